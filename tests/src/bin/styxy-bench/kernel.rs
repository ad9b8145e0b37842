//! The kernel path, side by side in one run: what the eBPF programs cost every program on the
//! machine (a port-0 `bind()`, a free port's `bind()`, a loopback `connect()` from outside every
//! session), what their log costs when it is off and on, and what a kernel session's moved bind
//! costs next to a native bind.
//!
//! The programs' tax is measured by rounds: each round starts a daemon at the cgroup root, times
//! the calls with no kernel session live (the session programs detached), then with one live
//! elsewhere on the machine (every program attached) and with root focusing that session (`styxy
//! focus`: every loopback connect outside the sessions looks the focus up), stops it (its programs detach), and times
//! them again without; so drift on a shared machine falls on all sides alike. The log levels are compared in sibling child cgroups, each
//! with a daemon of its own, and one without programs. The connect program's own run time, with
//! and without a focus, is read from the kernel's accounting (`program_time`): what the focus
//! adds is far below what timing whole connects can separate here.

use std::ffi::OsString;
use std::process::Command;
use std::time::Duration;

use crate::calls::{run_call_timer, Samples};
use crate::program_time::{RunTimeStats, Runs};
use anyhow::{bail, Context, Result};
use styxy_tests::{ebpf_ready, helper_bin, port_holder, styxy_bin, ChildCgroup, Daemon};

/// Timed calls per case and side, over `ROUNDS` rounds.
const CALLS: usize = 20_000;
const ROUNDS: usize = 10;
/// Ports of the `bench` range every test daemon has (10000-19999): held, free, and listened on.
const HELD: u16 = 10_050;
const FREE: u16 = 10_500;
const LISTENED: u16 = 10_600;
/// A pause before each timed case, on both sides alike.
const SETTLE: Duration = Duration::from_millis(300);

/// Runs `call-timer CALL PORT CALLS/ROUNDS` as `command` says (the program and its first
/// arguments come from the caller), adding its samples to `into`; returns the failed calls.
fn time_into(mut command: Command, call: &str, port: u16, into: &mut Samples) -> Result<usize> {
    command
        .args([call, &port.to_string(), &(CALLS / ROUNDS).to_string()])
        .env_remove("LD_PRELOAD");
    let (failed, samples) = run_call_timer(&mut command, call)?;
    into.0.extend(samples.0);
    Ok(failed)
}

fn call_timer() -> Command {
    Command::new(helper_bin("call-timer"))
}

fn row(label: &str, with: &Samples, without: &Samples, what: &str, target: &str) {
    println!(
        "{label:<46} {what} p50 {:>6.2} µs p99 {:>7.2} µs | without p50 {:>6.2} µs p99 {:>7.2} µs | ratio p50 {:>5.2}×  {target}",
        with.pct(0.5),
        with.pct(0.99),
        without.pct(0.5),
        without.pct(0.99),
        with.pct(0.5) / without.pct(0.5),
    );
}

pub async fn run() -> Result<()> {
    println!(
        "Kernel path — {CALLS} timed calls per case and side, in {ROUNDS} alternated rounds\n"
    );
    let Some(setup) = ebpf_ready() else {
        return Ok(());
    };
    let object = setup.object.to_str().context("utf-8 path")?.to_string();

    // 1. The log's cost: binds of a free port of the bench range (reported one by one, with a
    //    debug statement each) in three sibling cgroups.
    let plain = ChildCgroup::create(&setup.cgroup_root)?;
    let warn = ChildCgroup::create(&setup.cgroup_root)?;
    let debug = ChildCgroup::create(&setup.cgroup_root)?;
    let mut daemons = Vec::new();
    for (cgroup, level) in [(&warn, "warn"), (&debug, "debug")] {
        let path = cgroup.path.to_str().context("utf-8 path")?;
        daemons.push(
            Daemon::start_with(&[
                "--observer",
                "ebpf",
                "--cgroup",
                path,
                "--ebpf-object",
                &object,
                "--ebpf-log",
                level,
            ])
            .await?,
        );
    }
    let (mut none_s, mut warn_s, mut debug_s) =
        (Samples::default(), Samples::default(), Samples::default());
    let timer = helper_bin("call-timer");
    let timer = timer.to_str().context("utf-8 path")?;
    for _ in 0..ROUNDS {
        for (cgroup, into) in [
            (&plain, &mut none_s),
            (&warn, &mut warn_s),
            (&debug, &mut debug_s),
        ] {
            time_into(cgroup.command(timer, &[]), "bind", FREE, into)?;
        }
    }
    drop(daemons);
    row(
        "free-port bind, programs, --ebpf-log warn",
        &warn_s,
        &none_s,
        "with",
        "(debug statements off)",
    );
    row(
        "free-port bind, programs, --ebpf-log debug",
        &debug_s,
        &none_s,
        "with",
        "(a log record per bind)",
    );
    println!(
        "    the debug statements add {:+.2} µs at p50 when on; off, they are not in the loaded programs at all",
        debug_s.pct(0.5) - warn_s.pct(0.5)
    );

    // 2. At the root: with the daemon's programs, and without, round by round.
    let _held = port_holder(&[HELD])?;
    let _listener = styxy_tests::KillOnDrop(
        Command::new("python3")
            .args([
                "-c",
                "import socket\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
                 s.bind(('127.0.0.1', int(__import__('sys').argv[1])))\ns.listen(4096)\n\
                 while True:\n    c, _ = s.accept()\n    c.close()\n",
                &LISTENED.to_string(),
            ])
            .spawn()
            .context("starting the accept loop")?,
    );
    std::thread::sleep(Duration::from_millis(300));
    // Two states with the daemon: no session live (only the observer's programs attached), and
    // a session live somewhere on the machine (every program attached); then without a daemon.
    let mut idle: [Samples; 5] = Default::default();
    let mut live: [Samples; 5] = Default::default();
    let mut without: [Samples; 5] = Default::default();
    let mut moved = Samples::default();
    let mut moved_failed = 0;
    // Loopback connects outside every session while root focuses the live session (`styxy
    // focus`): each looks the focus up, and the port is not in the focused view.
    let mut focused = Samples::default();
    let mut focused_ratios: Vec<f64> = Vec::new();
    // The connect program's runs in the live and focused connect cases, by the kernel's count.
    const CONNECT4: &str = "styxy_connect4";
    let (mut live_connect_runs, mut focused_connect_runs) = (Runs::default(), Runs::default());
    let _stats = RunTimeStats::enable()?;
    let cases = [
        ("bind", 0),
        ("bind", FREE),
        ("connect", LISTENED),
        ("close", 0),
        ("getsockopt", 0),
    ];
    // Each round's with/without p50 ratio: the machine's fast and slow phases move both sides of
    // one round together, so these are steadier than the ratio of the pooled samples.
    let mut idle_ratios: [Vec<f64>; 5] = Default::default();
    let mut live_ratios: [Vec<f64>; 5] = Default::default();
    for _ in 0..ROUNDS {
        let daemon = Daemon::start_with(&["--observer", "ebpf", "--ebpf-object", &object]).await?;
        let status = daemon.status().await?;
        if !status.observer_reason.contains("kernel sessions enforced") {
            bail!("kernel sessions are off: {}", status.observer_reason);
        }
        if !status
            .kernel_sessions_detail
            .contains("detached while no session is live")
        {
            bail!("session programs attached with no session: {status:?}");
        }
        let mut round_idle: [Samples; 5] = Default::default();
        let mut round_live: [Samples; 5] = Default::default();
        for ((call, port), into) in cases.iter().zip(round_idle.iter_mut()) {
            // The daemon digests the records of the case before (the free-port binds): let it
            // finish, so one case's cost is not counted in the next one's.
            std::thread::sleep(SETTLE);
            time_into(call_timer(), call, *port, into)?;
        }
        // A session elsewhere on the machine: its programs attach before `sleep` starts.
        let session_live = styxy_tests::KillOnDrop(
            Command::new(styxy_bin())
                .arg("--socket")
                .arg(&daemon.socket)
                .args(["run", "--instance", "bench-live", "--", "sleep", "3600"])
                .env("STYXY_NOTIFY", OsString::from("off"))
                .spawn()
                .context("starting a live session")?,
        );
        wait_for_session_programs(&daemon).await?;
        for ((call, port), into) in cases.iter().zip(round_live.iter_mut()) {
            std::thread::sleep(SETTLE);
            let connect = *call == "connect";
            let before = connect.then(|| Runs::of(CONNECT4)).transpose()?;
            time_into(call_timer(), call, *port, into)?;
            if let Some(before) = before {
                live_connect_runs.add(Runs::of(CONNECT4)?.since(before));
            }
        }
        daemon
            .client()
            .await?
            .focus(styxy_tests::v1::FocusRequest {
                session: "bench-live".into(),
                clear: false,
            })
            .await
            .context("focusing the live session")?;
        let mut round_focused = Samples::default();
        std::thread::sleep(SETTLE);
        let before = Runs::of(CONNECT4)?;
        time_into(call_timer(), "connect", LISTENED, &mut round_focused)?;
        focused_connect_runs.add(Runs::of(CONNECT4)?.since(before));
        // A process of a kernel session binding the held port: moved by the bind program. The
        // shim is not loaded (`env -u LD_PRELOAD` after `styxy run` registered the session).
        let mut session = Command::new(styxy_bin());
        session
            .arg("--socket")
            .arg(&daemon.socket)
            .args([
                "run",
                "--instance",
                "bench-kernel",
                "--",
                "env",
                "-u",
                "LD_PRELOAD",
            ])
            .arg(helper_bin("call-timer"))
            .env("STYXY_NOTIFY", OsString::from("off"));
        moved_failed += time_into(session, "bind", HELD, &mut moved)?;
        drop(session_live);
        drop(daemon);
        std::thread::sleep(Duration::from_millis(200)); // its links close with it
        for (i, (call, port)) in cases.iter().enumerate() {
            std::thread::sleep(SETTLE);
            let mut round_without = Samples::default();
            time_into(call_timer(), call, *port, &mut round_without)?;
            if *call == "connect" {
                focused_ratios.push(round_focused.pct(0.5) / round_without.pct(0.5));
            }
            idle_ratios[i].push(round_idle[i].pct(0.5) / round_without.pct(0.5));
            live_ratios[i].push(round_live[i].pct(0.5) / round_without.pct(0.5));
            idle[i].0.extend(&round_idle[i].0);
            live[i].0.extend(&round_live[i].0);
            without[i].0.extend(round_without.0);
        }
        focused.0.extend(round_focused.0);
    }
    println!("\nWith a kernel session live (every program attached):");
    row(
        "port-0 bind (programs at the root)",
        &live[0],
        &without[0],
        "with",
        "target ≤ 1.3×",
    );
    row(
        "free-port bind (programs at the root)",
        &live[1],
        &without[1],
        "with",
        "",
    );
    row(
        "loopback connect outside every session",
        &live[2],
        &without[2],
        "with",
        "target ≤ 1.1×",
    );
    row(
        "loopback connect outside, with a focus set",
        &focused,
        &without[2],
        "with",
        "target ≤ 1.1×",
    );
    row(
        "close of a port-0 socket (sock_release)",
        &live[3],
        &without[3],
        "with",
        "",
    );
    row(
        "getsockopt(SO_ERROR) (no program of ours: control)",
        &live[4],
        &without[4],
        "with",
        "",
    );
    row(
        "session bind of a held port, moved by the kernel",
        &moved,
        &live[1],
        "    ",
        "target ≤ 1.5× (next to a free-port bind with the programs)",
    );
    println!(
        "    … and {:.2}× a free-port bind without any programs; {moved_failed} of {CALLS} moved binds failed",
        moved.pct(0.5) / without[1].pct(0.5)
    );
    let (live_ns, focused_ns) = (
        live_connect_runs.per_run_ns(),
        focused_connect_runs.per_run_ns(),
    );
    let native_ns = without[2].pct(0.5) * 1000.0;
    println!(
        "    the connect program itself (the kernel's run-time accounting, {} and {} runs): \
         {live_ns:.0} ns a run with a session live, {focused_ns:.0} ns with the focus set; the \
         focus adds {:+.0} ns, {:+.2} % of a loopback connect without programs ({:.2} µs p50): \
         {:.3}× (target ≤ 1.1×)",
        live_connect_runs.count,
        focused_connect_runs.count,
        focused_ns - live_ns,
        (focused_ns - live_ns) / native_ns * 100.0,
        native_ns / 1000.0,
        (native_ns + focused_ns - live_ns) / native_ns,
    );
    println!("\nWith no session live (the session programs detached; the bind observer only):");
    for (i, label) in [
        "port-0 bind",
        "free-port bind",
        "loopback connect",
        "close of a port-0 socket",
        "getsockopt(SO_ERROR)",
    ]
    .iter()
    .enumerate()
    {
        row(label, &idle[i], &without[i], "with", "");
    }
    println!(
        "\nRound by round, with/without p50 (the machine's phases move both sides of a round):"
    );
    for (label, (live, idle)) in [
        "port-0 bind",
        "free-port bind",
        "loopback connect",
        "close",
        "getsockopt",
    ]
    .iter()
    .zip(live_ratios.iter_mut().zip(idle_ratios.iter_mut()))
    {
        let spread = |ratios: &mut Vec<f64>| {
            ratios.sort_by(f64::total_cmp);
            format!(
                "median {:.2}×, {:.2}–{:.2}×",
                ratios[ratios.len() / 2],
                ratios[0],
                ratios[ratios.len() - 1]
            )
        };
        println!(
            "    {label:<18} session live: {}; none live: {}",
            spread(live),
            spread(idle)
        );
    }
    focused_ratios.sort_by(f64::total_cmp);
    println!(
        "    connect, focus set median {:.2}×, {:.2}–{:.2}×",
        focused_ratios[focused_ratios.len() / 2],
        focused_ratios[0],
        focused_ratios[focused_ratios.len() - 1]
    );
    Ok(())
}

/// Waits until `daemon` says its session programs are attached (a session was placed).
async fn wait_for_session_programs(daemon: &Daemon) -> Result<()> {
    for _ in 0..100 {
        let detail = daemon.status().await?.kernel_sessions_detail;
        if detail.contains("session programs are attached") {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the session programs did not attach for a live session")
}
