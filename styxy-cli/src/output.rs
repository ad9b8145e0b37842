//! How the client commands print: `--json` is the canonical proto3 JSON mapping of the daemon's
//! answer (the same shapes grpcurl prints), tables go through comfy-table, and times and holders
//! read as people say them.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Result};
use comfy_table::presets::NOTHING;
use comfy_table::{ContentArrangement, Table};
use styxy_common::net::Protocol;
use styxy_proto::v1 as pb;

/// `println!` for what a command prints on stdout: when its reader has gone (`styxy ports |
/// head`), the command ends quietly as a Unix tool does, where `println!` would panic. (The
/// process keeps ignoring SIGPIPE, as Rust programs do: a daemon gone mid-request is an error
/// that says so, not a silent death.)
macro_rules! outln {
    () => {
        $crate::output::write_out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::output::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for stdout, as [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::write_out(format_args!($($arg)*))
    };
}

/// Writes to stdout; when that fails, ends the process: quietly (status 0) when the reader has
/// gone, else with the error on stderr (status 1).
pub(crate) fn write_out(text: std::fmt::Arguments<'_>) {
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(text) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        // stderr may be gone too: nothing more to do then.
        let _ = writeln!(std::io::stderr(), "styxy: writing the output: {e}");
        std::process::exit(1);
    }
}

/// A gRPC answer, or an error that carries the daemon's message.
pub(crate) fn call<T>(result: Result<tonic::Response<T>, tonic::Status>) -> Result<T> {
    result
        .map(tonic::Response::into_inner)
        .map_err(|s| match s.code() {
            tonic::Code::Unavailable => anyhow!("the Styxy daemon is unreachable: {}", s.message()),
            _ => anyhow!("{}", s.message()),
        })
}

/// Prints a message as indented proto3 JSON.
pub(crate) fn print_json(message: &impl serde::Serialize) -> Result<()> {
    outln!("{}", serde_json::to_string_pretty(message)?);
    Ok(())
}

/// A table of plain columns, no borders, never wrapped (a terminal's width must not change what
/// a script that reads it sees).
pub(crate) fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.iter().copied());
    // Columns start at the line's start and are two spaces apart, as `ps` and `ss` print them.
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    table
}

/// Prints a table with the trailing spaces of its last column trimmed.
pub(crate) fn print_table(table: &Table) {
    for line in table.lines() {
        outln!("{}", line.trim_end());
    }
}

/// `tcp`, `udp`, or `-` for an unset or unknown value.
pub(crate) fn protocol_name(protocol: i32) -> &'static str {
    match pb::Protocol::try_from(protocol) {
        Ok(pb::Protocol::Tcp) => Protocol::Tcp.name(),
        Ok(pb::Protocol::Udp) => Protocol::Udp.name(),
        _ => "-",
    }
}

/// A pid for a table: `-` when the daemon could not tell it.
pub(crate) fn pid_cell(pid: u32) -> String {
    if pid == 0 {
        "-".to_string()
    } else {
        pid.to_string()
    }
}

/// A session as a person knows it: by its name (its worktree's, or `styxy run --name`), by its
/// instance id when it has none (ended, or from an older daemon); empty when there is no
/// session (no id: a name alone is not one).
pub(crate) fn session_shown<'a>(name: &'a str, id: &'a str) -> &'a str {
    if id.is_empty() || name.is_empty() {
        id
    } else {
        name
    }
}

/// `feature-x (claude-abc)`, or the id alone when the session has no other name: for what acts
/// on a session (focus, stop), where its id matters too.
pub(crate) fn session_label(name: &str, id: &str) -> String {
    if name.is_empty() || name == id {
        id.to_string()
    } else {
        format!("{name} ({id})")
    }
}

/// `comm, pid N[, session NAME] — type on addresses/proto [cmdline]`.
pub(crate) fn describe_holder(h: &pb::Holder) -> String {
    let mut who = match (h.pid, h.comm.as_str()) {
        (0, _) => format!("uid {} (process not visible)", h.uid),
        (pid, comm) => format!("{comm}, pid {pid}"),
    };
    let session = session_shown(&h.session_name, &h.instance_id);
    if !session.is_empty() {
        who.push_str(&format!(", session {session}"));
    }
    format!(
        "{who} — {} on {}/{} [{}]",
        h.service_type,
        h.addresses.join(","),
        protocol_name(h.protocol),
        h.cmdline
    )
}

/// `lease|claim ID (type) for pid N|uid N, expires in …`.
pub(crate) fn describe_lease(l: &pb::Lease) -> String {
    let owner = if l.pid == 0 {
        format!("uid {}", l.owner_uid)
    } else {
        format!("pid {}", l.pid)
    };
    let kind = if l.claim { "claim" } else { "lease" };
    format!(
        "{kind} {} ({}) for {owner}, {}",
        l.lease_id,
        l.service_type,
        expiry(l.expires_at_ms)
    )
}

/// `expires in 1m05s`, or `while its process runs` for a lease with no TTL.
pub(crate) fn expiry(expires_at_ms: u64) -> String {
    if expires_at_ms == 0 {
        return "while its process runs".to_string();
    }
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let left = expires_at_ms.saturating_sub(now_ms) / 1000;
    format!("expires in {}", human_duration(left))
}

/// `42s`, `3m07s`, `2h05m`.
pub(crate) fn human_duration(secs: u64) -> String {
    let d = Duration::from_secs(secs);
    match d.as_secs() {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// `HH:MM:SS` (UTC) of a Unix-milliseconds time.
pub(crate) fn clock(ms: u64) -> String {
    let s = ms / 1000;
    format!("{:02}:{:02}:{:02}", (s / 3600) % 24, (s / 60) % 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_clock_read_as_people_say_them() {
        assert_eq!(human_duration(42), "42s");
        assert_eq!(human_duration(187), "3m07s");
        assert_eq!(human_duration(7500), "2h05m");
        assert_eq!(clock(3_723_000), "01:02:03");
        assert_eq!(expiry(0), "while its process runs");
    }

    #[test]
    fn a_holder_is_described_with_its_session_by_name() {
        let mut h = pb::Holder {
            pid: 4100,
            comm: "node".into(),
            service_type: "dev".into(),
            addresses: vec!["127.0.0.1".into()],
            protocol: pb::Protocol::Tcp as i32,
            cmdline: "vite --port 5173".into(),
            ..Default::default()
        };
        assert_eq!(
            describe_holder(&h),
            "node, pid 4100 — dev on 127.0.0.1/tcp [vite --port 5173]"
        );
        h.instance_id = "claude-7f3e".into();
        assert!(describe_holder(&h).starts_with("node, pid 4100, session claude-7f3e — "));
        h.session_name = "feature-x".into();
        assert!(describe_holder(&h).starts_with("node, pid 4100, session feature-x — "));
    }

    #[test]
    fn tables_have_no_borders_and_no_trailing_spaces() {
        let mut t = table(&["PORT", "PROTO"]);
        t.add_row(["6006", "tcp"]);
        let lines: Vec<String> = t.lines().map(|l| l.trim_end().to_string()).collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].contains("PORT") && lines[0].contains("PROTO"));
        assert!(lines[1].contains("6006") && lines[1].contains("tcp"));
        assert!(!lines.iter().any(|l| l.contains('|') || l.contains('─')));
        assert!(lines[1].starts_with("6006"), "no left padding: {lines:?}");
    }
}
