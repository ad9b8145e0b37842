//! The session soak: four sessions each run servers on the same five asked ports, restarting them
//! all the time, while a client in every session connects to the five asked ports over and over.
//! Every connection is counted by who answered: the session's own server for that port (right),
//! another session's server or its own server for another port (wrong: the misroutes Styxy exists
//! to prevent), or nobody (refused: the session's server was between two lives). Run with the
//! default install — the root daemon with eBPF and the shim together — and with the socket tables
//! and the shim alone, two rounds on each daemon. The daemon's live heap (what it holds, counted by
//! its allocator) before and after each round tells whether it gives back what the round used;
//! its resident memory, what the allocator keeps besides.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use styxy_tests::{styxy_bin, Daemon};

const SESSIONS: usize = 4;
const PORTS: usize = 5;
const SECONDS: u64 = 45;
/// Rounds on each daemon.
const ROUNDS: u32 = 2;

/// A server of one session: listens on each asked port (where its bind lands), answers
/// `SESSION:ASKED` to each connection, and lives 0.5 to 3 s.
const SERVER: &str = r#"
import os, random, socket, sys, threading, time
session, ports = sys.argv[1], [int(p) for p in sys.argv[2:]]
def serve(s, asked):
    while True:
        try:
            c, _ = s.accept()
        except OSError:
            return
        try:
            c.sendall(("%s:%d\n" % (session, asked)).encode())
        except OSError:
            pass
        c.close()
for p in ports:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", p))
    except OSError as e:
        print("bind-failed", p, e.errno, flush=True)
        continue
    s.listen(64)
    threading.Thread(target=serve, args=(s, p), daemon=True).start()
time.sleep(random.uniform(0.5, 3.0))
os._exit(0)
"#;

/// A client of one session: connects to each asked port in turn until the deadline; prints
/// `right wrong_session wrong_port refused`, and its first three wrong answers on stderr.
const CLIENT: &str = r#"
import socket, sys, time
session, seconds, ports = sys.argv[1], float(sys.argv[2]), [int(p) for p in sys.argv[3:]]
right = wrong_session = wrong_port = refused = 0
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    for p in ports:
        try:
            c = socket.create_connection(("127.0.0.1", p), timeout=2)
            who = c.recv(64).decode().strip()
            c.close()
        except OSError:
            refused += 1
            continue
        if not who:
            refused += 1
            continue
        s, asked = who.split(":")
        if s == session and int(asked) == p:
            right += 1
            continue
        if s != session:
            wrong_session += 1
        else:
            wrong_port += 1
        if wrong_session + wrong_port <= 3:
            print("soak: %s asked %d, answered by %s's server for %s at %.3f" % (session, p, s, asked, time.time()), file=sys.stderr, flush=True)
print(right, wrong_session, wrong_port, refused, flush=True)
"#;

/// `styxy run --instance SESSION -- python3 -c SCRIPT ARGS…` against `daemon`.
fn in_session(daemon: &Daemon, session: &str, script: &str, args: &[String]) -> Command {
    let mut command = Command::new(styxy_bin());
    command
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["run", "--instance", session, "--", "python3", "-c", script])
        .args(args)
        .env("STYXY_NOTIFY", "off");
    command
}

struct Totals {
    right: u64,
    wrong_session: u64,
    wrong_port: u64,
    refused: u64,
    server_starts: u64,
}

/// One soak against `daemon`.
fn soak(daemon: &Daemon) -> Result<Totals> {
    let ports: Vec<String> = (0..PORTS)
        .map(|i| (daemon.base + 110 + i as u16).to_string())
        .collect();
    let running = Arc::new(AtomicBool::new(true));
    let mut restarters = Vec::new();
    for s in 0..SESSIONS {
        let session = format!("soak-{s}");
        let mut args = vec![session.clone()];
        args.extend(ports.iter().cloned());
        let mut command = in_session(daemon, &session, SERVER, &args);
        command.stdout(Stdio::null()).stderr(Stdio::null());
        let running = running.clone();
        restarters.push(std::thread::spawn(move || -> Result<u64> {
            let mut starts = 0;
            while running.load(Ordering::Relaxed) {
                command.status().context("running a session's server")?;
                starts += 1;
            }
            Ok(starts)
        }));
    }
    // Servers up before the clients start counting.
    std::thread::sleep(Duration::from_secs(2));
    let clients: Vec<_> = (0..SESSIONS)
        .map(|s| {
            let session = format!("soak-{s}");
            let mut args = vec![session.clone(), SECONDS.to_string()];
            args.extend(ports.iter().cloned());
            in_session(daemon, &session, CLIENT, &args)
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("starting a session's client")
        })
        .collect::<Result<_>>()?;
    let mut totals = Totals {
        right: 0,
        wrong_session: 0,
        wrong_port: 0,
        refused: 0,
        server_starts: 0,
    };
    for client in clients {
        let out = client.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let counts: Vec<u64> = text
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        anyhow::ensure!(counts.len() == 4, "a client said {text:?}");
        totals.right += counts[0];
        totals.wrong_session += counts[1];
        totals.wrong_port += counts[2];
        totals.refused += counts[3];
    }
    running.store(false, Ordering::Relaxed);
    for restarter in restarters {
        totals.server_starts += restarter
            .join()
            .map_err(|_| anyhow::anyhow!("a restarter panicked"))??;
    }
    Ok(totals)
}

pub async fn run() -> Result<()> {
    println!(
        "Session soak — {SESSIONS} sessions × {PORTS} asked ports, servers living 0.5–3 s, a client per \
         session connecting for {SECONDS} s\n"
    );
    let mut setups: Vec<(&str, Vec<String>)> = Vec::new();
    match styxy_tests::ebpf_ready() {
        Some(setup) => setups.push((
            "eBPF at the root + shim (the default install)",
            vec![
                "--observer".into(),
                "ebpf".into(),
                "--ebpf-object".into(),
                setup.object.display().to_string(),
            ],
        )),
        None => println!("(eBPF side skipped: see above)"),
    }
    setups.push((
        "socket tables + shim",
        vec!["--observer".into(), "sockets".into()],
    ));
    for (label, args) in setups {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let daemon = Daemon::start_with(&args).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let baseline = crate::footprint::usage(daemon.pid())?.0;
        let heap_baseline = heap_live_mb(&daemon).await?;
        let mut last = baseline;
        // Two rounds on one daemon: what the first leaves (bounded records such as the audit
        // filling up, or the allocator's hold) the second must not add to, or it grows.
        for round in 1..=ROUNDS {
            let started = Instant::now();
            let totals = tokio::task::block_in_place(|| soak(&daemon))?;
            let took = started.elapsed();
            tokio::time::sleep(Duration::from_secs(6)).await;
            let after = crate::footprint::usage(daemon.pid())?.0;
            let heap_after = heap_live_mb(&daemon).await?;
            // The moves the daemon keeps in memory for `styxy audit` (up to 10,000): bounded,
            // and part of what a round leaves.
            let audit = daemon
                .client()
                .await?
                .list_audit(styxy_tests::v1::ListAuditRequest {
                    since_ms: None,
                    limit: 10_000,
                })
                .await?
                .into_inner()
                .entries
                .len();
            let all = totals.right + totals.wrong_session + totals.wrong_port + totals.refused;
            println!(
                "{label:<38} round {round}: connections {all:>7} in {:.0} s: right {:>7}, another session's \
                 server {:>3}, the session's other server {:>3}, refused (between two lives) {:>6}; {} server \
                 starts; 6 s after, the daemon's live heap {heap_after:.2} MB ({:+.2} MB on the {heap_baseline:.2} MB \
                 at start; {audit} moves in its audit, {:.0} bytes a move), resident {after:.1} MB ({:+.1} MB on the round, {:+.1} MB \
                 on the {baseline:.1} MB at start)",
                took.as_secs_f64(),
                totals.right,
                totals.wrong_session,
                totals.wrong_port,
                totals.refused,
                totals.server_starts,
                heap_after - heap_baseline,
                (heap_after - heap_baseline) * 1e6 / audit.max(1) as f64,
                after - last,
                after - baseline
            );
            last = after;
        }
    }
    Ok(())
}

/// The daemon's live heap in MB, from its status.
async fn heap_live_mb(daemon: &Daemon) -> Result<f64> {
    let bytes = daemon.status().await?.heap_live_bytes.context(
        "the daemon counts its heap (the `styxy` binary installs the counting allocator)",
    )?;
    Ok(bytes as f64 / 1e6)
}
