//! Sessions never hurt each other, at what cost, side by side in one run:
//! - the PreToolUse kill guard per Bash call (`styxy hook pre-tool-use`, a process started with the
//!   hook's JSON on stdin, as Claude Code starts it) next to `/bin/true` started the same way, for a
//!   command with no kill word, a shell script read (no kill in it), one whose port is looked up
//!   in the daemon, and a `pkill -f` that reads `/proc`; pairs alternate, so drift falls on both sides;
//! - `kill(pid, 0)` and `kill(pid, SIGUSR1)` from outside every session with `lsm/task_kill`
//!   attached (a session live) and without (`--kill-protection off`), in alternated rounds —
//!   where the kernel loads BPF LSM programs at all; elsewhere it says why not.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result};
use styxy_tests::{ebpf_ready, styxy_bin, Daemon, Spawned};

use crate::calls::Samples;

/// Hook runs per case and side.
const HOOK_RUNS: usize = 200;
/// Signals per case, side and round, and rounds.
const SIGNALS: usize = 20_000;
const ROUNDS: usize = 6;

/// Starts `command` with `input` on its stdin and waits for it: the time it took, in ns.
fn timed_run(command: &mut Command, input: &[u8]) -> Result<u64> {
    let start = Instant::now();
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the hook")?;
    // `/bin/true` may be gone before it reads: its stdin is then closed (EPIPE), which is fine.
    let _ = child.stdin.take().context("stdin")?.write_all(input);
    child.wait()?;
    Ok(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX))
}

/// One case: `with` next to `without` (`base` names it), µs with `digits` decimals.
fn row(label: &str, with: &Samples, without: &Samples, base: &str, digits: usize) {
    println!(
        "{label:<44} p50 {:>8.digits$} µs p99 {:>8.digits$} µs | {base} p50 {:>8.digits$} µs p99 {:>8.digits$} µs | ratio p50 {:>5.2}×",
        with.pct(0.5),
        with.pct(0.99),
        without.pct(0.5),
        without.pct(0.99),
        with.pct(0.5) / without.pct(0.5),
    );
}

pub async fn run() -> Result<()> {
    println!("The kill guard: {HOOK_RUNS} hook calls per case, each next to /bin/true\n");
    let daemon = Daemon::start().await?;
    // A server the guard resolves `kill $(lsof -t -i:P)` to.
    let port = daemon.base + 40;
    let _server = styxy_tests::http_server(port)?;
    // A build script with no kill in it, as agents write them: read, and nothing more.
    let work_dir = tempfile::tempdir()?;
    std::fs::write(
        work_dir.path().join("build.sh"),
        "#!/usr/bin/env bash\nset -euo pipefail\nnpm ci\nnpm run build\n",
    )?;
    // ... and a package.json of a Vite app, whose scripts `npm run build` reads.
    std::fs::write(
        work_dir.path().join("package.json"),
        r#"{"name": "web", "private": true, "type": "module", "scripts": {"dev": "vite",
           "build": "tsc -b && vite build", "lint": "eslint .", "preview": "vite preview"},
           "dependencies": {"react": "^19.1.0", "react-dom": "^19.1.0"},
           "devDependencies": {"@vitejs/plugin-react": "^5.0.0", "eslint": "^9.30.0",
           "typescript": "~5.8.3", "vite": "^7.0.4"}}"#,
    )?;
    let cases = [
        ("no kill word (`git status`)", "git status".to_string()),
        (
            "a package script read (`npm run build`)",
            "npm run build".to_string(),
        ),
        (
            "a shell script read (`./build.sh`, no kill)",
            "./build.sh".to_string(),
        ),
        (
            "kill $(lsof -t -i:P): a daemon lookup",
            format!("kill $(lsof -t -i:{port})"),
        ),
        (
            "pkill -f vite: /proc and a daemon lookup",
            "pkill -f vite".to_string(),
        ),
    ];
    for (label, command) in cases {
        let input = serde_json::json!({
            "session_id": "bench",
            "hook_event_name": "PreToolUse",
            "tool_name": "Bash",
            "tool_input": { "command": command },
            "cwd": work_dir.path(),
        })
        .to_string();
        let (mut hook, mut floor) = (Samples::default(), Samples::default());
        for _ in 0..HOOK_RUNS {
            hook.0.push(timed_run(
                daemon
                    .cli_command(&["hook", "pre-tool-use"])
                    .env_remove("LD_PRELOAD"),
                input.as_bytes(),
            )?);
            floor.0.push(timed_run(
                Command::new("/bin/true").env_remove("LD_PRELOAD"),
                input.as_bytes(),
            )?);
        }
        row(label, &hook, &floor, "/bin/true", 0);
    }
    drop(daemon);
    println!();
    signals().await
}

/// `kill(pid, signal)` timed one by one, `count` times, in ns.
fn time_kills(pid: u32, signal: i32, count: usize, into: &mut Samples) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    for _ in 0..count {
        let start = Instant::now();
        // SAFETY: a signal to a process of this benchmark (it ignores SIGUSR1); no memory involved.
        unsafe { libc::kill(pid, signal) };
        into.0
            .push(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
}

async fn signals() -> Result<()> {
    let Some(setup) = ebpf_ready() else {
        println!(
            "kill(pid, …) with lsm/task_kill: skipped (needs root, cgroup v2 and the eBPF object)"
        );
        return Ok(());
    };
    let object = setup.object.to_string_lossy().into_owned();
    let start = |protection: &'static str| {
        let object = object.clone();
        async move {
            Daemon::start_with(&[
                "--observer",
                "ebpf",
                "--ebpf-object",
                &object,
                "--kill-protection",
                protection,
            ])
            .await
        }
    };
    let probe = start("on").await?;
    let status = probe.status().await?;
    if !status.kill_protection {
        println!(
            "kill(pid, …) with lsm/task_kill: not measurable here — {}",
            status.kill_protection_detail
        );
        return Ok(());
    }
    drop(probe);
    // The target ignores SIGUSR1, and is in no session.
    let mut target = Spawned::start(
        Command::new("sh")
            .args(["-c", "trap '' USR1; exec sleep 100000"])
            .env_remove("LD_PRELOAD"),
    )?;
    let pid = target.child.id();
    let per_round = SIGNALS / ROUNDS;
    let mut with = [Samples::default(), Samples::default()];
    let mut without = [Samples::default(), Samples::default()];
    for _ in 0..ROUNDS {
        for (protection, into) in [("on", &mut with), ("off", &mut without)] {
            let daemon = start(protection).await?;
            // A live session attaches the session programs (the LSM program with them).
            let session = Spawned::start(Command::new(styxy_bin()).args([
                "--socket",
                &daemon.socket.to_string_lossy(),
                "run",
                "--instance",
                "bench-session",
                "--",
                "sleep",
                "100000",
            ]))?;
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            time_kills(pid, 0, per_round, &mut into[0]);
            time_kills(pid, libc::SIGUSR1, per_round, &mut into[1]);
            drop(session);
            drop(daemon);
        }
    }
    let _ = target.kill();
    row(
        "kill(pid, 0), lsm/task_kill attached",
        &with[0],
        &without[0],
        "without",
        3,
    );
    row(
        "kill(pid, SIGUSR1), lsm/task_kill attached",
        &with[1],
        &without[1],
        "without",
        3,
    );
    Ok(())
}
