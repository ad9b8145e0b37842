//! Real dev servers that nobody here wrote — Django, Vite, Jupyter — as `scripts/setup.sh`
//! installs them (PyPI, and npm into a directory of its own). Each finder says why when the tool
//! is missing and returns `None` (the test skips); in CI (`CI` set) a missing tool fails the test.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::users::is_root;

/// Where `scripts/setup.sh` installs the npm dev servers: `$STYXY_DEV_SERVERS`, else
/// `/opt/styxy-devservers` as root, else `~/.cache/styxy/devservers`.
fn npm_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("STYXY_DEV_SERVERS") {
        return PathBuf::from(dir);
    }
    if is_root() {
        return PathBuf::from("/opt/styxy-devservers");
    }
    let home = std::env::var_os("HOME").unwrap_or_default();
    PathBuf::from(home).join(".cache/styxy/devservers")
}

fn missing(tool: &str, why: &str) -> Option<()> {
    assert!(
        std::env::var_os("CI").is_none(),
        "the {tool} tests must run in CI, but: {why}"
    );
    eprintln!("SKIP: {tool} test: {why} (cargo xtask setup installs it)");
    None
}

fn python_imports(modules: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Django, importable by `python3`.
pub fn django() -> Option<()> {
    if python_imports("django") {
        return Some(());
    }
    missing("Django", "python3 cannot import django")
}

/// Jupyter's server and a Python kernel, importable by `python3`.
pub fn jupyter() -> Option<()> {
    if python_imports("jupyter_server, ipykernel") {
        return Some(());
    }
    missing(
        "Jupyter",
        "python3 cannot import jupyter_server and ipykernel",
    )
}

/// The `vite` command, and `node` to run it and the test's WebSocket client.
pub fn vite() -> Option<PathBuf> {
    let vite = npm_dir().join("node_modules/.bin/vite");
    let runs = Command::new(&vite)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if runs {
        return Some(vite);
    }
    missing("Vite", &format!("{} does not run", vite.display()))?;
    None
}
