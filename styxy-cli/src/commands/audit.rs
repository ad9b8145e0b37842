//! `styxy audit`: every moved bind — who, from which port to which, held by whom.

use anyhow::Result;
use styxy_proto::v1 as pb;

use super::Client;
use crate::output::{call, clock, print_json};

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
        println!("no reassigned binds yet");
    }
    for e in &r.entries {
        let holder = match (e.holder_pid, e.holder_comm.as_str()) {
            (0, _) => String::new(),
            (pid, "") => format!(" (held by pid {pid})"),
            (pid, comm) => format!(" (held by {comm}, pid {pid})"),
        };
        println!(
            "{}  {} pid {}: {} → {}{holder}",
            clock(e.at_ms),
            e.comm,
            e.pid,
            e.requested_port,
            e.assigned_port,
        );
    }
    Ok(())
}
