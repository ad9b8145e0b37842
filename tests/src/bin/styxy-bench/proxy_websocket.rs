//! `styxy-bench proxy`'s WebSocket part: the round trip of a small message echoed by a
//! WebSocket server (tungstenite, one thread per connection), direct, through the names' proxy's
//! tunnel (polling after traffic, and sleeping between events) and through byte relays
//! (`relay`: the floors of a tunnel in user space, with wake-ups and without; `kernel_splice`:
//! the kernel's own splice, where the bench may load it), alternated in
//! two rounds. A benchmark, not a test: it asserts nothing about
//! time.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tungstenite::{Message, WebSocket};

/// Round trips timed per run (after as many to warm up).
const ROUND_TRIPS: usize = 5000;
/// The message echoed.
const MESSAGE: &[u8] = b"hmr: {\"type\":\"update\",\"path\":\"/x.js\"}";

/// An echo server on loopback `port`: its address.
pub fn start_echo(port: u16) -> Result<SocketAddr> {
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = stream.set_nodelay(true);
                let Ok(mut socket) = tungstenite::accept(stream) else {
                    return;
                };
                while let Ok(message) = socket.read() {
                    if (message.is_binary() || message.is_text()) && socket.send(message).is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// A WebSocket to `url` over a connection to `addr` (the proxy, with the name in `url`).
fn connect(addr: SocketAddr, url: &str) -> Result<WebSocket<TcpStream>> {
    let stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let (socket, _) = tungstenite::client::client(url, stream)
        .map_err(|e| anyhow::anyhow!("WebSocket handshake with {url} via {addr}: {e}"))?;
    Ok(socket)
}

/// p50 and p99 of one client's sequential round trips, in µs.
fn round_trips(addr: SocketAddr, url: &str) -> Result<(f64, f64)> {
    let mut socket = connect(addr, url)?;
    let mut once = || -> Result<()> {
        socket.send(Message::binary(MESSAGE))?;
        match socket.read()? {
            Message::Binary(echo) if echo.as_ref() == MESSAGE => Ok(()),
            other => bail!("the echo was {other:?}"),
        }
    };
    for _ in 0..ROUND_TRIPS {
        once()?;
    }
    let mut times = Vec::with_capacity(ROUND_TRIPS);
    for _ in 0..ROUND_TRIPS {
        let started = Instant::now();
        once()?;
        times.push(started.elapsed());
    }
    times.sort();
    let at = |p: f64| times[((times.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
    Ok((at(0.50), at(0.99)))
}

/// Direct, through the proxy on `proxy_port` and through `relay` (a byte relay to `echo`), two
/// alternating rounds, printed.
pub fn run(echo: SocketAddr, proxies: &[(&str, u16)], relays: &[(&str, SocketAddr)]) -> Result<()> {
    let direct_url = format!("ws://127.0.0.1:{}/", echo.port());
    // Each way in: its label, where it connects, the URL it asks for.
    let mut ways = vec![("direct".to_string(), echo, direct_url.clone())];
    for (label, port) in proxies {
        let proxy = SocketAddr::from(([127, 0, 0, 1], *port));
        let named_url = format!("ws://{}.localhost:{port}/", echo.port());
        // The daemon names the server once its table has it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while connect(proxy, &named_url).is_err() {
            if Instant::now() > deadline {
                bail!("{label} does not reach {named_url}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        ways.push((label.to_string(), proxy, named_url));
    }
    for (label, relay) in relays {
        ways.push((label.to_string(), *relay, direct_url.clone()));
    }
    println!(
        "\nWebSocket echo of a {}-byte message, round trips, side by side\n",
        MESSAGE.len()
    );
    let mut rounds = Vec::new();
    for round in 1..=2 {
        let mut row = Vec::new();
        for (label, addr, url) in &ways {
            let (p50, p99) = round_trips(*addr, url).with_context(|| label.clone())?;
            println!("round {round}  {label:<22} p50 {p50:>7.1} µs   p99 {p99:>7.1} µs");
            row.push((p50, p99));
        }
        rounds.push(row);
    }
    for row in &rounds {
        let direct = row[0];
        for ((label, _, _), (p50, p99)) in ways.iter().zip(row).skip(1) {
            println!(
                "{label:<22} WebSocket round trip: {:.2}× direct at p50, {:.2}× at p99",
                p50 / direct.0,
                p99 / direct.1
            );
        }
    }
    Ok(())
}
