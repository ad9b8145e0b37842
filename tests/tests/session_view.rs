//! Session views end to end: a server moved off a port in one agent session stays reachable, for
//! that session, at the port it asked for. Real daemon, real servers, real clients.

use std::process::Command;

use anyhow::{Context, Result};
use styxy_tests::v1 as pb;
use styxy_tests::{eventually, http_server, notice_port, styxy_bin, Daemon, Spawned};

const NOTICE: &str = "✓ STYXY: Auto-assigned port ";

/// `python3 -m http.server PORT` under `styxy run --instance INSTANCE`.
fn session_http_server(daemon: &Daemon, instance: &str, port: u16) -> Command {
    let mut command = Command::new(styxy_bin());
    command
        .arg("--socket")
        .arg(&daemon.socket)
        .args([
            "run",
            "--instance",
            instance,
            "--",
            "python3",
            "-u",
            "-m",
            "http.server",
        ])
        .args([&port.to_string(), "--bind", "127.0.0.1"]);
    command
}

/// The session's view as `styxy --json ports --instance` prints it.
fn view_of(daemon: &Daemon, instance: &str) -> Result<Vec<serde_json::Value>> {
    let out = daemon.cli(&["--json", "ports", "--instance", instance]);
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(listed["views"].as_array().cloned().unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_moved_server_is_in_its_sessions_view_until_it_stops() -> Result<()> {
    let daemon = Daemon::start().await?;
    let asked = daemon.base + 110;
    let _a = http_server(asked)?;
    let mut watch = daemon
        .client()
        .await?
        .watch(pb::WatchRequest {})
        .await?
        .into_inner();

    let mut b = Spawned::start(&mut session_http_server(&daemon, "session-b", asked))?;
    let notice = b.line_where(20, |l| l.starts_with(NOTICE))?;
    let moved = notice_port(&notice).context("port in the notice")?;
    let view = eventually(10, "session-b's view entry", || async {
        let view = view_of(&daemon, "session-b").ok()?;
        (!view.is_empty()).then_some(view)
    })
    .await?;
    assert_eq!(view.len(), 1, "{view:?}");
    assert_eq!(view[0]["instanceId"], "session-b");
    assert_eq!(view[0]["protocol"], "PROTOCOL_TCP");
    assert_eq!(view[0]["askedPort"], u32::from(asked));
    assert_eq!(view[0]["boundPort"], u32::from(moved));
    assert_eq!(view[0]["pid"], b.child.id());
    assert!(
        view_of(&daemon, "session-a")?.is_empty(),
        "other sessions see nothing"
    );
    let table = String::from_utf8(daemon.cli(&["ports", "--instance", "session-b"]).stdout)?;
    assert!(table.contains(&format!("{asked} → {moved}")), "{table}");

    // Watch carries the move with its session.
    let moved_event = styxy_tests::next_event(&mut watch, |e| {
        e.kind == pb::EventKind::Reassigned as i32 && e.port == u32::from(moved)
    })
    .await?;
    assert_eq!(moved_event.instance_id, "session-b");
    assert_eq!(moved_event.requested_port, u32::from(asked));

    // The moved server stops: its entry goes, and Watch says so (the claim's end).
    drop(b);
    eventually(10, "session-b's view emptied", || async {
        view_of(&daemon, "session-b").ok()?.is_empty().then_some(())
    })
    .await?;
    let ended = styxy_tests::next_event(&mut watch, |e| {
        e.kind == pb::EventKind::LeaseEnded as i32 && e.port == u32::from(moved)
    })
    .await?;
    assert_eq!(
        (ended.instance_id.as_str(), ended.requested_port),
        ("session-b", u32::from(asked))
    );
    Ok(())
}
