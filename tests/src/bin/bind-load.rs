//! Load for the eBPF observer benchmark: `bind-load RATE COUNT [FIRST LAST]` binds a TCP socket
//! to 127.0.0.1 and closes it, COUNT times, paced at RATE binds per second (0: as fast as it
//! can): on port 0, or on the ports FIRST..=LAST in turn (explicit ports in a service range are
//! what the kernel programs report one by one; ports others hold are skipped). Prints `done COUNT SECONDS`.

use std::time::{Duration, Instant};

fn bind_and_close(port: u16) -> std::io::Result<()> {
    // SAFETY: plain socket syscalls on a descriptor this function owns and closes.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut sin: libc::sockaddr_in = std::mem::zeroed();
        sin.sin_family = libc::AF_INET as libc::sa_family_t;
        sin.sin_port = port.to_be();
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
    let (rate, count, ports) = match args[..] {
        [rate, count] => (rate, count, 0..=0),
        [rate, count, first, last] if first <= last && last <= 65_535 => {
            (rate, count, first as u16..=last as u16)
        }
        _ => {
            eprintln!("usage: bind-load RATE COUNT [FIRST LAST]");
            std::process::exit(2);
        }
    };
    let mut next = ports.clone().cycle();
    let started = Instant::now();
    for done in 0..count {
        if rate > 0 {
            // Stay on schedule: never ahead of done/rate seconds.
            let due = Duration::from_secs_f64(done as f64 / rate as f64);
            while started.elapsed() < due {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        // A port some other program holds is skipped: COUNT binds succeed.
        let mut result = bind_and_close(next.next().unwrap_or(0));
        for _ in 0..100 {
            match &result {
                Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {
                    result = bind_and_close(next.next().unwrap_or(0));
                }
                _ => break,
            }
        }
        if let Err(e) = result {
            eprintln!("bind: {e}");
            std::process::exit(1);
        }
    }
    println!("done {count} {:.3}", started.elapsed().as_secs_f64());
}
