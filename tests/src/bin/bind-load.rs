//! Load for the eBPF observer benchmark: `bind-load RATE COUNT` binds a TCP socket to
//! 127.0.0.1:0 and closes it, COUNT times, paced at RATE binds per second (0: as fast as it can).
//! Prints `done COUNT SECONDS`.

use std::time::{Duration, Instant};

fn bind_and_close() -> std::io::Result<()> {
    // SAFETY: plain socket syscalls on a descriptor this function owns and closes.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut sin: libc::sockaddr_in = std::mem::zeroed();
        sin.sin_family = libc::AF_INET as libc::sa_family_t;
        sin.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
        let rc = libc::bind(
            fd,
            (&raw const sin).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        let error = std::io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(error);
        }
    }
    Ok(())
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let [rate, count] = args[..] else {
        eprintln!("usage: bind-load RATE COUNT");
        std::process::exit(2);
    };
    let started = Instant::now();
    for done in 0..count {
        if rate > 0 {
            // Stay on schedule: never ahead of done/rate seconds.
            let due = Duration::from_secs_f64(done as f64 / rate as f64);
            while started.elapsed() < due {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        if let Err(e) = bind_and_close() {
            eprintln!("bind: {e}");
            std::process::exit(1);
        }
    }
    println!("done {count} {:.3}", started.elapsed().as_secs_f64());
}
