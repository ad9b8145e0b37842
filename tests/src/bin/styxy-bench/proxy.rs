//! `styxy-bench proxy`: the names' proxy side by side with a direct connection to the same
//! server, and with a Caddy `reverse_proxy` when Caddy is installed (Debian `caddy`): keep-alive
//! GETs of a small body — p50/p99 of one client's sequential requests, and the requests per
//! second of 32 clients — in two alternating rounds; a WebSocket echo's round trip direct and
//! through the proxy (`proxy_websocket`); and the daemon's resident memory idle and with 1,000
//! idle client connections at the proxy. The proxy runs twice, polling after traffic (the
//! default `--proxy-spin-us`) and sleeping between events (`--proxy-spin-us 0`), with the CPU
//! time each daemon spends a request; two byte relays (`relay`) give the floors of a hop in user
//! space, with wake-ups and without, and for the WebSocket a third, spliced in the kernel
//! (`kernel_splice`). A benchmark, not a test: it asserts nothing
//! about time.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use styxy_tests::Daemon;

use crate::others;

/// Sequential requests of the latency run (after as many to warm up).
const SEQUENTIAL: usize = 5000;
/// Clients and seconds of the throughput run.
const CLIENTS: usize = 32;
const SECONDS: u64 = 3;
/// The body the server answers with.
const BODY: &[u8] = b"hello from the upstream\n";

/// One way to reach the server: where to connect, and the `Host` to send.
struct Target {
    label: &'static str,
    addr: SocketAddr,
    host: String,
    /// The process whose CPU time the sequential run reads (the daemons'), if any.
    cpu_of: Option<u32>,
}

pub async fn run() -> Result<()> {
    println!(
        "Names' proxy benchmark — keep-alive GETs of a {}-byte body, side by side\n",
        BODY.len()
    );
    let daemon = Daemon::start_with(&["--proxy", "127.0.0.1:0"]).await?;
    // A port of the daemon's block: one in the ephemeral range that its command does not name
    // would be a helper's, with no name.
    let upstream = start_upstream(daemon.base + 50)?;
    let proxy_port = daemon.proxy_port().await?;
    let name = format!("{}.localhost", upstream.port());
    let mut targets = vec![
        Target {
            label: "direct",
            addr: upstream,
            host: format!("127.0.0.1:{}", upstream.port()),
            cpu_of: None,
        },
        Target {
            label: "styxy proxy",
            addr: SocketAddr::from(([127, 0, 0, 1], proxy_port)),
            host: name.clone(),
            cpu_of: Some(daemon.pid()),
        },
    ];
    // The daemon names the server once its table has it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while get_once(&targets[1]).is_err() {
        if Instant::now() > deadline {
            bail!("the proxy does not reach {name}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The same proxy with its threads sleeping between events (`--proxy-spin-us 0`): what the
    // polling window buys, side by side.
    let sleeping = Daemon::start_with(&["--proxy", "127.0.0.1:0", "--proxy-spin-us", "0"]).await?;
    let sleeping_port = sleeping.proxy_port().await?;
    targets.push(Target {
        label: "styxy proxy, no spin",
        addr: SocketAddr::from(([127, 0, 0, 1], sleeping_port)),
        host: name.clone(),
        cpu_of: Some(sleeping.pid()),
    });
    // The floor of a blocking relay: one that knows no HTTP (see `relay`).
    let relay = crate::relay::start(upstream)?;
    targets.push(Target {
        label: "blocking byte relay",
        addr: relay,
        host: format!("127.0.0.1:{}", upstream.port()),
        cpu_of: None,
    });
    let polling_relay = crate::relay::start_polling(upstream)?;
    targets.push(Target {
        label: "polling byte relay",
        addr: polling_relay,
        host: format!("127.0.0.1:{}", upstream.port()),
        cpu_of: None,
    });
    // The others, each killed when the run ends.
    let mut _others = Vec::new();
    match others::start_caddy(upstream)? {
        Some((running, addr)) => {
            targets.push(Target {
                label: "caddy reverse_proxy",
                addr,
                host: format!("127.0.0.1:{}", addr.port()),
                cpu_of: None,
            });
            _others.push(running);
        }
        None => println!(
            "(caddy is not installed: `apt-get install caddy` adds it to the comparison)\n"
        ),
    }
    match others::start_portless(upstream)? {
        Some((running, addr, host)) => {
            targets.push(Target {
                label: "portless",
                addr,
                host,
                cpu_of: None,
            });
            _others.push(running);
        }
        None => {
            println!("(portless is not installed: `cargo xtask setup` adds it to the comparison)\n")
        }
    }
    for other in &targets[2..] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while get_once(other).is_err() {
            if Instant::now() > deadline {
                bail!("{} did not answer on {}", other.label, other.addr);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let mut rows: Vec<(&str, f64, f64, f64)> = Vec::new();
    for round in 1..=2 {
        for target in &targets {
            let (p50, p99, cpu) = latency(target)?;
            let rate = throughput(target)?;
            let cpu = cpu.map_or(String::new(), |cpu| {
                format!("   daemon CPU {cpu:>5.1} µs a request")
            });
            println!(
                "round {round}  {:<22} p50 {:>7.1} µs   p99 {:>7.1} µs   {:>8.0} req/s ({CLIENTS} clients){cpu}",
                target.label, p50, p99, rate
            );
            rows.push((target.label, p50, p99, rate));
        }
    }
    println!();
    for round in rows.chunks(targets.len()) {
        let direct = round[0];
        for other in &round[1..] {
            println!(
                "{:<22} adds p50 {:>6.1} µs, p99 {:>6.1} µs over direct; throughput {:.2}× direct",
                other.0,
                other.1 - direct.1,
                other.2 - direct.2,
                other.3 / direct.3
            );
        }
    }
    for (n, other) in targets.iter().enumerate().skip(2) {
        for round in rows.chunks(targets.len()) {
            println!(
                "styxy proxy throughput {:.2}× {}'s",
                round[1].3 / round[n].3,
                other.label
            );
        }
    }
    let echo = crate::proxy_websocket::start_echo(daemon.base + 51)?;
    let mut relays = vec![
        ("blocking byte relay", crate::relay::start(echo)?),
        ("polling byte relay", crate::relay::start_polling(echo)?),
    ];
    // The kernel's own splice, where this machine can load it (`ebpf_ready` says why not).
    if let Some(setup) = styxy_tests::ebpf_ready() {
        relays.push((
            "kernel splice relay",
            crate::kernel_splice::start(echo, &setup.object)?,
        ));
    }
    crate::proxy_websocket::run(
        echo,
        &[
            ("styxy proxy", proxy_port),
            ("styxy proxy, no spin", sleeping_port),
        ],
        &relays,
    )?;
    drop(sleeping);
    // Memory: the daemon idle, then holding 1,000 idle connections at the proxy.
    let pid = daemon.pid();
    let idle = rss_mb(pid)?;
    let held: Vec<TcpStream> = (0..1000)
        .filter_map(|_| TcpStream::connect(targets[1].addr).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let holding = rss_mb(pid)?;
    drop(held);
    println!(
        "\ndaemon resident memory: {idle:.1} MB after the runs; {holding:.1} MB holding 1,000 idle proxy connections"
    );
    // What the proxy itself costs idle: two fresh daemons side by side, one without it.
    drop(daemon);
    let without = Daemon::start_with(&[]).await?;
    let with =
        Daemon::start_with(&["--proxy", "127.0.0.1:0", "--proxy-tls", "127.0.0.1:0"]).await?;
    std::thread::sleep(Duration::from_secs(1));
    let (bare, proxied) = (rss_mb(without.pid())?, rss_mb(with.pid())?);
    println!(
        "fresh idle daemons: {bare:.1} MB without the proxy, {proxied:.1} MB with it (http and https): the proxy {:+.1} MB",
        proxied - bare
    );
    Ok(())
}

/// A small HTTP/1.1 server on loopback `port` answering every request with [`BODY`], one thread
/// per connection: its address.
fn start_upstream(port: u16) -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", port))?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || serve_connection(stream));
        }
    });
    Ok(addr)
}

fn serve_connection(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let answer = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
        BODY.len()
    );
    let mut answer = answer.into_bytes();
    answer.extend_from_slice(BODY);
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        // One request head at a time (GETs have no body).
        while let Some(end) = find(&buf, b"\r\n\r\n") {
            buf.drain(..end + 4);
            if stream.write_all(&answer).is_err() {
                return;
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A keep-alive client connection that sends GETs and reads whole answers.
struct Client {
    stream: TcpStream,
    request: Vec<u8>,
    buf: Vec<u8>,
}

impl Client {
    fn connect(target: &Target) -> Result<Client> {
        let stream = TcpStream::connect(target.addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Client {
            stream,
            request: format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", target.host).into_bytes(),
            buf: Vec::with_capacity(4096),
        })
    }

    /// One GET; fails on anything but a 200 with the body.
    fn get(&mut self) -> Result<()> {
        self.stream.write_all(&self.request)?;
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .context("a content-length")?;
                if self.buf.len() >= end + 4 + length {
                    if !head.starts_with("http/1.1 200") {
                        bail!("not a 200: {head}");
                    }
                    self.buf.drain(..end + 4 + length);
                    return Ok(());
                }
            }
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                bail!("closed");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn get_once(target: &Target) -> Result<()> {
    Client::connect(target)?.get()
}

/// p50 and p99 (µs) of sequential GETs on one connection.
/// p50 and p99 of one client's sequential keep-alive GETs, in µs, and the CPU time the target's
/// process spent a request over them (all its threads), when it has one to read.
fn latency(target: &Target) -> Result<(f64, f64, Option<f64>)> {
    let mut client = Client::connect(target)?;
    for _ in 0..SEQUENTIAL {
        client.get()?;
    }
    let cpu_before = target.cpu_of.map(cpu_ns).transpose()?;
    let mut times = Vec::with_capacity(SEQUENTIAL);
    for _ in 0..SEQUENTIAL {
        let started = Instant::now();
        client.get()?;
        times.push(started.elapsed());
    }
    let cpu = match (target.cpu_of, cpu_before) {
        (Some(pid), Some(before)) => Some((cpu_ns(pid)? - before) as f64 / 1e3 / SEQUENTIAL as f64),
        _ => None,
    };
    times.sort();
    let at = |p: f64| times[((times.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
    Ok((at(0.50), at(0.99), cpu))
}

/// The CPU time all of `pid`'s threads have had, in ns.
fn cpu_ns(pid: u32) -> Result<u64> {
    Ok(styxy_tests::cpu_time(pid, |_| true)?.as_nanos() as u64)
}

/// Requests per second of `CLIENTS` keep-alive clients, each sending as fast as it is answered.
fn throughput(target: &Target) -> Result<f64> {
    let done = Arc::new(AtomicUsize::new(0));
    let running = Arc::new(AtomicBool::new(true));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let mut client = Client::connect(target)?;
        let done = done.clone();
        let running = running.clone();
        clients.push(std::thread::spawn(move || -> Result<()> {
            while running.load(Ordering::Relaxed) {
                client.get()?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }));
    }
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(SECONDS));
    let count = done.load(Ordering::Relaxed);
    let elapsed = started.elapsed();
    running.store(false, Ordering::Relaxed);
    for client in clients {
        client
            .join()
            .map_err(|_| anyhow::anyhow!("a client panicked"))??;
    }
    Ok(count as f64 / elapsed.as_secs_f64())
}

/// The daemon's resident memory, in MB.
fn rss_mb(pid: u32) -> Result<f64> {
    Ok(super::footprint::usage(pid)?.0)
}
