//! `styxy watch`: bind, release, reassign and lease events as they happen, one line each.

use anyhow::{anyhow, Result};
use styxy_proto::v1 as pb;
use tokio_stream::StreamExt;

use super::Client;
use crate::client::Target;
use crate::output::{call, clock, protocol_name};

pub(super) async fn run(
    client: &mut Client,
    target: &Target,
    as_json: bool,
    deadline: std::time::Duration,
) -> Result<()> {
    let subscribed = tokio::time::timeout(deadline, client.watch(pb::WatchRequest {}))
        .await
        .map_err(|_| {
            anyhow!(
                "the Styxy daemon at {target} did not subscribe this watch within {} s; try again, \
                 or give it longer with --timeout SECONDS",
                deadline.as_secs_f64()
            )
        })?;
    let mut stream = call(subscribed)?;
    // The daemon has subscribed us once the call returns: from here no event is missed.
    eprintln!("watching {target} — Ctrl-C to stop");
    while let Some(event) = stream.next().await {
        let event = event.map_err(|s| anyhow!("the event stream ended: {}", s.message()))?;
        if as_json {
            outln!("{}", serde_json::to_string(&event)?);
        } else {
            outln!("{}", describe(&event));
        }
    }
    Ok(())
}

fn kind_name(kind: i32) -> &'static str {
    match pb::EventKind::try_from(kind) {
        Ok(pb::EventKind::Bound) => "bound",
        Ok(pb::EventKind::Released) => "released",
        Ok(pb::EventKind::Reassigned) => "reassigned",
        Ok(pb::EventKind::Leased) => "leased",
        Ok(pb::EventKind::LeaseEnded) => "lease-ended",
        _ => "unknown",
    }
}

fn describe(e: &pb::PortEvent) -> String {
    let who = if e.pid == 0 {
        String::new()
    } else {
        format!(" pid {} {}", e.pid, e.comm)
    };
    let at = clock(e.at_ms);
    match pb::EventKind::try_from(e.kind) {
        Ok(pb::EventKind::Reassigned) => format!(
            "{at}  reassigned {} → {}{who} ({})",
            e.requested_port, e.port, e.service_type
        ),
        Ok(pb::EventKind::Leased | pb::EventKind::LeaseEnded) => {
            format!("{at}  {} {} {}{who}", kind_name(e.kind), e.port, e.lease_id)
        }
        _ => format!(
            "{at}  {} {}/{}{who} ({})",
            kind_name(e.kind),
            e.port,
            protocol_name(e.protocol),
            e.service_type
        ),
    }
}
