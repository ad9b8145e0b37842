//! `styxy hook post-tool-use` (Claude Code `PostToolUse`, matcher `Bash`): tells the agent what
//! changed for its session since it was last told — each moved bind first (command, asked → bound
//! port, who held the asked one: command, pid and session), then each server of the session that
//! started or stopped on a port it asked for, background processes included, and the helper
//! ports (a notebook's kernel channels, a debugging port) in one line — through the hook's JSON
//! output (`hookSpecificOutput.additionalContext`); and, when the command printed a URL with the
//! port its server was moved off, which URL works where (`printed_urls`). Agents start servers in
//! the background and never read their stderr, so this is how they learn of a move. Says nothing
//! when nothing changed, and never fails the tool call.

use std::fmt::Write as _;
use std::ops::RangeInclusive;
use std::time::Duration;

use serde_json::json;
use styxy_proto::v1::{SessionReportRequest, SessionReportResponse, SessionServer};

use crate::client::Target;

/// At most this many servers are described one per line; the rest are counted.
const SERVERS_TOLD: usize = 12;
/// Command lines are cut to this many characters (their port arguments kept).
const COMMAND_CHARS: usize = 100;
/// At most this many helper ports are listed by number in the summary line.
const HELPER_PORTS_LISTED: usize = 8;

/// Runs the hook: reads the hook's JSON input, asks the daemon, prints the hook's JSON output
/// when something changed. Whatever goes wrong, prints nothing.
pub async fn run(target: &Target) {
    let input = super::read_hook_input();
    let Some(session_id) = super::session_id_of(&input) else {
        return;
    };
    let instance = super::instance_id(&session_id);
    let facts = Facts {
        ephemeral: styxy_common::net::ephemeral_ports(),
        tool_output: super::printed_urls::tool_output(&input),
    };
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
        if let Some(output) = hook_output(&report, &facts) {
            outln!("{output}");
        }
    }
}

/// What the report is read with besides the daemon's answer.
#[derive(Clone, Debug)]
pub struct Facts {
    /// The kernel's ephemeral ports (`ip_local_port_range`): where port-0 binds land, and the
    /// helper ports of a server (Jupyter's kernel channels, a browser's debugging port) with them.
    pub ephemeral: RangeInclusive<u16>,
    /// What the tool call printed (its stdout and stderr), where a tool may print a URL with a
    /// port it does not listen on.
    pub tool_output: String,
}

/// The hook's JSON output for a report, or `None` when nothing changed (no context noise).
pub fn hook_output(report: &SessionReportResponse, facts: &Facts) -> Option<String> {
    let context = describe(report, facts)?;
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

/// What changed, in words for the agent; `None` when nothing did. Moved servers first, then the
/// servers that started and stopped on ports their commands asked for, one line each; helper
/// ports (a notebook's kernel channels, a debugging port) in one line; then any URL the tool
/// printed with a port its server was moved off.
pub fn describe(report: &SessionReportResponse, facts: &Facts) -> Option<String> {
    let refused = describe_refused_signals(&report.refused_signals);
    match (describe_servers(report, facts), refused) {
        (Some(servers), Some(refused)) => Some(format!("{servers}\n- {refused}")),
        (None, Some(refused)) => Some(format!("Styxy: {refused}")),
        (servers, None) => servers,
    }
}

/// The signals the kernel refused from this session to another's: what happened, and the
/// command to use instead.
pub fn describe_refused_signals(refused: &[styxy_proto::v1::RefusedSignal]) -> Option<String> {
    if refused.is_empty() {
        return None;
    }
    let each: Vec<String> = refused
        .iter()
        .take(SERVERS_TOLD)
        .map(|r| {
            let session = if r.target_session_name.is_empty()
                || r.target_session_name == r.target_instance_id
            {
                r.target_instance_id.clone()
            } else {
                format!("{} ({})", r.target_session_name, r.target_instance_id)
            };
            let ports: Vec<String> = r.target_ports.iter().map(u32::to_string).collect();
            let on = if ports.is_empty() {
                String::new()
            } else {
                format!(" on port {}", ports.join(", "))
            };
            format!(
                "{} from {} (pid {}) to {} (pid {}{on}), a process of session {session}",
                r.signal, r.sender_comm, r.sender_pid, r.target_comm, r.target_pid
            )
        })
        .collect();
    Some(format!(
        "the kernel refused (EPERM) signals from this session to another session's processes: {}. \
         Sessions may run the same server on the same asked port side by side, so `pkill`, \
         `kill $(lsof -t -i:PORT)` and `fuser -k` reach the other session's server. To stop this \
         session's own servers use `styxy stop PORT` (the port this session uses), `styxy stop \
         NAME`, or `styxy stop --session` for all of them.",
        each.join("; ")
    ))
}

fn describe_servers(report: &SessionReportResponse, facts: &Facts) -> Option<String> {
    let helper = |s: &&SessionServer| is_helper(s, &facts.ephemeral);
    let (started_helpers, started): (Vec<&SessionServer>, Vec<&SessionServer>) =
        report.started.iter().partition(helper);
    let (stopped_helpers, stopped): (Vec<&SessionServer>, Vec<&SessionServer>) =
        report.stopped.iter().partition(helper);
    let urls = super::printed_urls::corrections(&facts.tool_output, &report.running);
    let focus = report.focus_changed.then(|| describe_focus(report));
    if report.started.is_empty() && report.stopped.is_empty() && urls.is_empty() {
        return focus.map(|line| format!("Styxy: {line}"));
    }
    let (moved, kept): (Vec<&SessionServer>, Vec<&SessionServer>) =
        started.into_iter().partition(|s| is_moved(s));
    // Which lines fit: moved servers first, then stopped ones (an agent waits for those), then
    // the rest; shown in the order moved, started, stopped.
    let mut lines: Vec<(usize, String)> = Vec::new();
    let by_priority = moved
        .iter()
        .map(|s| (0, describe_started(s)))
        .chain(stopped.iter().map(|s| (2, describe_stopped(s))))
        .chain(kept.iter().map(|s| (1, describe_started(s))));
    let total = moved.len() + stopped.len() + kept.len();
    lines.extend(by_priority.take(SERVERS_TOLD));
    lines.sort_by_key(|(order, _)| *order);
    let mut text = String::from("Styxy: this session's servers changed.");
    if report.started.is_empty() && report.stopped.is_empty() {
        text = String::from("Styxy: a URL this command printed needs a correction.");
    }
    for (_, line) in &lines {
        text.push_str("\n- ");
        text.push_str(line);
    }
    if total > SERVERS_TOLD {
        let _ = write!(
            text,
            "\n- … and {} more (`styxy session` lists them all).",
            total - SERVERS_TOLD
        );
    }
    if let Some(line) = describe_helpers(&started_helpers, &stopped_helpers) {
        text.push_str("\n- ");
        text.push_str(&line);
    }
    for line in urls {
        text.push_str("\n- ");
        text.push_str(&line);
    }
    if let Some(line) = focus {
        text.push_str("\n- ");
        text.push_str(&line);
    }
    Some(text)
}

/// The session gained or lost the focus (`styxy focus`): what that means for the person at the
/// keyboard, and that nothing changes inside the session.
pub fn describe_focus(report: &SessionReportResponse) -> String {
    let moved: Vec<String> = report
        .running
        .iter()
        .filter(|s| is_moved(s))
        .map(|s| format!("localhost:{}", s.asked_port))
        .collect();
    let ports = if moved.is_empty() {
        String::from("the ports its servers asked for")
    } else {
        moved.join(", ")
    };
    if report.focused_by.is_empty() {
        format!(
            "this session lost the focus: outside the sessions, {ports} reach whatever holds those ports again (the person at the keyboard focused elsewhere or cleared it; nothing changes inside this session)."
        )
    } else {
        format!(
            "the person at the keyboard gave this session the focus (`styxy focus`): outside every session (their browser, OAuth callbacks), {ports} now reach this session's servers. Nothing changes inside this session."
        )
    }
}

/// Whether the server was moved off the port it asked for.
fn is_moved(s: &SessionServer) -> bool {
    s.asked_port != 0 && s.asked_port != s.port
}

/// Whether a server's port is a helper's (see `styxy_common::command_line::is_helper_port`);
/// a moved server's never is.
pub fn is_helper(s: &SessionServer, ephemeral: &RangeInclusive<u16>) -> bool {
    !is_moved(s)
        && u16::try_from(s.port).is_ok_and(|port| {
            styxy_common::command_line::is_helper_port(&s.cmdline, port, ephemeral)
        })
}

fn describe_started(s: &SessionServer) -> String {
    let who = process(s);
    let proto = protocol(s);
    if is_moved(s) {
        format!(
            "MOVED: {who} asked for {proto} port {asked}, which {holder} holds, and listens on {port} \
             instead. Inside this session (commands you run here) localhost:{asked} reaches it; \
             outside it (a browser, another session) use localhost:{port}{by_name}.",
            asked = s.asked_port,
            port = s.port,
            holder = holder(s),
            by_name = by_name(s),
        )
    } else {
        format!(
            "started: {who} listens on {proto} port {port} (localhost:{port}, inside and outside \
             this session{by_name}).",
            port = s.port,
            by_name = by_name(s),
        )
    }
}

/// `, or by name: http://feature-x.localhost/` when the daemon's proxy names the server.
fn by_name(s: &SessionServer) -> String {
    s.urls
        .first()
        .map_or(String::new(), |url| format!(", or by name: {url}"))
}

fn describe_stopped(s: &SessionServer) -> String {
    let who = process(s);
    let proto = protocol(s);
    if is_moved(s) {
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

/// One line for the helper ports that started and stopped: how many, whose, which.
fn describe_helpers(started: &[&SessionServer], stopped: &[&SessionServer]) -> Option<String> {
    if started.is_empty() && stopped.is_empty() {
        return None;
    }
    let mut text =
        String::from("helper ports (not for a browser: kernel channels, debugging ports):");
    for (verb, list) in [("started", started), ("stopped", stopped)] {
        if list.is_empty() {
            continue;
        }
        let mut pids: Vec<u32> = list.iter().map(|s| s.pid).collect();
        pids.sort_unstable();
        pids.dedup();
        let mut ports: Vec<u32> = list.iter().map(|s| s.port).collect();
        ports.sort_unstable();
        let shown: Vec<String> = ports
            .iter()
            .take(HELPER_PORTS_LISTED)
            .map(u32::to_string)
            .collect();
        let more = if ports.len() > HELPER_PORTS_LISTED {
            ", …"
        } else {
            ""
        };
        let whose = if pids.len() == 1 {
            process(list[0])
        } else {
            format!("{} processes, e.g. {}", pids.len(), process(list[0]))
        };
        let _ = write!(
            text,
            " {} {verb} ({}{more}) by {whose};",
            list.len(),
            shown.join(", ")
        );
    }
    text.pop();
    text.push_str(". `styxy session` lists them.");
    Some(text)
}

/// Who held the port a moved server asked for: `` `python3 -m http.server 8000` (pid 4121,
/// session feature-x) ``, else by name, else "another process".
fn holder(s: &SessionServer) -> String {
    if s.asked_holder_pid == 0 {
        return "another process".to_string();
    }
    let asked = u16::try_from(s.asked_port)
        .map(|p| vec![p])
        .unwrap_or_default();
    let command = styxy_common::command_line::shown(
        &s.asked_holder_cmdline,
        &s.asked_holder_comm,
        COMMAND_CHARS,
        &asked,
    );
    // The session by its name (`feature-x`), by its id from a daemon that does not say the name.
    let session = [&s.asked_holder_session_name, &s.asked_holder_instance_id]
        .into_iter()
        .find(|said| !said.is_empty())
        .map_or(String::new(), |session| format!(", session {session}"));
    if command.is_empty() {
        format!("pid {}{session}", s.asked_holder_pid)
    } else {
        format!("`{command}` (pid {}{session})", s.asked_holder_pid)
    }
}

/// `` `python3 -m http.server 8000` (pid 4121) ``: the command line (cut, its port arguments
/// kept), else the name.
fn process(s: &SessionServer) -> String {
    let ports: Vec<u16> = [s.asked_port, s.port]
        .into_iter()
        .filter_map(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
        .collect();
    let command = styxy_common::command_line::shown(&s.cmdline, &s.comm, COMMAND_CHARS, &ports);
    format!("`{command}` (pid {})", s.pid)
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

    fn facts() -> Facts {
        Facts {
            ephemeral: 32768..=60999,
            tool_output: String::new(),
        }
    }

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
                "node".into()
            },
            asked_holder_cmdline: if asked == 0 {
                String::new()
            } else {
                format!("node .bin/storybook dev -p {asked}")
            },
            asked_holder_instance_id: if asked == 0 {
                String::new()
            } else {
                "claude-7f3e".into()
            },
            // Told by its name, not its id.
            asked_holder_session_name: if asked == 0 {
                String::new()
            } else {
                "feature-x".into()
            },
            addresses: vec!["0.0.0.0".into()],
            urls: Vec::new(),
        }
    }

    /// A Jupyter kernel's channel: an ephemeral port its command line does not name.
    fn kernel_channel(pid: u32, port: u32) -> SessionServer {
        SessionServer {
            pid,
            comm: "python3".into(),
            cmdline: "/usr/bin/python3 -m ipykernel_launcher -f /root/.local/share/jupyter/runtime/kernel-1.json".into(),
            protocol: Protocol::Tcp as i32,
            port,
            addresses: vec!["127.0.0.1".into()],
            ..Default::default()
        }
    }

    #[test]
    fn a_focus_gained_or_lost_is_told_with_the_ports_it_lends() {
        let mut report = SessionReportResponse {
            running: vec![server(7, 6007, 6006), server(8, 8000, 0)],
            focused_by: vec![1000],
            focus_changed: true,
            ..Default::default()
        };
        let told = describe(&report, &facts()).expect("told");
        assert!(
            told.starts_with("Styxy: the person at the keyboard gave this session the focus"),
            "{told}"
        );
        assert!(told.contains("localhost:6006 now reach"), "{told}");
        report.focused_by.clear();
        let told = describe(&report, &facts()).expect("told");
        assert!(told.contains("this session lost the focus"), "{told}");
        report.focus_changed = false;
        assert_eq!(describe(&report, &facts()), None, "told once");
    }

    #[test]
    fn a_refused_signal_is_told_with_whose_process_it_was_and_what_to_use() {
        let mut report = SessionReportResponse {
            refused_signals: vec![styxy_proto::v1::RefusedSignal {
                signal: "SIGTERM".into(),
                sender_pid: 41,
                sender_comm: "pkill".into(),
                target_pid: 30,
                target_comm: "python3".into(),
                target_instance_id: "claude-a".into(),
                target_session_name: "feature-a".into(),
                target_ports: vec![8000],
                ..Default::default()
            }],
            ..Default::default()
        };
        let told = describe(&report, &facts()).expect("told");
        assert!(
            told.starts_with("Styxy: the kernel refused (EPERM) signals from this session"),
            "{told}"
        );
        assert!(
            told.contains("SIGTERM from pkill (pid 41) to python3 (pid 30 on port 8000), a process of session feature-a (claude-a)"),
            "{told}"
        );
        assert!(told.contains("`styxy stop PORT`"), "{told}");
        // With a server change, one more line.
        report.started = vec![server(7, 6007, 6006)];
        let told = describe(&report, &facts()).expect("told");
        assert!(
            told.starts_with("Styxy: this session's servers changed."),
            "{told}"
        );
        assert!(told.contains("\n- the kernel refused"), "{told}");
    }

    #[test]
    fn nothing_changed_says_nothing() {
        let report = SessionReportResponse {
            running: vec![server(1, 8000, 0)],
            ..Default::default()
        };
        assert_eq!(hook_output(&report, &facts()), None);
        assert_eq!(
            hook_output(&SessionReportResponse::default(), &facts()),
            None
        );
    }

    #[test]
    fn a_move_names_both_ports_the_command_and_the_holder_with_its_session() {
        let report = SessionReportResponse {
            started: vec![server(7, 6007, 6006)],
            ..Default::default()
        };
        let output = hook_output(&report, &facts()).expect("a report");
        let value: Value = serde_json::from_str(&output).expect("JSON");
        assert_eq!(value["hookSpecificOutput"]["hookEventName"], "PostToolUse");
        let context = value["hookSpecificOutput"]["additionalContext"]
            .as_str()
            .expect("context");
        for needle in [
            "MOVED",
            "`python3 -m http.server 6006` (pid 7)",
            "asked for TCP port 6006",
            "which `node .bin/storybook dev -p 6006` (pid 4121, session feature-x) holds",
            "localhost:6006 reaches it",
            "use localhost:6007",
        ] {
            assert!(context.contains(needle), "{needle:?} in {context}");
        }
    }

    #[test]
    fn moved_servers_come_first_and_stopped_ones_are_never_crowded_out() {
        let report = SessionReportResponse {
            started: (0..20)
                .map(|i| server(100 + i, 8000 + i, 0))
                .chain([server(9, 6007, 6006)])
                .collect(),
            stopped: vec![server(5, 5174, 5173)],
            ..Default::default()
        };
        let context = describe(&report, &facts()).expect("a report");
        let lines: Vec<&str> = context.lines().collect();
        assert_eq!(lines.len(), 1 + SERVERS_TOLD + 1, "{context}");
        assert!(lines[1].starts_with("- MOVED:"), "{context}");
        assert!(
            lines[2].starts_with("- started: `python3 -m http.server 8000` (pid 100)"),
            "{context}"
        );
        assert!(
            lines[SERVERS_TOLD].starts_with(
                "- stopped: `python3 -m http.server 5173` (pid 5) no longer listens on TCP port 5174 (moved from 5173)"
            ),
            "{context}"
        );
        assert!(
            lines[SERVERS_TOLD + 1].contains("… and 10 more"),
            "{context}"
        );
    }

    #[test]
    fn helper_ports_are_summarised_in_one_line() {
        // A notebook server (asked for its port) with two kernels of five channels each.
        let mut notebook = server(50, 8888, 0);
        notebook.cmdline = "/usr/bin/python3 /usr/local/bin/jupyter-server --port 8888".into();
        let started: Vec<SessionServer> = std::iter::once(notebook)
            .chain((0..5).map(|i| kernel_channel(60, 40000 + i)))
            .chain((0..5).map(|i| kernel_channel(61, 41000 + i)))
            .collect();
        let report = SessionReportResponse {
            started,
            stopped: vec![server(5, 8000, 0)],
            ..Default::default()
        };
        let context = describe(&report, &facts()).expect("a report");
        let lines: Vec<&str> = context.lines().collect();
        assert_eq!(lines.len(), 4, "{context}");
        assert!(
            lines[1]
                .contains("started: `python3 /usr/local/bin/jupyter-server --port 8888` (pid 50)"),
            "{context}"
        );
        assert!(
            lines[2].starts_with("- stopped: `python3 -m http.server 8000`"),
            "{context}"
        );
        assert!(
            lines[3].starts_with("- helper ports (not for a browser"),
            "{context}"
        );
        assert!(
            lines[3].contains("10 started (40000, 40001, 40002, 40003, 40004, 41000, 41001, 41002, …) by 2 processes"),
            "{context}"
        );
    }

    #[test]
    fn what_counts_as_a_helper_port() {
        let ephemeral = 32768..=60999;
        // An ephemeral port the command names is a server someone asked for.
        let mut asked = server(1, 40000, 0);
        asked.cmdline = "python3 -m http.server 40000".into();
        assert!(!is_helper(&asked, &ephemeral));
        assert!(is_helper(&kernel_channel(1, 40000), &ephemeral));
        assert!(!is_helper(&kernel_channel(1, 8000), &ephemeral));
        // A debugging port is a helper wherever it is.
        let mut chromium = server(2, 9222, 0);
        chromium.cmdline = "chromium --headless --remote-debugging-port=9222 about:blank".into();
        assert!(is_helper(&chromium, &ephemeral));
        chromium.cmdline = "node --inspect 127.0.0.1:9229 app.js".into();
        chromium.port = 9229;
        assert!(is_helper(&chromium, &ephemeral));
        // A moved server never is.
        assert!(!is_helper(&server(3, 40001, 40000), &ephemeral));
    }

    #[test]
    fn a_named_server_is_told_with_its_url() {
        let mut moved = server(7, 6007, 6006);
        moved.urls = vec!["http://feature-x.localhost:8080/".into()];
        let report = SessionReportResponse {
            started: vec![moved],
            ..Default::default()
        };
        let context = describe(&report, &facts()).expect("a report");
        assert!(
            context.contains("use localhost:6007, or by name: http://feature-x.localhost:8080/."),
            "{context}"
        );
    }

    #[test]
    fn a_wrong_url_in_the_output_is_corrected_even_when_nothing_else_changed() {
        let report = SessionReportResponse {
            running: vec![server(7, 8001, 8000)],
            ..Default::default()
        };
        let facts = Facts {
            tool_output:
                "INFO:     Uvicorn running on http://127.0.0.1:8000 (Press CTRL+C to quit)".into(),
            ..facts()
        };
        let context = describe(&report, &facts).expect("a correction");
        assert!(
            context.contains("printed http://127.0.0.1:8000,"),
            "{context}"
        );
        assert!(context.contains("use http://127.0.0.1:8001."), "{context}");
    }

    #[test]
    fn command_lines_are_cut_keep_their_ports_and_cannot_break_the_text() {
        let mut s = server(1, 8000, 0);
        s.cmdline = format!("node `rm -rf`\n{} --port 8000", "x".repeat(500));
        let text = process(&s);
        assert!(text.chars().count() < COMMAND_CHARS + 20, "{text}");
        assert!(text.contains("… --port 8000`"), "{text}");
        assert!(!text.contains('\n'));
        assert_eq!(text.matches('`').count(), 2, "{text}");
        s.cmdline = String::new();
        assert_eq!(process(&s), "`python3` (pid 1)");
    }
}
