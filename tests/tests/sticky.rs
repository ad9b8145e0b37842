//! Sticky ports with real git worktrees, real servers and the real daemon: a server moved to P in
//! worktree W, stopped and started again in W (a new `styxy run`, a new session) gets P while P is
//! free, also after a daemon restart; a server of another worktree of the same repository is moved
//! past P; `styxy ports` lists what is remembered and `styxy forget` clears it.

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use styxy_tests::{eventually, http_server, notice_port, wait_for_listener, Daemon, Spawned};

fn git(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
        .args(args)
        .current_dir(dir)
        .output()
        .context("running git")?;
    ensure!(out.status.success(), "git {args:?}: {out:?}");
    Ok(())
}

/// Starts `python3 -m http.server asked` under `styxy run` in `dir`; returns it and the port it
/// was moved to.
fn moved_server(daemon: &Daemon, dir: &Path, asked: u16) -> Result<(Spawned, u16)> {
    let mut server = Spawned::start(daemon.shimmed_http_server(asked).current_dir(dir))?;
    let notice = server.line_where(20, |l| l.starts_with("✓ STYXY"))?;
    let port = notice_port(&notice).context("no port in the notice")?;
    wait_for_listener(port)?;
    Ok((server, port))
}

/// Stops a moved server, and waits until the daemon has seen its port freed.
async fn stop(daemon: &Daemon, mut server: Spawned, port: u16) -> Result<()> {
    server.child.kill()?;
    server.child.wait()?;
    eventually(10, "the port freed", || async {
        let out = daemon.cli(&["--json", "observe", &port.to_string()]);
        let value: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (value.get("holders").is_none() && value.get("lease").is_none()).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worktree_gets_its_port_back_and_other_worktrees_pass_it_over() -> Result<()> {
    let mut daemon = Daemon::start().await?;
    let asked = daemon.base + 2;
    let _holder = http_server(asked)?;
    let temp = tempfile::tempdir()?;
    let repo = temp.path().join("app");
    let other = temp.path().join("app-feature");
    std::fs::create_dir_all(repo.join("web/src"))?;
    git(&repo, &["init", "-q"])?;
    git(&repo, &["commit", "-q", "--allow-empty", "-m", "start"])?;
    git(
        &repo,
        &[
            "worktree",
            "add",
            "-q",
            "-b",
            "feature",
            other.to_str().context("utf-8")?,
        ],
    )?;
    std::fs::create_dir_all(other.join("web"))?;

    // W, from a subdirectory: moved to P (the worktree root is what is remembered).
    let (server, p) = moved_server(&daemon, &repo.join("web/src"), asked)?;
    stop(&daemon, server, p).await?;
    let ports = daemon.cli(&["ports"]);
    let listed = String::from_utf8_lossy(&ports.stdout).into_owned();
    ensure!(
        listed.contains(&format!("{asked} → {p}"))
            && listed.contains(repo.to_str().context("utf-8")?),
        "{listed}"
    );

    // The other worktree, while P is free: moved past it.
    let (feature, q) = moved_server(&daemon, &other.join("web"), asked)?;
    ensure!(q != p, "the other worktree got W's port {p}");

    // W again, a new session: P, while P is free.
    let (again, p2) = moved_server(&daemon, &repo, asked)?;
    ensure!(p2 == p, "W got {p2}, not its port {p}");
    stop(&daemon, again, p2).await?;
    stop(&daemon, feature, q).await?;

    // Remembered across a restart of the daemon.
    daemon.kill9_and_restart().await?;
    let (after_restart, p3) = moved_server(&daemon, &repo.join("web"), asked)?;
    ensure!(p3 == p, "after a restart W got {p3}, not {p}");
    stop(&daemon, after_restart, p3).await?;

    // Forgotten: W's entry is gone, the other worktree's stays.
    let forget = daemon.cli(&["forget", "--project", repo.to_str().context("utf-8")?]);
    ensure!(forget.status.success(), "{forget:?}");
    let said = String::from_utf8_lossy(&forget.stdout).into_owned();
    ensure!(said.contains("1 sticky port forgotten"), "{said}");
    let json = daemon.cli(&["--json", "ports"]);
    let value: serde_json::Value = serde_json::from_slice(&json.stdout)?;
    let projects: Vec<&str> = value["sticky"]
        .as_array()
        .context("sticky")?
        .iter()
        .filter_map(|e| e["project"].as_str())
        .collect();
    ensure!(
        projects == [other.canonicalize()?.to_str().context("utf-8")?],
        "{projects:?}"
    );
    // `--here`: the worktree of the current directory.
    let here = Command::new(styxy_tests::styxy_bin())
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["forget", "--here"])
        .current_dir(other.join("web"))
        .output()?;
    let said = String::from_utf8_lossy(&here.stdout).into_owned();
    ensure!(said.contains("1 sticky port forgotten"), "{here:?}");
    let refused = daemon.cli(&["forget"]);
    ensure!(!refused.status.success());
    ensure!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("--here, --project DIR, --port PORT, or --all"),
        "{refused:?}"
    );
    Ok(())
}
