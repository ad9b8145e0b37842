//! `styxy prune`: stops the orphans — servers whose session has ended (its agent gone, or
//! SessionEnd) while they run on, keeping their ports and sticky claims, and that nobody knows
//! whose they are any more. Your own (root: everyone's); `--dry-run` lists them. `styxy ports`
//! marks them `(ended: orphan)`.

use anyhow::Result;
use styxy_proto::v1 as pb;

use super::{stopping, Client};
use crate::output::{call, print_json};

#[derive(Clone, Debug, clap::Args)]
pub(crate) struct Args {
    /// List the orphans; stop nothing.
    #[arg(long)]
    dry_run: bool,
    /// Seconds to wait after SIGTERM before SIGKILL.
    #[arg(long, default_value_t = 5.0, value_parser = stopping::grace_seconds)]
    grace: f64,
}

impl Args {
    /// How long the call may take beyond the daemon's answer.
    pub(super) fn longest_wait(&self) -> std::time::Duration {
        stopping::longest_wait(self.grace)
    }
}

pub(super) async fn run(client: &mut Client, args: Args, as_json: bool) -> Result<()> {
    let r = call(
        client
            .prune(pb::PruneRequest {
                dry_run: args.dry_run,
                grace_ms: stopping::grace_ms(args.grace),
            })
            .await,
    )?;
    if as_json {
        return print_json(&r);
    }
    if r.stopped.is_empty() {
        outln!("no orphans: every server with a session belongs to a live one");
        return Ok(());
    }
    outln!(
        "{} {} orphan(s):",
        if args.dry_run {
            "would stop"
        } else {
            "stopped"
        },
        r.stopped.len()
    );
    stopping::print_stopped(&r.stopped, Some(("ENDED SESSION", &r.instance_ids)));
    Ok(())
}
