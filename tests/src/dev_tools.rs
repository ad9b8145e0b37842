//! Real dev servers that nobody here wrote — Django, Vite, Jupyter — as `scripts/setup.sh`
//! installs them (PyPI, and npm into a directory of its own). Each finder says why when the tool
//! is missing and returns `None` (the test skips); in CI (`CI` set) a missing tool fails the test.

use std::path::PathBuf;

use anyhow::Context;
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

/// Debian's Chromium (`/usr/bin/chromium`), headless.
pub fn chromium() -> Option<Chromium> {
    let path = PathBuf::from("/usr/bin/chromium");
    if path.is_file() {
        return Some(Chromium { path });
    }
    missing("Chromium", "/usr/bin/chromium is not installed")?;
    None
}

/// playwright-core's directory (it drives Debian's Chromium; it has no browser of its own).
pub fn playwright_core() -> Option<PathBuf> {
    let dir = npm_dir().join("node_modules/playwright-core");
    if dir.join("package.json").is_file() {
        return Some(dir);
    }
    missing(
        "Chromium (playwright-core)",
        &format!("{} is not installed", dir.display()),
    )?;
    None
}

/// A headless Chromium that trusts what the NSS database in `home` trusts.
pub struct Chromium {
    pub path: PathBuf,
}

impl Chromium {
    /// The flags every run takes: headless, no sandbox (root), and none of the background
    /// fetches that this machine's closed network refuses.
    pub const FLAGS: [&'static str; 9] = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
    ];

    /// The page at `url` after it loaded, as HTML (`--dump-dom`), with `home` as HOME (whose
    /// `.pki/nssdb` Chromium trusts); a certificate it refuses gives its error page instead.
    pub fn dump_dom(&self, url: &str, home: &std::path::Path) -> anyhow::Result<String> {
        let profile = tempfile::tempdir()?;
        let mut child = Command::new(&self.path)
            .args(Self::FLAGS)
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("--dump-dom")
            .arg(url)
            .env("HOME", home)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        // Read as it comes (a page larger than the pipe would otherwise stall it).
        let mut stdout = child.stdout.take().context("chromium's output")?;
        let reader = std::thread::spawn(move || {
            let mut out = String::new();
            std::io::Read::read_to_string(&mut stdout, &mut out).map(|_| out)
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if child.try_wait()?.is_some() {
                break;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("chromium --dump-dom {url} took more than 60 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let out = reader
            .join()
            .map_err(|_| anyhow::anyhow!("reading chromium's output panicked"))??;
        Ok(out)
    }
}
