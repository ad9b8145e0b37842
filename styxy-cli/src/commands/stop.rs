//! `styxy stop`: stops servers of your own session — by the port your session uses (`styxy stop
//! 8000` stops the server your `curl :8000` reaches, wherever it landed), by name (`storybook`),
//! by pid (`--pid`), or all of them (`--session`). SIGTERM, then SIGKILL after `--grace`. A
//! server of another session, or of none, is refused with whose it is: agents clean up with
//! this instead of `pkill` or `kill $(lsof -t -i:P)`, which reach other sessions' servers.

use std::time::Duration;

use anyhow::{bail, Result};
use styxy_proto::v1 as pb;
use styxy_proto::v1::stop_server_request::Target;

use super::Client;
use crate::output::{call, print_json, print_table, table};

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
    #[arg(long, default_value_t = 5.0, value_parser = grace_seconds)]
    grace: f64,
    /// From outside every session: the session of yours to act in (its name or id).
    #[arg(long = "in", value_name = "SESSION")]
    in_session: Option<String>,
    /// Show what would be stopped; stop nothing.
    #[arg(long)]
    dry_run: bool,
}

fn grace_seconds(text: &str) -> Result<f64, String> {
    let seconds: f64 = text
        .trim_end_matches('s')
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !(0.0..=600.0).contains(&seconds) {
        return Err("the grace period is 0 to 600 seconds".to_string());
    }
    Ok(seconds)
}

impl Args {
    /// How long the call may take beyond the daemon's answer: the grace period and the kill.
    pub(super) fn longest_wait(&self) -> Duration {
        Duration::from_secs_f64(self.grace) + Duration::from_secs(10)
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
    // 0 means "the default" to the daemon: a zero grace is 1 ms.
    let grace_ms = ((args.grace * 1000.0).round() as u32).max(1);
    let r = call(
        client
            .stop_server(pb::StopServerRequest {
                target: Some(target),
                grace_ms,
                session: args.in_session.clone().unwrap_or_default(),
                dry_run: args.dry_run,
            })
            .await,
    )?;
    if as_json {
        return print_json(&r);
    }
    let session = if r.session_name.is_empty() || r.session_name == r.instance_id {
        r.instance_id.clone()
    } else {
        format!("{} ({})", r.session_name, r.instance_id)
    };
    println!(
        "{} in session {session}:",
        if args.dry_run {
            "would stop"
        } else {
            "stopped"
        }
    );
    let mut t = table(&["PID", "COMMAND", "PORTS", "ENDED BY"]);
    for s in &r.stopped {
        let ports: Vec<String> = s.ports.iter().map(u32::to_string).collect();
        let mut ports = ports.join(",");
        if s.asked_port != 0 {
            ports = format!("{ports} (asked {})", s.asked_port);
        }
        t.add_row(vec![
            s.pid.to_string(),
            if s.cmdline.is_empty() {
                s.comm.clone()
            } else {
                s.cmdline.clone()
            },
            ports,
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
