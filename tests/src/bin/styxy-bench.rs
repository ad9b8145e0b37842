//! `cargo xtask bench`: Styxy's broker measured side by side with its closest peer, portpicker's
//! `portserver.py`, in one run on this machine. Prints throughput and p50/p99 latency for Allocate and
//! Suggest over the Unix socket with 1 and 32 concurrent clients, the same number of portserver
//! allocations, and the ratios. A benchmark, not a test: it asserts nothing about time.

use std::io::{Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use styxy_tests::v1 as pb;
use styxy_tests::Daemon;

/// Operations per scenario.
const OPS: usize = 4000;

struct Measured {
    label: String,
    ops: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
    fn pct(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
    }
    fn print(&self) {
        println!(
            "{:<44} {:>7} ops {:>10.0} ops/s   p50 {:>8.1} µs   p99 {:>8.1} µs",
            self.label,
            self.ops,
            self.rate(),
            self.pct(0.50).as_secs_f64() * 1e6,
            self.pct(0.99).as_secs_f64() * 1e6
        );
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    println!("Styxy broker benchmark — {OPS} operations per scenario, side by side\n");
    let mut results = Vec::new();
    for clients in [1, 32] {
        let daemon = Daemon::start().await?;
        results.push(styxy_allocate(&daemon, clients).await?);
        results.push(styxy_suggest(&daemon, clients).await?);
        results.push(portserver_allocate(clients)?);
    }
    for r in &results {
        r.print();
    }
    println!();
    for pair in results.chunks(3) {
        let (styxy, peer) = (&pair[0], &pair[2]);
        println!(
            "ratio {:<38} {:>6.1}× the throughput of portserver, p50 latency {:.2}× of portserver's",
            styxy.label,
            styxy.rate() / peer.rate(),
            styxy.pct(0.5).as_secs_f64() / peer.pct(0.5).as_secs_f64()
        );
    }
    Ok(())
}

/// Runs `per_client(client_index)` on `clients` concurrent tasks, each with its own connection, for OPS
/// operations in all.
async fn styxy_run<F, Fut>(
    daemon: &Daemon,
    clients: usize,
    label: String,
    op: F,
) -> Result<Measured>
where
    F: Fn(styxy_proto::v1::port_broker_client::PortBrokerClient<tonic::transport::Channel>) -> Fut
        + Clone
        + Send
        + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(daemon.client().await?);
    }
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for client in conns {
        let op = op.clone();
        tasks.spawn(async move {
            let mut lat = Vec::with_capacity(OPS / clients);
            for _ in 0..OPS / clients {
                let t = Instant::now();
                op(client.clone()).await?;
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        });
    }
    let mut latencies = Vec::new();
    while let Some(r) = tasks.join_next().await {
        latencies.extend(r??);
    }
    Ok(Measured {
        label,
        ops: latencies.len(),
        elapsed: start.elapsed(),
        latencies,
    })
}

async fn styxy_allocate(daemon: &Daemon, clients: usize) -> Result<Measured> {
    styxy_run(
        daemon,
        clients,
        format!("styxy Allocate, {clients} client(s)"),
        |mut c| async move {
            c.allocate(pb::AllocateRequest {
                service_type: "bench".into(),
                ..Default::default()
            })
            .await?;
            Ok(())
        },
    )
    .await
}

async fn styxy_suggest(daemon: &Daemon, clients: usize) -> Result<Measured> {
    styxy_run(
        daemon,
        clients,
        format!("styxy Suggest, {clients} client(s)"),
        |mut c| async move {
            c.suggest(pb::SuggestRequest {
                service_type: "api".into(),
                count: 1,
            })
            .await?;
            Ok(())
        },
    )
    .await
}

/// portpicker's portserver, started on an abstract Unix socket with a pool of its own.
fn portserver_allocate(clients: usize) -> Result<Measured> {
    let name = format!("styxy-bench-portserver-{}-{clients}", std::process::id());
    let script = find_portserver()?;
    let mut server = KillOnDrop(
        Command::new("python3")
            .arg(&script)
            .arg(format!("--portserver_address=@{name}"))
            .arg("--portserver_static_pool=40000-49999")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting portserver.py")?,
    );
    let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect_addr(&addr).is_err() {
        if Instant::now() > deadline {
            bail!("portserver did not start");
        }
        if let Some(status) = server.0.try_wait()? {
            bail!("portserver exited: {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = std::process::id();
    let start = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || -> Result<Vec<Duration>> {
                let mut lat = Vec::with_capacity(OPS / clients);
                for _ in 0..OPS / clients {
                    let t = Instant::now();
                    let mut s = UnixStream::connect_addr(&addr)?;
                    s.write_all(format!("{pid}\n").as_bytes())?;
                    s.shutdown(std::net::Shutdown::Write)?;
                    let mut reply = String::new();
                    s.read_to_string(&mut reply)?;
                    reply
                        .trim()
                        .parse::<u16>()
                        .with_context(|| format!("portserver replied {reply:?}"))?;
                    lat.push(t.elapsed());
                }
                Ok(lat)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for t in threads {
        latencies.extend(
            t.join()
                .map_err(|_| anyhow::anyhow!("client thread panicked"))??,
        );
    }
    Ok(Measured {
        label: format!("portserver.py allocate, {clients} client(s)"),
        ops: latencies.len(),
        elapsed: start.elapsed(),
        latencies,
    })
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn find_portserver() -> Result<String> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()?;
    let path = format!(
        "{}/portserver.py",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    if std::path::Path::new(&path).exists() {
        Ok(path)
    } else {
        bail!("{path} not found: pip install portpicker (cargo xtask setup does it)")
    }
}
