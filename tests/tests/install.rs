//! Running Styxy for real: the systemd unit, readiness notification, `styxy install|uninstall`,
//! and the Claude Code SessionStart hook — with the real binary, a real daemon and real servers.

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use styxy_tests::{http_server, notice_port, run_ok, styxy_bin, Daemon, Spawned};

/// A fresh directory, removed when the returned guard drops (a failed test included).
fn temp_dir(name: &str) -> Result<(tempfile::TempDir, PathBuf)> {
    let guard = tempfile::Builder::new()
        .prefix(&format!("styxy-{name}-"))
        .tempdir()?;
    let dir = guard.path().to_path_buf();
    Ok((guard, dir))
}

fn styxy(args: &[&str]) -> Command {
    let mut command = Command::new(styxy_bin());
    command.args(args);
    command
}

/// Every path under `dir` with its contents (None for directories).
fn snapshot(dir: &Path) -> Result<BTreeMap<PathBuf, Option<Vec<u8>>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        for entry in std::fs::read_dir(&current)? {
            let path = entry?.path();
            let relative = path.strip_prefix(dir)?.to_path_buf();
            if path.is_dir() {
                out.insert(relative, None);
                stack.push(path);
            } else {
                out.insert(relative, Some(std::fs::read(&path)?));
            }
        }
    }
    Ok(out)
}

#[test]
fn install_then_uninstall_leaves_the_root_as_it_was() -> Result<()> {
    let (_root_guard, root) = temp_dir("install-root")?;
    std::fs::create_dir_all(root.join("usr/local/bin"))?;
    std::fs::write(root.join("usr/local/bin/someone-else"), "keep me")?;
    let before = snapshot(&root)?;
    let root_arg = root.to_str().context("utf-8 path")?;

    let said = run_ok(&mut styxy(&["install", "--root", root_arg]))?;
    for installed in [
        "usr/local/bin/styxy",
        "usr/local/lib/styxy/libstyxy_preload.so",
        "usr/local/lib/styxy/libstyxy_shim_client.so",
        "etc/systemd/system/styxy.service",
        "etc/systemd/system/styxy-http.socket",
        "etc/systemd/system/styxy-https.socket",
    ] {
        assert!(
            root.join(installed).is_file(),
            "{installed} installed: {said}"
        );
        assert!(said.contains(installed), "{said}");
    }
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/styxy.service"))?;
    assert!(
        unit.contains("ExecStart=/usr/local/bin/styxy daemon"),
        "{unit}"
    );
    // The installed binary finds its shim through the prefix layout.
    let env = run_ok(Command::new(root.join("usr/local/bin/styxy")).arg("env"))?;
    assert!(
        env.contains(&format!(
            "{}/usr/local/lib/styxy/libstyxy_preload.so",
            root.display()
        )),
        "{env}"
    );
    // Installing again over it changes nothing but the files' contents.
    run_ok(&mut styxy(&["install", "--root", root_arg]))?;

    let said = run_ok(&mut styxy(&["uninstall", "--root", root_arg]))?;
    assert!(said.contains("removed"), "{said}");
    assert_eq!(snapshot(&root)?, before, "uninstall restores the tree");
    Ok(())
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() -> Result<()> {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "systemd-analyze is required in CI (apt-get install systemd)"
        );
        eprintln!("SKIP: systemd-analyze not found (apt-get install systemd)");
        return Ok(());
    }
    let (_root_guard, root) = temp_dir("unit-root")?;
    run_ok(&mut styxy(&[
        "install",
        "--root",
        root.to_str().context("utf-8 path")?,
    ]))?;
    // verify checks that ExecStart's binary exists: point it at the staged copy.
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/styxy.service"))?;
    let staged_bin = root.join("usr/local/bin/styxy");
    let unit = unit.replace(
        "ExecStart=/usr/local/bin/styxy",
        &format!("ExecStart={}", staged_bin.display()),
    );
    let check = root.join("check/styxy.service");
    std::fs::create_dir_all(check.parent().context("parent")?)?;
    std::fs::write(&check, unit)?;
    // The sockets that pass the names' proxy its ports, checked with the service they name.
    let mut units = vec![check.clone()];
    for socket in ["styxy-http.socket", "styxy-https.socket"] {
        let text = std::fs::read_to_string(root.join("etc/systemd/system").join(socket))?;
        assert!(text.contains("Service=styxy.service"), "{text}");
        let path = root.join("check").join(socket);
        std::fs::write(&path, text)?;
        units.push(path);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .output()?;
    let said =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );

    // A unit with a mistake does fail it (the check is real).
    std::fs::write(
        &check,
        std::fs::read_to_string(&check)?.replace("Type=notify", "Type=notifyy"),
    )?;
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&check)
        .output()?;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("notifyy"), "a bad unit is reported: {said}");
    Ok(())
}

#[test]
fn the_daemon_tells_systemd_when_it_is_ready_and_when_it_stops() -> Result<()> {
    let (_dir_guard, dir) = temp_dir("notify")?;
    let notify = dir.join("notify.sock");
    let listener = UnixDatagram::bind(&notify)?;
    listener.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut daemon = Command::new(styxy_bin())
        .arg("daemon")
        .arg("--socket")
        .arg(dir.join("styxy.sock"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(["--listen", "none", "--observer", "sockets"])
        .env("NOTIFY_SOCKET", &notify)
        .stderr(Stdio::null())
        .spawn()?;
    let mut message = [0u8; 512];
    let n = listener
        .recv(&mut message)
        .context("no readiness message within 30 s")?;
    let ready = String::from_utf8_lossy(&message[..n]).to_string();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    assert!(
        dir.join("styxy.sock").exists(),
        "the socket exists before READY=1 is sent"
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let n = listener.recv(&mut message).context("no STOPPING message")?;
    assert!(String::from_utf8_lossy(&message[..n]).contains("STOPPING=1"));
    assert!(daemon.wait()?.success(), "a clean exit on SIGTERM");
    Ok(())
}

const SESSION_JSON: &str = r#"{"session_id":"3f9c-test","transcript_path":"/tmp/t.jsonl","cwd":"/tmp","hook_event_name":"SessionStart","source":"startup"}"#;

fn session_start(env_file: &Path, socket: &Path) -> Result<String> {
    let mut child = styxy(&[
        "--socket",
        socket.to_str().context("utf-8")?,
        "hook",
        "session-start",
    ])
    .env("CLAUDE_ENV_FILE", env_file)
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .spawn()?;
    std::io::Write::write_all(
        child.stdin.as_mut().context("stdin")?,
        SESSION_JSON.as_bytes(),
    )?;
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "the hook must exit 0: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_session_start_hook_turns_the_shim_on_once_and_moves_servers() -> Result<()> {
    let daemon = Daemon::start().await?;
    let (_dir_guard, dir) = temp_dir("hook")?;
    let env_file = dir.join("claude-env.sh");
    std::fs::write(&env_file, "export EARLIER=1\n")?;

    let said = session_start(&env_file, &daemon.socket)?;
    assert!(
        said.contains("Styxy is on") && said.contains("✓ STYXY"),
        "{said}"
    );
    assert!(!said.contains("Warning"), "{said}");
    let first = std::fs::read_to_string(&env_file)?;
    assert!(first.starts_with("export EARLIER=1\n"), "kept: {first}");
    assert!(
        first.contains("libstyxy_preload.so")
            && first.contains("STYXY_INSTANCE='claude-3f9c-test'"),
        "{first}"
    );
    session_start(&env_file, &daemon.socket)?;
    assert_eq!(
        std::fs::read_to_string(&env_file)?,
        first,
        "a second run adds nothing"
    );

    // Sourced (twice, as Claude Code does before each command) over an existing LD_PRELOAD.
    let script = format!(". '{0}'; . '{0}'; echo \"$LD_PRELOAD\"", env_file.display());
    let out = Command::new("sh")
        .args(["-c", &script])
        .env("LD_PRELOAD", "/opt/other/libother.so")
        .output()?;
    let preload = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let entries: Vec<&str> = preload.split(':').collect();
    assert_eq!(entries.len(), 2, "{preload}");
    assert!(entries[0].ends_with("libstyxy_preload.so"), "{preload}");
    assert_eq!(entries[1], "/opt/other/libother.so");

    // A server started in such a shell on a held port moves, under the session's instance.
    let held = daemon.base + 180;
    let _holder = http_server(held)?;
    let script = format!(
        ". '{}'; exec python3 -u -m http.server {held} --bind 127.0.0.1",
        env_file.display()
    );
    let mut server = Spawned::start(
        Command::new("sh")
            .args(["-c", &script])
            .env("STYXY_SOCKET", &daemon.socket)
            .env_remove("LD_PRELOAD"),
    )?;
    let notice = server.line_where(20, |l| l.starts_with("✓ STYXY"))?;
    let moved = notice_port(&notice).context("port")?;
    assert_ne!(moved, held);
    let audit = daemon.audit().await?;
    assert!(
        audit
            .iter()
            .any(|e| e.assigned_port == u32::from(moved) && e.instance_id == "claude-3f9c-test"),
        "{audit:?}"
    );
    Ok(())
}

#[test]
fn the_hook_never_fails_the_session() -> Result<()> {
    let (_dir_guard, dir) = temp_dir("hook-down")?;
    let env_file = dir.join("env.sh");
    let said = session_start(&env_file, &dir.join("no-daemon.sock"))?;
    assert!(
        said.contains("Warning") && said.contains("systemctl start styxy"),
        "{said}"
    );
    assert!(std::fs::read_to_string(&env_file)?.contains("libstyxy_preload.so"));
    // No CLAUDE_ENV_FILE, garbage on stdin: still exit 0, with advice.
    let mut child = styxy(&["--socket", "/nonexistent.sock", "hook", "session-start"])
        .env_remove("CLAUDE_ENV_FILE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(child.stdin.as_mut().context("stdin")?, b"not json")?;
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("CLAUDE_ENV_FILE is not set"));
    Ok(())
}

#[test]
fn hook_install_twice_then_uninstall_gives_back_every_file_byte_for_byte() -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let (_dir_guard, dir) = temp_dir("settings")?;
    let home = dir.join("home");
    std::fs::create_dir_all(home.join(".claude"))?;
    // The user's settings live in a dotfiles checkout, linked into ~/.claude; hand-formatted.
    let dotfiles = dir.join("dotfiles-settings.json");
    let original = "{\n    \"model\": \"opus\",\n    \"permissions\": {\"allow\": [\"Bash(npm run *)\"]},\n    \"hooks\": {\"SessionStart\": [{\"matcher\": \"startup\", \"hooks\": [{\"type\": \"command\", \"command\": \"echo hello\"}]}]}\n}";
    std::fs::write(&dotfiles, original)?;
    let settings = home.join(".claude/settings.json");
    std::os::unix::fs::symlink(&dotfiles, &settings)?;
    // Claude Code's own state file, private, with an MCP server of the user's.
    let claude_json = home.join(".claude.json");
    let state = "{\"numStartups\":7,\"mcpServers\":{\"db\":{\"command\":\"pg-mcp\"}}}";
    std::fs::write(&claude_json, state)?;
    std::fs::set_permissions(&claude_json, std::fs::Permissions::from_mode(0o600))?;
    let hook = |verb: &str, extra: &[&str]| -> Result<String> {
        let mut args = vec!["hook", verb];
        args.extend_from_slice(extra);
        run_ok(styxy(&args).env("HOME", &home).env_remove("XDG_STATE_HOME"))
    };

    let said = hook("install", &[])?;
    assert!(
        said.contains("added the Styxy hooks") && said.contains("added the MCP server"),
        "{said}"
    );
    let installed: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&settings)?)?;
    assert_eq!(installed["model"], "opus");
    assert_eq!(installed["permissions"]["allow"][0], "Bash(npm run *)");
    let start = installed["hooks"]["SessionStart"]
        .as_array()
        .context("array")?;
    assert_eq!(start.len(), 2);
    assert_eq!(start[0]["hooks"][0]["command"], "echo hello");
    for (event, arg) in [
        ("SessionStart", "session-start"),
        ("PostToolUse", "post-tool-use"),
        ("SessionEnd", "session-end"),
    ] {
        let groups = installed["hooks"][event].as_array().context("array")?;
        let ours = groups.last().context("ours")?;
        let command = ours["hooks"][0]["command"].as_str().context("command")?;
        assert!(
            command.ends_with(&format!("hook {arg}")),
            "{event}: {command}"
        );
    }
    assert_eq!(installed["hooks"]["PostToolUse"][0]["matcher"], "Bash");
    assert!(
        std::fs::symlink_metadata(&settings)?
            .file_type()
            .is_symlink(),
        "the link stays a link"
    );
    let mcp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&claude_json)?)?;
    assert_eq!(mcp["numStartups"], 7);
    assert_eq!(mcp["mcpServers"]["db"]["command"], "pg-mcp");
    assert_eq!(mcp["mcpServers"]["styxy"]["args"][0], "mcp");
    assert_eq!(
        std::fs::metadata(&claude_json)?.permissions().mode() & 0o777,
        0o600,
        "still private"
    );

    let again = hook("install", &[])?;
    assert!(again.contains("already in"), "{again}");
    let said = hook("uninstall", &[])?;
    assert!(
        said.contains("removed the Styxy hooks") && said.contains("removed the MCP server"),
        "{said}"
    );
    assert_eq!(
        std::fs::read_to_string(&dotfiles)?,
        original,
        "byte for byte"
    );
    assert_eq!(
        std::fs::read_to_string(&claude_json)?,
        state,
        "byte for byte"
    );
    assert_eq!(
        std::fs::metadata(&claude_json)?.permissions().mode() & 0o777,
        0o600
    );
    assert!(std::fs::symlink_metadata(&settings)?
        .file_type()
        .is_symlink());
    assert!(hook("uninstall", &[])?.contains("no Styxy hooks"));

    // A change the user made meanwhile is kept: the file is the JSON without Styxy's entries.
    hook("install", &[])?;
    let mut edited: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&settings)?)?;
    edited["theme"] = serde_json::json!("dark");
    std::fs::write(&settings, serde_json::to_string(&edited)?)?;
    hook("uninstall", &[])?;
    let kept: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&settings)?)?;
    let mut expected: serde_json::Value = serde_json::from_str(original)?;
    expected["theme"] = serde_json::json!("dark");
    assert_eq!(kept, expected);

    // A project install creates the project's files and uninstall removes them again.
    let project = dir.join("project");
    std::fs::create_dir_all(&project)?;
    let project_arg = project.to_str().context("utf-8")?;
    let said = hook("install", &["--project", project_arg])?;
    assert!(said.contains(".mcp.json"), "{said}");
    let project_settings: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        project.join(".claude/settings.json"),
    )?)?;
    assert_eq!(project_settings["enabledMcpjsonServers"][0], "styxy");
    assert!(project.join(".mcp.json").exists());
    hook("uninstall", &["--project", project_arg])?;
    assert!(
        !project.join(".mcp.json").exists(),
        "created by install, removed by uninstall"
    );
    assert!(!project.join(".claude/settings.json").exists());

    let path = settings.to_str().context("utf-8")?;
    // A settings file that is not JSON is left alone, with a message.
    std::fs::write(&settings, "{ not json")?;
    let out = styxy(&["hook", "install", "--settings", path])
        .env("HOME", &home)
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid JSON"));
    assert_eq!(std::fs::read_to_string(&settings)?, "{ not json");
    Ok(())
}
