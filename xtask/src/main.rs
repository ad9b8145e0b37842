//! `cargo xtask`: the project's build, run, test and benchmark entry points.
//!
//! - `setup`: install what a fresh machine lacks (scripts/setup.sh);
//! - `build-ebpf`: build the kernel programs (styxy-ebpf) into `target/styxy-ebpf.o`;
//! - `build-preload`: build the bind() shim (styxy-preload, `no_std`, panic = "abort") and put
//!   `libstyxy_preload.so` next to the other binaries in `target/debug` and `target/release`;
//! - `build`: everything, release mode (eBPF included when it can, inside the `styxy` binary):
//!   what `styxy install` installs;
//! - `run`: set up, build in release mode (eBPF included when it can) and run the daemon in the foreground;
//! - `lint`: `cargo fmt --check` and `cargo clippy -D warnings` on all three workspaces (the main
//!   one, the shim's and the eBPF programs', the last with Debian's clippy);
//! - `test`: build every binary the end-to-end tests start, then run the whole test suite;
//! - `bench`: build in release mode and run the side-by-side benchmarks;
//! - `dist`: the Debian package, `target/dist/styxy_<version>_amd64.deb` (see `dist`).

mod dist;

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
    /// Build the eBPF programs into target/styxy-ebpf.o (the daemon finds them there).
    BuildEbpf {
        /// Release profile (both profiles are optimised; release keeps debug info for the verifier's messages).
        #[arg(long)]
        release: bool,
    },
    /// Build the bind() shim, libstyxy_preload.so, into target/debug and target/release.
    BuildPreload,
    /// Build everything in release mode (eBPF included when it can): what `styxy install` installs.
    Build,
    /// Build (release) and run the daemon in the foreground; extra arguments go to `styxy daemon`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Formatting and clippy (-D warnings) on the workspace, the shim and the eBPF programs.
    Lint,
    /// Build everything the tests start, then run the whole test suite.
    Test {
        /// Extra arguments for `cargo test`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The Debian package, target/dist/styxy_<version>_amd64.deb (checked by lintian when present).
    Dist,
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
        Task::BuildEbpf { release } => build_ebpf(&root, release),
        Task::BuildPreload => build_preload(&root, &["debug", "release"]),
        Task::Build => build_release(&root),
        Task::Run { args } => {
            // The daemon runs without what setup brings (it falls back to the socket tables),
            // so a failed setup is a warning here, not the end.
            if let Err(e) = setup(&root) {
                eprintln!("xtask: setup: {e:#}\nxtask: continuing");
            }
            build_release(&root)?;
            let styxy = root.join("target/release/styxy");
            run(Command::new(&styxy).arg("daemon").args(&args))
        }
        Task::Lint => lint(&root),
        Task::Dist => dist::dist(&root).map(drop),
        Task::Test { args } => {
            setup(&root)?;
            match build_ebpf(&root, true) {
                Ok(()) => {}
                // CI must run the eBPF tests, never skip them.
                Err(e) if std::env::var_os("CI").is_some() => return Err(e),
                Err(e) => eprintln!("xtask: {e:#}\nxtask: the eBPF tests will say SKIP"),
            }
            run(with_embedded_ebpf(&root, cargo_command()).args(["build", "--workspace"]))?;
            build_preload(&root, &["debug"])?;
            // The shim's own unit tests (it is not a workspace member).
            run(preload_cargo(&root).arg("test"))?;
            let mut test_args = vec!["test", "--workspace"];
            test_args.extend(args.iter().map(String::as_str));
            run(with_embedded_ebpf(&root, cargo_command()).args(&test_args))
        }
        Task::Bench { args } => {
            setup(&root)?;
            run(with_embedded_ebpf(&root, cargo_command()).args([
                "build",
                "--release",
                "--workspace",
            ]))?;
            build_preload(&root, &["release"])?;
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

/// Debian's compiler, which ships the library source that `-Z build-std=core` needs.
const EBPF_RUSTC: &str = "/usr/bin/rustc";
const EBPF_CARGO: &str = "/usr/bin/cargo";
const EBPF_LIBRARY_SOURCE: &str = "/usr/lib/rustlib/src/rust/library/core";
/// Debian's clippy for that compiler (rust-web-clippy).
const EBPF_CLIPPY: &str = "/usr/bin/cargo-clippy";

/// What the eBPF build needs and this machine lacks, with how to get it.
fn missing_ebpf_tools() -> Vec<String> {
    let mut missing = Vec::new();
    if !Path::new(EBPF_RUSTC).exists() || !Path::new(EBPF_CARGO).exists() {
        missing.push(format!(
            "{EBPF_RUSTC} and {EBPF_CARGO} (apt-get install rustc-web cargo-web)"
        ));
    }
    if !Path::new(EBPF_LIBRARY_SOURCE).exists() {
        missing.push(format!(
            "the Rust library source in {EBPF_LIBRARY_SOURCE} (apt-get install rust-web-src)"
        ));
    }
    let linker_found = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !linker_found {
        missing.push(
            "bpf-linker on PATH (LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version 0.13.0 \
             --no-default-features --features llvm-22, after apt-get install llvm-22-dev)"
                .into(),
        );
    }
    missing
}

fn build_ebpf(root: &Path, release: bool) -> Result<()> {
    let missing = missing_ebpf_tools();
    if !missing.is_empty() {
        bail!(
            "cannot build the eBPF programs; missing:\n  - {}\nInstall them all with `cargo xtask setup` (as root)",
            missing.join("\n  - ")
        );
    }
    let target_dir = root.join("target/ebpf");
    let mut build = ebpf_cargo(root, "target/ebpf");
    build.arg("build");
    if release {
        build.arg("--release");
    }
    run(&mut build)?;
    let profile = if release { "release" } else { "debug" };
    let built = target_dir
        .join("bpfel-unknown-none")
        .join(profile)
        .join("styxy-ebpf");
    let object = root.join("target/styxy-ebpf.o");
    std::fs::copy(&built, &object)
        .with_context(|| format!("copying {} to {}", built.display(), object.display()))?;
    println!("xtask: eBPF object at {}", object.display());
    Ok(())
}

/// Debian's cargo in `styxy-ebpf`, building for the BPF target with `-Z build-std=core`, into
/// `target_dir` (relative to the root); the caller adds the subcommand (`build`, `clippy`).
fn ebpf_cargo(root: &Path, target_dir: &str) -> Command {
    let mut command = Command::new(EBPF_CARGO);
    command
        .current_dir(root.join("styxy-ebpf"))
        .env("RUSTC_BOOTSTRAP", "1")
        .env("RUSTC", EBPF_RUSTC)
        .env("CARGO_TARGET_DIR", root.join(target_dir))
        // `--target bpfel-unknown-none -Z build-std=core`, as configuration, so that any
        // subcommand takes them.
        .env("CARGO_BUILD_TARGET", "bpfel-unknown-none")
        .env("CARGO_UNSTABLE_BUILD_STD", "core")
        // BPF ISA v3 (Linux 5.12+): the atomic exchange and fetch-add the kernel-session programs
        // use to take a spare port and to read the reader's state with a full barrier.
        .env(
            "CARGO_TARGET_BPFEL_UNKNOWN_NONE_RUSTFLAGS",
            "-C target-cpu=v3",
        )
        // Debian's cargo finds Debian's clippy-driver next to it, not rustup's shims.
        .env("PATH", ebpf_path())
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTUP_TOOLCHAIN");
    command
}

/// PATH with /usr/bin first, so Debian's cargo runs Debian's clippy-driver.
fn ebpf_path() -> std::ffi::OsString {
    let mut dirs = vec![PathBuf::from("/usr/bin")];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(dirs).unwrap_or_else(|_| "/usr/bin".into())
}

/// Release build of everything `styxy install` installs; without the eBPF toolchain the daemon
/// reads the socket tables, so a failed eBPF build is a warning.
fn build_release(root: &Path) -> Result<()> {
    if let Err(e) = build_ebpf(root, true) {
        eprintln!(
            "xtask: {e:#}\nxtask: continuing without eBPF: the daemon will read the socket tables"
        );
    }
    run(with_embedded_ebpf(root, cargo_command()).args([
        "build",
        "--release",
        "-p",
        "styxy-cli",
        "-p",
        "styxy-shim-client",
    ]))?;
    build_preload(root, &["release"])
}

/// `command` (a cargo build) with `STYXY_EBPF_EMBED` naming `target/styxy-ebpf.o` when it is
/// there: the daemon then carries its programs inside (see `styxy-daemon/build.rs`). Every build
/// xtask makes sets it alike, so they never rebuild each other's daemon; a plain `cargo build`
/// makes a daemon that finds the object as a file.
fn with_embedded_ebpf(root: &Path, mut command: Command) -> Command {
    let object = root.join("target/styxy-ebpf.o");
    if object.is_file() {
        command.env("STYXY_EBPF_EMBED", object);
    } else {
        command.env_remove("STYXY_EBPF_EMBED");
    }
    command
}

/// Cargo for the shim's own workspace (styxy-preload), building into target/preload.
fn preload_cargo(root: &Path) -> Command {
    let mut command = cargo_command();
    command
        .current_dir(root.join("styxy-preload"))
        .env("CARGO_TARGET_DIR", root.join("target/preload"));
    command
}

/// Builds libstyxy_preload.so (always optimised: a release build is what proves it has no
/// reachable panic) and puts it in `target/<profile>/` for each profile given, next to
/// `styxy` and `libstyxy_shim_client.so`, where the tests, `styxy run` and `styxy install` find it.
fn build_preload(root: &Path, profiles: &[&str]) -> Result<()> {
    run(preload_cargo(root).args(["build", "--release"]))?;
    let built = root.join("target/preload/release/libstyxy_preload.so");
    for profile in profiles {
        let dir = root.join("target").join(profile);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // Copy, then rename over: processes running with the old library keep their mapping of it
        // (writing into a mapped library in place would crash them).
        let staged = dir.join(".libstyxy_preload.so.new");
        let placed = dir.join("libstyxy_preload.so");
        std::fs::copy(&built, &staged)
            .with_context(|| format!("copying {} to {}", built.display(), staged.display()))?;
        std::fs::rename(&staged, &placed)
            .with_context(|| format!("moving {} to {}", staged.display(), placed.display()))?;
    }
    Ok(())
}

/// `cargo fmt --check` and `cargo clippy --all-targets -D warnings` on the main workspace, the
/// shim's (`styxy-preload`) and the eBPF programs' (`styxy-ebpf`, with Debian's clippy, which
/// knows the BPF target). Without the eBPF toolchain the eBPF crate's clippy is skipped with the
/// reason, except in CI, where it must run.
fn lint(root: &Path) -> Result<()> {
    cargo(&["fmt", "--all", "--", "--check"])?;
    for manifest in ["styxy-preload/Cargo.toml", "styxy-ebpf/Cargo.toml"] {
        cargo(&["fmt", "--manifest-path", manifest, "--", "--check"])?;
    }
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    run(preload_cargo(root).args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    let mut missing = missing_ebpf_tools();
    if !Path::new(EBPF_CLIPPY).exists() {
        missing.push(format!("{EBPF_CLIPPY} (apt-get install rust-web-clippy)"));
    }
    if !missing.is_empty() {
        let why = format!("eBPF clippy needs:\n  - {}", missing.join("\n  - "));
        if std::env::var_os("CI").is_some() {
            bail!("{why}");
        }
        eprintln!("xtask: SKIP {why}\nInstall them with `cargo xtask setup` (as root)");
        return Ok(());
    }
    run(ebpf_cargo(root, "target/ebpf-clippy").args([
        "clippy",
        "--release",
        "--",
        "-D",
        "warnings",
    ]))
}

fn setup(root: &Path) -> Result<()> {
    run(Command::new("bash").arg(root.join("scripts/setup.sh")))
}

fn cargo(args: &[&str]) -> Result<()> {
    run(cargo_command().args(args))
}

/// The cargo that runs this xtask (`$CARGO`), else the one on PATH.
fn cargo_command() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
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
