//! Times one socket call for the shim and kernel benchmarks: `call-timer bind|connect|close|getsockopt
//! PORT COUNT` opens a TCP socket, binds 127.0.0.1:PORT (0 for an ephemeral port) or connects to it, and
//! closes it, COUNT times, timing only the `bind()` or `connect()` call — or, for `close`, the
//! `close()` of the socket just bound (what the kernel's `sock_release` program adds to), or, for
//! `getsockopt`, a `getsockopt(SO_ERROR)` on it (no program of Styxy's sees one: the control), after a few untimed warm-up calls (the
//! first load the client library or map the session table). Prints `ok FAILED NS…` (failed calls,
//! then every latency in nanoseconds) on one line.

use std::time::Instant;

/// Untimed calls before the timed ones.
const WARMUP: usize = 20;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(call), Some(port), Some(count)) = (
        args.first()
            .map(String::as_str)
            .filter(|c| ["bind", "connect", "close", "getsockopt"].contains(c)),
        args.get(1).and_then(|a| a.parse::<u16>().ok()),
        args.get(2).and_then(|a| a.parse::<usize>().ok()),
    ) else {
        eprintln!("usage: call-timer bind|connect|close|getsockopt PORT COUNT");
        std::process::exit(2);
    };
    // SAFETY: sockaddr_in is plain data.
    let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sin.sin_family = libc::AF_INET as libc::sa_family_t;
    sin.sin_port = port.to_be();
    sin.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let mut latencies = Vec::with_capacity(count);
    let mut failed = 0;
    for round in 0..WARMUP + count {
        // SAFETY: plain socket syscalls on a descriptor this loop owns and closes.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            if fd < 0 {
                eprintln!("socket: {}", std::io::Error::last_os_error());
                std::process::exit(1);
            }
            let (rc, took) = if call == "getsockopt" {
                let mut error: libc::c_int = 0;
                let mut error_len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
                let started = Instant::now();
                let rc = libc::getsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_ERROR,
                    (&raw mut error).cast(),
                    &mut error_len,
                );
                let took = started.elapsed().as_nanos() as u64;
                libc::close(fd);
                (rc, took)
            } else if call == "close" {
                let bound = libc::bind(fd, (&raw const sin).cast(), len);
                let started = Instant::now();
                let closed = libc::close(fd);
                (bound | closed, started.elapsed().as_nanos() as u64)
            } else {
                let started = Instant::now();
                let rc = if call == "bind" {
                    libc::bind(fd, (&raw const sin).cast(), len)
                } else {
                    libc::connect(fd, (&raw const sin).cast(), len)
                };
                let took = started.elapsed().as_nanos() as u64;
                libc::close(fd);
                (rc, took)
            };
            if round >= WARMUP {
                latencies.push(took);
                failed += usize::from(rc != 0);
            }
        }
    }
    let list: Vec<String> = latencies.iter().map(u64::to_string).collect();
    println!("ok {failed} {}", list.join(" "));
}
