//! `styxy prune`: stops the orphans — servers whose session has ended (its agent gone, or
//! SessionEnd) while they run on, keeping their ports and sticky claims, and that nobody knows
//! whose they are any more. Your own (root: everyone's); `--dry-run` lists them. `styxy ports`
//! marks them `(ended: orphan)`.

use anyhow::Result;
use styxy_proto::v1 as pb;

use super::Client;
use crate::output::{call, print_json, print_table, table};

#[derive(Clone, Debug, clap::Args)]
pub(crate) struct Args {
    /// List the orphans; stop nothing.
    #[arg(long)]
    dry_run: bool,
    /// Seconds to wait after SIGTERM before SIGKILL.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=600))]
    grace: u32,
}

impl Args {
    /// How long the call may take beyond the daemon's answer.
    pub(super) fn longest_wait(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(self.grace) + 10)
    }
}

pub(super) async fn run(client: &mut Client, args: Args, as_json: bool) -> Result<()> {
    let r = call(
        client
            .prune(pb::PruneRequest {
                dry_run: args.dry_run,
                // 0 means "the default" to the daemon: a zero grace is 1 ms.
                grace_ms: (args.grace * 1000).max(1),
            })
            .await,
    )?;
    if as_json {
        return print_json(&r);
    }
    if r.stopped.is_empty() {
        println!("no orphans: every server with a session belongs to a live one");
        return Ok(());
    }
    println!(
        "{} {} orphan(s):",
        if args.dry_run {
            "would stop"
        } else {
            "stopped"
        },
        r.stopped.len()
    );
    let mut t = table(&["PID", "COMMAND", "PORTS", "ENDED SESSION", "ENDED BY"]);
    for (s, session) in r.stopped.iter().zip(&r.instance_ids) {
        let ports: Vec<String> = s.ports.iter().map(u32::to_string).collect();
        t.add_row(vec![
            s.pid.to_string(),
            if s.cmdline.is_empty() {
                s.comm.clone()
            } else {
                s.cmdline.clone()
            },
            ports.join(","),
            session.clone(),
            if s.ended_by.is_empty() {
                "-".to_string()
            } else {
                s.ended_by.clone()
            },
        ]);
    }
    print_table(&t);
    Ok(())
}
