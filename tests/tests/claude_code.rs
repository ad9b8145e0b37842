//! End to end with the real Claude Code CLI (`claude -p`, its native binary) against a stand-in
//! Messages API on loopback that scripts the model's turns: `styxy hook install` puts the hooks and
//! the MCP server in a scratch HOME; the SessionStart hook turns the shim on; a background Bash
//! server on a held port is moved; the next PostToolUse tells the agent (asked → bound, both
//! addresses) and one with no change says nothing; a command of the session reaches the moved
//! server through the asked port; every MCP tool answers what `styxy --json` answers, and
//! `stop_server` stops the session's moved server by its asked port (not the port's holder);
//! SessionEnd ends the session. The PreToolUse kill guard denies a `pkill` that would reach
//! another session's server, and the model reads why and what to use instead. Skips, saying why,
//! when the CLI is not installed (`cargo xtask setup`).

use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use styxy_tests::claude::{
    claude_binary, hook_outputs, run_claude, tool_result_text, tool_use_id, StandIn, Turn,
};
use styxy_tests::{http_server, styxy_bin, Daemon};

fn styxy_json(daemon: &Daemon, args: &[&str]) -> Result<Value> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = daemon.cli(&all);
    ensure!(out.status.success(), "styxy {args:?}: {out:?}");
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn tool_json(events: &[Value], step: usize) -> Result<Value> {
    let text = tool_result_text(events, &tool_use_id(step))
        .with_context(|| format!("no result for step {step}"))?;
    serde_json::from_str(&text).with_context(|| format!("step {step} answered {text}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn claude_code_sessions_get_moves_reported_views_and_the_mcp_tools() -> Result<()> {
    let claude = match claude_binary() {
        Ok(path) => path,
        Err(why) => {
            assert!(std::env::var_os("CI").is_none(), "required in CI: {why}");
            eprintln!("SKIP: {why}");
            return Ok(());
        }
    };
    let daemon = Daemon::start().await?;
    let held = daemon.base + 180;
    let holder = http_server(held)?;
    let preferred = daemon.base + 190;
    let temp = tempfile::tempdir()?;
    let home = temp.path().join("home");
    let work = temp.path().join("work");
    std::fs::create_dir_all(&home)?;
    std::fs::create_dir_all(&work)?;
    let token = format!("served-by-the-session-{}", std::process::id());
    std::fs::write(work.join("marker.txt"), &token)?;

    let install = Command::new(styxy_bin())
        .args(["hook", "install"])
        .env("HOME", &home)
        .env_remove("XDG_STATE_HOME")
        .output()?;
    ensure!(install.status.success(), "hook install: {install:?}");

    // It writes its pid first, for the step that stops it (`exec`: the pid is the server's).
    let server = format!(
        "sh -c 'echo $$ > server.pid; exec python3 -m http.server {held} --bind 127.0.0.1 --directory .'"
    );
    let script = vec![
        // 0: a background server on the held port.
        Turn::Tool(
            "Bash",
            json!({ "command": server, "description": "start the dev server", "run_in_background": true }),
        ),
        // 1: the session's own client asks the port it asked for.
        Turn::Tool(
            "Bash",
            json!({ "command": format!("sleep 2; curl -s http://127.0.0.1:{held}/marker.txt"), "description": "fetch" }),
        ),
        // 2: nothing changes.
        Turn::Tool(
            "Bash",
            json!({ "command": "true", "description": "nothing" }),
        ),
        // 3-9: every MCP tool.
        Turn::Tool("mcp__styxy__session_ports", json!({})),
        Turn::Tool("mcp__styxy__who_holds", json!({ "port": held })),
        Turn::Tool(
            "mcp__styxy__suggest_ports",
            json!({ "service_type": "api", "count": 3 }),
        ),
        Turn::Tool("mcp__styxy__list_ports", json!({})),
        Turn::Tool(
            "mcp__styxy__allocate_port",
            json!({ "service_type": "api", "preferred_port": preferred, "ttl_seconds": 600 }),
        ),
        Turn::Tool("mcp__styxy__release_port", json!({ "port": preferred })),
        Turn::Tool("mcp__styxy__status", json!({})),
        // 10: a bad call is a tool error, and the server goes on.
        Turn::Tool("mcp__styxy__who_holds", json!({ "port": 70000 })),
        // 11: the server stops: MCP stop_server by the port this session asked (its view sends
        // it to the moved server), as the kill guard advises.
        Turn::Tool("mcp__styxy__stop_server", json!({ "port": held })),
        // 12: a Bash call after it, whose report tells the stop.
        Turn::Tool(
            "Bash",
            json!({ "command": "sleep 2", "description": "wait" }),
        ),
        Turn::Text("All done."),
    ];
    let stand_in = StandIn::start(script).await?;
    let socket = daemon.socket.to_string_lossy().into_owned();
    let claude_run = {
        let (claude, home, work) = (claude.clone(), home.clone(), work.clone());
        let port = stand_in.port;
        tokio::task::spawn_blocking(move || {
            run_claude(
                &claude,
                port,
                &home,
                &work,
                "Bash,mcp__styxy__session_ports,mcp__styxy__who_holds,mcp__styxy__suggest_ports,\
                 mcp__styxy__list_ports,mcp__styxy__allocate_port,mcp__styxy__release_port,\
                 mcp__styxy__status,mcp__styxy__stop_server",
                &[("STYXY_SOCKET", &socket)],
                Duration::from_secs(150),
            )
        })
    };
    // While claude runs: the daemon's own answers, to compare the MCP tools' with.
    let moved_entry = styxy_tests::eventually(60, "the background server moved", || async {
        let audit = daemon.audit().await.ok()?;
        audit
            .into_iter()
            .find(|e| e.requested_port == u32::from(held) && e.instance_id.starts_with("claude-"))
    })
    .await?;
    let moved = moved_entry.assigned_port;
    let events = claude_run.await??;

    // SessionStart turned the shim on, and Claude Code lists the MCP server with its tools.
    let start = hook_outputs(&events, "SessionStart:startup");
    ensure!(
        start.len() == 1 && start[0].contains("Styxy is on"),
        "{start:?}"
    );
    let init = events
        .iter()
        .find(|e| e["subtype"] == "init")
        .context("no init event")?;
    let session_id = init["session_id"].as_str().context("session id")?;
    let instance = format!("claude-{session_id}");
    ensure!(
        init["mcp_servers"].as_array().is_some_and(|s| s
            .iter()
            .any(|m| m["name"] == "styxy" && m["status"] == "connected")),
        "{}",
        init["mcp_servers"]
    );
    let tools: Vec<&str> = init["tools"]
        .as_array()
        .context("tools")?
        .iter()
        .filter_map(Value::as_str)
        .filter(|t| t.starts_with("mcp__styxy__"))
        .collect();
    ensure!(tools.len() == 8, "{tools:?}");
    ensure!(
        moved_entry.instance_id == instance,
        "{moved_entry:?} vs {instance}"
    );

    // PostToolUse: the move is told exactly once, with both addresses; a call with no change adds
    // nothing; the stop is told.
    let reports = hook_outputs(&events, "PostToolUse:Bash");
    ensure!(reports.len() == 4, "{reports:?}");
    let told: Vec<&String> = reports.iter().filter(|r| r.contains("MOVED")).collect();
    ensure!(told.len() == 1, "{reports:?}");
    let output: Value = serde_json::from_str(told[0].trim())?;
    let context = output["hookSpecificOutput"]["additionalContext"]
        .as_str()
        .context("additionalContext")?;
    for needle in [
        format!("asked for TCP port {held}"),
        format!("pid {}", holder.pid()),
        format!("localhost:{held} reaches it"),
        format!("use localhost:{moved}"),
        format!("http.server {held}"),
    ] {
        ensure!(context.contains(&needle), "{needle:?} not in {context}");
    }
    ensure!(
        reports[2].trim().is_empty(),
        "no change, no context: {:?}",
        reports[2]
    );
    ensure!(
        reports[3].contains("stopped") && reports[3].contains(&format!("port {moved}")),
        "{:?}",
        reports[3]
    );
    // The model was told: the context is in a later request.
    ensure!(
        stand_in
            .requests()
            .iter()
            .any(|r| r.to_string().contains(&format!("use localhost:{moved}"))),
        "the move report never reached the model"
    );

    // Inside the session the asked port reaches the session's own (moved) server.
    let fetched = tool_result_text(&events, &tool_use_id(1)).context("fetch result")?;
    ensure!(fetched.contains(&token), "{fetched}");

    // The MCP tools answer what `styxy --json` answers.
    let session = tool_json(&events, 3)?;
    ensure!(session["instanceId"] == instance.as_str(), "{session}");
    ensure!(
        session["running"]
            .as_array()
            .is_some_and(|r| r.iter().any(|s| s["port"] == moved
                && s["askedPort"] == u32::from(held)
                && s["askedHolderPid"] == holder.pid())),
        "{session}"
    );
    let who = tool_json(&events, 4)?;
    ensure!(
        who == styxy_json(&daemon, &["observe", &held.to_string()])?,
        "{who}"
    );
    let suggested = tool_json(&events, 5)?;
    ensure!(
        suggested == styxy_json(&daemon, &["suggest", "api", "-n", "3"])?,
        "{suggested}"
    );
    let listed = tool_json(&events, 6)?;
    ensure!(
        listed["views"].as_array().is_some_and(|v| v
            .iter()
            .any(|e| e["instanceId"] == instance.as_str()
                && e["askedPort"] == u32::from(held)
                && e["boundPort"] == moved)),
        "{listed}"
    );
    ensure!(
        listed["holders"].as_array().is_some_and(|h| h
            .iter()
            .any(|x| x["port"] == u32::from(held) && x["pid"] == holder.pid())),
        "{listed}"
    );
    let allocated = tool_json(&events, 7)?;
    ensure!(allocated["port"] == u32::from(preferred), "{allocated}");
    let released = tool_json(&events, 8)?;
    ensure!(
        released["releasedLeaseIds"] == json!([allocated["leaseId"]]),
        "{released}"
    );
    let status = tool_json(&events, 9)?;
    let cli_status = styxy_json(&daemon, &["status"])?;
    for field in ["version", "observer", "stateDir", "socketPath"] {
        ensure!(
            status[field] == cli_status[field],
            "{field}: {status} vs {cli_status}"
        );
    }
    let bad = tool_result_text(&events, &tool_use_id(10)).context("bad call")?;
    ensure!(bad.contains("1 to 65535"), "{bad}");
    // stop_server stopped this session's server, found through its view: the moved one.
    let stopped = tool_json(&events, 11)?;
    ensure!(stopped["instanceId"] == instance.as_str(), "{stopped}");
    ensure!(
        stopped["stopped"].as_array().is_some_and(|s| s.len() == 1
            && s[0]["ports"] == json!([moved])
            && s[0]["askedPort"] == u32::from(held)
            && s[0]["endedBy"] == "SIGTERM"),
        "{stopped}"
    );
    ensure!(
        holder.pid() != 0 && std::net::TcpStream::connect(("127.0.0.1", held)).is_ok(),
        "the holder of {held} (not this session's) runs on"
    );

    // SessionEnd ended the session: its instance is gone, nothing of it is leased.
    let after = styxy_json(&daemon, &["status"])?;
    ensure!(
        after["instances"].as_u64().unwrap_or(0) == 0,
        "the session ended: {after}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_kill_guard_keeps_an_agent_from_killing_another_sessions_server() -> Result<()> {
    let claude = match claude_binary() {
        Ok(path) => path,
        Err(why) => {
            assert!(std::env::var_os("CI").is_none(), "required in CI: {why}");
            eprintln!("SKIP: {why}");
            return Ok(());
        }
    };
    let daemon = Daemon::start().await?;
    let port = daemon.base + 200;
    // Another session's server: a sibling project's dev server.
    let mut other = styxy_tests::Spawned::start(&mut daemon.shimmed_in(
        "feature-a",
        "python3",
        &[
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ],
    ))?;
    styxy_tests::wait_for_listener(port)?;
    let temp = tempfile::tempdir()?;
    let home = temp.path().join("home");
    let work = temp.path().join("work");
    std::fs::create_dir_all(&home)?;
    std::fs::create_dir_all(&work)?;
    let install = Command::new(styxy_bin())
        .args(["hook", "install"])
        .env("HOME", &home)
        .env_remove("XDG_STATE_HOME")
        .output()?;
    ensure!(install.status.success(), "hook install: {install:?}");
    let script = vec![
        // 0: the usual clean-up, which would kill feature-a's server.
        Turn::Tool(
            "Bash",
            json!({ "command": format!("pkill -f 'http.server {port}'"), "description": "stop the old dev server" }),
        ),
        Turn::Text("Understood."),
    ];
    let stand_in = StandIn::start(script).await?;
    let socket = daemon.socket.to_string_lossy().into_owned();
    let events = {
        let port = stand_in.port;
        tokio::task::spawn_blocking(move || {
            run_claude(
                &claude,
                port,
                &home,
                &work,
                "Bash",
                &[("STYXY_SOCKET", &socket)],
                Duration::from_secs(150),
            )
        })
        .await??
    };
    // The hook denied the call, naming the other session's server and `styxy stop`.
    let denied = tool_result_text(&events, &tool_use_id(0)).context("the result of step 0")?;
    for needle in [
        "this command would signal another session's processes".to_string(),
        format!("pid {} (python3, port {port}) of session", other.child.id()),
        "feature-a".to_string(),
        "`styxy stop PORT`".to_string(),
    ] {
        ensure!(denied.contains(&needle), "{needle:?} not in {denied}");
    }
    // The model read it, and the server runs on.
    ensure!(
        stand_in
            .requests()
            .iter()
            .any(|r| r.to_string().contains("would signal another session")),
        "the denial never reached the model"
    );
    ensure!(
        other.child.try_wait()?.is_none(),
        "feature-a's server was killed"
    );
    ensure!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "feature-a's server answers"
    );
    Ok(())
}
