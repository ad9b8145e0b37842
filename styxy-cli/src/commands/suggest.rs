//! `styxy suggest TYPE`: free ports of a service type's range, lowest first.

use anyhow::Result;
use styxy_proto::v1 as pb;

use super::Client;
use crate::output::{call, print_json};

#[derive(Clone, Debug, clap::Args)]
pub(crate) struct Args {
    service_type: String,
    #[arg(short = 'n', long, default_value_t = 1)]
    count: u32,
}

pub(super) async fn run(client: &mut Client, args: Args, as_json: bool) -> Result<()> {
    let r = call(
        client
            .suggest(pb::SuggestRequest {
                service_type: args.service_type,
                count: args.count,
            })
            .await,
    )?;
    if as_json {
        return print_json(&r);
    }
    let ports: Vec<String> = r.ports.iter().map(u32::to_string).collect();
    let listed = if ports.is_empty() {
        "no free port".to_string()
    } else {
        ports.join(" ")
    };
    let (start, end) = (r.range_start, r.range_end);
    outln!("{} ({start}-{end}): {listed}", r.service_type);
    Ok(())
}
