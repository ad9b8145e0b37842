//! `styxy hook post-tool-use` (Claude Code `PostToolUse`, matcher `Bash`): tells the agent what
//! changed for its session since it was last told — each moved bind (command, asked → bound port,
//! who held the asked one) and each server of the session that started or stopped, background
//! processes included — through the hook's JSON output (`hookSpecificOutput.additionalContext`).
//! Agents start servers in the background and never read their stderr, so this is how they learn
//! of a move. Says nothing when nothing changed, and never fails the tool call.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::json;
use styxy_proto::v1::{SessionReportRequest, SessionReportResponse, SessionServer};

use crate::client::Target;

/// At most this many servers are described in one report; the rest are counted.
const SERVERS_TOLD: usize = 12;
/// Command lines are cut to this many characters.
const COMMAND_CHARS: usize = 100;

/// Runs the hook: reads the hook's JSON input, asks the daemon, prints the hook's JSON output
/// when something changed. Whatever goes wrong, prints nothing.
pub async fn run(target: &Target) {
    let input = super::read_hook_input();
    let Some(session_id) = super::session_id_of(&input) else {
        return;
    };
    let instance = super::instance_id(&session_id);
    let call = async {
        let mut client = crate::client::connect(target).await?;
        let report = client
            .session_report(SessionReportRequest {
                instance_id: instance,
                peek: false,
                pid: 0,
            })
            .await?
            .into_inner();
        anyhow::Ok(report)
    };
    if let Ok(Ok(report)) = tokio::time::timeout(Duration::from_secs(3), call).await {
        if let Some(output) = hook_output(&report) {
            println!("{output}");
        }
    }
}

/// The hook's JSON output for a report, or `None` when nothing changed (no context noise).
pub fn hook_output(report: &SessionReportResponse) -> Option<String> {
    let context = describe(report)?;
    Some(
        json!({
            "hookSpecificOutput": {
                "hookEventName": "PostToolUse",
                "additionalContext": context,
            }
        })
        .to_string(),
    )
}

/// What changed, in words for the agent; `None` when nothing did.
pub fn describe(report: &SessionReportResponse) -> Option<String> {
    if report.started.is_empty() && report.stopped.is_empty() {
        return None;
    }
    let mut text = String::from("Styxy: this session's servers changed.");
    let told = report
        .started
        .iter()
        .map(|s| (true, s))
        .chain(report.stopped.iter().map(|s| (false, s)));
    let total = report.started.len() + report.stopped.len();
    for (started, server) in told.take(SERVERS_TOLD) {
        text.push_str("\n- ");
        text += &if started {
            describe_started(server)
        } else {
            describe_stopped(server)
        };
    }
    if total > SERVERS_TOLD {
        let _ = write!(
            text,
            "\n- … and {} more (`styxy ports` lists them all).",
            total - SERVERS_TOLD
        );
    }
    Some(text)
}

fn describe_started(s: &SessionServer) -> String {
    let who = process(s);
    let proto = protocol(s);
    if s.asked_port != 0 && s.asked_port != s.port {
        let holder = match (s.asked_holder_pid, s.asked_holder_comm.as_str()) {
            (0, _) => "another process".to_string(),
            (pid, "") => format!("pid {pid}"),
            (pid, comm) => format!("{comm} (pid {pid})"),
        };
        format!(
            "MOVED: {who} asked for {proto} port {asked}, which {holder} holds, and listens on {port} \
             instead. Inside this session (commands you run here) localhost:{asked} reaches it; \
             outside it (a browser, another session) use localhost:{port}.",
            asked = s.asked_port,
            port = s.port,
        )
    } else {
        format!(
            "started: {who} listens on {proto} port {port} (localhost:{port}, inside and outside \
             this session).",
            port = s.port
        )
    }
}

fn describe_stopped(s: &SessionServer) -> String {
    let who = process(s);
    let proto = protocol(s);
    if s.asked_port != 0 && s.asked_port != s.port {
        format!(
            "stopped: {who} no longer listens on {proto} port {port} (moved from {asked}).",
            port = s.port,
            asked = s.asked_port
        )
    } else {
        format!(
            "stopped: {who} no longer listens on {proto} port {}.",
            s.port
        )
    }
}

/// `` `python3 -m http.server 8000` (pid 4121) ``: the command line, cut, else the name.
fn process(s: &SessionServer) -> String {
    let command = if s.cmdline.trim().is_empty() {
        s.comm.as_str()
    } else {
        s.cmdline.trim()
    };
    let mut cut: String = command
        .chars()
        .filter(|c| !c.is_control())
        .take(COMMAND_CHARS)
        .collect();
    if command.chars().count() > COMMAND_CHARS {
        cut.push('…');
    }
    // Backticks would end the code span early.
    let cut = cut.replace('`', "'");
    format!("`{cut}` (pid {})", s.pid)
}

/// `TCP` or `UDP` (as `styxy ports` names them, in capitals for prose).
fn protocol(s: &SessionServer) -> String {
    match crate::output::protocol_name(s.protocol) {
        "-" => "TCP".to_string(),
        name => name.to_ascii_uppercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use styxy_proto::v1::Protocol;

    fn server(pid: u32, port: u32, asked: u32) -> SessionServer {
        SessionServer {
            pid,
            comm: "python3".into(),
            cmdline: format!(
                "python3 -m http.server {}",
                if asked == 0 { port } else { asked }
            ),
            protocol: Protocol::Tcp as i32,
            port,
            asked_port: asked,
            asked_holder_pid: if asked == 0 { 0 } else { 4121 },
            asked_holder_comm: if asked == 0 {
                String::new()
            } else {
                "storybook".into()
            },
            addresses: vec!["0.0.0.0".into()],
        }
    }

    #[test]
    fn nothing_changed_says_nothing() {
        let report = SessionReportResponse {
            running: vec![server(1, 8000, 0)],
            ..Default::default()
        };
        assert_eq!(hook_output(&report), None);
        assert_eq!(hook_output(&SessionReportResponse::default()), None);
    }

    #[test]
    fn a_move_names_both_ports_the_command_and_the_holder() {
        let report = SessionReportResponse {
            started: vec![server(7, 6007, 6006)],
            ..Default::default()
        };
        let output = hook_output(&report).expect("a report");
        let value: Value = serde_json::from_str(&output).expect("JSON");
        assert_eq!(value["hookSpecificOutput"]["hookEventName"], "PostToolUse");
        let context = value["hookSpecificOutput"]["additionalContext"]
            .as_str()
            .expect("context");
        for needle in [
            "MOVED",
            "`python3 -m http.server 6006` (pid 7)",
            "asked for TCP port 6006",
            "storybook (pid 4121)",
            "localhost:6006 reaches it",
            "use localhost:6007",
        ] {
            assert!(context.contains(needle), "{needle:?} in {context}");
        }
    }

    #[test]
    fn started_and_stopped_servers_are_listed_and_long_lists_cut() {
        let report = SessionReportResponse {
            started: (0..20).map(|i| server(100 + i, 8000 + i, 0)).collect(),
            stopped: vec![server(5, 5174, 5173)],
            ..Default::default()
        };
        let context = describe(&report).expect("a report");
        assert!(context
            .contains("started: `python3 -m http.server 8000` (pid 100) listens on TCP port 8000"));
        assert_eq!(context.lines().count(), 1 + SERVERS_TOLD + 1, "{context}");
        assert!(context.contains("… and 9 more"), "{context}");
        let report = SessionReportResponse {
            stopped: vec![server(5, 5174, 5173)],
            ..Default::default()
        };
        assert!(describe(&report)
            .expect("a report")
            .contains("stopped: `python3 -m http.server 5173` (pid 5) no longer listens on TCP port 5174 (moved from 5173)"));
    }

    #[test]
    fn command_lines_are_cut_and_cannot_break_the_text() {
        let mut s = server(1, 8000, 0);
        s.cmdline = format!("node `rm -rf`\n{}", "x".repeat(500));
        let text = process(&s);
        assert!(text.chars().count() < COMMAND_CHARS + 20, "{text}");
        assert!(!text.contains('\n'));
        assert_eq!(text.matches('`').count(), 2, "{text}");
        s.cmdline = String::new();
        assert_eq!(process(&s), "`python3` (pid 1)");
    }
}
