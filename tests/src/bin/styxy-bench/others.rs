//! The other proxies `styxy-bench proxy` compares with, when installed: Caddy's `reverse_proxy`
//! (Debian `caddy`) and portless (npm `portless`, installed by `cargo xtask setup`), each in
//! plain HTTP from a scratch HOME, so that neither makes a CA, changes a trust store or writes
//! `/etc/hosts`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};

/// A running proxy, killed when dropped; its scratch dir goes after it.
pub struct Running {
    child: Child,
    _scratch: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A Caddy `reverse_proxy` from a free loopback port to `upstream`, when Caddy is installed.
pub fn start_caddy(upstream: SocketAddr) -> Result<Option<(Running, SocketAddr)>> {
    if Command::new("caddy")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        return Ok(None);
    }
    let port = free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    // A Caddyfile, not `caddy reverse-proxy`: that command also makes Caddy's own local CA and
    // installs it in the system's trust store (seen here), which a benchmark must not do.
    // `http://:PORT` serves any host, in plain HTTP; its HOME is a scratch dir.
    let scratch = tempfile::tempdir().context("a scratch dir for caddy")?;
    let caddyfile = scratch.path().join("Caddyfile");
    std::fs::write(
        &caddyfile,
        format!(
            "{{\n\tskip_install_trust\n\tauto_https off\n\tadmin off\n}}\n\
             http://:{port} {{\n\treverse_proxy {upstream}\n}}\n"
        ),
    )
    .context("writing the Caddyfile")?;
    // Killed when dropped, also when it never answers.
    let child = Running {
        child: Command::new("caddy")
            .args(["run", "--adapter", "caddyfile", "--config"])
            .arg(&caddyfile)
            .env("HOME", scratch.path())
            .env("XDG_DATA_HOME", scratch.path())
            .env("XDG_CONFIG_HOME", scratch.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting caddy")?,
        _scratch: scratch,
    };
    Ok(Some((child, addr)))
}

/// portless's proxy (`portless proxy start --no-tls --foreground`) on a free loopback port, with
/// `bench.localhost` aliased to `upstream`: the proxy, its address and the Host to send.
pub fn start_portless(upstream: SocketAddr) -> Result<Option<(Running, SocketAddr, String)>> {
    let Some(portless) = portless() else {
        return Ok(None);
    };
    let port = free_port()?;
    let scratch = tempfile::tempdir().context("a scratch HOME for portless")?;
    let child = Command::new(&portless)
        .args(["proxy", "start", "--no-tls", "--foreground", "-p"])
        .arg(port.to_string())
        .env("HOME", scratch.path())
        .env("PORTLESS_STATE_DIR", scratch.path())
        // By default it writes its names into /etc/hosts (seen here): not from a benchmark.
        .env("PORTLESS_SYNC_HOSTS", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting portless")?;
    let running = Running {
        child,
        _scratch: scratch,
    };
    // Its routes file appears once it runs; the alias is written there.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let aliased = Command::new(&portless)
            .args(["alias", "bench"])
            .arg(upstream.port().to_string())
            .env("HOME", running._scratch.path())
            .env("PORTLESS_STATE_DIR", running._scratch.path())
            .env("PORTLESS_SYNC_HOSTS", "0")
            .output()
            .context("running portless alias")?;
        if aliased.status.success() {
            break;
        }
        if std::time::Instant::now() > deadline {
            bail!("portless alias failed: {aliased:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    Ok(Some((
        running,
        SocketAddr::from(([127, 0, 0, 1], port)),
        "bench.localhost".into(),
    )))
}

/// `portless`, where `cargo xtask setup` installs it (`$STYXY_DEV_SERVERS`, else
/// `/opt/styxy-devservers` as root, else `~/.cache/styxy/devservers`), or on PATH.
fn portless() -> Option<PathBuf> {
    let dir = std::env::var_os("STYXY_DEV_SERVERS")
        .map(PathBuf::from)
        .or_else(|| styxy_tests::is_root().then(|| PathBuf::from("/opt/styxy-devservers")))
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/styxy/devservers"))
        })?;
    let installed = dir.join("node_modules/.bin/portless");
    if installed.is_file() {
        return Some(installed);
    }
    Command::new("portless")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| PathBuf::from("portless"))
}
