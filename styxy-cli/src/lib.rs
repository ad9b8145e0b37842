//! The `styxy` command: the client of the daemon (one module per command under `commands`),
//! `styxy run` and `styxy env` (`preload`), `styxy install` (`install`), the Claude Code hooks
//! (`hook`), the MCP server (`mcp`), shell completions and man pages (`docs`), `styxy doctor`
//! (`doctor`) — and `styxy daemon`, which hands over to the `styxy-daemon` crate. [`main`] is the
//! whole binary; [`client`] is how every part (and the tests) reach the daemon.

// First: its printing macros (`outln!`, `out!`) serve the modules below.
#[macro_use]
mod output;

pub mod client;
mod commands;
mod docs;
mod doctor;
mod hook;
mod install;
mod logging;
mod mcp;
mod mcp_stdio;
mod preload;
mod trust_stores;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use client::Target;
use styxy_common::paths;

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
    /// Print JSON instead of tables: the answer's canonical proto3 JSON, as grpcurl prints it.
    #[arg(long, global = true)]
    json: bool,
    /// How long a client command waits for the daemon before it gives up with an error.
    #[arg(long, global = true, value_name = "SECONDS", default_value_t = 10.0,
          value_parser = parse_timeout)]
    timeout: f64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker daemon.
    Daemon(commands::daemon::Args),
    /// Run a command with the bind() shim preloaded: its servers move off ports others hold.
    Run {
        /// Group the command's ports with an agent session (sets STYXY_INSTANCE).
        #[arg(long)]
        instance: Option<String>,
        /// The session's name for its servers' names (`NAME.localhost`, `storybook.NAME.localhost`);
        /// by default its project's directory name.
        #[arg(long)]
        name: Option<String>,
        /// The command and its arguments, after `--`.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            required = true,
            value_name = "CMD"
        )]
        command: Vec<std::ffi::OsString>,
    },
    /// Install the binary (its eBPF programs inside it, or their object beside it), the shim and the
    /// systemd units.
    Install(InstallArgs),
    /// Remove what `styxy install` put in place (same --prefix and --root).
    Uninstall(InstallArgs),
    /// The Claude Code hooks (SessionStart, PreToolUse, PostToolUse, SessionEnd) and their installer.
    #[command(subcommand)]
    Hook(HookCommand),
    /// Serve MCP on stdio (for Claude Code and other agents): session ports, who holds a port,
    /// suggest, allocate, release, status.
    Mcp,
    /// Print the shell lines that turn the shim on: eval "$(styxy env)".
    Env {
        /// Also set STYXY_INSTANCE.
        #[arg(long)]
        instance: Option<String>,
    },
    /// Check what Styxy needs here — the daemon and its observer, the eBPF programs and kernel
    /// sessions, the shim, the Claude Code hooks and MCP server, kill protection, the state dir,
    /// other port tools — and say how to fix what is off. Exit status 0 only when all is well.
    Doctor,
    /// Print the completion script for a shell: bash, zsh, fish, elvish or powershell (e.g.
    /// `styxy completions bash > /usr/share/bash-completion/completions/styxy`).
    Completions { shell: clap_complete::Shell },
    /// Write a man page for `styxy` and each of its commands (styxy.1, styxy-ports.1, …) into DIR.
    Manpages {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    #[command(flatten)]
    Client(commands::Command),
}

#[derive(clap::Args)]
struct InstallArgs {
    /// Installation prefix: <prefix>/bin/styxy, <prefix>/lib/styxy/.
    #[arg(long, default_value = install::DEFAULT_PREFIX)]
    prefix: PathBuf,
    /// Stage everything under this directory instead of / (for packaging and tests).
    #[arg(long)]
    root: Option<PathBuf>,
}

#[derive(Subcommand)]
enum HookCommand {
    /// Run as the SessionStart hook: reads the hook JSON on stdin, writes to $CLAUDE_ENV_FILE.
    SessionStart,
    /// Run as the SessionEnd hook: ends the session's leases and claims (kills nothing); silent, exit 0.
    SessionEnd,
    /// Run as the PostToolUse hook (matcher Bash): tells the agent of moved binds and of its
    /// session's servers that started or stopped; silent when nothing changed, exit 0 always.
    PostToolUse,
    /// Run as the PreToolUse hook (matcher Bash): denies a command whose kill, pkill, killall,
    /// fuser -k or kill-port would reach another session's processes, naming them and the
    /// `styxy stop` to use; silent otherwise, and whenever anything goes wrong (it fails open).
    PreToolUse,
    /// Add the hooks (SessionStart, PreToolUse and PostToolUse for Bash, SessionEnd) and the `styxy` MCP server to Claude Code's configuration (default:
    /// ~/.claude/settings.json and ~/.claude.json).
    Install(HookPlaces),
    /// Remove exactly what `hook install` added (same options); the files are given back as they were.
    Uninstall(HookPlaces),
}

#[derive(clap::Args)]
struct HookPlaces {
    /// The settings file for the hooks (default: ~/.claude/settings.json, or the project's).
    #[arg(long)]
    settings: Option<PathBuf>,
    /// Install for one project: DIR/.claude/settings.json and DIR/.mcp.json.
    #[arg(long, value_name = "DIR")]
    project: Option<PathBuf>,
}

impl HookPlaces {
    fn places(self) -> Result<hook::settings::Places> {
        match self.project {
            Some(dir) => Ok(hook::settings::Places::project(&dir, self.settings)),
            None => hook::settings::Places::user(self.settings),
        }
    }
}

/// `--timeout`: a number of seconds from 0.1 to one day.
fn parse_timeout(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(secs) if (0.1..=86_400.0).contains(&secs) => Ok(secs),
        _ => Err(format!(
            "{text:?} is not a number of seconds from 0.1 to 86400"
        )),
    }
}

/// The `styxy` command line as clap describes it (completions and man pages are made from it).
fn command_line() -> clap::Command {
    <Args as clap::CommandFactory>::command()
}

/// The `styxy` binary: parses the command line, runs the command, and turns an error into one
/// message on stderr and exit status 1.
pub fn main() -> ExitCode {
    let args = Args::parse();
    // The daemon serves on worker threads; every other command is one conversation with it and
    // starts none (`styxy run` then execs: a machine out of pids or threads still gets its command
    // run, and tokio, which panics when it cannot start a worker, is never asked to).
    let mut builder = match args.command {
        Command::Daemon(_) => tokio::runtime::Builder::new_multi_thread(),
        _ => tokio::runtime::Builder::new_current_thread(),
    };
    // Silently: the message below says it, without a panic's backtrace.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        builder.enable_all().build()
    }));
    std::panic::set_hook(hook);
    let runtime = match built {
        Ok(Ok(rt)) => rt,
        Ok(Err(e)) => {
            eprintln!("styxy: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
        Err(_) => {
            eprintln!(
                "styxy: starting the async runtime: cannot start a thread (out of processes or \
                 memory? see `ulimit -u` and /proc/sys/kernel/pid_max)"
            );
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
        Command::Daemon(d) => commands::daemon::run(d, args.socket).await,
        Command::Run {
            instance,
            name,
            command,
        } => {
            preload::run(
                &command,
                instance.as_deref(),
                name.as_deref(),
                args.socket.as_deref(),
            )
            .await
        }
        Command::Install(a) => {
            let layout = install::Layout::new(a.root, Some(a.prefix))?;
            for line in install::install(&layout)? {
                outln!("{line}");
            }
            Ok(())
        }
        Command::Uninstall(a) => {
            let layout = install::Layout::new(a.root, Some(a.prefix))?;
            for line in install::uninstall(&layout)? {
                outln!("{line}");
            }
            Ok(())
        }
        Command::Hook(HookCommand::SessionEnd) => {
            let target = Target::Unix(args.socket.unwrap_or_else(daemon_socket));
            hook::session_end(&target).await;
            Ok(())
        }
        Command::Hook(HookCommand::SessionStart) => {
            let target = Target::Unix(args.socket.unwrap_or_else(daemon_socket));
            outln!("{}", hook::session_start(&target).await);
            Ok(())
        }
        Command::Hook(HookCommand::PostToolUse) => {
            let target = Target::Unix(args.socket.unwrap_or_else(daemon_socket));
            hook::post_tool_use::run(&target).await;
            Ok(())
        }
        Command::Hook(HookCommand::PreToolUse) => {
            let target = Target::Unix(args.socket.unwrap_or_else(daemon_socket));
            hook::kill_guard::run(&target).await;
            Ok(())
        }
        Command::Hook(HookCommand::Install(places)) => {
            for line in hook::settings::install(&places.places()?)? {
                outln!("{line}");
            }
            Ok(())
        }
        Command::Hook(HookCommand::Uninstall(places)) => {
            for line in hook::settings::uninstall(&places.places()?)? {
                outln!("{line}");
            }
            Ok(())
        }
        Command::Mcp => {
            let target = Target::Unix(args.socket.unwrap_or_else(daemon_socket));
            mcp::serve(target).await
        }
        Command::Env { instance } => {
            let library = preload::find_library()?;
            out!(
                "{}",
                preload::env_lines(&library, instance.as_deref(), args.socket.as_deref())
            );
            Ok(())
        }
        Command::Completions { shell } => docs::completions(shell, &mut std::io::stdout().lock()),
        Command::Doctor => {
            let target = match args.tcp {
                Some(addr) => Target::Tcp(addr),
                None => Target::Unix(args.socket.unwrap_or_else(daemon_socket)),
            };
            doctor::run(
                &target,
                args.json,
                std::time::Duration::from_secs_f64(args.timeout),
            )
            .await
        }
        Command::Manpages { dir } => {
            for written in docs::manpages(&dir)? {
                outln!("{}", written.display());
            }
            Ok(())
        }
        Command::Client(command) => {
            let target = match args.tcp {
                Some(addr) => Target::Tcp(addr),
                None => Target::Unix(args.socket.unwrap_or_else(daemon_socket)),
            };
            commands::run(
                command,
                &target,
                args.json,
                std::time::Duration::from_secs_f64(args.timeout),
            )
            .await
        }
    }
}

/// The daemon's socket when none was given (see `paths::find_socket`), saying on stderr when the
/// user's own path was passed over because another user could have planted it.
pub(crate) fn daemon_socket() -> std::path::PathBuf {
    let (socket, warning) = paths::find_socket_checked();
    if let Some(warning) = warning {
        eprintln!("styxy: warning: {warning}");
    }
    socket
}
