//! `styxy stop`: stops servers of your own session — by the port your session uses (`styxy stop
//! 8000` stops the server your `curl :8000` reaches, wherever it landed), by name (`storybook`),
//! by pid (`--pid`), or all of them (`--session`). SIGTERM, then SIGKILL after `--grace`. A
//! server of another session, or of none, is refused with whose it is: agents clean up with
//! this instead of `pkill` or `kill $(lsof -t -i:P)`, which reach other sessions' servers.

use std::time::Duration;

use anyhow::{bail, Result};
use styxy_proto::v1 as pb;
use styxy_proto::v1::stop_server_request::Target;

use super::{stopping, Client};
use crate::output::{call, print_json, session_label};

#[derive(Clone, Debug, clap::Args)]
pub(crate) struct Args {
    /// What to stop: a port as your session uses it (8000), or a server's name in it (storybook).
    #[arg(required_unless_present_any = ["pid", "all"], conflicts_with_all = ["pid", "all"])]
    target: Option<String>,
    /// Stop this process of your session.
    #[arg(long, conflicts_with = "all")]
    pid: Option<u32>,
    /// Stop every server of your session.
    #[arg(long = "session")]
    all: bool,
    /// Seconds to wait after SIGTERM before SIGKILL.
    #[arg(long, default_value_t = 5.0, value_parser = stopping::grace_seconds)]
    grace: f64,
    /// From outside every session: the session of yours to act in (its name or id).
    #[arg(long = "in", value_name = "SESSION")]
    in_session: Option<String>,
    /// Show what would be stopped; stop nothing.
    #[arg(long)]
    dry_run: bool,
}

impl Args {
    /// How long the call may take beyond the daemon's answer: the grace period and the kill.
    pub(super) fn longest_wait(&self) -> Duration {
        stopping::longest_wait(self.grace)
    }
}

pub(super) async fn run(client: &mut Client, args: Args, as_json: bool) -> Result<()> {
    let target = match (&args.target, args.pid, args.all) {
        (_, Some(pid), _) => Target::Pid(pid),
        (_, _, true) => Target::All(true),
        (Some(text), _, _) => match text.parse::<u32>() {
            Ok(port) => Target::Port(port),
            Err(_) if text.trim().is_empty() => bail!("name a port or a server to stop"),
            Err(_) => Target::Name(text.clone()),
        },
        (None, None, false) => bail!("name a port or a server to stop, or give --pid or --session"),
    };
    let r = call(
        client
            .stop_server(pb::StopServerRequest {
                target: Some(target),
                grace_ms: stopping::grace_ms(args.grace),
                session: args.in_session.clone().unwrap_or_default(),
                dry_run: args.dry_run,
            })
            .await,
    )?;
    if as_json {
        return print_json(&r);
    }
    let session = session_label(&r.session_name, &r.instance_id);
    outln!(
        "{} in session {session}:",
        if args.dry_run {
            "would stop"
        } else {
            "stopped"
        }
    );
    stopping::print_stopped(&r.stopped, None);
    Ok(())
}
