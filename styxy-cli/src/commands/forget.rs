//! `styxy forget`: forgets sticky ports — the port a project's server got last, which it would
//! get back — by project, by port, or all of them (your own; root: anyone's).

use anyhow::{bail, Context, Result};
use styxy_proto::v1 as pb;

use super::Client;
use crate::output::{call, print_json};

#[derive(Clone, Debug, clap::Args)]
pub(crate) struct Args {
    /// Only this project's (a directory; its git worktree root is what was remembered).
    #[arg(long, value_name = "DIR")]
    project: Option<std::path::PathBuf>,
    /// Only this project's: the git worktree root of the current directory.
    #[arg(long, conflicts_with = "project")]
    here: bool,
    /// Only those given or asked for this port.
    #[arg(long)]
    port: Option<u32>,
    /// All your sticky ports.
    #[arg(long, conflicts_with_all = ["project", "here", "port"])]
    all: bool,
}

/// The project a directory belongs to, as the daemon remembers it.
fn project_of(dir: &std::path::Path) -> Result<String> {
    let dir = std::fs::canonicalize(dir)
        .with_context(|| format!("{} is not a directory", dir.display()))?;
    styxy_common::paths::project_of_dir(&dir).with_context(|| {
        format!(
            "{} is no project (`/`, or a path that is not UTF-8): give --project DIR",
            dir.display()
        )
    })
}

pub(super) async fn run(client: &mut Client, args: Args, as_json: bool) -> Result<()> {
    let project = match (&args.project, args.here) {
        (Some(dir), _) => Some(project_of(dir)?),
        (None, true) => Some(project_of(&std::env::current_dir()?)?),
        (None, false) => None,
    };
    if project.is_none() && args.port.is_none() && !args.all {
        bail!("say what to forget: --here, --project DIR, --port PORT, or --all");
    }
    let r = call(
        client
            .forget(pb::ForgetRequest {
                project,
                port: args.port,
                all: args.all,
            })
            .await,
    )?;
    if as_json {
        return print_json(&r);
    }
    match r.forgotten.len() {
        0 => outln!("no sticky port matched"),
        n => {
            for e in &r.forgotten {
                outln!(
                    "forgot {} → {} ({}) of {}",
                    if e.asked_port == 0 {
                        "any".to_string()
                    } else {
                        e.asked_port.to_string()
                    },
                    e.port,
                    e.service_type,
                    e.project
                );
            }
            outln!("{n} sticky port{} forgotten", if n == 1 { "" } else { "s" });
        }
    }
    Ok(())
}
