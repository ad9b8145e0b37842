//! `styxy focus`: lends a session's view to the person at the keyboard. `styxy focus feature-x`
//! makes your processes outside every session (the browser, an OAuth callback, a bookmark)
//! reach feature-x's servers at the ports they asked for; `--clear` gives it up; with neither,
//! it shows what you focus. Connections still reaching the old destinations are closed by the
//! switch, so a reload shows the new session.

use anyhow::{bail, Result};
use styxy_proto::v1 as pb;

use super::Client;
use crate::output::{call, print_json, session_label};

#[derive(Clone, Debug, clap::Args)]
pub(crate) struct Args {
    /// The session to focus: its name (feature-x, feature-x.localhost) or its id.
    session: Option<String>,
    /// Give the focus up: localhost:PORT reaches whatever is bound to PORT again.
    #[arg(long, conflicts_with = "session")]
    clear: bool,
}

pub(super) async fn run(client: &mut Client, args: Args, as_json: bool) -> Result<()> {
    let session = args.session.unwrap_or_default();
    if !args.clear && session.trim().is_empty() && !session.is_empty() {
        bail!("name the session to focus (`styxy status` lists them), or give --clear");
    }
    let r = call(
        client
            .focus(pb::FocusRequest {
                session: session.clone(),
                clear: args.clear,
            })
            .await,
    )?;
    if as_json {
        return print_json(&r);
    }
    let now = session_label(&r.session_name, &r.instance_id);
    let before = session_label(&r.previous_session_name, &r.previous_instance_id);
    let looked = session.is_empty() && !args.clear;
    match (looked, r.instance_id.is_empty()) {
        (true, true) => outln!("no focus: localhost:PORT reaches whatever is bound to PORT"),
        (true, false) => outln!("focus: {now}"),
        (false, true) if r.previous_instance_id.is_empty() => outln!("no focus to clear"),
        (false, true) => outln!("focus cleared (was {before})"),
        (false, false) if r.previous_instance_id == r.instance_id => {
            outln!("focus: {now} (already)")
        }
        (false, false) if r.previous_instance_id.is_empty() => outln!("focus: {now}"),
        (false, false) => outln!("focus: {now} (was {before})"),
    }
    for port in &r.ports {
        if looked {
            outln!("  localhost:{} → {}", port.asked, port.to);
        } else {
            outln!("  localhost:{}: {} → {}", port.asked, port.from, port.to);
        }
    }
    if !looked && r.closed_connections > 0 {
        outln!(
            "closed {} connection(s) to the old destinations",
            r.closed_connections
        );
    }
    if !r.available {
        outln!("(not followed here: {})", r.unavailable_reason);
    }
    Ok(())
}
