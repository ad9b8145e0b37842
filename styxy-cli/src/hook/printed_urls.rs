//! Ports a tool printed but does not listen on. A server moved off its asked port often prints
//! the port it was configured with, not the one it got: uvicorn's `Uvicorn running on
//! http://127.0.0.1:8000`, Jupyter's `http://localhost:8888/tree?token=…`, Postgres's
//! `listening on … port 5432`. Inside the session that URL still works (its view leads there);
//! from outside — the browser the human opens it in — it reaches whoever holds the asked port.
//! The PostToolUse report says which URL the tool printed and which one works where.

use serde_json::Value;
use styxy_proto::v1::SessionServer;

/// How much of a tool's output is looked at (its beginning): a tool's output is capped by the
/// agent anyway, and server banners come first.
const OUTPUT_LOOKED_AT: usize = 256 * 1024;
/// At most this many corrections in one report.
const CORRECTIONS: usize = 5;

/// What the tool call printed: every string in the hook input's `tool_response` (a Bash call's
/// `stdout` and `stderr`, whatever shape the agent gives them), joined by newlines.
pub fn tool_output(input: &str) -> String {
    let Ok(value) = serde_json::from_str::<Value>(input) else {
        return String::new();
    };
    let mut out = String::new();
    if let Some(response) = value.get("tool_response") {
        collect_strings(response, &mut out);
    }
    if out.len() > OUTPUT_LOOKED_AT {
        let mut end = OUTPUT_LOOKED_AT;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
    }
    out
}

fn collect_strings(value: &Value, out: &mut String) {
    match value {
        Value::String(text) => {
            out.push_str(text);
            out.push('\n');
        }
        Value::Array(items) => items.iter().for_each(|v| collect_strings(v, out)),
        Value::Object(fields) => fields.values().for_each(|v| collect_strings(v, out)),
        _ => {}
    }
}

/// One sentence for each URL (or `port N` phrase) in `output` that names the asked port of a
/// moved server of the session: what was printed, and what works inside and outside.
pub fn corrections(output: &str, running: &[SessionServer]) -> Vec<String> {
    let mut said = Vec::new();
    let mut out = Vec::new();
    for server in running
        .iter()
        .filter(|s| s.asked_port != 0 && s.asked_port != s.port)
    {
        let (Ok(asked), Ok(bound)) = (u16::try_from(server.asked_port), u16::try_from(server.port))
        else {
            continue;
        };
        for line in output.lines().filter(|l| !l.contains("STYXY")) {
            for printed in loopback_urls(line, asked) {
                if said.contains(&printed) || out.len() == CORRECTIONS {
                    continue;
                }
                let working = with_port(&printed, asked, bound);
                out.push(format!(
                    "The command printed {printed}, but that server listens on {bound} (it was \
                     moved off {asked}): inside this session {printed} works; from outside it (a \
                     browser, another session) use {working}."
                ));
                said.push(printed);
            }
            if names_port_in_words(line, asked) && !said.contains(&format!("port {asked}")) {
                if out.len() == CORRECTIONS {
                    continue;
                }
                out.push(format!(
                    "The command's output says port {asked}, but that server listens on {bound} \
                     (it was moved off {asked}): inside this session {asked} reaches it; from \
                     outside it use {bound}."
                ));
                said.push(format!("port {asked}"));
            }
        }
    }
    out
}

/// The hosts a printed URL may name for a server on this machine.
const LOOPBACK_HOSTS: [&str; 6] = [
    "localhost",
    "127.0.0.1",
    "0.0.0.0",
    "[::1]",
    "[::]",
    "[::ffff:127.0.0.1]",
];

/// URLs in `line` (http, https, ws, wss) whose host is this machine's and whose port is `port`,
/// each up to the first character that cannot end a URL in prose.
fn loopback_urls(line: &str, port: u16) -> Vec<String> {
    let mut found = Vec::new();
    for scheme in ["http://", "https://", "ws://", "wss://"] {
        let mut rest = line;
        while let Some(at) = rest.find(scheme) {
            let url_start = &rest[at..];
            let end = url_start
                .find(|c: char| {
                    c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`' | ')')
                })
                .unwrap_or(url_start.len());
            let url = url_start[..end].trim_end_matches(['.', ',', ';']);
            let authority = &url[scheme.len()..];
            let authority = authority.split(['/', '?', '#']).next().unwrap_or_default();
            if let Some((host, p)) = authority.rsplit_once(':') {
                if LOOPBACK_HOSTS.contains(&host) && p.parse::<u16>().ok() == Some(port) {
                    found.push(url.to_string());
                }
            }
            rest = &url_start[scheme.len()..];
        }
    }
    found
}

/// `url` with its port `from` replaced by `to`, and a wildcard host (`0.0.0.0`, `[::]`) by
/// `localhost` (a browser cannot open the wildcard).
fn with_port(url: &str, from: u16, to: u16) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("http", url));
    let split = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(split);
    let host = authority
        .strip_suffix(&format!(":{from}"))
        .unwrap_or(authority);
    let host = if matches!(host, "0.0.0.0" | "[::]") {
        "localhost"
    } else {
        host
    };
    format!("{scheme}://{host}:{to}{tail}")
}

/// Whether `line` says `port N` (a log line: `listening on IPv4 address "127.0.0.1", port 5432`).
fn names_port_in_words(line: &str, port: u16) -> bool {
    let needle = format!("port {port}");
    line.to_ascii_lowercase()
        .match_indices(&needle)
        .any(|(at, _)| {
            let before = line[..at].chars().next_back();
            let after = line[at + needle.len()..].chars().next();
            !before.is_some_and(|c| c.is_ascii_alphanumeric())
                && !after.is_some_and(|c| c.is_ascii_digit())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moved(asked: u32, port: u32) -> SessionServer {
        SessionServer {
            pid: 7,
            comm: "jupyter-server".into(),
            cmdline: "jupyter server --port 8888".into(),
            port,
            asked_port: asked,
            ..Default::default()
        }
    }

    #[test]
    fn the_tools_output_is_every_string_of_the_response() {
        let input = r#"{"session_id":"s","tool_response":{"stdout":"a http://x","stderr":"b","interrupted":false}}"#;
        let out = tool_output(input);
        assert!(out.contains("a http://x") && out.contains('b'), "{out}");
        assert_eq!(tool_output(r#"{"tool_response":"plain"}"#), "plain\n");
        assert_eq!(tool_output("not json"), "");
        assert_eq!(tool_output(r#"{"session_id":"s"}"#), "");
    }

    #[test]
    fn a_printed_url_with_the_asked_port_is_corrected_for_outside() {
        let output = "[I 12:00 ServerApp] Jupyter Server is running at:\n\
                      [I 12:00 ServerApp] http://localhost:8888/tree?token=abc123\n\
                      [I 12:00 ServerApp]     http://127.0.0.1:8888/tree?token=abc123.\n";
        let lines = corrections(output, &[moved(8888, 8889)]);
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert!(
            lines[0].contains("printed http://localhost:8888/tree?token=abc123,"),
            "{}",
            lines[0]
        );
        assert!(
            lines[0].contains("use http://localhost:8889/tree?token=abc123."),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].contains("use http://127.0.0.1:8889/tree?token=abc123."),
            "{}",
            lines[1]
        );
    }

    #[test]
    fn wildcard_hosts_become_localhost_and_other_ports_and_hosts_are_left_alone() {
        let output = "Uvicorn running on http://0.0.0.0:8000 (Press CTRL+C to quit)\n\
                      see http://example.com:8000/ and http://localhost:18000/ and http://localhost:8001/";
        let lines = corrections(output, &[moved(8000, 8001)]);
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(
            lines[0].contains("printed http://0.0.0.0:8000,"),
            "{}",
            lines[0]
        );
        assert!(
            lines[0].contains("use http://localhost:8001."),
            "{}",
            lines[0]
        );
        // A server that was not moved prints the truth: nothing to say.
        assert!(corrections(output, &[moved(0, 8000)]).is_empty());
    }

    #[test]
    fn a_port_in_words_is_corrected_once() {
        let output = "LOG:  listening on IPv4 address \"127.0.0.1\", port 5432\n\
                      LOG:  listening on IPv6 address \"::1\", port 5432\n\
                      support 54321 and port 54320";
        let lines = corrections(output, &[moved(5432, 5433)]);
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(
            lines[0].contains("says port 5432") && lines[0].contains("use 5433"),
            "{}",
            lines[0]
        );
    }

    #[test]
    fn styxys_own_notice_is_not_corrected_and_the_count_is_bounded() {
        let notice =
            "✓ STYXY: Auto-assigned port 8001 (8000 in use by `x`, pid 1) http://localhost:8000/";
        assert!(corrections(notice, &[moved(8000, 8001)]).is_empty());
        let many: String = (0..20)
            .map(|i| format!("http://localhost:8000/{i}\n"))
            .collect();
        assert_eq!(corrections(&many, &[moved(8000, 8001)]).len(), CORRECTIONS);
    }

    #[test]
    fn urls_are_found_whatever_surrounds_them() {
        assert_eq!(
            loopback_urls("(http://[::1]:8000/x)", 8000),
            ["http://[::1]:8000/x"]
        );
        assert_eq!(
            loopback_urls("\"ws://localhost:8000\"", 8000),
            ["ws://localhost:8000"]
        );
        assert!(loopback_urls("http://localhost", 8000).is_empty());
        assert!(loopback_urls("http://localhost:80000", 8000).is_empty());
        assert_eq!(
            with_port("https://[::]:8000", 8000, 8001),
            "https://localhost:8001"
        );
    }
}
