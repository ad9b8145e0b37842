//! `styxy ports`: every bound port, lease and session view entry, or one agent session's
//! (`--instance`, by its id or its name). A server's session is shown by its name (its
//! worktree's, or `styxy run --name`), and its URL by name through the proxy when the proxy runs.
//! A view entry reads `8000 → 8001`: inside that session, the asked port reaches the server that
//! was moved to the bound one. Sticky ports read `8000 → 8001` too: the port that project's
//! server asking 8000 got last, and gets again while it is free.

use anyhow::Result;
use styxy_proto::v1 as pb;

use super::Client;
use crate::output::{
    call, expiry, pid_cell, print_json, print_table, protocol_name, session_label, session_shown,
    table,
};

#[derive(Clone, Debug, clap::Args)]
pub(crate) struct Args {
    /// Only the ports of this agent session: its STYXY_INSTANCE (`--instance "$STYXY_INSTANCE"`)
    /// or its name (`--instance feature-x`).
    #[arg(long)]
    instance: Option<String>,
}

pub(super) async fn run(client: &mut Client, args: Args, as_json: bool) -> Result<()> {
    let mut r = call(client.list_ports(pb::ListPortsRequest {}).await)?;
    if let Some(wanted) = &args.instance {
        let ids = instances_called(&r, wanted);
        let mine = |id: &String| ids.contains(id);
        r.holders.retain(|h| mine(&h.instance_id));
        r.leases.retain(|l| mine(&l.instance_id));
        r.views.retain(|v| mine(&v.instance_id));
        r.sticky.clear();
        r.focuses.retain(|f| mine(&f.instance_id));
    }
    if as_json {
        return print_json(&r);
    }
    print_holders(&r.holders);
    if !r.leases.is_empty() {
        outln!();
        print_leases(&r.leases);
    }
    if !r.views.is_empty() {
        outln!();
        print_views(&r.views);
    }
    for focus in &r.focuses {
        let name = session_label(&focus.session_name, &focus.instance_id);
        outln!(
            "focus: uid {}'s processes outside the sessions follow {name}'s view",
            focus.uid
        );
    }
    if !r.sticky.is_empty() {
        outln!();
        print_sticky(&r.sticky);
    }
    Ok(())
}

/// The instance ids `wanted` stands for: itself, and the sessions named so.
fn instances_called(r: &pb::ListPortsResponse, wanted: &str) -> Vec<String> {
    let named = r
        .holders
        .iter()
        .filter(|h| h.session_name == wanted)
        .map(|h| &h.instance_id)
        .chain(
            r.focuses
                .iter()
                .filter(|f| f.session_name == wanted)
                .map(|f| &f.instance_id),
        );
    let mut ids: Vec<String> = Vec::new();
    for id in std::iter::once(wanted).chain(named.map(String::as_str)) {
        if !id.is_empty() && !ids.iter().any(|known| known == id) {
            ids.push(id.to_string());
        }
    }
    ids
}

/// A holder's session as a person knows it: its name (its id when it has none), or the ended
/// session of an orphan.
fn session_cell(h: &pb::Holder) -> String {
    match (session_shown(&h.session_name, &h.instance_id), h.orphan) {
        ("", _) => "-".to_string(),
        // Its session ended while it runs on: `styxy prune` stops it.
        (ended, true) => format!("{ended} (ended: orphan)"),
        (session, false) => session.to_string(),
    }
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
        outln!("no bound ports seen");
        return;
    }
    let mut t = table(&[
        "PORT", "PROTO", "PID", "COMM", "TYPE", "SESSION", "ADDRESS", "URL",
    ]);
    for h in holders {
        t.add_row([
            h.port.to_string(),
            protocol_name(h.protocol).to_string(),
            pid_cell(h.pid),
            if h.comm.is_empty() { "?" } else { &h.comm }.to_string(),
            h.service_type.clone(),
            session_cell(h),
            h.addresses.join(","),
            // The most general of its names (all of them in --json).
            h.urls.first().map_or("-", String::as_str).to_string(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(instance_id: &str, session_name: &str) -> pb::Holder {
        pb::Holder {
            instance_id: instance_id.into(),
            session_name: session_name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_session_is_shown_by_its_name_and_an_ended_one_by_its_id() {
        assert_eq!(
            session_cell(&holder("claude-7f3e", "feature-x")),
            "feature-x"
        );
        assert_eq!(session_cell(&holder("claude-7f3e", "")), "claude-7f3e");
        assert_eq!(session_cell(&holder("", "")), "-");
        let orphan = pb::Holder {
            orphan: true,
            ..holder("claude-7f3e", "")
        };
        assert_eq!(session_cell(&orphan), "claude-7f3e (ended: orphan)");
    }

    #[test]
    fn a_session_is_picked_by_its_id_or_its_name() {
        let r = pb::ListPortsResponse {
            holders: vec![
                holder("claude-7f3e", "feature-x"),
                holder("claude-0a1b", "feature-y"),
                holder("claude-7f3e", "feature-x"),
                holder("", ""),
            ],
            ..Default::default()
        };
        assert_eq!(
            instances_called(&r, "feature-x"),
            ["feature-x", "claude-7f3e"]
        );
        assert_eq!(instances_called(&r, "claude-0a1b"), ["claude-0a1b"]);
        assert_eq!(instances_called(&r, ""), Vec::<String>::new());
    }
}
