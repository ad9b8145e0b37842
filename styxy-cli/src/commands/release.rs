//! `styxy release PORT|LEASE-ID`: end a lease.

use anyhow::Result;
use styxy_proto::v1 as pb;

use super::Client;
use crate::output::{call, print_json};

#[derive(Clone, Debug, clap::Args)]
pub(crate) struct Args {
    /// A port number or a lease id such as lease-3.
    target: String,
}

pub(super) async fn run(client: &mut Client, args: Args, as_json: bool) -> Result<()> {
    let target = match args.target.parse::<u32>() {
        Ok(port) => pb::release_request::Target::Port(port),
        Err(_) => pb::release_request::Target::LeaseId(args.target),
    };
    let r = call(
        client
            .release(pb::ReleaseRequest {
                target: Some(target),
            })
            .await,
    )?;
    if as_json {
        return print_json(&r);
    }
    outln!("released {}", r.released_lease_ids.join(", "));
    Ok(())
}
