//! `styxy allocate TYPE`: lease a free port of a service type, for a while or for a process's life.

use anyhow::Result;
use styxy_proto::v1 as pb;

use super::Client;
use crate::output::{call, expiry, print_json};

#[derive(Clone, Debug, clap::Args)]
pub(crate) struct Args {
    service_type: String,
    /// Take this port when it is free.
    #[arg(long)]
    port: Option<u16>,
    /// Tie the lease to this process: it ends when the process exits.
    #[arg(long)]
    pid: Option<u32>,
    /// Lease lifetime in seconds (default without --pid: one hour).
    #[arg(long)]
    ttl: Option<u64>,
    /// Group the lease with an agent session.
    #[arg(long)]
    instance: Option<String>,
}

pub(super) async fn run(client: &mut Client, args: Args, as_json: bool) -> Result<()> {
    let r = call(
        client
            .allocate(pb::AllocateRequest {
                service_type: args.service_type,
                preferred_port: args.port.map(u32::from),
                pid: args.pid,
                instance_id: args.instance,
                ttl_seconds: args.ttl,
            })
            .await,
    )?;
    if as_json {
        return print_json(&r);
    }
    outln!(
        "{} ({}) leased as {}, {}",
        r.port,
        r.service_type,
        r.lease_id,
        expiry(r.expires_at_ms)
    );
    Ok(())
}
