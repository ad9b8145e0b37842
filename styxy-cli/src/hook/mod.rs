//! The Claude Code SessionStart hook: `styxy hook session-start` turns the bind() shim on for an
//! agent's session and registers the agent process in it (with the daemon's eBPF programs, the
//! kernel then moves and redirects for everything the agent starts, static binaries included);
//! `styxy hook post-tool-use` tells the agent of every move and every server of its session that
//! started or stopped (`post_tool_use`); `styxy hook pre-tool-use` denies a kill command aimed
//! at another session's processes (`kill_guard`, reading `kill_idioms`); `styxy hook session-end` ends the session's leases and
//! claims when the agent's session ends; `styxy hook install|uninstall` adds or removes all of it,
//! the MCP server included (`settings`).
//!
//! Claude Code runs SessionStart hooks with the session's details as JSON on stdin and the path of
//! a file in `CLAUDE_ENV_FILE`, which it sources before every shell command of the session; what
//! the hook prints goes into the agent's context. The hook never fails the session: whatever goes
//! wrong becomes a line of advice and exit status 0.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::client::Target;
use crate::preload;
use styxy_common::env;

/// Marks the lines this hook writes, so a second run adds nothing.
const ENV_MARKER: &str = "# styxy: bind() shim for this session (styxy hook session-start)";

pub mod kill_guard;
pub mod kill_idioms;
pub mod post_tool_use;
pub mod printed_urls;
pub mod settings;

/// A hook's JSON input from stdin, at most 1 MiB: a hook's input is a few hundred bytes, a larger
/// one not worth the memory (and then not valid JSON, so ignored).
pub(crate) fn read_hook_input() -> String {
    let mut input = String::new();
    let _ = std::io::stdin().take(1 << 20).read_to_string(&mut input);
    input
}

/// The instance id of a session: `claude-<session id>`, reduced to what the daemon accepts.
pub fn instance_id(session_id: &str) -> String {
    let cleaned: String = session_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(100)
        .collect();
    format!("claude-{cleaned}")
}

/// The lines for `CLAUDE_ENV_FILE`. Sourcing them any number of times puts the shim in
/// `LD_PRELOAD` once and keeps what was there.
pub fn env_file_lines(library: &Path, instance: &str) -> String {
    let lib = preload::shell_quote(&library.to_string_lossy());
    format!(
        "{ENV_MARKER}\n\
         case \":${{LD_PRELOAD:-}}:\" in *:{lib}:*) ;; *) export LD_PRELOAD={lib}\"${{LD_PRELOAD:+:$LD_PRELOAD}}\" ;; esac\n\
         export {}={}\n",
        env::INSTANCE.name,
        preload::shell_quote(instance)
    )
}

/// `styxy hook session-start`: returns what to print for the agent. Never an error.
pub async fn session_start(target: &Target) -> String {
    let input = read_hook_input();
    let session_id = session_id_of(&input).unwrap_or_else(|| format!("pid{}", std::process::id()));
    let instance = instance_id(&session_id);
    let mut lines = Vec::new();
    match turn_shim_on(&instance) {
        Ok(true) => lines.push(format!(
            "Styxy is on for this session (instance {instance}): a dev server that asks for a port \
             another process holds starts on a free port in the same range instead, and prints a line \
             `✓ STYXY: Auto-assigned port NEW (OLD in use by …)`. Inside this session OLD still \
             reaches the moved server; from outside (a browser) use NEW. After each Bash call you are \
             told of moved and stopped servers, background ones included. `styxy session` lists this \
             session's servers, `styxy ports` everyone's (or the styxy MCP tools: session_ports, who_holds, …)."
        )),
        Ok(false) => lines.push(format!("Styxy is already on for this session (instance {instance}).")),
        Err(e) => lines.push(format!(
            "Styxy could not turn its bind() shim on: {e:#}. Servers start as usual (no port moves)."
        )),
    }
    match join_kernel_session(target, &instance).await {
        Ok(answer) => {
            if answer.kernel_session {
                lines.push(
                    "Static binaries (Go, musl) started in this session are moved and redirected by the kernel too."
                        .to_string(),
                );
                lines.push(if answer.focused_by.is_empty() {
                    "The person at the keyboard may give this session the focus (`styxy focus`): their localhost:PORT outside the sessions then reaches this session's servers at the ports they asked for. You are told when it comes or goes.".to_string()
                } else {
                    "This session has the focus (`styxy focus`): outside the sessions, localhost:PORT reaches this session's servers at the ports they asked for.".to_string()
                });
            }
            if let Some(line) = names_line(&answer) {
                lines.push(line);
            }
        }
        Err(e) if e.downcast_ref::<tonic::Status>().is_some() => lines.push(format!(
            "Styxy could not register this session with its daemon: {e:#}."
        )),
        Err(_) => lines.push(format!(
            "Warning: the Styxy daemon is not answering at {target}; ports will not be moved until it \
             runs. Fix: `sudo systemctl start styxy` (or run `styxy daemon`)."
        )),
    }
    lines.join("\n")
}

/// How the person at the keyboard reaches this session's servers by name, when the daemon's
/// proxy runs.
fn names_line(answer: &styxy_proto::v1::RegisterInstanceResponse) -> Option<String> {
    let (scheme, listen) =
        styxy_common::url::proxy_entry(&answer.proxy_listen, &answer.proxy_tls_listen)?;
    if answer.session_name.is_empty() {
        return None;
    }
    let url = |name: &str| styxy_common::url::name_url(scheme, name, listen);
    let name = &answer.session_name;
    Some(format!(
        "A browser reaches this session's servers by name, whatever port they land on: \
         {} (its main web server), {} (storybook, api, …) and {}. Give the person those URLs \
         rather than port numbers; every session's servers are listed live at {}.",
        url(&format!("{name}.localhost")),
        url(&format!("<service>.{name}.localhost")),
        url(&format!("<asked port>.{name}.localhost")),
        url(styxy_common::url::DASHBOARD_HOST),
    ))
}

/// The agent process whose hook this is: the nearest ancestor that is not a shell (Claude Code
/// may run hooks through `sh -c`).
fn agent_pid() -> Option<u32> {
    let mut pid = std::os::unix::process::parent_id();
    for _ in 0..4 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // pid (comm) state ppid …: comm may hold spaces and parentheses, so split at the last ')'.
        let (head, tail) = stat.rsplit_once(')')?;
        let comm = head.split_once('(')?.1;
        if !matches!(comm, "sh" | "bash" | "dash" | "zsh" | "fish") {
            return Some(pid);
        }
        pid = tail.split_whitespace().nth(1)?.parse().ok()?;
    }
    None
}

/// Registers the agent process in the session `instance`: with the daemon's eBPF programs, it
/// and everything it starts from now on are in the instance's kernel session.
async fn join_kernel_session(
    target: &Target,
    instance: &str,
) -> Result<styxy_proto::v1::RegisterInstanceResponse> {
    let pid = agent_pid().context("no agent process found above this hook")?;
    let answer = crate::client::register_instance(
        target,
        Some(instance.to_string()),
        None,
        pid,
        Duration::from_secs(3),
    )
    .await?;
    Ok(answer?)
}

/// The session id in a hook's JSON input, if it has one (and it is not empty).
pub(crate) fn session_id_of(input: &str) -> Option<String> {
    serde_json::from_str::<Value>(input)
        .ok()?
        .get("session_id")?
        .as_str()
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
}

/// Set to `1` in the environment Claude Code runs its hooks with (its own: `env` in
/// settings.json, or the shell that starts it), and SessionEnd stops the session's servers too.
pub const STOP_SERVERS_ON_END: &str = "STYXY_STOP_SERVERS_ON_END";

/// `styxy hook session-end` (Claude Code `SessionEnd`): ends the session's leases and claims and
/// forgets its instance; its servers keep running (orphans, which `styxy prune` stops), unless
/// the session opted in with [`STOP_SERVERS_ON_END`]. Never fails the session: whatever goes
/// wrong (no input, not JSON, no daemon), it says nothing and exits 0.
pub async fn session_end(target: &Target) {
    let input = read_hook_input();
    let Some(session_id) = session_id_of(&input) else {
        return;
    };
    let instance = instance_id(&session_id);
    let stop_servers = std::env::var(STOP_SERVERS_ON_END).is_ok_and(|v| v == "1");
    // Stopping waits for the servers to end (SIGTERM, then SIGKILL after 5 s).
    let deadline = if stop_servers { 15 } else { 2 };
    let call = async {
        let mut client = crate::client::connect(target).await?;
        client
            .end_instance(styxy_proto::v1::EndInstanceRequest {
                instance_id: instance,
                stop_servers,
            })
            .await?;
        anyhow::Ok(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(deadline), call).await;
}

/// Appends the shim's lines to `CLAUDE_ENV_FILE`; `Ok(false)` when they are there already.
fn turn_shim_on(instance: &str) -> Result<bool> {
    let env_file = std::env::var_os("CLAUDE_ENV_FILE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .context(
            "CLAUDE_ENV_FILE is not set (Claude Code sets it for SessionStart hooks); in a shell, \
             `eval \"$(styxy env)\"` does the same",
        )?;
    let library = preload::find_library()?;
    let existing = match std::fs::read_to_string(&env_file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", env_file.display())),
    };
    if existing.lines().any(|l| l == ENV_MARKER) {
        return Ok(false);
    }
    let mut text = String::new();
    if !existing.is_empty() && !existing.ends_with('\n') {
        text.push('\n');
    }
    text += &env_file_lines(&library, instance);
    use std::io::Write;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&env_file)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("appending to {}", env_file.display()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_end_finds_the_session_id_and_ignores_bad_input() {
        assert_eq!(
            session_id_of(r#"{"session_id":"abc-1","hook_event_name":"SessionEnd"}"#).as_deref(),
            Some("abc-1")
        );
        for bad in [
            "",
            "not json",
            "{}",
            r#"{"session_id":""}"#,
            r#"{"session_id":7}"#,
            "[1,2]",
        ] {
            assert_eq!(session_id_of(bad), None, "{bad:?}");
        }
        let huge = format!(r#"{{"session_id":"x","pad":"{}"}}"#, "y".repeat(2 << 20));
        assert_eq!(
            session_id_of(&huge).as_deref(),
            Some("x"),
            "parsed whole when handed whole"
        );
    }

    #[test]
    fn instance_ids_are_what_the_daemon_accepts() {
        assert_eq!(instance_id("abc-123"), "claude-abc-123");
        assert_eq!(instance_id("a b/c;$"), "claude-abc");
    }
}
