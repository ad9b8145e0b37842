//! The `styxy` client commands, one module each: each asks the daemon one question and prints the
//! answer as a table for people or, with `--json`, as the answer's proto3 JSON (see `output`).

mod allocate;
mod audit;
pub(crate) mod daemon;
mod focus;
mod forget;
mod observe;
mod open;
mod ports;
mod prune;
mod release;
mod session;
mod status;
mod stop;
mod stopping;
mod suggest;
mod trust;
mod watch;

use std::time::Duration;

use anyhow::{anyhow, Result};

use crate::client::{connect, Target};

/// A client command, parsed.
#[derive(Clone, Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Daemon version, observer in use and why, counters.
    Status,
    /// Every bound port and lease.
    Ports(ports::Args),
    /// Who holds a port.
    Observe(observe::Args),
    /// Free ports for a service type (dev, api, storybook, …), lowest first.
    Suggest(suggest::Args),
    /// Lease a free port for a service type.
    Allocate(allocate::Args),
    /// End a lease, by port or lease id.
    Release(release::Args),
    /// Stream bind, release, reassign and lease events.
    Watch,
    /// Reassigned binds, newest last.
    Audit(audit::Args),
    /// One agent session's servers: bound port, and the asked one when moved.
    Session(session::Args),
    /// Forget sticky ports (the port a project's server gets back), by project or port.
    Forget(forget::Args),
    /// Lend a session's view to you: your localhost:PORT (browser, OAuth callbacks) reaches that session's servers at the ports they asked for. --clear gives it up; with no session, shows it.
    Focus(focus::Args),
    /// Stop servers of your own session: by the port your session uses (8000), by name (storybook), --pid, or --session for all. SIGTERM, then SIGKILL after --grace. Another session's server is refused: use this instead of pkill or kill $(lsof -t -i:PORT).
    Stop(stop::Args),
    /// Stop the orphans: servers whose session ended while they run on (yours; root: everyone's). --dry-run lists them; `styxy ports` marks them.
    Prune(prune::Args),
    /// Open the dashboard (http://styxy.localhost/), or a server by its name, in the browser.
    Open(open::Args),
    /// Make this machine's browsers and tools trust https://NAME.localhost: the daemon's local CA (valid for *.localhost only) added to the system store (as root) and to Chromium's and Firefox's NSS databases.
    Trust(trust::Args),
    /// Remove exactly that CA from every store `styxy trust` added it to.
    Untrust(trust::Args),
}

/// Runs a client command against the daemon at `target`. Every call has `deadline`: a stopped
/// daemon, or one whose disk is full, costs that and an error, never a hang (`styxy watch` waits
/// that long to be subscribed, then streams for as long as it runs).
pub(crate) async fn run(
    command: Command,
    target: &Target,
    as_json: bool,
    deadline: Duration,
) -> Result<()> {
    let late = || {
        anyhow!(
            "the Styxy daemon at {target} did not answer within {} s (stopped, overloaded, or unable to \
             write its state: see its log); try again, or give it longer with --timeout SECONDS",
            deadline.as_secs_f64()
        )
    };
    let mut client = tokio::time::timeout(deadline, connect(target))
        .await
        .map_err(|_| late())??;
    // `styxy watch` streams for as long as it runs: its first call has the deadline instead.
    // `styxy trust` changes stores after the daemon answers: only its call has the deadline.
    let streams = matches!(
        command,
        Command::Watch | Command::Trust(_) | Command::Untrust(_)
    );
    // `styxy stop` waits for the servers to end: its grace period on top of the deadline.
    let budget = match &command {
        Command::Stop(args) => deadline + args.longest_wait(),
        Command::Prune(args) => deadline + args.longest_wait(),
        _ => deadline,
    };
    let call = async {
        match command {
            Command::Status => status::run(&mut client, as_json).await,
            Command::Ports(args) => ports::run(&mut client, args, as_json).await,
            Command::Observe(args) => observe::run(&mut client, args, as_json).await,
            Command::Suggest(args) => suggest::run(&mut client, args, as_json).await,
            Command::Allocate(args) => allocate::run(&mut client, args, as_json).await,
            Command::Release(args) => release::run(&mut client, args, as_json).await,
            Command::Watch => watch::run(&mut client, target, as_json, deadline).await,
            Command::Audit(args) => audit::run(&mut client, args, as_json).await,
            Command::Session(args) => session::run(&mut client, args, as_json).await,
            Command::Forget(args) => forget::run(&mut client, args, as_json).await,
            Command::Focus(args) => focus::run(&mut client, args, as_json).await,
            Command::Stop(args) => stop::run(&mut client, args, as_json).await,
            Command::Prune(args) => prune::run(&mut client, args, as_json).await,
            Command::Open(args) => open::run(&mut client, args).await,
            Command::Trust(args) => trust::run(&mut client, args, true, as_json, deadline).await,
            Command::Untrust(args) => trust::run(&mut client, args, false, as_json, deadline).await,
        }
    };
    if streams {
        return call.await;
    }
    tokio::time::timeout(budget, call)
        .await
        .map_err(|_| late())?
}

/// The client every command is handed.
pub(crate) type Client =
    styxy_proto::v1::port_broker_client::PortBrokerClient<tonic::transport::Channel>;
