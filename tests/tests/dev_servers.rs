//! Real dev servers that nobody here wrote, run as their users run them: two sessions each start
//! the same tool on the same port. Django's autoreloader keeps its moved port across edits, a
//! moved Vite makes one notice and one audit entry and its HMR works inside the session (at the
//! asked port) and outside it (at the bound one), and the agent's report on a moved Jupyter names
//! the notebook server, summarises its kernels' ports, corrects the URL Jupyter printed and tells
//! when it stops; with the socket tables, and with the root daemon's eBPF programs and the shim
//! together (the default install).
//!
//! Needs Django, Vite, Jupyter and Node.js (`cargo xtask setup` installs them); the eBPF variants also
//! need root, cgroup v2 and the eBPF object. Each test says why when it skips; CI fails instead.
//! Tests here run one at a time: the eBPF variants attach at the cgroup root.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use styxy_tests::v1 as pb;
use styxy_tests::{
    django, ebpf_ready, eventually, http_get, jupyter, styxy_bin, vite, Daemon, Spawned,
};

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Clone, Copy, Debug)]
enum Observer {
    /// The socket tables: only the shim moves binds.
    Sockets,
    /// The root daemon's eBPF programs with the shim in every process of a session.
    Ebpf,
}

/// A daemon with `observer`; `None` (the test skips, saying why) when eBPF cannot be used here.
async fn daemon(observer: Observer) -> Result<Option<Daemon>> {
    match observer {
        // Read at the installed daemon's interval (not the tests' usual 100 ms): what a restart
        // must outrun is an old server that the table still shows.
        Observer::Sockets => Ok(Some(
            Daemon::start_with(&["--observer", "sockets", "--scan-interval-ms", "1000"]).await?,
        )),
        Observer::Ebpf => {
            let Some(setup) = ebpf_ready() else {
                return Ok(None);
            };
            let object = setup.object.to_str().context("utf-8 path")?;
            let daemon =
                Daemon::start_with(&["--observer", "ebpf", "--ebpf-object", object]).await?;
            ensure!(
                daemon.status().await?.kernel_sessions_enforced,
                "kernel sessions are on at the root"
            );
            Ok(Some(daemon))
        }
    }
}

/// Every server of `instance` now, as the daemon reports them (without marking anything told).
async fn servers_of(daemon: &Daemon, instance: &str) -> Result<Vec<pb::SessionServer>> {
    let request = pb::SessionReportRequest {
        instance_id: instance.into(),
        peek: true,
        pid: 0,
    };
    Ok(daemon
        .client()
        .await?
        .session_report(request)
        .await?
        .into_inner()
        .running)
}

/// The server of `instance` that asked for `asked` and was moved, when its pid is not `old`.
async fn moved_server(
    daemon: &Daemon,
    instance: &str,
    asked: u16,
    old: Option<u32>,
) -> Result<Option<pb::SessionServer>> {
    Ok(servers_of(daemon, instance)
        .await?
        .into_iter()
        .find(|s| s.asked_port == u32::from(asked) && Some(s.pid) != old))
}

/// Another session's server on `port` (127.0.0.1), so that the session under test is moved:
/// session `the-other-session`, named `other-work` (what the agent is told).
fn holder_in_another_session(daemon: &Daemon, port: u16) -> Result<Spawned> {
    let port = port.to_string();
    let mut holder = Spawned::start(
        Command::new(styxy_tests::styxy_bin())
            .arg("--socket")
            .arg(&daemon.socket)
            .args([
                "run",
                "--instance",
                "the-other-session",
                "--name",
                "other-work",
            ])
            .args(["--", "python3", "-u", "-m", "http.server", &port])
            .args(["--bind", "127.0.0.1"]),
    )?;
    holder.line_where(15, |l| l.contains("Serving HTTP"))?;
    Ok(holder)
}

// ---- Django: an autoreloader's children keep the port -------------------------------------------

/// Django's `runserver` in a session whose port is held: the autoreloader replaces its child on
/// each edit, and every child lands on the port the first one was moved to.
async fn django_edits_keep_the_port(observer: Observer) -> Result<()> {
    if django().is_none() {
        return Ok(());
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(daemon) = daemon(observer).await? else {
        return Ok(());
    };
    let asked = daemon.base + 5;
    let _holder = holder_in_another_session(&daemon, asked)?;
    let work = tempfile::tempdir()?;
    let made = Command::new("python3")
        .args(["-m", "django", "startproject", "webapp"])
        .arg(work.path())
        .output()?;
    ensure!(made.status.success(), "startproject: {made:?}");
    let address = format!("127.0.0.1:{asked}");
    // Its own process group: the autoreloader's child goes with it when the test ends.
    let mut server = Spawned::start_group(
        daemon
            .shimmed_in(
                "django-edits",
                "python3",
                &["-u", "manage.py", "runserver", &address],
            )
            .current_dir(work.path()),
    )?;
    let first = eventually(30, "Django's first server", || async {
        moved_server(&daemon, "django-edits", asked, None)
            .await
            .ok()
            .flatten()
    })
    .await
    .with_context(|| format!("{:?}", server.rest(0)))?;
    let mut ports = vec![first.port];
    let mut last = first.pid;
    let settings = work.path().join("webapp/settings.py");
    for edit in 1..=10 {
        let next = edit_until_restarted(&daemon, &settings, edit, asked, last).await?;
        ports.push(next.port);
        last = next.pid;
    }
    assert!(
        ports.iter().all(|&p| p == first.port),
        "{observer:?}: every child of the autoreloader on {}: {ports:?}\n{}",
        first.port,
        server.rest(0).join("\n")
    );
    let port = u16::try_from(first.port)?;
    ensure!(port != asked, "moved off the held port");
    // Outside the session, the port it was moved to reaches it (an edit made twice, when the
    // reloader was slow to see the first, restarts it once more: let that restart finish).
    let status = eventually(20, "Django answering on its port", || async {
        http_get(port).ok().filter(|s| s.contains(" 200 "))
    })
    .await?;
    ensure!(
        status.contains(" 200 "),
        "Django answers on {port}: {status}"
    );
    Ok(())
}

/// Edits `file` (appends a comment) until a new server of the session for `asked` listens
/// instead of pid `old` (an edit the reloader made before its first look is seen by the next).
async fn edit_until_restarted(
    daemon: &Daemon,
    file: &Path,
    edit: u32,
    asked: u16,
    old: u32,
) -> Result<pb::SessionServer> {
    use std::io::Write;
    // Another edit only when the reloader missed this one (it looks once a second; a restart
    // takes a second or two, longer on a loaded machine): each extra edit is one more restart.
    for attempt in 0..5 {
        let mut f = std::fs::OpenOptions::new().append(true).open(file)?;
        writeln!(f, "# edit {edit}.{attempt}")?;
        drop(f);
        let found = eventually(9, "the restarted server", || async {
            moved_server(daemon, "django-edits", asked, Some(old))
                .await
                .ok()
                .flatten()
        })
        .await;
        if let Ok(server) = found {
            return Ok(server);
        }
    }
    bail!("edit {edit}: no new server replaced pid {old} in 45 s")
}

#[tokio::test(flavor = "multi_thread")]
async fn django_edits_keep_the_moved_port_with_the_socket_tables() -> Result<()> {
    django_edits_keep_the_port(Observer::Sockets).await
}

#[tokio::test(flavor = "multi_thread")]
async fn django_edits_keep_the_moved_port_with_ebpf_and_the_shim() -> Result<()> {
    django_edits_keep_the_port(Observer::Ebpf).await
}

// ---- Vite: one notice, one audit entry, HMR inside and outside -----------------------------------

/// A Node.js HMR client as Vite's own page script is: reads the token from `/@vite/client`,
/// loads `/main.js` (so the module is in Vite's graph), opens the `vite-hmr` WebSocket, prints
/// `connected`, then `hmr TYPE` for the first update or reload, and `main: …` with what the module
/// said. Arguments: host, port.
const HMR_CLIENT: &str = r#"
const [host, port] = process.argv.slice(2);
const base = `http://${host}:${port}`;
const fail = (why) => { console.log(`error ${why}`); process.exit(1); };
setTimeout(() => fail('timeout'), 30000);
const client = await (await fetch(`${base}/@vite/client`)).text();
const token = /const wsToken = "([^"]*)"/.exec(client)?.[1];
if (token === undefined) fail('no wsToken in /@vite/client');
const main = await (await fetch(`${base}/main.js`)).text();
console.log(`main: ${/console\.log\("([^"]*)"\)/.exec(main)?.[1]}`);
const ws = new WebSocket(`ws://${host}:${port}/?token=${token}`, 'vite-hmr');
ws.onerror = () => fail('websocket');
ws.onmessage = (event) => {
  const message = JSON.parse(event.data);
  if (message.type === 'connected') console.log('connected');
  if (message.type === 'update' || message.type === 'full-reload') {
    console.log(`hmr ${message.type}`);
    process.exit(0);
  }
};
"#;

/// A Vite project in `dir` whose page loads `main.js`, which logs `marker`.
fn vite_project(dir: &Path, marker: &str) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("index.html"),
        "<!doctype html><html><body><script type=\"module\" src=\"/main.js\"></script></body></html>\n",
    )?;
    std::fs::write(dir.join("main.js"), format!("console.log(\"{marker}\");\n"))?;
    Ok(())
}

/// The port in Vite's `➜  Local:   http://localhost:PORT/` line.
fn vite_local_port(server: &mut Spawned) -> Result<u16> {
    let line = server.line_where(30, |l| l.contains("Local:"))?;
    line.rsplit(':')
        .next()
        .and_then(|p| p.trim().trim_end_matches('/').parse().ok())
        .with_context(|| format!("no port in {line:?}"))
}

async fn vite_moves_once_and_hmr_works(observer: Observer) -> Result<()> {
    let Some(vite) = vite() else {
        return Ok(());
    };
    let vite = vite.to_str().context("utf-8 path")?.to_string();
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(daemon) = daemon(observer).await? else {
        return Ok(());
    };
    let asked = daemon.base + 7;
    let port_arg = asked.to_string();
    let work = tempfile::tempdir()?;
    let (a_dir, b_dir) = (work.path().join("a"), work.path().join("b"));
    vite_project(&a_dir, "a")?;
    vite_project(&b_dir, "b")?;
    let client = work.path().join("hmr-client.mjs");
    std::fs::write(&client, HMR_CLIENT)?;
    let client = client.to_str().context("utf-8 path")?;

    let mut a = Spawned::start_group(
        daemon
            .shimmed_in("vite-a", &vite, &["--port", &port_arg])
            .current_dir(&a_dir)
            // Plain text: Vite colours its banner when CI is set.
            .env("NO_COLOR", "1"),
    )?;
    ensure!(vite_local_port(&mut a)? == asked, "A keeps the free port");
    let mut b = Spawned::start_group(
        daemon
            .shimmed_in("vite-b", &vite, &["--port", &port_arg])
            .current_dir(&b_dir)
            .env("NO_COLOR", "1"),
    )?;
    let bound = vite_local_port(&mut b)?;
    ensure!(bound != asked, "B is moved: {:?}", b.seen);

    // Inside B's session, at the asked port: B's page and B's HMR.
    let node = ["--experimental-websocket", client];
    let inside_args = [&node[..], &["127.0.0.1", &port_arg]].concat();
    let mut inside = Spawned::start(&mut daemon.shimmed_in("vite-b", "node", &inside_args))?;
    // Outside every session, at the bound port.
    let bound_arg = bound.to_string();
    let mut outside = Spawned::start(
        Command::new("node")
            .args(node)
            .args(["127.0.0.1", &bound_arg]),
    )?;
    for (name, client) in [("inside", &mut inside), ("outside", &mut outside)] {
        let main = client.line_where(20, |l| l.starts_with("main:") || l.starts_with("error"))?;
        ensure!(main == "main: b", "{name}: B's module, not A's: {main}");
        client.line_where(20, |l| l == "connected" || l.starts_with("error"))?;
    }
    std::fs::write(b_dir.join("main.js"), "console.log(\"b, edited\");\n")?;
    for (name, client) in [("inside", &mut inside), ("outside", &mut outside)] {
        let hmr = client.line_where(20, |l| l.starts_with("hmr ") || l.starts_with("error"))?;
        ensure!(hmr.starts_with("hmr "), "{name}: {hmr}");
    }

    // One notice, naming the port Vite printed; one audit entry for the move.
    let notices: Vec<&String> = b.seen.iter().filter(|l| l.contains("STYXY:")).collect();
    assert_eq!(
        notices.len(),
        1,
        "{observer:?}: one notice per server start: {:#?}",
        b.seen
    );
    assert!(
        notices[0].contains(&format!("Auto-assigned port {bound} ({asked} ")),
        "{notices:?}"
    );
    // Whose the port is: A's command and session, by the session's name (its directory's, as
    // `a.localhost` says it; its id is `vite-a`) — on the kernel's path too, where the shim asks
    // the daemon for the notice.
    assert!(
        notices[0].contains(&format!(
            "in use by `node {vite} --port {asked}`, session a, pid {})",
            a.child.id()
        )),
        "{observer:?}: {notices:?}"
    );
    let moves: Vec<pb::AuditEntry> = daemon
        .audit()
        .await?
        .into_iter()
        .filter(|e| e.requested_port == u32::from(asked))
        .collect();
    assert_eq!(
        moves.len(),
        1,
        "{observer:?}: one audit entry for B's probes and bind: {moves:#?}"
    );
    assert_eq!(moves[0].assigned_port, u32::from(bound));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn vite_moved_makes_one_notice_and_hmr_works_with_the_socket_tables() -> Result<()> {
    vite_moves_once_and_hmr_works(Observer::Sockets).await
}

#[tokio::test(flavor = "multi_thread")]
async fn vite_moved_makes_one_notice_and_hmr_works_with_ebpf_and_the_shim() -> Result<()> {
    vite_moves_once_and_hmr_works(Observer::Ebpf).await
}

// ---- Jupyter: what the agent hears ----------------------------------------------------------------

/// Runs `styxy hook post-tool-use` as Claude Code would after a Bash call of session `session_id`
/// that printed `printed`: the context it gives the agent, if any.
fn post_tool_use(daemon: &Daemon, session_id: &str, printed: &str) -> Result<Option<String>> {
    use std::io::Write;
    let input = serde_json::json!({
        "session_id": session_id,
        "hook_event_name": "PostToolUse",
        "tool_name": "Bash",
        "tool_input": {"command": "jupyter server &"},
        "tool_response": {"stdout": printed, "stderr": "", "interrupted": false},
    });
    let mut child = Command::new(styxy_bin())
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["hook", "post-tool-use"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    stdin.write_all(input.to_string().as_bytes())?;
    drop(stdin);
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "the hook never fails: {out:?}");
    let text = String::from_utf8(out.stdout)?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    let value: serde_json::Value = serde_json::from_str(text.trim())?;
    Ok(value["hookSpecificOutput"]["additionalContext"]
        .as_str()
        .map(str::to_owned))
}

/// `curl` against Jupyter's REST API with the test's token: the response body.
fn jupyter_api(port: u32, method: &str, path: &str, body: &str) -> Result<String> {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--fail",
            "-X",
            method,
            "-H",
            "Authorization: token styxy-test",
        ])
        .args(["-d", body])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()?;
    ensure!(out.status.success(), "curl {method} {path}: {out:?}");
    Ok(String::from_utf8(out.stdout)?)
}

async fn jupyter_is_reported_as_the_agent_needs(observer: Observer) -> Result<()> {
    if jupyter().is_none() {
        return Ok(());
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(daemon) = daemon(observer).await? else {
        return Ok(());
    };
    let asked = daemon.base + 9;
    let _holder = holder_in_another_session(&daemon, asked)?;
    let work = tempfile::tempdir()?;
    let root = work.path().to_str().context("utf-8 path")?;
    let port_arg = asked.to_string();
    // The agent's session is `claude-<session id>`, as the SessionStart hook names it.
    let (session_id, instance) = ("nb", "claude-nb");
    let mut notebook = Spawned::start_group(
        daemon
            .shimmed_in(
                instance,
                "jupyter",
                &[
                    "server",
                    "--port",
                    &port_arg,
                    "--ip",
                    "127.0.0.1",
                    "--no-browser",
                    "--allow-root",
                    "--IdentityProvider.token=styxy-test",
                    "--ServerApp.port_retries=0",
                    &format!("--ServerApp.root_dir={root}"),
                ],
            )
            .env("JUPYTER_RUNTIME_DIR", work.path().join("runtime"))
            .env("JUPYTER_DATA_DIR", work.path().join("data"))
            .env("JUPYTER_CONFIG_DIR", work.path().join("config")),
    )?;
    notebook.line_where(60, |l| l.contains("Use Control-C to stop this server"))?;
    let server = eventually(30, "the notebook server in the session", || async {
        moved_server(&daemon, instance, asked, None)
            .await
            .ok()
            .flatten()
    })
    .await?;
    // Two kernels: each listens on several helper ports (its ZMQ channels).
    for _ in 0..2 {
        jupyter_api(server.port, "POST", "/api/kernels", r#"{"name":"python3"}"#)?;
    }
    let kernel_ports = || async {
        let servers = servers_of(&daemon, instance).await.ok()?;
        Some(servers.iter().filter(|s| s.pid != server.pid).count())
    };
    eventually(60, "both kernels' channels", || async {
        kernel_ports().await.filter(|n| *n >= 10)
    })
    .await?;

    // What the agent hears after the Bash call that started it: the notebook server named and
    // moved, the kernels' ports in one line, and the URL Jupyter printed corrected.
    let printed = notebook.seen.join("\n");
    ensure!(
        printed.contains(&format!("http://127.0.0.1:{asked}/")),
        "Jupyter prints the port it asked for (what Styxy corrects): {printed}"
    );
    let context = post_tool_use(&daemon, session_id, &printed)?.context("a report")?;
    let lines: Vec<&str> = context.lines().collect();
    assert!(
        lines[1].starts_with("- MOVED: `python3 ")
            && lines[1].contains("jupyter-server")
            && lines[1].contains(&format!("--port {asked}`"))
            && lines[1].contains(&format!("listens on {} instead", server.port)),
        "the notebook server first: {context}"
    );
    assert!(
        lines[1].contains("session other-work"),
        "the holder's session is named (by its name, not its id): {context}"
    );
    let helpers: Vec<&&str> = lines
        .iter()
        .filter(|l| l.contains("helper ports"))
        .collect();
    assert_eq!(helpers.len(), 1, "{context}");
    // Every kernel port the daemon knew when the hook asked, counted (a kernel may still open
    // one after: never fewer than ten, never more than the daemon knows now).
    let told: usize = helpers[0]
        .split_once(" started (")
        .and_then(|(before, _)| before.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("a count in {}", helpers[0]))?;
    let known = kernel_ports().await.context("the session's servers")?;
    assert!(
        (10..=known).contains(&told) && helpers[0].contains("ipykernel_launcher"),
        "{told} of {known} kernel ports: {context}"
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("started: `python3 -m ipykernel_launcher")),
        "no line per kernel port: {context}"
    );
    assert!(
        context.contains(&format!("printed http://127.0.0.1:{asked}/"))
            && context.contains(&format!("use http://127.0.0.1:{}/", server.port)),
        "the URL Jupyter printed is corrected: {context}"
    );
    assert!(lines.len() <= 5, "a short report: {context}");

    // The notebook server stops (killed): the agent is told, in a line of its own.
    notebook.child.kill()?;
    notebook.child.wait()?;
    // (Its kernels notice their parent is gone and stop; the group goes when the test ends.)
    let stopped = eventually(30, "the stop told", || async {
        let context = post_tool_use(&daemon, session_id, "").ok()??;
        context.contains("stopped").then_some(context)
    })
    .await?;
    assert!(
        stopped.contains(&format!(
            "no longer listens on TCP port {} (moved from {asked})",
            server.port
        )),
        "the stopped line of the notebook server: {stopped}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn jupyter_is_reported_as_the_agent_needs_with_the_socket_tables() -> Result<()> {
    jupyter_is_reported_as_the_agent_needs(Observer::Sockets).await
}

#[tokio::test(flavor = "multi_thread")]
async fn jupyter_is_reported_as_the_agent_needs_with_ebpf_and_the_shim() -> Result<()> {
    jupyter_is_reported_as_the_agent_needs(Observer::Ebpf).await
}
