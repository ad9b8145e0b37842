//! A byte relay on loopback for `styxy-bench proxy`: each accepted connection joined to one of
//! its own to the server, two blocking threads copying bytes, no HTTP at all. No proxy in user
//! space can add less than these two more hops through the kernel's loopback and the wake-ups
//! they take (a blocking read is woken straight from the socket, without an epoll round), so
//! what it adds is the floor the proxy's figures are read against on the machine they ran on.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};

use anyhow::Result;

/// A relay to `server` on a loopback port of its own: its address.
pub fn start(server: SocketAddr) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(upstream) = TcpStream::connect(server) else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let (Ok(client_side), Ok(upstream_side)) = (client.try_clone(), upstream.try_clone())
            else {
                continue;
            };
            std::thread::spawn(move || pump(client, upstream_side));
            std::thread::spawn(move || pump(upstream, client_side));
        }
    });
    Ok(addr)
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
