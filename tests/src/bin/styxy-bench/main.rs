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
    // `styxy-bench [broker|shim|ebpf|kernel|soak|footprint|proxy|guard]`: one part only; all by default.
    let only = std::env::args().nth(1);
    match only.as_deref() {
        Some("shim") => return shim::run().await,
        Some("ebpf") => return ebpf::run().await,
        Some("footprint") => return footprint::run().await,
        Some("kernel") => return kernel::run().await,
        Some("soak") => return soak::run().await,
        Some("proxy") => return proxy::run().await,
        Some("guard") => return guard::run().await,
        _ => {}
    }
    println!("Styxy broker benchmark — {OPS} operations per scenario, side by side\n");
    let mut results = Vec::new();
    for clients in [1, 32] {
        let daemon = production_daemon().await?;
        results.push(styxy_allocate(&daemon, clients).await?);
        results.push(styxy_suggest(&daemon, clients).await?);
        drop(daemon);
        // A fresh daemon: the leases of the run above would crowd the range.
        let daemon = production_daemon().await?;
        let socket = daemon.socket.clone();
        results.push(tokio::task::spawn_blocking(move || lean_allocate(&socket, clients)).await??);
        results.push(portserver_allocate(clients)?);
    }
    for r in &results {
        r.print();
    }
    println!();
    for group in results.chunks(4) {
        let peer = &group[3];
        for styxy in [&group[0], &group[2]] {
            println!(
                "ratio {:<44} {:>6.1}× the throughput of portserver, p50 latency {:.2}× of portserver's",
                styxy.label,
                styxy.rate() / peer.rate(),
                styxy.pct(0.5).as_secs_f64() / peer.pct(0.5).as_secs_f64()
            );
        }
    }
    println!(
        "(tonic client: what the CLI uses; lean client: the shim's HTTP/2 client, one blocking \
         thread per client like portserver's — both share the 2 cores with the daemon)"
    );
    // Where the time goes: Status (a reading of the daemon's state — sessions, focus, protection —
    // the nearest to a call that does no work the API has; no floor) and the shim's one call.
    let daemon = production_daemon().await?;
    let floor = styxy_run(
        &daemon,
        1,
        "Status (reads the state), 1 client".into(),
        |mut c| async move {
            c.status(pb::StatusRequest {}).await?;
            Ok(())
        },
    )
    .await?;
    let free = daemon.base + 150;
    let resolve = styxy_run(
        &daemon,
        1,
        "ResolveBind (free port), 1 client".into(),
        move |mut c| async move {
            c.resolve_bind(styxy_tests::resolve_bind_request(
                std::process::id(),
                free,
                pb::Protocol::Tcp,
            ))
            .await?;
            Ok(())
        },
    )
    .await?;
    // Its eBPF programs would observe (and slow) every bind of the benchmarks below.
    drop(daemon);
    println!();
    floor.print();
    resolve.print();
    if only.as_deref() == Some("broker") {
        return Ok(());
    }
    println!();
    shim::run().await?;
    println!();
    ebpf::run().await?;
    println!();
    kernel::run().await?;
    println!();
    soak::run().await?;
    println!();
    proxy::run().await?;
    println!();
    guard::run().await?;
    println!();
    footprint::run().await
}

mod calls;
mod guard;
mod kernel;
mod kernel_splice;
mod others;
mod program_time;
mod proxy;
mod proxy_websocket;
mod relay;
mod soak;

/// The daemon's footprint: resident memory and open descriptors idle, and after 10,000
/// short-lived servers; and how soon the port of a process that exited leaves the table, with
/// each observer.
mod footprint {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use anyhow::{Context, Result};
    use styxy_tests::v1 as pb;
    use styxy_tests::{helper_bin, Daemon};

    const SERVERS: usize = 10_000;

    /// (resident MB, open descriptors) of a process.
    pub(crate) fn usage(pid: u32) -> Result<(f64, usize)> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("VmRSS")?;
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
        Ok((kb / 1024.0, fds))
    }

    /// Nanoseconds per allocation + free through the system allocator and through the daemon's
    /// counting one, side by side (rounds alternate): two threads at once, as the daemon's
    /// two workers allocate, sizes cycling from 16 B to 4 KiB, 64 blocks live per thread.
    fn allocator_cost() -> (f64, f64) {
        use std::alloc::{GlobalAlloc, Layout, System};
        use styxy_daemon::heap::CountingAllocator;
        const CALLS: usize = 2_000_000;
        fn churn<A: GlobalAlloc + Sync>(allocator: &A) -> f64 {
            let started = Instant::now();
            std::thread::scope(|scope| {
                for _ in 0..2 {
                    scope.spawn(|| {
                        let mut live: Vec<(*mut u8, Layout)> = Vec::with_capacity(64);
                        for i in 0..CALLS {
                            let size = 16 << (i % 9);
                            let layout = Layout::from_size_align(size, 8).expect("a valid layout");
                            // SAFETY: a non-zero layout; each block is freed once, with its layout.
                            unsafe {
                                let block = allocator.alloc(layout);
                                assert!(!block.is_null(), "out of memory");
                                block.write(1);
                                if live.len() == 64 {
                                    let (old, old_layout) = live.swap_remove(i % 64);
                                    allocator.dealloc(old, old_layout);
                                }
                                live.push((block, layout));
                            }
                        }
                        for (block, layout) in live {
                            // SAFETY: allocated above with this layout, not yet freed.
                            unsafe { allocator.dealloc(block, layout) };
                        }
                    });
                }
            });
            started.elapsed().as_nanos() as f64 / CALLS as f64
        }
        let (mut system, mut counting) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            system.push(churn(&System));
            counting.push(churn(&CountingAllocator));
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        (median(&mut system), median(&mut counting))
    }

    /// Clients and seconds of the request flood.
    const FLOOD_CLIENTS: usize = 40;
    const FLOOD_SECONDS: u64 = 5;

    /// `FLOOD_CLIENTS` loopback TCP clients (open to any local process) sending 4 MB `Suggest`
    /// requests for `FLOOD_SECONDS`, the daemon's resident memory sampled meanwhile: (before, peak,
    /// 6 s after) in MB, and the requests answered (refused).
    async fn request_flood(daemon: &Daemon) -> Result<(f64, f64, f64, usize)> {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::Arc;
        let pid = daemon.pid();
        let before = usage(pid)?.0;
        let running = Arc::new(AtomicBool::new(true));
        let sampler = {
            let running = running.clone();
            tokio::spawn(async move {
                let mut peak = 0f64;
                while running.load(Ordering::Relaxed) {
                    if let Ok((mb, _)) = usage(pid) {
                        peak = peak.max(mb);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                peak
            })
        };
        let answered = Arc::new(AtomicUsize::new(0));
        let huge = "x".repeat(4 << 20);
        let deadline = Instant::now() + Duration::from_secs(FLOOD_SECONDS);
        let mut clients = Vec::new();
        for _ in 0..FLOOD_CLIENTS {
            let mut client = daemon
                .tcp_client()
                .await?
                .max_encoding_message_size(8 << 20)
                .max_decoding_message_size(8 << 20);
            let huge = huge.clone();
            let answered = answered.clone();
            clients.push(tokio::spawn(async move {
                while Instant::now() < deadline {
                    let request = pb::SuggestRequest {
                        service_type: huge.clone(),
                        count: 1,
                    };
                    if client.suggest(request).await.is_err() {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        for client in clients {
            client.await?;
        }
        running.store(false, Ordering::Relaxed);
        let peak = sampler.await?;
        // The daemon gives freed memory back every 5 s.
        tokio::time::sleep(Duration::from_secs(6)).await;
        let after = usage(pid)?.0;
        Ok((before, peak, after, answered.load(Ordering::Relaxed)))
    }

    /// How long until Observe no longer shows the port of a server that was just killed.
    async fn gone_after_exit(daemon: &Daemon, port: u16) -> Result<Duration> {
        let mut server = Command::new("python3")
            .args(["-c", "import socket, sys, time\ns = socket.socket()\ns.bind(('127.0.0.1', int(sys.argv[1])))\ns.listen(1)\nprint('up', flush=True)\ntime.sleep(60)\n"])
            .arg(port.to_string())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(server.stdout.take().context("stdout")?),
            &mut line,
        )?;
        let mut client = daemon.client().await?;
        // Seen bound first (the table has it), then killed.
        let seen_by = Instant::now() + Duration::from_secs(5);
        while Instant::now() < seen_by {
            let list = client
                .list_ports(pb::ListPortsRequest {})
                .await?
                .into_inner();
            if list.holders.iter().any(|h| h.port == u32::from(port)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        server.kill()?;
        server.wait()?;
        let killed = Instant::now();
        loop {
            let list = client
                .list_ports(pb::ListPortsRequest {})
                .await?
                .into_inner();
            if !list.holders.iter().any(|h| h.port == u32::from(port)) {
                return Ok(killed.elapsed());
            }
            anyhow::ensure!(
                killed.elapsed() < Duration::from_secs(120),
                "still listed after 120 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub async fn run() -> Result<()> {
        println!("Footprint — the daemon idle, and after {SERVERS} short-lived servers\n");
        let (system_ns, counting_ns) = tokio::task::block_in_place(allocator_cost);
        println!(
            "allocator: an allocation and its free, 16 B to 4 KiB, 2 threads: system {system_ns:.1} ns, \
             the daemon's counting allocator {counting_ns:.1} ns ({:.2}×; it counts the live heap for \
             Status and the metrics)",
            counting_ns / system_ns
        );
        let daemon = super::production_daemon().await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (idle_mb, idle_fds) = usage(daemon.pid())?;
        let heap_mb = |status: pb::StatusResponse| status.heap_live_bytes.unwrap_or(0) as f64 / 1e6;
        let idle_heap = heap_mb(daemon.status().await?);
        println!(
            "idle: resident {idle_mb:.1} MB (live heap {idle_heap:.2} MB), {idle_fds} open descriptors   target ≤ 20 MB"
        );
        let started = Instant::now();
        let mut running = Vec::new();
        for _ in 0..SERVERS {
            running.push(
                Command::new(helper_bin("bind-load"))
                    .args(["0", "1", "10100", "10199"])
                    .stdout(Stdio::null())
                    .spawn()?,
            );
            if running.len() >= 32 {
                for mut child in running.drain(..) {
                    child.wait()?;
                }
            }
        }
        for mut child in running {
            child.wait()?;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (after_mb, after_fds) = usage(daemon.pid())?;
        let after_heap = heap_mb(daemon.status().await?);
        println!(
            "after {SERVERS} servers ({:.1} s): resident {after_mb:.1} MB ({:+.1}), live heap {after_heap:.2} MB ({:+.2}), \
             {after_fds} descriptors ({:+})   target: no growth",
            started.elapsed().as_secs_f64(),
            after_mb - idle_mb,
            after_heap - idle_heap,
            after_fds as i64 - idle_fds as i64
        );
        let heap_before = heap_mb(daemon.status().await?);
        let (before, peak, after, refused) = request_flood(&daemon).await?;
        let heap_after = heap_mb(daemon.status().await?);
        println!(
            "request flood ({FLOOD_CLIENTS} TCP clients, 4 MB Suggest requests, {FLOOD_SECONDS} s, {refused} refused): \
             resident {before:.1} MB before, peak {peak:.1} MB, {after:.1} MB 6 s after; live heap {heap_before:.2} → \
             {heap_after:.2} MB   target: bounded, back to the baseline"
        );
        let with_ebpf = gone_after_exit(&daemon, daemon.base + 40).await?;
        let status = daemon.status().await?;
        println!(
            "port of an exited server gone from the table after {:.0} ms ({} observer)   target ≤ 1 s",
            with_ebpf.as_secs_f64() * 1000.0,
            status.observer
        );
        drop(daemon);
        // The test daemons read the socket tables every 100 ms (the daemon's default is 1 s).
        let sockets = Daemon::start_with(&["--observer", "sockets"]).await?;
        let with_sockets = gone_after_exit(&sockets, sockets.base + 40).await?;
        println!(
            "port of an exited server gone from the table after {:.0} ms (sockets-table observer, read every 100 ms)   target ≤ 1 s",
            with_sockets.as_secs_f64() * 1000.0
        );
        Ok(())
    }
}

/// The eBPF observer: how many binds per second it keeps up with, and the delay from the kernel
/// seeing a bind to the broker having applied it (measured by the daemon, shown in Status).
mod ebpf {
    use std::time::{Duration, Instant};

    use anyhow::{bail, Context, Result};
    use styxy_tests::v1 as pb;
    use styxy_tests::{ebpf_ready, helper_bin, ChildCgroup, Daemon};

    pub async fn run() -> Result<()> {
        println!("eBPF observer — binds of the ports 10000-19999 in turn (bind + close: a Bound and a Released record each) in a child cgroup\n");
        let Some(setup) = ebpf_ready() else {
            return Ok(());
        };
        for (label, rate, count) in [
            ("paced at 20,000 binds/s", 20_000u64, 100_000u64),
            ("as fast as one process can", 0, 200_000),
        ] {
            let cgroup = ChildCgroup::create(&setup.cgroup_root)?;
            let daemon = Daemon::start_with(&[
                "--observer",
                "ebpf",
                "--cgroup",
                cgroup.path.to_str().context("utf-8 path")?,
                "--ebpf-object",
                setup.object.to_str().context("utf-8 path")?,
            ])
            .await?;
            let load = helper_bin("bind-load");
            let out = cgroup
                .command(
                    load.to_str().context("utf-8 path")?,
                    &[&rate.to_string(), &count.to_string(), "10000", "19999"],
                )
                .output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            let Some(seconds) = text
                .split_whitespace()
                .nth(2)
                .and_then(|s| s.parse::<f64>().ok())
            else {
                bail!("bind-load failed: {out:?}");
            };
            let mut client = daemon.client().await?;
            let expected = 2 * count;
            let deadline = Instant::now() + Duration::from_secs(30);
            let status = loop {
                let s = client.status(pb::StatusRequest {}).await?.into_inner();
                if s.observer_delay_samples + s.dropped_events >= expected
                    || Instant::now() > deadline
                {
                    break s;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            println!(
                "{label:<28} {:>8.0} binds/s   records {:>7}/{expected}   lost {:>6}   bind → broker p50 {:>5} µs  p99 {:>6} µs",
                count as f64 / seconds,
                status.observer_delay_samples,
                status.dropped_events,
                status.observer_delay_p50_us,
                status.observer_delay_p99_us,
            );
        }
        println!("\ntargets: p99 ≤ 1 ms and nothing lost at 20,000 binds/s");
        Ok(())
    }
}

/// A daemon as it runs for real: the eBPF observer on the whole machine when this machine allows
/// it (root, cgroup v2, the object built), else the socket tables. Says which.
async fn production_daemon() -> Result<Daemon> {
    let daemon = match styxy_tests::ebpf_ready() {
        Some(setup) => {
            let object = setup.object.to_string_lossy().into_owned();
            Daemon::start_with(&["--observer", "ebpf", "--ebpf-object", &object]).await?
        }
        None => Daemon::start().await?,
    };
    let status = daemon.status().await?;
    println!(
        "(daemon observer: {} — {})",
        status.observer, status.observer_reason
    );
    Ok(daemon)
}

/// The preload shim: the cost of `bind()` with and without it, and of merely loading it.
mod shim {
    use std::ffi::OsString;
    use std::path::PathBuf;
    use std::process::{Command, Stdio};
    use std::time::Instant;

    use anyhow::{bail, Context, Result};
    use styxy_tests::{helper_bin, port_holder, shim_library, Daemon};

    use crate::calls::Samples;

    const BINDS: usize = 2000;
    /// Alternated native/shim runs per case.
    const ROUNDS: usize = 20;
    const STARTS: usize = 400;

    /// Side-by-side figures of one case: native binds and binds under the shim.
    struct Compared {
        native: Samples,
        native_failed: usize,
        shimmed: Samples,
        shim_failed: usize,
    }

    /// `call-timer bind PORT` natively and under the shim with `shim_env`, in `ROUNDS` alternated runs
    /// of `BINDS / ROUNDS` binds each, so drift on a shared machine (another job, the daemon's
    /// observer catching up) hits both sides alike.
    fn compare_binds(port: u16, shim_env: &[(&str, OsString)]) -> Result<Compared> {
        compare("bind", port, port, shim_env)
    }

    /// `call-timer CALL PORT COUNT` (CALL: bind or connect): natively on `native_port`, under the
    /// shim with `shim_env` on `shim_port`, in alternated runs.
    fn compare(
        call: &str,
        native_port: u16,
        shim_port: u16,
        shim_env: &[(&str, OsString)],
    ) -> Result<Compared> {
        let mut compared = Compared {
            native: Samples(Vec::with_capacity(BINDS)),
            native_failed: 0,
            shimmed: Samples(Vec::with_capacity(BINDS)),
            shim_failed: 0,
        };
        for _ in 0..ROUNDS {
            let (failed, samples) = time_calls(call, native_port, None)?;
            compared.native_failed += failed;
            compared.native.0.extend(samples.0);
            let (failed, samples) = time_calls(call, shim_port, Some(shim_env))?;
            compared.shim_failed += failed;
            compared.shimmed.0.extend(samples.0);
        }
        Ok(compared)
    }

    /// One run of `HELPER PORT BINDS/ROUNDS`, with the shim and `env` when given.
    fn time_calls(
        call: &str,
        port: u16,
        shim_env: Option<&[(&str, OsString)]>,
    ) -> Result<(usize, Samples)> {
        let mut command = Command::new(helper_bin("call-timer"));
        command.arg(call);
        command.args([port.to_string(), (BINDS / ROUNDS).to_string()]);
        command.env_remove("LD_PRELOAD").env("STYXY_NOTIFY", "off");
        if let Some(env) = shim_env {
            command.env("LD_PRELOAD", shim_library());
            command.envs(env.iter().map(|(k, v)| (k, v)));
        }
        crate::calls::run_call_timer(&mut command, call)
    }

    /// `/bin/true` started without and with the shim, alternately, so drift on a shared machine
    /// hits both sides alike. Returns (native, with the shim).
    fn time_starts() -> Result<(Samples, Samples)> {
        let mut native = Vec::with_capacity(STARTS);
        let mut shimmed = Vec::with_capacity(STARTS);
        for round in 0..2 * STARTS {
            let preload = round % 2 == 1;
            let mut command = Command::new("/bin/true");
            command.env_remove("LD_PRELOAD").stdout(Stdio::null());
            if preload {
                command.env("LD_PRELOAD", shim_library());
            }
            let started = Instant::now();
            let status = command.status()?;
            let took = started.elapsed().as_nanos() as u64;
            if !status.success() {
                bail!("/bin/true failed under {command:?}");
            }
            if preload {
                shimmed.push(took);
            } else {
                native.push(took);
            }
        }
        Ok((Samples(native), Samples(shimmed)))
    }

    /// A TCP server that accepts and closes connections, in `python3`, under `styxy run` in
    /// `session` when given (then it may be moved off `port`: `port` says where it listens).
    struct AcceptLoop {
        child: std::process::Child,
        port: u16,
    }

    impl Drop for AcceptLoop {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    const ACCEPT_LOOP: &str = "import socket, sys\n\
        s = socket.socket()\n\
        s.bind(('127.0.0.1', int(sys.argv[1])))\n\
        s.listen(4096)\n\
        print(s.getsockname()[1], flush=True)\n\
        while True:\n    c, _ = s.accept()\n    c.close()\n";

    fn accept_loop(session: Option<&str>, port: u16, daemon: &Daemon) -> Result<AcceptLoop> {
        use std::io::BufRead;
        let mut command = match session {
            Some(session) => {
                let mut c = Command::new(styxy_tests::styxy_bin());
                c.arg("--socket").arg(&daemon.socket).args([
                    "run",
                    "--instance",
                    session,
                    "--",
                    "python3",
                ]);
                c
            }
            None => Command::new("python3"),
        };
        let mut child = command
            .args(["-u", "-c", ACCEPT_LOOP, &port.to_string()])
            .env("STYXY_NOTIFY", "off")
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the accept loop")?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        let port = line.trim().parse().context("the accept loop's port")?;
        Ok(AcceptLoop { child, port })
    }

    fn row(label: &str, native: &Samples, shimmed: &Samples, note: &str) {
        println!(
            "{label:<34} native p50 {:>7.1} p99 {:>7.1} µs | shim p50 {:>7.1} p99 {:>7.1} µs | shim/native: p50 {:>5.2}× mean {:>5.2}×  {note}",
            native.pct(0.5),
            native.pct(0.99),
            shimmed.pct(0.5),
            shimmed.pct(0.99),
            shimmed.pct(0.5) / native.pct(0.5),
            shimmed.mean() / native.mean(),
        );
    }

    pub async fn run() -> Result<()> {
        println!(
            "Preload shim — {BINDS} timed bind() calls per case and side (in {ROUNDS} alternated runs, after warm-up), {STARTS} process starts\n"
        );
        let daemon = super::production_daemon().await?;
        let socket: OsString = daemon.socket.clone().into();
        let up = [("STYXY_SOCKET", socket)];
        let free = daemon.base + 150;
        let held = daemon.base + 160;
        let holder = port_holder(&[held])?;

        let zero = compare_binds(0, &up)?;
        row(
            "(a) port 0, pass-through, daemon up",
            &zero.native,
            &zero.shimmed,
            "target ≤ 1.1×",
        );

        let free_up = compare_binds(free, &up)?;
        row(
            "(b) free port, daemon up",
            &free_up.native,
            &free_up.shimmed,
            "target p50 ≤ 1.5× (the session table: no daemon call)",
        );
        if free_up.shim_failed > 0 {
            println!("    {} binds failed under the shim", free_up.shim_failed);
        }

        let moved = compare_binds(held, &up)?;
        row(
            "(c) held port, moved",
            &moved.native,
            &moved.shimmed,
            "target p50 ≤ 100 µs, p99 ≤ 500 µs",
        );
        println!(
            "    native: {} of {BINDS} failed with EADDRINUSE; shim: {} failed",
            moved.native_failed, moved.shim_failed
        );

        // (f) Loopback connect(): to a port no view redirects, and to one a session's view does
        // (asked → its moved server; natively, the same server at its real port).
        let listener = accept_loop(None, free + 1, &daemon)?;
        let unviewed = compare("connect", free + 1, free + 1, &up)?;
        row(
            "(f) loopback connect, no view entry",
            &unviewed.native,
            &unviewed.shimmed,
            "target p50 ≤ 1.2×",
        );
        let asked = listener.port;
        let moved_server = accept_loop(Some("bench-session"), asked, &daemon)?;
        let in_session = [
            ("STYXY_SOCKET", daemon.socket.clone().into_os_string()),
            ("STYXY_INSTANCE", OsString::from("bench-session")),
        ];
        // Wait until the view is published: a connect in the session then reaches the moved server.
        std::thread::sleep(std::time::Duration::from_millis(300));
        let viewed = compare("connect", moved_server.port, asked, &in_session)?;
        row(
            "(f) loopback connect, redirected",
            &viewed.native,
            &viewed.shimmed,
            "target p50 ≤ 1.2×",
        );
        if viewed.shim_failed + viewed.native_failed > 0 {
            println!(
                "    failed connects: native {}, shim {}",
                viewed.native_failed, viewed.shim_failed
            );
        }
        drop(moved_server);
        drop(listener);

        // Down for real: no daemon, so no observer either (its eBPF programs leave with it).
        drop(holder);
        drop(daemon);
        let missing: PathBuf = std::env::temp_dir().join("styxy-bench-no-daemon.sock");
        let down = [("STYXY_SOCKET", OsString::from(missing))];
        // Port 0 again without the observer: with it, a bind costs 2 µs or ~20 µs depending on
        // whether the daemon's reader is idle (each record then wakes it), a noise that falls on
        // native and shimmed runs alike and can hide or inflate the shim's own cost.
        let zero_down = compare_binds(0, &down)?;
        row(
            "(a) port 0, pass-through, no daemon",
            &zero_down.native,
            &zero_down.shimmed,
            "target ≤ 1.1×",
        );
        let free_down = compare_binds(free, &down)?;
        row(
            "(d) daemon down, free port",
            &free_down.native,
            &free_down.shimmed,
            "target ≤ 2×",
        );

        let (native_start, shim_start) = time_starts()?;
        row(
            "(e) /bin/true start-up",
            &native_start,
            &shim_start,
            "target ≤ 1.2×",
        );
        Ok(())
    }
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
        format!("styxy Allocate, tonic client, {clients} client(s)"),
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

/// Allocate through the shim's blocking HTTP/2 client (`styxy_shim_client::http2`), one thread
/// and connection per client, as the portserver side is measured: the client's own cost stays
/// small, so the figure is the daemon's.
fn lean_allocate(socket: &std::path::Path, clients: usize) -> Result<Measured> {
    use prost::Message;
    use styxy_shim_client::http2::{request_header_block, Connection};
    let header = request_header_block("/styxy.v1.PortBroker/Allocate");
    let message = pb::AllocateRequest {
        service_type: "bench".into(),
        ..Default::default()
    }
    .encode_to_vec();
    let socket = socket.to_path_buf();
    let deadline = || Instant::now() + Duration::from_secs(10);
    blocking_clients(
        format!("styxy Allocate, lean client, {clients} client(s)"),
        clients,
        move || Ok(Connection::open(&socket, deadline())?),
        move |conn| {
            let reply = conn.unary(&header, &message, deadline())?;
            if reply.grpc_status != 0 {
                bail!("Allocate failed with gRPC status {}", reply.grpc_status);
            }
            pb::AllocateResponse::decode(reply.message.as_slice())?;
            Ok(())
        },
    )
}

/// `clients` threads, each with the state `connect` makes, running `op` [`OPS`]` / clients` times;
/// every run of `op` is timed. The clock starts once every client has connected, as it does for
/// the tonic clients: what is measured is the calls, not the connection set-up.
fn blocking_clients<S>(
    label: String,
    clients: usize,
    connect: impl Fn() -> Result<S> + Clone + Send + 'static,
    op: impl Fn(&mut S) -> Result<()> + Clone + Send + 'static,
) -> Result<Measured> {
    let ready = std::sync::Arc::new(std::sync::Barrier::new(clients + 1));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (connect, op, ready) = (connect.clone(), op.clone(), ready.clone());
            std::thread::spawn(move || -> Result<Vec<Duration>> {
                let state = connect();
                ready.wait();
                let mut state = state?;
                let mut lat = Vec::with_capacity(OPS / clients);
                for _ in 0..OPS / clients {
                    let t = Instant::now();
                    op(&mut state)?;
                    lat.push(t.elapsed());
                }
                Ok(lat)
            })
        })
        .collect();
    ready.wait();
    let start = Instant::now();
    let mut latencies = Vec::new();
    for t in threads {
        latencies.extend(
            t.join()
                .map_err(|_| anyhow::anyhow!("client thread panicked"))??,
        );
    }
    Ok(Measured {
        label,
        ops: latencies.len(),
        elapsed: start.elapsed(),
        latencies,
    })
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
    blocking_clients(
        format!("portserver.py allocate, {clients} client(s)"),
        clients,
        || Ok(()),
        move |_| {
            let mut s = UnixStream::connect_addr(&addr)?;
            s.write_all(format!("{pid}\n").as_bytes())?;
            s.shutdown(std::net::Shutdown::Write)?;
            let mut reply = String::new();
            s.read_to_string(&mut reply)?;
            reply
                .trim()
                .parse::<u16>()
                .with_context(|| format!("portserver replied {reply:?}"))?;
            Ok(())
        },
    )
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
