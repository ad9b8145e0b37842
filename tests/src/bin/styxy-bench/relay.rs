//! Byte relays on loopback for `styxy-bench proxy`: each accepted connection joined to one of
//! its own to the server, bytes copied both ways, no HTTP at all — the floors the proxy's
//! figures are read against on the machine they ran on. [`start`]: two blocking threads per
//! connection, each woken straight from its socket (no epoll round): what a hop costs with a
//! wake-up each way. [`start_polling`]: one thread per connection that, like the proxy's
//! threads (`--proxy-spin-us`), keeps polling both sockets for the same window after traffic
//! before it sleeps: no tunnel in user space adds less than its two more hops through the
//! kernel's loopback with no wake-up at all.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::Result;

/// How long the polling relay polls after traffic: the daemon's default `--proxy-spin-us`.
const POLLING_WINDOW: Duration = Duration::from_micros(200);

/// A polling relay to `server` on a loopback port of its own: its address.
pub fn start_polling(server: SocketAddr) -> Result<SocketAddr> {
    relay_to(server, |client, upstream| {
        std::thread::spawn(move || {
            let _ = poll_both(client, upstream);
        });
    })
}

/// Accepts on a loopback port of its own, connects each client to `server` and hands the two
/// to `join`: its address.
pub fn relay_to(
    server: SocketAddr,
    join: impl Fn(TcpStream, TcpStream) + Send + 'static,
) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            if let Ok(upstream) = TcpStream::connect(server) {
                join(client, upstream);
            }
        }
    });
    Ok(addr)
}

/// Copies bytes both ways between `a` and `b` until either ends, polling for the window after
/// each read that brought some, sleeping in `poll(2)` otherwise.
fn poll_both(mut a: TcpStream, mut b: TcpStream) -> std::io::Result<()> {
    for stream in [&a, &b] {
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
    }
    let mut buffer = [0u8; 16 * 1024];
    let mut last = Instant::now();
    loop {
        let mut moved = false;
        for a_to_b in [true, false] {
            let (from, to) = if a_to_b {
                (&mut a, &mut b)
            } else {
                (&mut b, &mut a)
            };
            match from.read(&mut buffer) {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    write_fully(to, &buffer[..n])?;
                    moved = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if moved {
            last = Instant::now();
        } else if last.elapsed() < POLLING_WINDOW {
            std::thread::yield_now();
        } else {
            let mut fds = [a.as_raw_fd(), b.as_raw_fd()].map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
            // SAFETY: fds is a valid array of two pollfd for poll to fill in.
            unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        }
    }
}

/// Writes all of `bytes` to a non-blocking `to`, waiting in `poll(2)` while it is full.
fn write_fully(to: &mut TcpStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match to.write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                let mut fd = libc::pollfd {
                    fd: to.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: fd is a valid pollfd for poll to fill in.
                unsafe { libc::poll(&mut fd, 1, -1) };
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A blocking relay to `server` on a loopback port of its own: its address.
pub fn start(server: SocketAddr) -> Result<SocketAddr> {
    relay_to(server, |client, upstream| {
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let (Ok(client_side), Ok(upstream_side)) = (client.try_clone(), upstream.try_clone())
        else {
            return;
        };
        std::thread::spawn(move || pump(client, upstream_side));
        std::thread::spawn(move || pump(upstream, client_side));
    })
}

/// Copies `from` to `to` until `from` ends, then ends `to`'s writing.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buffer = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buffer[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
