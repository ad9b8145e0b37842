//! `styxy`: the daemon (`styxy daemon`) and its command-line client.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use styxy::client::Target;
use styxy::daemon::{DaemonOptions, ObserverChoice};
use styxy::{cli, paths};

#[derive(Parser)]
#[command(
    name = "styxy",
    version,
    about = "A port broker for machines where many dev servers and agents run"
)]
struct Args {
    /// The daemon's Unix socket [default: /run/styxy/styxy.sock as root, else $XDG_RUNTIME_DIR/styxy/styxy.sock; clients fall back to /run/styxy/styxy.sock when only the system daemon runs]
    #[arg(long, global = true, env = "STYXY_SOCKET")]
    socket: Option<PathBuf>,
    /// Talk to the daemon over TCP (read-only calls) instead of the Unix socket, e.g. 127.0.0.1:9876
    #[arg(long, global = true, env = "STYXY_TCP")]
    tcp: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker daemon.
    Daemon(DaemonArgs),
    /// Run a command with the bind() shim preloaded: its servers move off ports others hold.
    Run {
        /// Group the command's ports with an agent session (sets STYXY_INSTANCE).
        #[arg(long)]
        instance: Option<String>,
        /// The command and its arguments, after `--`.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            required = true,
            value_name = "CMD"
        )]
        command: Vec<std::ffi::OsString>,
    },
    /// Install the binary, the shim, the eBPF object and the systemd unit.
    Install(InstallArgs),
    /// Remove what `styxy install` put in place (same --prefix and --root).
    Uninstall(InstallArgs),
    /// The Claude Code SessionStart hook.
    #[command(subcommand)]
    Hook(HookCommand),
    /// Print the shell lines that turn the shim on: eval "$(styxy env)".
    Env {
        /// Also set STYXY_INSTANCE.
        #[arg(long)]
        instance: Option<String>,
    },
    #[command(flatten)]
    Client(cli::Command),
}

#[derive(clap::Args)]
struct InstallArgs {
    /// Installation prefix: <prefix>/bin/styxy, <prefix>/lib/styxy/.
    #[arg(long, default_value = styxy::install::DEFAULT_PREFIX)]
    prefix: PathBuf,
    /// Stage everything under this directory instead of / (for packaging and tests).
    #[arg(long)]
    root: Option<PathBuf>,
}

#[derive(Subcommand)]
enum HookCommand {
    /// Run as the SessionStart hook: reads the hook JSON on stdin, writes to $CLAUDE_ENV_FILE.
    SessionStart,
    /// Add the hook to a Claude Code settings.json (default: ~/.claude/settings.json).
    Install {
        #[arg(long)]
        settings: Option<PathBuf>,
    },
    /// Remove the hook (only it) from a Claude Code settings.json.
    Uninstall {
        #[arg(long)]
        settings: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct DaemonArgs {
    /// Loopback TCP address to serve on, or `none`.
    #[arg(long, default_value = paths::DEFAULT_TCP)]
    listen: String,
    /// Where leases, instances and the audit log are kept [default: /var/lib/styxy as root, else $XDG_STATE_HOME/styxy]
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Service ranges in TOML [default: /etc/styxy/config.toml as root, else $XDG_CONFIG_HOME/styxy/config.toml, if present]
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where bind events come from.
    #[arg(long, value_enum, default_value = "auto")]
    observer: ObserverChoice,
    /// How often the sockets-table observer reads the kernel's socket tables.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    scan_interval_ms: u64,
    /// Let TCP callers (who cannot be identified) make calls that change state, as the daemon's user.
    #[arg(long)]
    tcp_allow_writes: bool,
    /// cgroup v2 directory the eBPF observer attaches to [default: the cgroup v2 root, i.e. the whole machine]
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// The eBPF object [default: $STYXY_EBPF_OBJECT, next to this binary, or <prefix>/lib/styxy/styxy-ebpf.o]
    #[arg(long)]
    ebpf_object: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("styxy: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("styxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    match args.command {
        Command::Daemon(d) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_env("STYXY_LOG")
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .with_writer(std::io::stderr)
                .init();
            let listen = match d.listen.as_str() {
                "none" => None,
                addr => Some(addr.parse::<SocketAddr>().with_context(|| {
                    format!("--listen {addr:?} is not an address like 127.0.0.1:9876 (or `none`)")
                })?),
            };
            if let Some(addr) = listen.filter(|a| !a.ip().is_loopback()) {
                tracing::warn!("--listen {addr} is not a loopback address: the API is reachable from the network");
            }
            let default_config = paths::default_config();
            let config = d
                .config
                .or_else(|| default_config.exists().then_some(default_config));
            styxy::daemon::run(DaemonOptions {
                socket: args.socket.unwrap_or_else(paths::default_socket),
                listen,
                state_dir: d.state_dir.unwrap_or_else(paths::default_state_dir),
                config,
                observer: d.observer,
                scan_interval: Duration::from_millis(d.scan_interval_ms),
                tcp_allow_writes: d.tcp_allow_writes,
                cgroup: d.cgroup,
                ebpf_object: d.ebpf_object,
            })
            .await
        }
        Command::Run { instance, command } => {
            styxy::preload::run(&command, instance.as_deref(), args.socket.as_deref())
        }
        Command::Install(a) => {
            let layout = styxy::install::Layout::new(a.root, Some(a.prefix))?;
            for line in styxy::install::install(&layout)? {
                println!("{line}");
            }
            Ok(())
        }
        Command::Uninstall(a) => {
            let layout = styxy::install::Layout::new(a.root, Some(a.prefix))?;
            for line in styxy::install::uninstall(&layout)? {
                println!("{line}");
            }
            Ok(())
        }
        Command::Hook(HookCommand::SessionStart) => {
            let target = Target::Unix(args.socket.unwrap_or_else(paths::find_socket));
            println!("{}", styxy::hook::session_start(&target).await);
            Ok(())
        }
        Command::Hook(HookCommand::Install { settings }) => {
            let settings = settings.map_or_else(styxy::hook::default_settings, Ok)?;
            println!("{}", styxy::hook::install(&settings)?);
            Ok(())
        }
        Command::Hook(HookCommand::Uninstall { settings }) => {
            let settings = settings.map_or_else(styxy::hook::default_settings, Ok)?;
            println!("{}", styxy::hook::uninstall(&settings)?);
            Ok(())
        }
        Command::Env { instance } => {
            let library = styxy::preload::find_library()?;
            print!(
                "{}",
                styxy::preload::env_lines(&library, instance.as_deref(), args.socket.as_deref())
            );
            Ok(())
        }
        Command::Client(command) => {
            let target = match args.tcp {
                Some(addr) => Target::Tcp(addr),
                None => Target::Unix(args.socket.unwrap_or_else(paths::find_socket)),
            };
            cli::run(command, &target, args.json).await
        }
    }
}
