//! `styxy-bench proxy`'s WebSocket part: the round trip of a small message echoed by a
//! WebSocket server (tungstenite, one thread per connection), direct, through the names' proxy's
//! tunnel and through a byte relay (`relay`, the floor of any tunnel in user space), alternated
//! in two rounds. A benchmark, not a test: it asserts nothing about
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
pub fn run(echo: SocketAddr, proxy_port: u16, relay: SocketAddr) -> Result<()> {
    let proxy = SocketAddr::from(([127, 0, 0, 1], proxy_port));
    let direct_url = format!("ws://127.0.0.1:{}/", echo.port());
    let named_url = format!("ws://{}.localhost:{proxy_port}/", echo.port());
    // The daemon names the server once its table has it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while connect(proxy, &named_url).is_err() {
        if Instant::now() > deadline {
            bail!("the proxy does not reach {named_url}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "\nWebSocket echo of a {}-byte message, round trips, side by side\n",
        MESSAGE.len()
    );
    let mut ratios = Vec::new();
    for round in 1..=2 {
        let direct = round_trips(echo, &direct_url).context("direct")?;
        let named = round_trips(proxy, &named_url).context("through the proxy")?;
        let relayed = round_trips(relay, &direct_url).context("through the byte relay")?;
        for (label, (p50, p99)) in [
            ("direct", direct),
            ("styxy proxy", named),
            ("byte relay", relayed),
        ] {
            println!("round {round}  {label:<12} p50 {p50:>7.1} µs   p99 {p99:>7.1} µs");
        }
        ratios.push((named.0 / direct.0, named.1 / direct.1, relayed.0 / direct.0));
    }
    for (p50, p99, floor) in ratios {
        println!(
            "styxy proxy WebSocket round trip: {p50:.2}× direct at p50, {p99:.2}× at p99 \
             (the byte relay, the floor: {floor:.2}× at p50)"
        );
    }
    Ok(())
}
