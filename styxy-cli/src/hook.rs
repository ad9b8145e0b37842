//! The Claude Code SessionStart hook: `styxy hook session-start` turns the bind() shim on for an
//! agent's session and registers the agent process in it (with the daemon's eBPF programs, the
//! kernel then moves and redirects for everything the agent starts, static binaries included);
//! `styxy hook session-end` ends the session's leases and claims when the agent's session ends;
//! `styxy hook install|uninstall` adds or removes the SessionStart hook in `settings.json`.
//!
//! Claude Code runs SessionStart hooks with the session's details as JSON on stdin and the path of
//! a file in `CLAUDE_ENV_FILE`, which it sources before every shell command of the session; what
//! the hook prints goes into the agent's context. The hook never fails the session: whatever goes
//! wrong becomes a line of advice and exit status 0.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::client::Target;
use crate::preload;
use styxy_common::env;

/// Marks the lines this hook writes, so a second run adds nothing.
const ENV_MARKER: &str = "# styxy: bind() shim for this session (styxy hook session-start)";
/// The command `hook install` registers is `<styxy> hook session-start`.
const HOOK_ARGS: &str = "hook session-start";

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
    let mut input = String::new();
    let _ = std::io::stdin().read_to_string(&mut input);
    let session_id = serde_json::from_str::<Value>(&input)
        .ok()
        .and_then(|v| {
            v.get("session_id")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| format!("pid{}", std::process::id()));
    let instance = instance_id(&session_id);
    let mut lines = Vec::new();
    match turn_shim_on(&instance) {
        Ok(true) => lines.push(format!(
            "Styxy is on for this session (instance {instance}): a dev server that asks for a port \
             another process holds starts on a free port in the same range instead, and prints a line \
             `✓ STYXY: Auto-assigned port NEW (OLD in use by …)` — use the NEW port. \
             `styxy ports --instance {instance}` lists this session's servers; `styxy ports`, everyone's."
        )),
        Ok(false) => lines.push(format!("Styxy is already on for this session (instance {instance}).")),
        Err(e) => lines.push(format!(
            "Styxy could not turn its bind() shim on: {e:#}. Servers start as usual (no port moves)."
        )),
    }
    match join_kernel_session(target, &instance).await {
        Ok(answer) if answer.kernel_session => lines.push(
            "Static binaries (Go, musl) started in this session are moved and redirected by the kernel too."
                .to_string(),
        ),
        Ok(_) => {}
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
        pid,
        Duration::from_secs(3),
    )
    .await?;
    Ok(answer?)
}

/// The session id in a hook's JSON input, if it has one (and it is not empty).
fn session_id_of(input: &str) -> Option<String> {
    serde_json::from_str::<Value>(input)
        .ok()?
        .get("session_id")?
        .as_str()
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
}

/// `styxy hook session-end` (Claude Code `SessionEnd`): ends the session's leases and claims and
/// forgets its instance; its servers keep running. Never fails the session: whatever goes wrong
/// (no input, not JSON, no daemon), it says nothing and exits 0.
pub async fn session_end(target: &Target) {
    use std::io::Read as _;
    // At most 1 MiB: a hook's input is a few hundred bytes, a larger one not worth the memory.
    let mut input = String::new();
    let _ = std::io::stdin().take(1 << 20).read_to_string(&mut input);
    let Some(session_id) = session_id_of(&input) else {
        return;
    };
    let instance = instance_id(&session_id);
    let call = async {
        let mut client = crate::client::connect(target).await?;
        client
            .end_instance(styxy_proto::v1::EndInstanceRequest {
                instance_id: instance,
            })
            .await?;
        anyhow::Ok(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), call).await;
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

/// `~/.claude/settings.json`: Claude Code's user-level settings.
pub fn default_settings() -> Result<PathBuf> {
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("HOME is not set; give --settings FILE")?;
    Ok(PathBuf::from(home).join(".claude/settings.json"))
}

fn is_our_hook(hook: &Value) -> bool {
    hook.get("command")
        .and_then(Value::as_str)
        .is_some_and(|c| c.trim_end().ends_with(HOOK_ARGS) && c.contains("styxy"))
}

/// Adds the SessionStart hook running `command` to `settings`; false when one is there already.
pub fn add_hook(settings: &mut Value, command: &str) -> Result<bool> {
    let Some(root) = settings.as_object_mut() else {
        bail!("the settings file is not a JSON object");
    };
    let hooks = root.entry("hooks").or_insert_with(|| json!({}));
    let Some(hooks) = hooks.as_object_mut() else {
        bail!("`hooks` in the settings is not an object");
    };
    let session_start = hooks.entry("SessionStart").or_insert_with(|| json!([]));
    let Some(groups) = session_start.as_array_mut() else {
        bail!("`hooks.SessionStart` in the settings is not an array");
    };
    let present = groups.iter().any(|group| {
        group
            .get("hooks")
            .and_then(Value::as_array)
            .is_some_and(|hs| hs.iter().any(is_our_hook))
    });
    if present {
        return Ok(false);
    }
    groups.push(json!({ "hooks": [ { "type": "command", "command": command } ] }));
    Ok(true)
}

/// Removes this hook (only it) from `settings`, and the containers it leaves empty; false when absent.
pub fn remove_hook(settings: &mut Value) -> bool {
    let Some(hooks) = settings.get_mut("hooks").and_then(Value::as_object_mut) else {
        return false;
    };
    let Some(groups) = hooks.get_mut("SessionStart").and_then(Value::as_array_mut) else {
        return false;
    };
    let mut removed = false;
    for group in groups.iter_mut() {
        if let Some(hs) = group.get_mut("hooks").and_then(Value::as_array_mut) {
            let before = hs.len();
            hs.retain(|h| !is_our_hook(h));
            removed |= hs.len() != before;
        }
    }
    if !removed {
        return false;
    }
    groups.retain(|g| {
        g.get("hooks")
            .and_then(Value::as_array)
            .is_none_or(|hs| !hs.is_empty())
    });
    if groups.is_empty() {
        hooks.remove("SessionStart");
    }
    if hooks.is_empty() {
        if let Some(root) = settings.as_object_mut() {
            root.remove("hooks");
        }
    }
    true
}

fn load_settings(path: &Path) -> Result<Value> {
    match std::fs::read_to_string(path) {
        Ok(text) if text.trim().is_empty() => Ok(json!({})),
        Ok(text) => serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not valid JSON; fix it first, nothing was changed",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(json!({})),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn save_settings(path: &Path, settings: &Value) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("json.styxy-tmp");
    let text = serde_json::to_string_pretty(settings)? + "\n";
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

/// `styxy hook install`: returns the line to print.
pub fn install(settings_path: &Path) -> Result<String> {
    let exe = std::env::current_exe().context("finding the styxy binary")?;
    let exe = std::fs::canonicalize(&exe).unwrap_or(exe);
    let command = format!(
        "{} {HOOK_ARGS}",
        preload::shell_quote(&exe.to_string_lossy())
    );
    let mut settings = load_settings(settings_path)?;
    if !add_hook(&mut settings, &command)? {
        return Ok(format!(
            "the Styxy SessionStart hook is already in {}",
            settings_path.display()
        ));
    }
    save_settings(settings_path, &settings)?;
    Ok(format!(
        "added the SessionStart hook `{command}` to {}; new Claude Code sessions get the shim",
        settings_path.display()
    ))
}

/// `styxy hook uninstall`: returns the line to print.
pub fn uninstall(settings_path: &Path) -> Result<String> {
    let mut settings = load_settings(settings_path)?;
    if !remove_hook(&mut settings) {
        return Ok(format!("no Styxy hook in {}", settings_path.display()));
    }
    save_settings(settings_path, &settings)?;
    Ok(format!(
        "removed the Styxy SessionStart hook from {}",
        settings_path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_keeps_everything_else_and_is_idempotent() {
        let mut settings = json!({
            "model": "opus",
            "hooks": { "SessionStart": [ { "matcher": "startup", "hooks": [ { "type": "command", "command": "echo hi" } ] } ],
                       "Stop": [] }
        });
        let before = settings.clone();
        assert!(add_hook(&mut settings, "/usr/local/bin/styxy hook session-start").expect("add"));
        assert!(!add_hook(&mut settings, "/other/styxy hook session-start").expect("add again"));
        assert_eq!(settings["model"], "opus");
        assert_eq!(
            settings["hooks"]["SessionStart"].as_array().map(Vec::len),
            Some(2)
        );
        assert!(remove_hook(&mut settings));
        assert_eq!(settings, before, "uninstall removes only its own entry");
        assert!(!remove_hook(&mut settings));
    }

    #[test]
    fn an_empty_settings_file_gets_only_the_hook_and_loses_it_again() {
        let mut settings = json!({});
        assert!(add_hook(&mut settings, "styxy hook session-start").expect("add"));
        assert!(remove_hook(&mut settings));
        assert_eq!(settings, json!({}));
    }

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
