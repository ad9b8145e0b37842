//! Session views end to end: a server moved off a port in one agent session stays reachable, for
//! that session, at the port it asked for. Real daemon, real servers, real clients.

use std::process::Command;

use anyhow::{Context, Result};
use styxy_tests::v1 as pb;
use styxy_tests::{eventually, http_server, notice_port, styxy_bin, Daemon, Spawned};

const NOTICE: &str = "✓ STYXY: Auto-assigned port ";

/// `python3 -m http.server PORT` under `styxy run --instance INSTANCE`.
fn session_http_server(daemon: &Daemon, instance: &str, port: u16) -> Command {
    daemon.shimmed_in(
        instance,
        "python3",
        &[
            "-u",
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ],
    )
}

/// The session's view as `styxy --json ports --instance` prints it.
fn view_of(daemon: &Daemon, instance: &str) -> Result<Vec<serde_json::Value>> {
    let out = daemon.cli(&["--json", "ports", "--instance", instance]);
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(listed["views"].as_array().cloned().unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_moved_server_is_in_its_sessions_view_until_it_stops() -> Result<()> {
    let daemon = Daemon::start().await?;
    let asked = daemon.base + 110;
    let _a = http_server(asked)?;
    let mut watch = daemon
        .client()
        .await?
        .watch(pb::WatchRequest {})
        .await?
        .into_inner();

    let mut b = Spawned::start(&mut session_http_server(&daemon, "session-b", asked))?;
    let notice = b.line_where(20, |l| l.starts_with(NOTICE))?;
    let moved = notice_port(&notice).context("port in the notice")?;
    let view = eventually(10, "session-b's view entry", || async {
        let view = view_of(&daemon, "session-b").ok()?;
        (!view.is_empty()).then_some(view)
    })
    .await?;
    assert_eq!(view.len(), 1, "{view:?}");
    assert_eq!(view[0]["instanceId"], "session-b");
    assert_eq!(view[0]["protocol"], "PROTOCOL_TCP");
    assert_eq!(view[0]["askedPort"], u32::from(asked));
    assert_eq!(view[0]["boundPort"], u32::from(moved));
    assert_eq!(view[0]["pid"], b.child.id());
    assert!(
        view_of(&daemon, "session-a")?.is_empty(),
        "other sessions see nothing"
    );
    let table = String::from_utf8(daemon.cli(&["ports", "--instance", "session-b"]).stdout)?;
    assert!(table.contains(&format!("{asked} → {moved}")), "{table}");

    // Watch carries the move with its session.
    let moved_event = styxy_tests::next_event(&mut watch, |e| {
        e.kind == pb::EventKind::Reassigned as i32 && e.port == u32::from(moved)
    })
    .await?;
    assert_eq!(moved_event.instance_id, "session-b");
    assert_eq!(moved_event.requested_port, u32::from(asked));

    // The moved server stops: its entry goes, and Watch says so (the claim's end).
    drop(b);
    eventually(10, "session-b's view emptied", || async {
        view_of(&daemon, "session-b").ok()?.is_empty().then_some(())
    })
    .await?;
    let ended = styxy_tests::next_event(&mut watch, |e| {
        e.kind == pb::EventKind::LeaseEnded as i32 && e.port == u32::from(moved)
    })
    .await?;
    assert_eq!(
        (ended.instance_id.as_str(), ended.requested_port),
        ("session-b", u32::from(asked))
    );
    Ok(())
}

/// `python3 -m http.server PORT --directory DIR` serving a `whoami.txt` that says `name`.
fn marked_server(
    daemon: &Daemon,
    instance: Option<&str>,
    port: u16,
    name: &str,
    dir: &std::path::Path,
) -> Result<Spawned> {
    let root = dir.join(name);
    std::fs::create_dir_all(&root)?;
    std::fs::write(root.join("whoami.txt"), name)?;
    let mut command = Command::new(styxy_bin());
    command.arg("--socket").arg(&daemon.socket).arg("run");
    if let Some(instance) = instance {
        command.args(["--instance", instance]);
    }
    command
        .args([
            "--",
            "python3",
            "-u",
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(&root);
    Spawned::start(&mut command)
}

/// Runs `program args…` under `styxy run` (in `instance`, when given) and returns its stdout.
fn in_session(
    daemon: &Daemon,
    instance: Option<&str>,
    program: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Result<String> {
    let mut command = Command::new(styxy_bin());
    command.arg("--socket").arg(&daemon.socket).arg("run");
    if let Some(instance) = instance {
        command.args(["--instance", instance]);
    }
    command
        .args(["--", program])
        .args(args)
        .envs(env.iter().copied());
    let out = command.output()?;
    anyhow::ensure!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn curl(daemon: &Daemon, instance: Option<&str>, host: &str, port: u16) -> Result<String> {
    in_session(
        daemon,
        instance,
        "curl",
        &[
            "-sS",
            "--max-time",
            "10",
            &format!("http://{host}:{port}/whoami.txt"),
        ],
        &[],
    )
}

/// A second session's server on a port the first holds moves; inside the second session the asked
/// port reaches it (curl over 127.0.0.1 and localhost, node's fetch), everywhere else the first.
#[tokio::test(flavor = "multi_thread")]
async fn in_a_session_the_asked_port_reaches_the_sessions_own_moved_server() -> Result<()> {
    let daemon = Daemon::start().await?;
    let dir = tempfile::tempdir()?;
    let asked = daemon.base + 120;
    let mut a = marked_server(&daemon, Some("session-a"), asked, "A", dir.path())?;
    styxy_tests::wait_for_listener(asked)?;
    let mut b = marked_server(&daemon, Some("session-b"), asked, "B", dir.path())?;
    let moved = notice_port(&b.line_where(20, |l| l.starts_with(NOTICE))?).context("moved port")?;
    styxy_tests::wait_for_listener(moved)?;
    assert_eq!(
        curl(&daemon, None, "127.0.0.1", moved)?,
        "B",
        "the real port, from anywhere"
    );

    eventually(10, "session-b's view in the table", || async {
        (curl(&daemon, Some("session-b"), "127.0.0.1", asked).ok()? == "B").then_some(())
    })
    .await?;
    assert_eq!(
        curl(&daemon, Some("session-b"), "localhost", asked)?,
        "B",
        "localhost (::1 first, then 127.0.0.1)"
    );
    let fetch = format!(
        "fetch('http://localhost:{asked}/whoami.txt').then(r => r.text()).then(t => console.log(t))"
    );
    assert_eq!(
        in_session(&daemon, Some("session-b"), "node", &["-e", &fetch], &[])?,
        "B",
        "node's fetch"
    );
    assert_eq!(
        curl(&daemon, Some("session-a"), "127.0.0.1", asked)?,
        "A",
        "the other session"
    );
    assert_eq!(curl(&daemon, None, "127.0.0.1", asked)?, "A", "no session");
    assert_eq!(
        in_session(
            &daemon,
            Some("session-b"),
            "curl",
            &["-sS", &format!("http://127.0.0.1:{asked}/whoami.txt")],
            &[("STYXY_VIEW", "off")]
        )?,
        "A",
        "STYXY_VIEW=off"
    );

    // Once B's server stops, its session reaches A's again.
    drop(b);
    eventually(10, "session-b's view ended", || async {
        (curl(&daemon, Some("session-b"), "127.0.0.1", asked).ok()? == "A").then_some(())
    })
    .await?;
    a.child.kill()?;
    Ok(())
}

/// A UDP echo server, moved in session B; prints its port once bound.
const UDP_ECHO: &str = "import socket, sys\n\
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
s.bind(('127.0.0.1', int(sys.argv[1])))\n\
print('bound', s.getsockname()[1], flush=True)\n\
while True:\n    data, peer = s.recvfrom(2048)\n    s.sendto(data, peer)\n";

/// A UDP client: connect+send, then sendto/recvfrom; prints what came back and from which port,
/// and the connected socket's peer port.
const UDP_CLIENT: &str = "import socket, sys\n\
port = int(sys.argv[1])\n\
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
c.settimeout(5)\n\
c.connect(('127.0.0.1', port))\n\
c.send(b'connected')\n\
print(c.recv(2048).decode(), c.getpeername()[1])\n\
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
u.settimeout(5)\n\
u.sendto(b'unconnected', ('127.0.0.1', port))\n\
data, peer = u.recvfrom(2048)\n\
print(data.decode(), peer[1])\n";

#[tokio::test(flavor = "multi_thread")]
async fn a_udp_client_in_the_session_reaches_its_moved_echo_server_and_sees_the_asked_port(
) -> Result<()> {
    let daemon = Daemon::start().await?;
    let asked = daemon.base + 130;
    let holder = std::net::UdpSocket::bind(("127.0.0.1", asked))?;
    let mut echo = Spawned::start(&mut daemon.shimmed_in(
        "session-b",
        "python3",
        &["-u", "-c", UDP_ECHO, &asked.to_string()],
    ))?;
    let line = echo.line_where(20, |l| l.starts_with("bound "))?;
    let moved: u16 = line.trim_start_matches("bound ").trim().parse()?;
    assert_ne!(moved, asked, "moved off the held port");
    let replies = eventually(10, "the echo through the view", || async {
        let out = in_session(
            &daemon,
            Some("session-b"),
            "python3",
            &["-c", UDP_CLIENT, &asked.to_string()],
            &[],
        )
        .ok()?;
        Some(out)
    })
    .await?;
    let lines: Vec<&str> = replies.lines().collect();
    assert_eq!(
        lines,
        vec![format!("connected {asked}"), format!("unconnected {asked}")],
        "both sends reached the moved server, which looks like the asked port"
    );
    drop(holder);
    Ok(())
}

/// A connected socket's peer reads as the asked port; a free explicit port is bound without a
/// call to the daemon and still listed under its session.
#[tokio::test(flavor = "multi_thread")]
async fn getpeername_says_the_asked_port_and_a_free_bind_asks_no_one() -> Result<()> {
    let daemon = Daemon::start().await?;
    let dir = tempfile::tempdir()?;
    let asked = daemon.base + 140;
    let _a = marked_server(&daemon, None, asked, "A", dir.path())?;
    styxy_tests::wait_for_listener(asked)?;
    let mut b = marked_server(&daemon, Some("session-b"), asked, "B", dir.path())?;
    let moved = notice_port(&b.line_where(20, |l| l.starts_with(NOTICE))?).context("moved port")?;
    styxy_tests::wait_for_listener(moved)?;
    let peer = format!(
        "import socket\ns = socket.create_connection(('127.0.0.1', {asked}))\nprint(s.getpeername()[1])\n"
    );
    let seen = eventually(10, "the redirected connection", || async {
        let port = in_session(&daemon, Some("session-b"), "python3", &["-c", &peer], &[]).ok()?;
        (port == asked.to_string()).then_some(port)
    })
    .await?;
    assert_eq!(seen, asked.to_string());

    let calls_before = daemon.status().await?.resolve_bind_calls;
    let free = daemon.base + 150;
    let mut c = marked_server(&daemon, Some("session-c"), free, "C", dir.path())?;
    styxy_tests::wait_for_listener(free)?;
    let listed = eventually(10, "the free bind under its session", || async {
        let out = daemon.cli(&["--json", "ports", "--instance", "session-c"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let holders = v["holders"].as_array()?.clone();
        (!holders.is_empty()).then_some(holders)
    })
    .await?;
    assert_eq!(listed[0]["port"], u32::from(free));
    assert_eq!(listed[0]["pid"], c.child.id());
    assert_eq!(
        daemon.status().await?.resolve_bind_calls,
        calls_before,
        "the table showed the port free: no ResolveBind"
    );
    c.child.kill()?;
    Ok(())
}

/// A lease is in the table: the fast path moves off another's lease like off any held port.
#[tokio::test(flavor = "multi_thread")]
async fn a_leased_port_is_never_bound_by_the_fast_path() -> Result<()> {
    let daemon = Daemon::start().await?;
    let dir = tempfile::tempdir()?;
    let leased = daemon.base + 160;
    // Leased for another process (a lease tied to no process is its user's own to bind).
    let mut owner = Command::new("sleep").arg("600").spawn()?;
    let owner_pid = owner.id().to_string();
    let port = leased.to_string();
    let out = daemon.cli(&["allocate", "api", "--port", &port, "--pid", &owner_pid]);
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut server = marked_server(&daemon, Some("session-d"), leased, "D", dir.path())?;
    let notice = server.line_where(20, |l| l.starts_with(NOTICE));
    owner.kill()?;
    owner.wait()?;
    let moved = notice_port(&notice?).context("moved port")?;
    assert_ne!(moved, leased);
    Ok(())
}

/// Two sessions starting a server on one free port at once: distinct ports, and each session's
/// clients reach their own server at the asked port.
#[tokio::test(flavor = "multi_thread")]
async fn two_sessions_racing_for_one_free_port_each_reach_their_own() -> Result<()> {
    let daemon = Daemon::start().await?;
    let dir = tempfile::tempdir()?;
    let asked = daemon.base + 170;
    let mut x = marked_server(&daemon, Some("session-x"), asked, "X", dir.path())?;
    let mut y = marked_server(&daemon, Some("session-y"), asked, "Y", dir.path())?;
    // The port each serves on, from http.server's own line (its notice, on stderr, may come
    // before or after it).
    let port_of = |s: &mut Spawned| -> Result<u16> {
        let line = s.line_where(20, |l| l.starts_with("Serving HTTP on 127.0.0.1 port "))?;
        let rest = line.trim_start_matches("Serving HTTP on 127.0.0.1 port ");
        Ok(rest.split_whitespace().next().context("a port")?.parse()?)
    };
    let (px, py) = (port_of(&mut x)?, port_of(&mut y)?);
    assert_ne!(px, py, "distinct ports");
    assert!(
        px == asked || py == asked,
        "one of them kept the asked port: {px} {py}"
    );
    for (instance, name) in [("session-x", "X"), ("session-y", "Y")] {
        eventually(10, "each session reaches its own", || async {
            (curl(&daemon, Some(instance), "127.0.0.1", asked).ok()? == name).then_some(())
        })
        .await?;
    }
    Ok(())
}

/// The race above, made certain: a server of session Y has bound the free port (SO_REUSEADDR)
/// but not yet listened when session X's server binds and listens there, so Y's `listen()` is
/// refused. Y still starts — on a moved port, with its descriptor and options — and each
/// session's clients reach their own.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_whose_listen_lost_the_port_moves_instead_of_failing() -> Result<()> {
    let daemon = Daemon::start().await?;
    let dir = tempfile::tempdir()?;
    let asked = daemon.base + 175;
    let port = asked.to_string();
    let mut y = Spawned::start(&mut daemon.shimmed_in(
        "session-y",
        "python3",
        &["-u", "-c", styxy_tests::BIND_THEN_LISTEN, &port, "Y"],
    ))?;
    y.line_where(20, |l| l == "bound")?;
    let mut x = marked_server(&daemon, Some("session-x"), asked, "X", dir.path())?;
    let serving = x.line_where(20, |l| l.starts_with("Serving HTTP on 127.0.0.1 port "))?;
    assert!(serving.contains(&format!(" port {asked} ")), "{serving}");
    y.send_line("")?;
    let moved = styxy_tests::listening_port(&y.line_where(20, |l| l.starts_with("listening"))?)?;
    assert_ne!(moved, asked);
    let notice = y.has_line(10, |l| l.starts_with(NOTICE))?;
    assert_eq!(notice_port(&notice), Some(moved), "{notice}");
    for (instance, name) in [("session-x", "X"), ("session-y", "Y")] {
        eventually(10, "each session reaches its own", || async {
            (curl(&daemon, Some(instance), "127.0.0.1", asked).ok()? == name).then_some(())
        })
        .await?;
    }
    Ok(())
}

/// The daemon killed with `kill -9`: binds and connects go on as without the shim.
#[tokio::test(flavor = "multi_thread")]
async fn with_the_daemon_killed_binds_and_connects_are_native() -> Result<()> {
    let mut daemon = Daemon::start().await?;
    let dir = tempfile::tempdir()?;
    let asked = daemon.base + 180;
    let _a = marked_server(&daemon, None, asked, "A", dir.path())?;
    styxy_tests::wait_for_listener(asked)?;
    let mut b = marked_server(&daemon, Some("session-b"), asked, "B", dir.path())?;
    notice_port(&b.line_where(20, |l| l.starts_with(NOTICE))?).context("moved port")?;
    eventually(10, "the view in force", || async {
        (curl(&daemon, Some("session-b"), "127.0.0.1", asked).ok()? == "B").then_some(())
    })
    .await?;
    daemon.kill9()?;
    assert_eq!(
        curl(&daemon, Some("session-b"), "127.0.0.1", asked)?,
        "A",
        "no daemon, no redirect"
    );
    let free = daemon.base + 181;
    let mut c = marked_server(&daemon, Some("session-b"), free, "C", dir.path())?;
    styxy_tests::wait_for_listener(free)?;
    let mut held = marked_server(&daemon, Some("session-b"), asked, "E", dir.path())?;
    held.line_where(20, |l| l.contains("Address already in use"))
        .context("a held port fails natively")?;
    c.child.kill()?;
    Ok(())
}

/// Everything as an ordinary user (uid 65534): the user's own daemon, its table, the servers and
/// the session's client. Needs root to switch user; says SKIP otherwise (and fails in CI).
#[tokio::test(flavor = "multi_thread")]
async fn session_views_work_for_an_ordinary_user() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if !styxy_tests::can_act_as_another_user() {
        return Ok(());
    }
    const NOBODY: u32 = 65534;
    // Debian's python: pyenv's shims live under /root, which other users cannot enter.
    let python = "/usr/bin/python3";
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))?;
    let socket = dir.path().join("styxy.sock");
    let as_nobody = |program: &std::path::Path| {
        let mut command = Command::new(program);
        command
            .uid(NOBODY)
            .gid(NOBODY)
            .env("HOME", dir.path())
            .env_remove("XDG_RUNTIME_DIR");
        command
    };
    let mut daemon = Spawned::start(
        as_nobody(&styxy_bin())
            .arg("daemon")
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args([
                "--listen",
                "none",
                "--observer",
                "sockets",
                "--scan-interval-ms",
                "100",
            ]),
    )?;
    daemon.line_where(20, |l| l.contains("listening on the Unix socket"))?;
    let asked = styxy_tests::port_block() + 10;
    let serve = |name: &str, instance: Option<&str>| -> Result<Spawned> {
        let root = dir.path().join(name);
        std::fs::create_dir_all(&root)?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))?;
        std::fs::write(root.join("whoami.txt"), name)?;
        let mut command = as_nobody(&styxy_bin());
        command.arg("--socket").arg(&socket).arg("run");
        if let Some(instance) = instance {
            command.args(["--instance", instance]);
        }
        command
            .args([
                "--",
                python,
                "-u",
                "-m",
                "http.server",
                &asked.to_string(),
                "--bind",
                "127.0.0.1",
                "--directory",
            ])
            .arg(&root);
        Spawned::start(&mut command)
    };
    let curl = |instance: &str| -> Result<String> {
        let out = as_nobody(&styxy_bin())
            .arg("--socket")
            .arg(&socket)
            .args([
                "run",
                "--instance",
                instance,
                "--",
                "curl",
                "-sS",
                "--max-time",
                "10",
            ])
            .arg(format!("http://127.0.0.1:{asked}/whoami.txt"))
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let _a = serve("A", None)?;
    styxy_tests::wait_for_listener(asked)?;
    let mut b = serve("B", Some("session-b"))?;
    b.line_where(20, |l| l.starts_with(NOTICE))?;
    eventually(
        10,
        "the ordinary user's session reaching its own server",
        || async { (curl("session-b").ok()? == "B").then_some(()) },
    )
    .await?;
    assert_eq!(curl("session-a")?, "A");
    Ok(())
}

/// A destination that is not loopback is never redirected: the session reaches the first server
/// at the machine's own non-loopback address. SKIP when the machine has no such address.
#[tokio::test(flavor = "multi_thread")]
async fn non_loopback_destinations_are_never_redirected() -> Result<()> {
    // The address this machine would use to reach the outside, if it has one (nothing is sent).
    let probe = std::net::UdpSocket::bind("0.0.0.0:0")?;
    let local = probe
        .connect("192.0.2.200:9")
        .or_else(|_| probe.connect("10.255.255.1:9"))
        .and_then(|()| probe.local_addr())
        .map(|a| a.ip())
        .ok()
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified());
    let Some(local) = local else {
        eprintln!("SKIP: this machine has no non-loopback address");
        return Ok(());
    };
    let daemon = Daemon::start().await?;
    let dir = tempfile::tempdir()?;
    let asked = daemon.base + 190;
    let root = dir.path().join("A");
    std::fs::create_dir_all(&root)?;
    std::fs::write(root.join("whoami.txt"), "A")?;
    let mut a = Command::new("python3");
    a.args([
        "-m",
        "http.server",
        &asked.to_string(),
        "--bind",
        "0.0.0.0",
        "--directory",
    ])
    .arg(&root)
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    let mut a = a.spawn()?;
    styxy_tests::wait_for_listener(asked)?;
    let mut b = marked_server(&daemon, Some("session-b"), asked, "B", dir.path())?;
    notice_port(&b.line_where(20, |l| l.starts_with(NOTICE))?).context("moved port")?;
    eventually(10, "the view in force on loopback", || async {
        (curl(&daemon, Some("session-b"), "127.0.0.1", asked).ok()? == "B").then_some(())
    })
    .await?;
    let host = local.to_string();
    assert_eq!(
        curl(&daemon, Some("session-b"), &host, asked)?,
        "A",
        "{host} is not loopback"
    );
    a.kill()?;
    a.wait()?;
    Ok(())
}

/// Another user naming the same session cannot redirect its traffic: views are per user. uid
/// 65534 starts a server "in" root's session-b on a held port (moved); root's session-b still
/// reaches the first server at the asked port, and the other user's own session reaches its own.
#[tokio::test(flavor = "multi_thread")]
async fn another_user_naming_the_same_session_cannot_redirect_its_traffic() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if !styxy_tests::can_act_as_another_user() {
        return Ok(());
    }
    let daemon = Daemon::start().await?;
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let asked = daemon.base + 195;
    let _a = marked_server(&daemon, None, asked, "A", dir.path())?;
    styxy_tests::wait_for_listener(asked)?;
    let root = dir.path().join("X");
    std::fs::create_dir_all(&root)?;
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))?;
    std::fs::write(root.join("whoami.txt"), "X")?;
    let mut intruder = daemon.shimmed_in(
        "session-b",
        "/usr/bin/python3",
        &[
            "-u",
            "-m",
            "http.server",
            &asked.to_string(),
            "--bind",
            "127.0.0.1",
            "--directory",
        ],
    );
    intruder.arg(&root).uid(65534).gid(65534);
    let mut x = Spawned::start(&mut intruder)?;
    let moved = notice_port(&x.line_where(20, |l| l.starts_with(NOTICE))?).context("moved port")?;
    styxy_tests::wait_for_listener(moved)?;
    // The other user's own session reaches its server through its view...
    let curl_as_nobody = || -> Result<String> {
        let out = daemon
            .shimmed_in("session-b", "curl", &["-sS", "--max-time", "10"])
            .arg(format!("http://127.0.0.1:{asked}/whoami.txt"))
            .uid(65534)
            .gid(65534)
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    eventually(10, "the other user's own view", || async {
        (curl_as_nobody().ok()? == "X").then_some(())
    })
    .await?;
    // ...but root's session-b is untouched by it.
    assert_eq!(curl(&daemon, Some("session-b"), "127.0.0.1", asked)?, "A");
    Ok(())
}

/// With the shim alone (the socket tables, no kernel programs): while a session's moved server is
/// between two lives, the port it was moved to is held for the port it asked. The session's other
/// server asking that port itself moves off it, and the session's clients of the asked port find
/// nothing rather than reach that other server.
#[tokio::test(flavor = "multi_thread")]
async fn a_held_port_stands_for_its_asked_port_not_for_itself() -> Result<()> {
    let daemon = Daemon::start().await?;
    let dir = tempfile::tempdir()?;
    let asked = daemon.base + 125;
    let _outside = marked_server(&daemon, None, asked, "outside", dir.path())?;
    styxy_tests::wait_for_listener(asked)?;
    // The session lives on (its agent), whatever its servers do.
    let mut agent = Spawned::start(&mut daemon.shimmed_in("session-h", "sleep", &["600"]))?;
    agent.rest(0);
    let mut first = marked_server(&daemon, Some("session-h"), asked, "first", dir.path())?;
    let held = notice_port(&first.line_where(20, |l| l.starts_with(NOTICE))?).context("moved")?;
    styxy_tests::wait_for_listener(held)?;
    drop(first);
    // Held: the view entry stays, with no process.
    eventually(10, "the first server's port held", || async {
        let view = view_of(&daemon, "session-h").ok()?;
        (view.len() == 1 && view[0]["pid"].as_u64().unwrap_or(0) == 0).then_some(())
    })
    .await
    .with_context(|| format!("the view: {:?}", view_of(&daemon, "session-h")))?;
    let mut other = marked_server(&daemon, Some("session-h"), held, "other", dir.path())?;
    let moved = notice_port(&other.line_where(20, |l| l.starts_with(NOTICE))?).context("moved")?;
    assert_ne!(
        moved, held,
        "the session's server asking its held port moves off it"
    );
    styxy_tests::wait_for_listener(moved)?;
    assert_eq!(
        curl(&daemon, Some("session-h"), "127.0.0.1", held)?,
        "other"
    );
    assert!(
        curl(&daemon, Some("session-h"), "127.0.0.1", asked).is_err(),
        "the asked port's clients find nothing between its server's two lives"
    );
    other.child.kill()?;
    agent.child.kill()?;
    Ok(())
}
