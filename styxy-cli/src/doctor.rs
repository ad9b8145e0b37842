//! `styxy doctor`: one command that checks what Styxy needs on this machine and says, for each
//! thing that is off, how to fix it — the daemon reachable and its observer, the eBPF programs
//! and kernel sessions, the shim, the Claude Code hooks and MCP server, what keeps one session's
//! kill from reaching another's servers, the state directory, and other tools that fight for the
//! same ports. Exit status 0 only when every check passes; `--json`
//! prints the same as one object.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};
use serde::Serialize;
use styxy_proto::v1 as pb;

use crate::client::{connect, Target};
use crate::hook::settings::{self, Places};
use crate::output::human_duration;
use crate::preload;

/// One check's outcome.
#[derive(Serialize)]
struct Check {
    name: &'static str,
    ok: bool,
    /// What was found.
    detail: String,
    /// What to do about it, when it is not ok.
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            ok: true,
            detail: detail.into(),
            fix: None,
        }
    }

    fn off(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name,
            ok: false,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// Runs every check against the daemon at `target` (waiting at most `deadline` for it), prints
/// them, and fails when any is off.
pub async fn run(target: &Target, as_json: bool, deadline: Duration) -> Result<()> {
    let status = daemon_status(target, deadline).await;
    let mut checks = Vec::new();
    match &status {
        Ok(s) => checks.push(Check::ok(
            "daemon",
            format!(
                "Styxy {} at {}, up {}; observer {}",
                s.version,
                target,
                human_duration(s.uptime_seconds),
                s.observer
            ),
        )),
        Err(e) => checks.push(Check::off(
            "daemon",
            format!("{e:#}"),
            "start it: `sudo systemctl start styxy` (installed) or `styxy daemon`; or point at it with \
             --socket / STYXY_SOCKET",
        )),
    }
    let status = status.ok();
    checks.extend(kernel_checks(status.as_ref()));
    checks.push(shim_check());
    checks.push(claude_code_check());
    checks.push(kill_protection_check(status.as_ref()));
    checks.push(state_dir_check(status.as_ref()));
    checks.push(port_tools_check(status.as_ref()));

    let failed = checks.iter().filter(|c| !c.ok).count();
    if as_json {
        let report = serde_json::json!({ "ok": failed == 0, "checks": checks });
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for check in &checks {
            let mark = if check.ok { "✓" } else { "✗" };
            outln!("{mark} {:<16} {}", check.name, check.detail);
            if let Some(fix) = &check.fix {
                outln!("  {:<16} fix: {fix}", "");
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} checks found something to fix", checks.len());
    }
    Ok(())
}

async fn daemon_status(target: &Target, deadline: Duration) -> Result<pb::StatusResponse> {
    let asked = async {
        let mut client = connect(target).await?;
        Ok::<_, anyhow::Error>(client.status(pb::StatusRequest {}).await?.into_inner())
    };
    match tokio::time::timeout(deadline, asked).await {
        Ok(answer) => answer,
        Err(_) => bail!("it did not answer within {} s", deadline.as_secs_f64()),
    }
}

/// The eBPF programs attached, and kernel sessions enforced (what moves static binaries and
/// keeps a session's traffic its own without the shim).
fn kernel_checks(status: Option<&pb::StatusResponse>) -> [Check; 2] {
    let Some(s) = status else {
        return [
            Check::off(
                "eBPF programs",
                "not checked: no daemon",
                "start the daemon (above)",
            ),
            Check::off(
                "kernel sessions",
                "not checked: no daemon",
                "start the daemon (above)",
            ),
        ];
    };
    let programs = if s.observer == "ebpf" {
        Check::ok("eBPF programs", s.observer_reason.clone())
    } else {
        Check::off(
            "eBPF programs",
            format!("not attached: {}", s.observer_reason),
            "run the daemon as root on a kernel with cgroup v2 (the installed unit does); a styxy \
             built by `cargo xtask build` carries its programs, or give --ebpf-object FILE",
        )
    };
    let sessions = if s.kernel_sessions_enforced {
        Check::ok(
            "kernel sessions",
            format!("{} live; {}", s.kernel_sessions, s.kernel_sessions_detail),
        )
    } else {
        Check::off(
            "kernel sessions",
            format!("off: {}", s.kernel_sessions_detail),
            "attach the programs at the cgroup root (the daemon's default; no --cgroup below it)",
        )
    };
    [programs, sessions]
}

/// The shim: in this shell's `LD_PRELOAD`, or at least found; and loadable by the dynamic
/// loader (a program started with it runs, and the loader says nothing).
fn shim_check() -> Check {
    let preload = std::env::var("LD_PRELOAD").unwrap_or_default();
    let in_shell = preload
        .split([' ', ':'])
        .find(|entry| entry.ends_with(styxy_common::paths::PRELOAD_LIBRARY))
        .map(str::to_string);
    let library = match &in_shell {
        Some(entry) => entry.clone(),
        None => match preload::find_library() {
            Ok(path) => path.display().to_string(),
            Err(e) => {
                return Check::off(
                    "shim",
                    format!("{e:#}"),
                    "install it with `styxy install` (or `cargo xtask build`)",
                )
            }
        },
    };
    let tried = Command::new("/bin/sh")
        .args(["-c", "exit 0"])
        .env("LD_PRELOAD", &library)
        .output();
    let loader_said = match &tried {
        Ok(out) if out.status.success() && out.stderr.is_empty() => None,
        Ok(out) => Some(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        Err(e) => Some(e.to_string()),
    };
    match (loader_said, in_shell) {
        (Some(said), _) => Check::off(
            "shim",
            format!("{library} does not load: {said}"),
            "reinstall it (`styxy install`), built for this machine's glibc",
        ),
        (None, Some(_)) => Check::ok("shim", format!("{library}, in this shell's LD_PRELOAD")),
        (None, None) => Check::ok(
            "shim",
            format!(
                "{library} loads; not in this shell's LD_PRELOAD (agent sessions get it from the \
                 SessionStart hook; `eval \"$(styxy env)\"` or `styxy run -- CMD` for yours)"
            ),
        ),
    }
}

/// Where Claude Code's settings may hold Styxy's hooks: the user's, and this directory's project.
fn settings_scopes() -> Vec<Places> {
    let mut scopes = Vec::new();
    if let Ok(user) = Places::user(None) {
        scopes.push(user);
    }
    if let Ok(here) = std::env::current_dir() {
        scopes.push(Places::project(&here, None));
    }
    scopes
}

/// The Claude Code hooks and MCP server, in the user's settings or this directory's project.
fn claude_code_check() -> Check {
    let mut seen = Vec::new();
    for places in &settings_scopes() {
        match settings::installed(places) {
            Ok(found) if found.missing_hooks.is_empty() && found.mcp_server => {
                return Check::ok(
                    "Claude Code",
                    format!(
                        "the hooks in {} and the MCP server in {}",
                        places.settings.display(),
                        places.mcp.display()
                    ),
                );
            }
            Ok(found) => seen.push(format!(
                "{}: {}{}",
                places.settings.display(),
                if found.missing_hooks.is_empty() {
                    "hooks there".to_string()
                } else {
                    format!("missing {}", found.missing_hooks.join(", "))
                },
                if found.mcp_server {
                    "; MCP server there".to_string()
                } else {
                    format!("; no MCP server in {}", places.mcp.display())
                }
            )),
            Err(e) => seen.push(format!("{e:#}")),
        }
    }
    Check::off(
        "Claude Code",
        seen.join("; "),
        "`styxy hook install` (or `styxy hook install --project DIR` for one project)",
    )
}

/// What keeps a session's `kill`/`pkill` off another session's servers: the kernel's
/// `lsm/task_kill` (every program), else the agents' PreToolUse guard (commands Claude Code runs).
/// One of the two passes; the detail says which, and why the kernel's is off.
fn kill_protection_check(status: Option<&pb::StatusResponse>) -> Check {
    const NAME: &str = "kill protection";
    let Some(s) = status else {
        return Check::off(NAME, "not checked: no daemon", "start the daemon (above)");
    };
    if s.kill_protection {
        return Check::ok(NAME, format!("in the kernel: {}", s.kill_protection_detail));
    }
    let mut guard = None;
    for places in &settings_scopes() {
        if settings::installed(places).is_ok_and(|f| !f.missing_hooks.contains(&"PreToolUse")) {
            guard = Some(places.settings.display().to_string());
            break;
        }
    }
    match guard {
        Some(settings) => Check::ok(
            NAME,
            format!(
                "the agents' PreToolUse guard (in {settings}) only; {}",
                s.kill_protection_detail
            ),
        ),
        None => Check::off(
            NAME,
            format!("none: {}", s.kill_protection_detail),
            "`styxy hook install` (the agents' guard); for every program, a kernel with the BPF \
             LSM (`bpf` in /sys/kernel/security/lsm, e.g. boot with lsm=...,bpf) and the daemon's \
             default --kill-protection on",
        ),
    }
}

/// The daemon's state directory: its owner's (root's, or this user's) alone.
fn state_dir_check(status: Option<&pb::StatusResponse>) -> Check {
    let Some(s) = status else {
        return Check::off(
            "state dir",
            "not checked: no daemon",
            "start the daemon (above)",
        );
    };
    let dir = Path::new(&s.state_dir);
    let meta = match std::fs::metadata(dir) {
        Ok(meta) => meta,
        Err(e) => {
            return Check::off(
                "state dir",
                format!("{}: {e}", dir.display()),
                "check the path the daemon was given (--state-dir)",
            )
        }
    };
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let mode = meta.mode() & 0o7777;
    if meta.uid() != 0 && meta.uid() != me {
        return Check::off(
            "state dir",
            format!("{} belongs to uid {}", dir.display(), meta.uid()),
            format!(
                "give it to the daemon's user: `chown -R {me} {}`",
                dir.display()
            ),
        );
    }
    if mode & 0o022 != 0 {
        return Check::off(
            "state dir",
            format!("{} is writable by others (mode {mode:o})", dir.display()),
            format!("`chmod 700 {}`", dir.display()),
        );
    }
    Check::ok(
        "state dir",
        format!("{} (uid {}, mode {mode:o})", dir.display(), meta.uid()),
    )
}

/// Other tools on this machine that assign ports or proxy `*.localhost` names too, and the
/// names' proxy's own trouble getting its ports.
fn port_tools_check(status: Option<&pb::StatusResponse>) -> Check {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let words: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|w| String::from_utf8_lossy(w).into_owned())
            .collect();
        // portless (npm): its own proxy and port numbers for `*.localhost` names.
        if words
            .iter()
            .take(3)
            .any(|w| w.rsplit('/').next() == Some("portless"))
        {
            found.push(format!(
                "portless (pid {pid}) proxies *.localhost names too"
            ));
        }
    }
    if let Some(detail) = status.map(|s| &s.proxy_detail).filter(|d| !d.is_empty()) {
        found.push(format!("the names' proxy: {detail}"));
    }
    if found.is_empty() {
        Check::ok(
            "port tools",
            "no other tool assigns ports or serves *.localhost names",
        )
    } else {
        Check::off(
            "port tools",
            found.join("; "),
            "stop the other tool (or keep its names and ports apart from Styxy's), and free the \
             proxy's ports",
        )
    }
}
