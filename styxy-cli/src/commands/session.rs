//! `styxy session`: the servers of one agent session — each with the port it is bound to and, when
//! it was moved, the port it asked for (which the session's own processes still use) — without
//! marking anything as told (the PostToolUse hook's reports are unchanged by it); and, when the
//! daemon's proxy runs, the URL that reaches it by name.

use anyhow::{bail, Result};
use styxy_proto::v1 as pb;

use super::Client;
use crate::output::{call, pid_cell, print_json, print_table, protocol_name, table};

/// Command lines are cut to this many characters (their port arguments kept).
const COMMAND_CHARS: usize = 80;

/// The ports a server's command line may name: the asked one and the bound one.
fn ports(s: &pb::SessionServer) -> Vec<u16> {
    [s.asked_port, s.port]
        .into_iter()
        .filter(|p| *p != 0)
        .filter_map(|p| u16::try_from(p).ok())
        .collect()
}

#[derive(Clone, Debug, clap::Args)]
pub(crate) struct Args {
    /// The session [default: $STYXY_INSTANCE, else the session of this shell's process tree]
    #[arg(long)]
    instance: Option<String>,
    /// The session of this process instead (registered for it or an ancestor).
    #[arg(long, conflicts_with = "instance")]
    pid: Option<u32>,
}

pub(super) async fn run(client: &mut Client, args: Args, as_json: bool) -> Result<()> {
    let instance = args.instance.or_else(|| {
        args.pid
            .is_none()
            .then(|| std::env::var(styxy_common::env::INSTANCE.name).ok())
            .flatten()
            .filter(|i| !i.is_empty())
    });
    let pid = match (&instance, args.pid) {
        (Some(_), _) => 0,
        (None, Some(pid)) => pid,
        (None, None) => std::process::id(),
    };
    if pid == 0 && instance.is_none() {
        bail!("name the session: --instance ID or --pid PID");
    }
    let r = call(
        client
            .session_report(pb::SessionReportRequest {
                instance_id: instance.unwrap_or_default(),
                peek: true,
                pid,
            })
            .await,
    )?;
    if as_json {
        return print_json(&r);
    }
    match (r.session_name.as_str(), r.session_name_wanted.as_str()) {
        ("", _) => outln!("session {}", r.instance_id),
        (name, "") => outln!("session {} (named {name})", r.instance_id),
        (name, wanted) if wanted == styxy_common::url::DASHBOARD_LABEL => outln!(
            "session {} (named {name}: {wanted}.localhost is the dashboard's)",
            r.instance_id
        ),
        (name, wanted) => outln!(
            "session {} (named {name}: an older session is named {wanted})",
            r.instance_id
        ),
    }
    if r.running.is_empty() {
        outln!("no servers");
        return Ok(());
    }
    // A URL column when the daemon's proxy serves names.
    let with_urls = r.running.iter().any(|s| !s.urls.is_empty());
    let mut columns = vec!["PORT", "PROTO", "ASKED", "PID", "COMMAND"];
    if with_urls {
        columns.push("URL");
    }
    let mut t = table(&columns);
    for s in &r.running {
        let asked = if s.asked_port == 0 {
            "-".to_string()
        } else {
            s.asked_port.to_string()
        };
        let mut row = vec![
            s.port.to_string(),
            protocol_name(s.protocol).to_string(),
            asked,
            pid_cell(s.pid),
            // Cut as the agent's report cuts it: its port arguments kept.
            styxy_common::command_line::shown(&s.cmdline, &s.comm, COMMAND_CHARS, &ports(s)),
        ];
        if with_urls {
            row.push(s.urls.first().cloned().unwrap_or_else(|| "-".into()));
        }
        t.add_row(row);
    }
    print_table(&t);
    Ok(())
}
