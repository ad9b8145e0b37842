//! `styxy observe PORT`: who holds a port, checked against the kernel right now.

use anyhow::Result;
use styxy_proto::v1 as pb;

use super::Client;
use crate::output::{call, describe_holder, describe_lease, print_json};

#[derive(Clone, Debug, clap::Args)]
pub(crate) struct Args {
    port: u16,
    /// Only this protocol (default: TCP and UDP).
    #[arg(long, value_enum)]
    protocol: Option<ProtocolArg>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum ProtocolArg {
    Tcp,
    Udp,
}

pub(super) async fn run(client: &mut Client, args: Args, as_json: bool) -> Result<()> {
    let protocol = match args.protocol {
        Some(ProtocolArg::Tcp) => pb::Protocol::Tcp,
        Some(ProtocolArg::Udp) => pb::Protocol::Udp,
        None => pb::Protocol::Unspecified,
    };
    let r = call(
        client
            .observe(pb::ObserveRequest {
                port: u32::from(args.port),
                protocol: protocol as i32,
            })
            .await,
    )?;
    if as_json {
        return print_json(&r);
    }
    let port = args.port;
    let range = if r.range_service_type.is_empty() {
        String::new()
    } else {
        format!(" ({} range)", r.range_service_type)
    };
    match (&r.holders[..], &r.lease) {
        ([], None) => outln!("port {port}{range} is free"),
        (holders, lease) => {
            outln!("port {port}{range}:");
            for h in holders {
                outln!("  bound by {}", describe_holder(h));
            }
            if let Some(l) = lease {
                outln!("  leased: {}", describe_lease(l));
            }
        }
    }
    Ok(())
}
