//! `styxy doctor` against real daemons: what is off is named with its fix and the exit status
//! says so; on the default install (the root daemon with eBPF at the cgroup root, the shim in the
//! shell, the Claude Code hooks installed) every check passes.

use std::path::Path;
use std::process::{Command, Output};

use anyhow::{Context, Result};
use styxy_tests::{ebpf_ready, shim_library, Daemon};

/// `styxy --json doctor` against `daemon` with `home` as `$HOME`, run in `home`, without the
/// shim unless `preload` says otherwise.
fn doctor(
    daemon: &Daemon,
    home: &Path,
    preload: Option<&Path>,
) -> Result<(Output, serde_json::Value)> {
    let mut command = daemon.cli_command(&["--json", "doctor"]);
    command
        .current_dir(home)
        .env("HOME", home)
        .env_remove("LD_PRELOAD");
    if let Some(library) = preload {
        command.env("LD_PRELOAD", library);
    }
    let out = command.output()?;
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).with_context(|| format!("doctor's JSON: {out:?}"))?;
    Ok((out, report))
}

/// The check named `name` in a report.
fn check<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["checks"]
        .as_array()
        .and_then(|checks| checks.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no check {name} in {report}"))
}

fn hook_install(home: &Path) -> Result<()> {
    let out = Command::new(styxy_tests::styxy_bin())
        .args(["hook", "install"])
        .env("HOME", home)
        .output()?;
    anyhow::ensure!(out.status.success(), "hook install: {out:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn doctor_names_what_is_off_with_its_fix() -> Result<()> {
    let daemon = Daemon::start_with(&["--observer", "sockets"]).await?;
    let home = tempfile::tempdir()?;
    let (out, report) = doctor(&daemon, home.path(), None)?;
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert_eq!(report["ok"], false);
    assert_eq!(check(&report, "daemon")["ok"], true, "{report}");
    let ebpf = check(&report, "eBPF programs");
    assert_eq!(ebpf["ok"], false);
    assert!(
        ebpf["detail"]
            .as_str()
            .is_some_and(|d| d.contains("--observer sockets")),
        "{ebpf}"
    );
    assert!(
        ebpf["fix"].as_str().is_some_and(|f| f.contains("root")),
        "{ebpf}"
    );
    let claude = check(&report, "Claude Code");
    assert_eq!(claude["ok"], false);
    assert!(
        claude["fix"]
            .as_str()
            .is_some_and(|f| f.contains("styxy hook install")),
        "{claude}"
    );
    assert_eq!(check(&report, "shim")["ok"], true, "{report}");
    assert_eq!(check(&report, "state dir")["ok"], true, "{report}");
    // No kernel programs and no guard: nothing keeps one session's kill off another's servers.
    let kills = check(&report, "kill protection");
    assert_eq!(kills["ok"], false, "{kills}");
    assert!(
        kills["fix"]
            .as_str()
            .is_some_and(|f| f.contains("styxy hook install") && f.contains("lsm")),
        "{kills}"
    );
    // The people's output says the same, each fix under its check.
    let text = daemon
        .cli_command(&["doctor"])
        .current_dir(home.path())
        .env("HOME", home.path())
        .output()?;
    let printed = String::from_utf8_lossy(&text.stdout);
    assert!(
        printed.contains("✓ daemon") && printed.contains("✗ Claude Code"),
        "{printed}"
    );
    assert!(printed.contains("fix: `styxy hook install`"), "{printed}");
    assert!(String::from_utf8_lossy(&text.stderr).contains("checks found something to fix"));

    // Fixed as told: the hooks and the MCP server are found.
    hook_install(home.path())?;
    let (_, report) = doctor(&daemon, home.path(), None)?;
    assert_eq!(check(&report, "Claude Code")["ok"], true, "{report}");
    // ... and with them the agents' guard: kill protection passes, saying it is the guard alone.
    let kills = check(&report, "kill protection");
    assert_eq!(kills["ok"], true, "{kills}");
    assert!(
        kills["detail"]
            .as_str()
            .is_some_and(|d| d.contains("PreToolUse guard") && d.contains("only")),
        "{kills}"
    );
    // A state dir others may write to is named, with the chmod that fixes it.
    let state = daemon.state_dir().to_path_buf();
    std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
    let (_, report) = doctor(&daemon, home.path(), None)?;
    let dir = check(&report, "state dir");
    std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    assert_eq!(dir["ok"], false, "{report}");
    assert!(
        dir["fix"].as_str().is_some_and(|f| f.contains("chmod 700")),
        "{dir}"
    );

    // No daemon: said, with how to start one, within the deadline, and the local checks still run.
    let socket = daemon.socket.clone();
    drop(daemon);
    let out = Command::new(styxy_tests::styxy_bin())
        .arg("--socket")
        .arg(&socket)
        .args(["--timeout", "3", "--json", "doctor"])
        .env("HOME", home.path())
        .current_dir(home.path())
        .output()?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(out.status.code(), Some(1));
    let down = check(&report, "daemon");
    assert_eq!(down["ok"], false);
    assert!(
        down["fix"]
            .as_str()
            .is_some_and(|f| f.contains("styxy daemon")),
        "{down}"
    );
    assert_eq!(check(&report, "Claude Code")["ok"], true, "{report}");
    Ok(())
}

/// The default install, as a user has it: the root daemon with its eBPF programs at the cgroup
/// root, the shim in the shell, the hooks installed — every check passes, exit status 0.
#[tokio::test(flavor = "multi_thread")]
async fn doctor_is_all_green_on_the_default_install() -> Result<()> {
    let Some(setup) = ebpf_ready() else {
        return Ok(());
    };
    let object = setup.object.to_str().context("utf-8 path")?;
    let daemon = Daemon::start_with(&["--observer", "ebpf", "--ebpf-object", object]).await?;
    let home = tempfile::tempdir()?;
    hook_install(home.path())?;
    let library = shim_library();
    let (out, report) = doctor(&daemon, home.path(), Some(&library))?;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(out.status.code(), Some(0));
    let shim = check(&report, "shim");
    assert!(
        shim["detail"]
            .as_str()
            .is_some_and(|d| d.contains("in this shell's LD_PRELOAD")),
        "{shim}"
    );
    // The kernel's lsm/task_kill where the kernel takes BPF LSM programs, else the guard: the
    // detail says which, agreeing with the daemon's status.
    let kills = check(&report, "kill protection");
    let status = daemon.cli_command(&["--json", "status"]).output()?;
    let status: serde_json::Value = serde_json::from_slice(&status.stdout)?;
    let expected = if status["killProtection"] == true {
        "in the kernel"
    } else {
        "PreToolUse guard"
    };
    assert!(
        kills["detail"]
            .as_str()
            .is_some_and(|d| d.contains(expected)),
        "{kills} (status: {status})"
    );
    Ok(())
}
