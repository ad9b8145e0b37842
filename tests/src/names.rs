//! What the names' tests share: a daemon with the proxy (on the default install's eBPF and shim
//! when eBPF can be used here, else on the socket tables), two git worktrees, a server in a
//! session, curl, and the port a session's server is bound to now.

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};

use crate::v1 as pb;
use crate::{ebpf_ready, Daemon, Spawned};

/// A daemon with the proxy on a free loopback port, and that port.
pub async fn daemon_with_proxy() -> Result<(Daemon, u16)> {
    daemon_with_proxy_and(&[]).await
}

/// A daemon with the proxy on a free loopback port and `extra` arguments, and the proxy's port.
pub async fn daemon_with_proxy_and(extra: &[&str]) -> Result<(Daemon, u16)> {
    let mut args = vec!["--proxy", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let daemon = match ebpf_ready() {
        Some(setup) => {
            let object = setup.object.to_str().context("utf-8 path")?;
            args.extend(["--observer", "ebpf", "--ebpf-object", object]);
            Daemon::start_with(&args).await?
        }
        None => {
            eprintln!("names: without eBPF here, on the socket tables");
            Daemon::start_with(&args).await?
        }
    };
    let port = daemon.proxy_port().await?;
    Ok((daemon, port))
}

/// A git repository `shop` with worktrees `feature-x` and `feature-y` beside it, each with an
/// `index.html` saying whose it is.
pub fn worktrees(root: &Path) -> Result<()> {
    let git = |dir: &Path, args: &[&str]| -> Result<()> {
        let out = Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .current_dir(dir)
            .output()?;
        ensure!(out.status.success(), "git {args:?}: {out:?}");
        Ok(())
    };
    let shop = root.join("shop");
    std::fs::create_dir_all(&shop)?;
    git(&shop, &["init", "-q"])?;
    std::fs::write(shop.join("README"), "shop\n")?;
    git(&shop, &["add", "README"])?;
    git(&shop, &["commit", "-q", "-m", "start"])?;
    for name in ["feature-x", "feature-y"] {
        git(
            &shop,
            &["worktree", "add", "-q", "-b", name, &format!("../{name}")],
        )?;
        std::fs::write(root.join(name).join("index.html"), format!("I am {name}\n"))?;
    }
    Ok(())
}

/// `python3 -m http.server ASKED` in `dir`, in session `instance`: its own process group.
pub fn http_server_in(daemon: &Daemon, instance: &str, dir: &Path, asked: u16) -> Result<Spawned> {
    let mut server = Spawned::start_group(
        daemon
            .shimmed_in(
                instance,
                "python3",
                &[
                    "-u",
                    "-m",
                    "http.server",
                    &asked.to_string(),
                    "--bind",
                    "127.0.0.1",
                ],
            )
            .current_dir(dir),
    )?;
    server.line_where(20, |l| l.contains("Serving HTTP"))?;
    Ok(server)
}

/// `curl` for `url` (curl resolves `*.localhost` to loopback itself): the status and the body.
pub fn curl(url: &str, extra: &[&str]) -> Result<(u16, String)> {
    let out = Command::new("curl")
        .args(["-sS", "-m", "10", "-w", "\n%{http_code}"])
        .args(extra)
        .arg(url)
        .output()?;
    ensure!(out.status.success(), "curl {url}: {out:?}");
    let text = String::from_utf8(out.stdout)?;
    let (body, code) = text.rsplit_once('\n').context("a status")?;
    Ok((code.parse()?, body.to_string()))
}

/// The port session `instance`'s server that asked `asked` is bound to now.
pub async fn bound_port(daemon: &Daemon, instance: &str, asked: u16) -> Result<u16> {
    let request = pb::SessionReportRequest {
        instance_id: instance.into(),
        peek: true,
        pid: 0,
    };
    let servers = daemon
        .client()
        .await?
        .session_report(request)
        .await?
        .into_inner()
        .running;
    servers
        .iter()
        .find(|s| s.asked_port == u32::from(asked) || s.port == u32::from(asked))
        .and_then(|s| u16::try_from(s.port).ok())
        .with_context(|| format!("no server of {instance} for {asked}: {servers:?}"))
}

/// `vite --port ASKED` in `app`, run by `styxy run` in session `shop-ui` named `shop` (by its
/// user, not by its directory), once it says where it listens.
pub fn vite_in_shop(daemon: &Daemon, vite: &str, app: &Path, asked: u16) -> Result<Spawned> {
    let mut server = Spawned::start_group(
        Command::new(crate::styxy_bin())
            .arg("--socket")
            .arg(&daemon.socket)
            .args(["run", "--instance", "shop-ui", "--name", "shop", "--", vite])
            .args(["--port", &asked.to_string()])
            .current_dir(app)
            // Plain text: Vite colours its banner when CI is set.
            .env("NO_COLOR", "1"),
    )?;
    server.line_where(30, |l| l.contains("Local:"))?;
    Ok(server)
}
