//! The Debian package as a user installs it: `cargo xtask dist` builds it (lintian checks it),
//! `dpkg -i` installs it on this machine, the installed `/usr/bin/styxy daemon` runs with the
//! eBPF programs built into it at the cgroup root (this machine may have no systemd as PID 1:
//! the daemon is started by hand and the unit checked with `systemd-analyze verify`), a real
//! server is moved through the installed shim, `styxy doctor` is green; `dpkg -r` stops the
//! daemon and removes every file, `dpkg --purge` the state dir too: a listing of every path under
//! /usr, /etc, /var/lib, /opt and /lib after the purge is the one before the install. The package
//! holds no object file, and the running daemon neither maps nor holds one open.
//!
//! Needs root, dpkg and the eBPF toolchain (it says SKIP without them; CI has them). It builds
//! in release mode, and is the only test in this binary: nothing else runs while the package is
//! installed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{ensure, Context, Result};
use styxy_tests::{ebpf_ready, http_server, is_root, run_ok, KillOnDrop, Spawned};

/// The workspace root (this crate is `tests/`).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Where a package puts files (and its scripts could): every path under them, to compare before
/// the install and after the purge.
const LISTED_ROOTS: [&str; 5] = ["/usr", "/etc", "/var/lib", "/opt", "/lib"];

/// Every path under [`LISTED_ROOTS`] (not following symlinks), but what changes on its own while
/// the test runs: dpkg's and apt's own records, logs and caches, and Python's bytecode caches
/// (the test's `python3` writes them, as root, next to the standard library).
fn filesystem_listing() -> Result<std::collections::BTreeSet<String>> {
    let roots = LISTED_ROOTS.iter().filter(|r| Path::new(r).exists());
    let out = run_ok(Command::new("find").args(roots).arg("-xdev"))?;
    Ok(out
        .lines()
        .filter(|p| {
            !p.starts_with("/var/lib/dpkg")
                && !p.starts_with("/var/lib/apt")
                && !p.starts_with("/var/lib/systemd")
                && !p.contains("__pycache__")
        })
        .map(str::to_owned)
        .collect())
}

/// Removes the package when the test ends, however it ends.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "styxy"]).output();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_package_installs_runs_and_leaves_nothing_behind() -> Result<()> {
    let have_dpkg = Command::new("dpkg").arg("--version").output().is_ok();
    if !is_root() || !have_dpkg || ebpf_ready().is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI installs the package: it needs root, dpkg and the eBPF toolchain"
        );
        eprintln!("SKIP: installing the package needs root, dpkg and the eBPF toolchain");
        return Ok(());
    }
    if Path::new("/usr/bin/styxy").exists() {
        eprintln!(
            "SKIP: /usr/bin/styxy exists (a package installed here is not this test's to replace)"
        );
        return Ok(());
    }
    let root = workspace();
    let built = run_ok(
        Command::new(env!("CARGO"))
            .args(["xtask", "dist"])
            .current_dir(&root)
            .stdin(Stdio::null()),
    )?;
    let package = built
        .lines()
        .filter_map(|l| l.strip_prefix("xtask: "))
        .find(|p| p.ends_with(".deb"))
        .map(PathBuf::from)
        .with_context(|| format!("the package's path in {built}"))?;

    let before = filesystem_listing()?;
    let _purge = Purge;
    run_ok(Command::new("dpkg").arg("-i").arg(&package))?;
    let listed = run_ok(Command::new("dpkg").args(["-L", "styxy"]))?;
    // The programs travel inside the binary: no object file in the package.
    ensure!(
        !listed.lines().any(|l| l.ends_with(".o")),
        "an object file in the package: {listed}"
    );
    for file in [
        "/usr/bin/styxy",
        "/usr/lib/styxy/libstyxy_preload.so",
        "/usr/lib/styxy/libstyxy_shim_client.so",
        "/usr/lib/systemd/system/styxy.service",
        "/usr/share/bash-completion/completions/styxy",
        "/usr/share/man/man1/styxy-doctor.1.gz",
    ] {
        ensure!(
            listed.lines().any(|l| l == file),
            "{file} not in the package: {listed}"
        );
    }
    // The unit as systemd would read it.
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok()
    {
        let units = [
            "/usr/lib/systemd/system/styxy.service",
            "/usr/lib/systemd/system/styxy-http.socket",
            "/usr/lib/systemd/system/styxy-https.socket",
        ];
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .args(units)
            .output()?;
        let said = String::from_utf8_lossy(&out.stderr).to_string();
        ensure!(out.status.success(), "systemd-analyze verify: {said}");
    }

    // The installed daemon, as root with its defaults (/run/styxy, /var/lib/styxy), loading the
    // programs built into it.
    let daemon = KillOnDrop(
        Command::new("/usr/bin/styxy")
            .args(["daemon", "--listen", "none"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let status = styxy_tests::eventually(15, "the installed daemon up", || async {
        let out = Command::new("/usr/bin/styxy")
            .args(["--json", "status"])
            .output()
            .ok()?;
        out.status.success().then_some(out.stdout)
    })
    .await?;
    let status: serde_json::Value = serde_json::from_slice(&status)?;
    ensure!(
        status["observerReason"]
            .as_str()
            .is_some_and(|r| r.contains("built into this binary")),
        "{status}"
    );
    ensure!(status["kernelSessionsEnforced"] == true, "{status}");
    // No `.o` file read: none is open in the daemon, none of its memory maps one.
    let pid = daemon.0.id();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    ensure!(
        !maps.contains(".o\n"),
        "the daemon maps an object file: {maps}"
    );
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))?.flatten() {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            ensure!(
                target.extension().is_none_or(|e| e != "o"),
                "the daemon holds {} open",
                target.display()
            );
        }
    }

    // A real server moved off a taken port, through the installed shim.
    // In a built-in range (the test type's, 9200-9299): the installed daemon has no config.
    let port = 9281;
    let _holder = http_server(port)?;
    let script = "import socket\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
                  s.bind(('127.0.0.1', PORT))\ns.listen(1)\nprint('bound', s.getsockname()[1], flush=True)\n\
                  input()\n"
        .replace("PORT", &port.to_string());
    let mut moved = Spawned::start(
        Command::new("/usr/bin/styxy").args(["run", "--", "python3", "-u", "-c", &script]),
    )?;
    let line = moved.line_where(15, |l| l.starts_with("bound"))?;
    let bound: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .with_context(|| line.clone())?;
    ensure!(bound != port, "moved off the taken {port}: {line}");
    drop(moved);

    // The doctor, with the hooks installed and the shim preloaded: all green.
    let home = tempfile::tempdir()?;
    run_ok(
        Command::new("/usr/bin/styxy")
            .args(["hook", "install"])
            .env("HOME", home.path()),
    )?;
    let doctor = Command::new("/usr/bin/styxy")
        .args(["--json", "doctor"])
        .env("HOME", home.path())
        .env("LD_PRELOAD", "/usr/lib/styxy/libstyxy_preload.so")
        .current_dir(home.path())
        .output()?;
    let report: serde_json::Value = serde_json::from_slice(&doctor.stdout)?;
    ensure!(
        doctor.status.success() && report["ok"] == true,
        "doctor: {report}"
    );

    // Removed while a kernel session lives (its programs would stay pinned across a restart):
    // the daemon stops, its programs are detached, and every file the package brought goes.
    let mut session =
        Spawned::start(Command::new("/usr/bin/styxy").args(["run", "--", "sleep", "600"]))?;
    session.rest(0);
    let pins = Path::new("/sys/fs/bpf/styxy/var-lib-styxy");
    styxy_tests::eventually(10, "the session's programs pinned", || async {
        pins.exists().then_some(())
    })
    .await?;
    let mut daemon = daemon;
    run_ok(Command::new("dpkg").args(["-r", "styxy"]))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let stopped = loop {
        if let Some(exit) = daemon.0.try_wait()? {
            break exit;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "dpkg -r did not stop the daemon"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    ensure!(stopped.success(), "the daemon's exit: {stopped:?}");
    for file in listed
        .lines()
        .filter(|l| l.starts_with("/usr/bin") || l.starts_with("/usr/lib"))
    {
        let path = Path::new(file);
        ensure!(
            path.is_dir() || !path.exists(),
            "{file} is still there after dpkg -r"
        );
    }
    ensure!(!Path::new("/usr/lib/styxy").exists());
    ensure!(!pins.exists(), "dpkg -r leaves the kernel programs pinned");
    drop(session);
    // Purged: the state dir too.
    ensure!(
        Path::new("/var/lib/styxy").exists(),
        "the daemon's state dir"
    );
    run_ok(Command::new("dpkg").args(["--purge", "styxy"]))?;
    ensure!(
        !Path::new("/var/lib/styxy").exists(),
        "purge removes the state dir"
    );
    // Nothing the package or its scripts made is left anywhere it could have put something.
    let after = filesystem_listing()?;
    let left: Vec<&String> = after.difference(&before).collect();
    ensure!(left.is_empty(), "left behind after the purge: {left:?}");
    Ok(())
}
