//! `styxy ports`: every bound port, lease and session view entry, or one agent session's
//! (`--instance`). A view entry reads `8000 → 8001`: inside that session, the asked port reaches
//! the server that was moved to the bound one. Sticky ports read `8000 → 8001` too: the port
//! that project's server asking 8000 got last, and gets again while it is free.

use anyhow::Result;
use styxy_proto::v1 as pb;

use super::Client;
use crate::output::{call, expiry, pid_cell, print_json, print_table, protocol_name, table};

#[derive(Clone, Debug, clap::Args)]
pub(crate) struct Args {
    /// Only the ports of this agent session (its STYXY_INSTANCE), e.g. `--instance "$STYXY_INSTANCE"`.
    #[arg(long)]
    instance: Option<String>,
}

pub(super) async fn run(client: &mut Client, args: Args, as_json: bool) -> Result<()> {
    let mut r = call(client.list_ports(pb::ListPortsRequest {}).await)?;
    if let Some(instance) = &args.instance {
        r.holders.retain(|h| &h.instance_id == instance);
        r.leases.retain(|l| &l.instance_id == instance);
        r.views.retain(|v| &v.instance_id == instance);
        r.sticky.clear();
        r.focuses.retain(|f| &f.instance_id == instance);
    }
    if as_json {
        return print_json(&r);
    }
    print_holders(&r.holders);
    if !r.leases.is_empty() {
        println!();
        print_leases(&r.leases);
    }
    if !r.views.is_empty() {
        println!();
        print_views(&r.views);
    }
    for focus in &r.focuses {
        let name = if focus.session_name.is_empty() || focus.session_name == focus.instance_id {
            focus.instance_id.clone()
        } else {
            format!("{} ({})", focus.session_name, focus.instance_id)
        };
        println!(
            "focus: uid {}'s processes outside the sessions follow {name}'s view",
            focus.uid
        );
    }
    if !r.sticky.is_empty() {
        println!();
        print_sticky(&r.sticky);
    }
    Ok(())
}

fn print_sticky(sticky: &[pb::StickyPort]) {
    let mut t = table(&["STICKY", "TYPE", "UID", "PROJECT"]);
    for e in sticky {
        let asked = if e.asked_port == 0 {
            "any".to_string()
        } else {
            e.asked_port.to_string()
        };
        t.add_row([
            format!("{asked} → {}", e.port),
            e.service_type.clone(),
            e.uid.to_string(),
            e.project.clone(),
        ]);
    }
    print_table(&t);
}

fn print_views(views: &[pb::ViewEntry]) {
    let mut t = table(&["INSTANCE", "PROTO", "VIEW", "PID"]);
    for v in views {
        t.add_row([
            v.instance_id.clone(),
            protocol_name(v.protocol).to_string(),
            format!("{} → {}", v.asked_port, v.bound_port),
            pid_cell(v.pid),
        ]);
    }
    print_table(&t);
}

fn print_holders(holders: &[pb::Holder]) {
    if holders.is_empty() {
        println!("no bound ports seen");
        return;
    }
    let mut t = table(&[
        "PORT", "PROTO", "PID", "COMM", "TYPE", "INSTANCE", "ADDRESS",
    ]);
    for h in holders {
        t.add_row([
            h.port.to_string(),
            protocol_name(h.protocol).to_string(),
            pid_cell(h.pid),
            if h.comm.is_empty() { "?" } else { &h.comm }.to_string(),
            h.service_type.clone(),
            match (h.instance_id.as_str(), h.orphan) {
                ("", _) => "-".to_string(),
                // Its session ended while it runs on: `styxy prune` stops it.
                (ended, true) => format!("{ended} (ended: orphan)"),
                (id, false) => id.to_string(),
            },
            h.addresses.join(","),
        ]);
    }
    print_table(&t);
}

fn print_leases(leases: &[pb::Lease]) {
    let mut t = table(&["PORT", "LEASE", "KIND", "TYPE", "PID", "EXPIRES"]);
    for l in leases {
        t.add_row([
            l.port.to_string(),
            l.lease_id.clone(),
            if l.claim { "claim" } else { "lease" }.to_string(),
            l.service_type.clone(),
            pid_cell(l.pid),
            expiry(l.expires_at_ms),
        ]);
    }
    print_table(&t);
}
