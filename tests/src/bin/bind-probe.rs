//! A small program the shim tests run under `LD_PRELOAD`: it binds in the ways real servers do
//! (after `fork()`, from many threads at once, inside a tokio runtime, with SO_REUSEPORT) and prints
//! one line per bind, `bound REQUESTED ACTUAL` or `failed REQUESTED ERRNO`, then waits for stdin to
//! close (so the sockets stay bound while the test looks) unless told `--exit`. Mode `stdin` binds
//! one port per line read from stdin (`PORT`, or `ADDRESS PORT` such as `::1 6006`), so a test can
//! change the world between two binds of one process.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Barrier};

fn report(requested: u16, result: std::io::Result<u16>) {
    let line = match result {
        Ok(actual) => format!("bound {requested} {actual}\n"),
        Err(e) => format!("failed {requested} {}\n", e.raw_os_error().unwrap_or(0)),
    };
    // One write per line so lines from threads and processes never interleave.
    let _ = std::io::stdout().lock().write_all(line.as_bytes());
    let _ = std::io::stdout().flush();
}

fn listen(addr: &str, port: u16) -> std::io::Result<TcpListener> {
    TcpListener::bind(format!("{addr}:{port}"))
}

fn bound_port(listener: &std::io::Result<TcpListener>) -> std::io::Result<u16> {
    match listener {
        Ok(l) => l.local_addr().map(|a| a.port()),
        Err(e) => Err(std::io::Error::from_raw_os_error(
            e.raw_os_error().unwrap_or(0),
        )),
    }
}

/// A TCP socket with SO_REUSEPORT set, bound to 127.0.0.1:port and listening.
fn listen_reuseport(port: u16) -> std::io::Result<TcpListener> {
    // SAFETY: plain socket syscalls on a descriptor this function owns; every result is checked.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let listener = <TcpListener as std::os::fd::FromRawFd>::from_raw_fd(fd);
        let one: libc::c_int = 1;
        if libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEPORT,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        let mut sin: libc::sockaddr_in = std::mem::zeroed();
        sin.sin_family = libc::AF_INET as libc::sa_family_t;
        sin.sin_port = port.to_be();
        sin.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
        if libc::bind(
            listener.as_raw_fd(),
            (&raw const sin).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        if libc::listen(fd, 16) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(listener)
    }
}

fn ports(args: &[String]) -> Vec<u16> {
    args.iter()
        .map(|a| a.parse().unwrap_or_else(|_| panic!("not a port: {a}")))
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let exit_now = args.iter().any(|a| a == "--exit");
    let args: Vec<String> = args.into_iter().filter(|a| a != "--exit").collect();
    let Some((mode, rest)) = args.split_first() else {
        eprintln!(
            "usage: bind-probe fork|threads|tokio|dual|reuseport|errno|loaded|stdin PORT… [--exit]"
        );
        std::process::exit(2);
    };
    let mut keep = Vec::new();
    match mode.as_str() {
        // Bind the first port, fork, bind the second in the child (which reports and exits).
        "fork" => {
            let ports = ports(rest);
            let first = listen("127.0.0.1", ports[0]);
            report(ports[0], bound_port(&first));
            keep.push(first);
            // SAFETY: the child only binds, writes and exits.
            match unsafe { libc::fork() } {
                0 => {
                    let second = listen("127.0.0.1", ports[1]);
                    report(ports[1], bound_port(&second));
                    // SAFETY: leave without running the parent's atexit handlers twice.
                    unsafe { libc::_exit(0) };
                }
                child if child > 0 => {
                    let mut status = 0;
                    // SAFETY: waiting for our own child.
                    unsafe { libc::waitpid(child, &mut status, 0) };
                }
                _ => panic!("fork failed: {}", std::io::Error::last_os_error()),
            }
        }
        // Every port from its own thread, all released at the same moment.
        "threads" => {
            let ports = ports(rest);
            let barrier = Arc::new(Barrier::new(ports.len()));
            let handles: Vec<_> = ports
                .into_iter()
                .map(|port| {
                    let barrier = barrier.clone();
                    std::thread::spawn(move || {
                        barrier.wait();
                        let listener = listen("127.0.0.1", port);
                        report(port, bound_port(&listener));
                        listener
                    })
                })
                .collect();
            for h in handles {
                keep.push(h.join().expect("binding thread"));
            }
        }
        // Bind from inside the host's own tokio runtime.
        "tokio" => {
            let port = ports(rest)[0];
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let listener = runtime.block_on(async move {
                let addr: SocketAddr = ([127, 0, 0, 1], port).into();
                let l = tokio::net::TcpListener::bind(addr).await;
                report(
                    port,
                    l.as_ref()
                        .map_err(|e| {
                            std::io::Error::from_raw_os_error(e.raw_os_error().unwrap_or(0))
                        })
                        .and_then(|l| l.local_addr().map(|a| a.port())),
                );
                l.and_then(|l| l.into_std())
            });
            keep.push(listener);
        }
        // One server on IPv4 and IPv6 loopback: 127.0.0.1:PORT, then [::1]:PORT.
        "dual" => {
            let port = ports(rest)[0];
            for addr in ["127.0.0.1", "[::1]"] {
                let l = listen(addr, port);
                report(port, bound_port(&l));
                keep.push(l);
            }
        }
        // Two SO_REUSEPORT sockets on the same port.
        "reuseport" => {
            let port = ports(rest)[0];
            for _ in 0..2 {
                let l = listen_reuseport(port);
                report(port, bound_port(&l));
                keep.push(l);
            }
        }
        // errno as the host left it survives a bind that succeeds (moved or not).
        "errno" => {
            let port = ports(rest)[0];
            // SAFETY: plain socket calls on a descriptor this block owns; errno is this thread's.
            unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                let mut sin: libc::sockaddr_in = std::mem::zeroed();
                sin.sin_family = libc::AF_INET as libc::sa_family_t;
                sin.sin_port = port.to_be();
                sin.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
                *libc::__errno_location() = libc::EAGAIN;
                let rc = libc::bind(
                    fd,
                    (&raw const sin).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                );
                let errno_after = *libc::__errno_location();
                let mut bound: libc::sockaddr_in = std::mem::zeroed();
                let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
                libc::getsockname(fd, (&raw mut bound).cast(), &mut len);
                println!(
                    "rc {rc} errno {errno_after} port {}",
                    u16::from_be(bound.sin_port)
                );
                libc::close(fd);
            }
        }
        // Whether the gRPC client library got loaded: after a port-0 bind it must not be.
        "loaded" => {
            let l = listen("127.0.0.1", 0);
            report(0, bound_port(&l));
            keep.push(l);
            let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
            println!(
                "preload {} client {}",
                maps.contains("libstyxy_preload.so"),
                maps.contains("libstyxy_shim_client.so")
            );
        }
        // One bind per port read from stdin, until it closes.
        "stdin" => {
            for line in std::io::stdin().lines() {
                // `PORT`, or `ADDRESS PORT` (`::1 6006`); 127.0.0.1 by default.
                let line = line.unwrap_or_default();
                let (addr, port) = match line.split_whitespace().collect::<Vec<_>>()[..] {
                    [port] => ("127.0.0.1".to_string(), port),
                    [addr, port] if addr.contains(':') => (format!("[{addr}]"), port),
                    [addr, port] => (addr.to_string(), port),
                    _ => break,
                };
                let Ok(port) = port.parse::<u16>() else {
                    break;
                };
                let listener = listen(&addr, port);
                report(port, bound_port(&listener));
                keep.push(listener);
            }
        }
        other => {
            eprintln!("unknown mode {other}");
            std::process::exit(2);
        }
    }
    if !exit_now {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
    }
    drop(keep);
}
