//! `styxy audit`: every moved bind — who (and in which session), from which port to which, held
//! by whom (command, pid, session). Sessions are named as the names show them (their worktree's,
//! or `styxy run --name`) while they live, by instance id after.

use anyhow::Result;
use styxy_proto::v1 as pb;

use super::Client;
use crate::output::{call, clock, print_json, session_shown};

#[derive(Clone, Debug, clap::Args)]
pub(crate) struct Args {
    #[arg(long, default_value_t = 50)]
    limit: u32,
}

pub(super) async fn run(client: &mut Client, args: Args, as_json: bool) -> Result<()> {
    let r = call(
        client
            .list_audit(pb::ListAuditRequest {
                since_ms: None,
                limit: args.limit,
            })
            .await,
    )?;
    if as_json {
        return print_json(&r);
    }
    if r.entries.is_empty() {
        outln!("no reassigned binds yet");
    }
    for e in &r.entries {
        let session = match session_shown(&e.session_name, &e.instance_id) {
            "" => String::new(),
            session => format!(" [{session}]"),
        };
        outln!(
            "{}  {} pid {}{session}: {} → {}{}",
            clock(e.at_ms),
            e.comm,
            e.pid,
            e.requested_port,
            e.assigned_port,
            holder(e),
        );
    }
    Ok(())
}

/// ` (held by `python3 -m http.server 8000`, pid 4121, session feature-x)`: the holder by its
/// command (else its name), pid and session; empty when unknown.
fn holder(e: &pb::AuditEntry) -> String {
    if e.holder_pid == 0 {
        return String::new();
    }
    let ports = u16::try_from(e.requested_port)
        .map(|p| vec![p])
        .unwrap_or_default();
    let command = styxy_common::command_line::shown(&e.holder_cmdline, &e.holder_comm, 80, &ports);
    let mut text = String::from(" (held by ");
    if !command.is_empty() {
        text.push_str(&format!("`{command}`, "));
    }
    text.push_str(&format!("pid {}", e.holder_pid));
    // By its name while the session lives; by its id once it has ended.
    let session = session_shown(&e.holder_session_name, &e.holder_instance_id);
    if !session.is_empty() {
        text.push_str(&format!(", session {session}"));
    }
    text.push(')');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_is_named_by_command_pid_and_session() {
        let mut e = pb::AuditEntry {
            requested_port: 8000,
            holder_pid: 4121,
            holder_comm: "python3".into(),
            holder_cmdline: "/usr/bin/python3 -m http.server 8000".into(),
            holder_instance_id: "claude-7f3e".into(),
            ..Default::default()
        };
        assert_eq!(
            holder(&e),
            " (held by `python3 -m http.server 8000`, pid 4121, session claude-7f3e)"
        );
        e.holder_session_name = "feature-x".into();
        assert_eq!(
            holder(&e),
            " (held by `python3 -m http.server 8000`, pid 4121, session feature-x)"
        );
        e.holder_cmdline.clear();
        e.holder_instance_id.clear();
        assert_eq!(holder(&e), " (held by `python3`, pid 4121)");
        e.holder_comm.clear();
        assert_eq!(holder(&e), " (held by pid 4121)");
        e.holder_pid = 0;
        assert_eq!(holder(&e), "");
    }
}
