//! `cargo xtask`: the project's build, run, test and benchmark entry points.
//!
//! - `setup`: install what a fresh machine lacks (scripts/setup.sh);
//! - `run`: build in release mode and run the daemon in the foreground;
//! - `test`: build every binary the end-to-end tests start, then run the whole test suite;
//! - `bench`: build in release mode and run the side-by-side benchmarks.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Args {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh machine lacks (idempotent).
    Setup,
    /// Build (release) and run the daemon in the foreground; extra arguments go to `styxy daemon`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build everything the tests start, then run the whole test suite.
    Test {
        /// Extra arguments for `cargo test`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks, measured side by side in one run (release build).
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match Args::parse().command {
        Task::Setup => setup(&root),
        Task::Run { args } => {
            cargo(&[
                "build",
                "--release",
                "-p",
                "styxy-daemon",
                "-p",
                "styxy-preload",
                "-p",
                "styxy-shim-client",
            ])?;
            let styxy = root.join("target/release/styxy");
            run(Command::new(&styxy).arg("daemon").args(&args))
        }
        Task::Test { args } => {
            setup(&root)?;
            cargo(&["build", "--workspace"])?;
            let mut test_args = vec!["test", "--workspace"];
            test_args.extend(args.iter().map(String::as_str));
            cargo(&test_args)
        }
        Task::Bench { args } => {
            setup(&root)?;
            cargo(&["build", "--release", "--workspace"])?;
            run(Command::new(root.join("target/release/styxy-bench")).args(&args))
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn setup(root: &Path) -> Result<()> {
    run(Command::new("bash").arg(root.join("scripts/setup.sh")))
}

fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo).args(args))
}

fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("running {:?}", command.get_program()))?;
    if !status.success() {
        bail!("{:?} failed: {status}", command.get_program());
    }
    Ok(())
}
