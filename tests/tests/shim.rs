//! The bind() shim end to end: real servers (python, node, a Rust probe) under `styxy run` or
//! `LD_PRELOAD`, a real daemon, real sockets.

use std::collections::BTreeSet;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use styxy_tests::{
    helper_bin, http_get, http_server, notice_port, port_holder, shim_library, wait_for_listener,
    Daemon, Spawned,
};

const NOTICE: &str = "✓ STYXY: Auto-assigned port ";

/// `bound REQUESTED ACTUAL` lines of the bind probe, as (requested, actual).
fn bound(line: &str) -> Option<(u16, u16)> {
    let mut words = line.strip_prefix("bound ")?.split_whitespace();
    Some((words.next()?.parse().ok()?, words.next()?.parse().ok()?))
}

fn probe(daemon: &Daemon, args: &[&str]) -> Command {
    let mut command = Command::new(helper_bin("bind-probe"));
    command
        .args(args)
        .env("LD_PRELOAD", shim_library())
        .env("STYXY_SOCKET", &daemon.socket)
        .env_remove("STYXY_NOTIFY")
        .env_remove("STYXY_DISABLE");
    command
}

#[tokio::test(flavor = "multi_thread")]
async fn a_python_server_on_a_held_port_starts_on_a_free_one_and_says_so() -> Result<()> {
    let daemon = Daemon::start().await?;
    let asked = daemon.base + 100; // in the test daemon's api range
    let holder = http_server(asked)?;
    let mut server = Spawned::start(daemon.shimmed_http_server(asked).env_remove("STYXY_NOTIFY"))?;
    let notice = server.line_where(20, |l| l.starts_with(NOTICE))?;
    let moved = notice_port(&notice).context("port in the notice")?;
    assert!(
        moved != asked && (daemon.base + 100..=daemon.base + 199).contains(&moved),
        "moved within the api range: {notice}"
    );
    // The holder by its command (not a service type): the agent can tell whose it is.
    assert!(
        notice.ends_with(&format!(
            "({asked} in use by `python3 -m http.server {asked} --bind 127.0.0.1`, pid {})",
            holder.pid()
        )),
        "{notice}"
    );
    server.has_line(20, |l| l.contains(&format!("port {moved}")))?;
    wait_for_listener(moved)?;
    assert!(http_get(moved)?.contains("200"), "the moved server serves");
    assert!(http_get(asked)?.contains("200"), "the holder is untouched");

    let audit = daemon.audit().await?;
    assert!(
        audit.iter().any(|e| e.requested_port == u32::from(asked)
            && e.assigned_port == u32::from(moved)
            && e.pid == server.child.id()
            && e.holder_pid == holder.pid()),
        "audit has the move: {audit:?}"
    );
    Ok(())
}

const NODE_SERVERS: &str = r#"
const http = require('http');
const port = Number(process.argv[1]);
const mode = process.argv[2];
const serve = (name) => http.createServer((q, r) => r.end(name));
if (mode === 'dual') {
  const s = serve('dual').listen(port, '::', () => console.log(`listening ${s.address().port}`));
} else {
  const v4 = serve('v4').listen({ port, host: '0.0.0.0' }, () => {
    const v6 = serve('v6').listen({ port, host: '::', ipv6Only: true }, () =>
      console.log(`listening ${v4.address().port} ${v6.address().port}`));
  });
}
"#;

#[tokio::test(flavor = "multi_thread")]
async fn node_servers_on_ipv6_and_on_both_families_move_together() -> Result<()> {
    let daemon = Daemon::start().await?;
    let asked = daemon.base + 110;
    let _holder = http_server(asked)?;
    let asked = asked.to_string();

    // One dual-stack server on `::`.
    let mut dual =
        Spawned::start(&mut daemon.shimmed("node", &["-e", NODE_SERVERS, &asked, "dual"]))?;
    let listening = dual.line_where(20, |l| l.starts_with("listening "))?;
    let port: u16 = listening["listening ".len()..].parse()?;
    assert_ne!(port.to_string(), asked);
    assert!(http_get(port)?.contains("200"));
    let mut v6 =
        std::net::TcpStream::connect(("::1", port)).context("the move holds on ::1 too")?;
    std::io::Write::write_all(&mut v6, b"GET / HTTP/1.0\r\n\r\n")?;

    // One process with an IPv4 and an IPv6-only server on the same asked port: one new port for both.
    let mut pair =
        Spawned::start(&mut daemon.shimmed("node", &["-e", NODE_SERVERS, &asked, "pair"]))?;
    let listening = pair.line_where(20, |l| l.starts_with("listening "))?;
    let ports: Vec<&str> = listening.split_whitespace().skip(1).collect();
    ensure!(ports.len() == 2, "{listening}");
    assert_eq!(
        ports[0], ports[1],
        "IPv4 and IPv6 on the same new port: {listening}"
    );
    assert_ne!(ports[0], asked);
    assert_ne!(ports[0], port.to_string(), "not the other node's port");
    let notices = pair.seen.iter().filter(|l| l.starts_with(NOTICE)).count();
    assert_eq!(notices, 1, "one line for one move: {:?}", pair.seen);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_servers_started_at_once_on_one_held_port_all_get_their_own() -> Result<()> {
    let daemon = Daemon::start().await?;
    let asked = daemon.base + 120;
    let _holder = http_server(asked)?;
    let mut servers = Vec::new();
    for _ in 0..20 {
        // What is tested is twenty distinct ports, not the deadline: twenty Pythons starting at
        // once on two cores (beside the other tests) can keep a 50 ms answer waiting.
        servers.push(Spawned::start(
            daemon
                .shimmed_http_server(asked)
                .env("STYXY_TIMEOUT_MS", "2000"),
        )?);
    }
    let mut ports = BTreeSet::new();
    for server in &mut servers {
        let notice = server.line_where(60, |l| l.starts_with(NOTICE))?;
        let port = notice_port(&notice).context("port in notice")?;
        server.has_line(30, |l| l.starts_with("Serving HTTP"))?;
        ports.insert(port);
    }
    assert_eq!(ports.len(), 20, "twenty distinct ports: {ports:?}");
    for &port in &ports {
        assert!((daemon.base + 100..=daemon.base + 199).contains(&port));
        assert!(http_get(port)?.contains("200"), "port {port} serves");
    }
    for server in &mut servers {
        assert!(server.child.try_wait()?.is_none(), "none failed");
    }
    Ok(())
}

/// What a python bind of `port` prints, with or without the shim (and its environment).
fn python_bind(port: u16, shim_env: Option<&[(&str, &str)]>) -> Result<String> {
    let script = format!(
        "import socket\ns = socket.socket()\ntry:\n    s.bind(('127.0.0.1', {port}))\n    \
         print('bound', s.getsockname()[1])\nexcept OSError as e:\n    print('failed', e.errno, e.strerror)\n"
    );
    let mut command = Command::new("python3");
    command.args(["-c", &script]);
    if let Some(env) = shim_env {
        command
            .env("LD_PRELOAD", shim_library())
            .envs(env.iter().copied());
    }
    let out = command.output()?;
    ensure!(out.status.success(), "python failed: {out:?}");
    Ok(String::from_utf8(out.stdout)?.trim().to_string() + &String::from_utf8(out.stderr)?)
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_daemon_down_the_shim_changes_nothing() -> Result<()> {
    // A port block of our own, with no daemon serving the socket.
    let base = styxy_tests::port_block();
    let held = base + 1;
    let _holder = http_server(held)?;
    let sockets = tempfile::tempdir()?;
    let missing = sockets.path().join("no-daemon.sock");
    let stale = sockets.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale)?); // a socket file nobody listens on
    for socket in [&missing, &stale] {
        let env = [("STYXY_SOCKET", socket.to_str().context("utf-8 path")?)];
        for port in [base + 2, held] {
            let native = python_bind(port, None)?;
            let shimmed = python_bind(port, Some(&env))?;
            assert_eq!(shimmed, native, "port {port}, socket {}", socket.display());
        }
    }
    assert!(
        python_bind(held, None)?.starts_with("failed 98"),
        "held really is held"
    );
    let _ = std::fs::remove_file(&stale);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn reuseport_sockets_are_never_moved() -> Result<()> {
    let daemon = Daemon::start().await?;
    let port = daemon.base + 130;
    // A first process holds the port with SO_REUSEPORT; a second joins it, also with SO_REUSEPORT.
    let mut first = Spawned::start(&mut probe(&daemon, &["reuseport", &port.to_string()]))?;
    let mut second = Spawned::start(&mut probe(&daemon, &["reuseport", &port.to_string()]))?;
    for probe in [&mut first, &mut second] {
        for _ in 0..2 {
            let line =
                probe.line_where(20, |l| l.starts_with("bound ") || l.starts_with("failed "))?;
            assert_eq!(bound(&line), Some((port, port)), "{line}");
        }
    }
    assert!(!second.seen.iter().any(|l| l.starts_with(NOTICE)));
    Ok(())
}

/// Two processes listening on one UDP port with SO_REUSEADDR, as mDNS and SSDP listeners do.
#[tokio::test(flavor = "multi_thread")]
async fn udp_listeners_sharing_a_port_with_reuseaddr_are_never_moved() -> Result<()> {
    let daemon = Daemon::start().await?;
    let port = daemon.base + 135;
    let script = format!(
        "import socket, sys\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('0.0.0.0', {port}))\n\
         print('bound', {port}, s.getsockname()[1], flush=True)\nsys.stdin.read()\n"
    );
    let mut listeners = Vec::new();
    for _ in 0..2 {
        let mut listener = Spawned::start(
            daemon
                .shimmed("python3", &["-c", &script])
                .env_remove("STYXY_NOTIFY"),
        )?;
        let line = listener.line_where(20, |l| l.starts_with("bound ") || l.contains("Error"))?;
        assert_eq!(bound(&line), Some((port, port)), "{line}");
        listeners.push(listener);
    }
    assert!(!listeners[1].seen.iter().any(|l| l.starts_with(NOTICE)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_child_after_fork_and_many_threads_at_once_are_moved_correctly() -> Result<()> {
    let daemon = Daemon::start().await?;
    let held: Vec<u16> = (0..10).map(|i| daemon.base + 140 + i).collect();
    let _holder = port_holder(&held)?;
    let range = daemon.base + 100..=daemon.base + 199;

    // Parent binds (and so starts its client thread), forks; the child binds another held port.
    let mut forked = Spawned::start(
        probe(
            &daemon,
            &["fork", &held[0].to_string(), &held[1].to_string(), "--exit"],
        )
        .env("STYXY_TIMEOUT_MS", "2000"),
    )?;
    let lines = forked.rest(30);
    let moves: Vec<(u16, u16)> = lines.iter().filter_map(|l| bound(l)).collect();
    // (A rare failure here in CI, a parent's bind refused with no notice, is not understood yet:
    // the daemon's audit and log say what it answered.)
    if moves.len() != 2 {
        let audit = daemon.audit().await;
        panic!(
            "parent and child both bound: {lines:?}\naudit: {audit:#?}\nlog: {}",
            daemon.log()
        );
    }
    for (asked, got) in &moves {
        assert!(asked != got && range.contains(got), "{lines:?}");
    }
    assert_ne!(moves[0].1, moves[1].1, "{lines:?}");

    // Eight threads bind eight held ports at the same moment.
    let ports: Vec<String> = held[2..].iter().map(u16::to_string).collect();
    let mut args = vec!["threads"];
    args.extend(ports.iter().map(String::as_str));
    let mut threads = Spawned::start(probe(&daemon, &args).env("STYXY_TIMEOUT_MS", "2000"))?;
    let mut got = BTreeSet::new();
    for _ in 0..8 {
        let line =
            threads.line_where(30, |l| l.starts_with("bound ") || l.starts_with("failed "))?;
        let (asked, port) = bound(&line).with_context(|| format!("a thread failed: {line}"))?;
        assert!(asked != port && range.contains(&port), "{line}");
        got.insert(port);
    }
    assert_eq!(got.len(), 8, "eight distinct ports: {got:?}");
    for port in got {
        wait_for_listener(port)?;
    }
    Ok(())
}

/// Fifty threads of one process bind fifty ports at once, half of them held: the moved ones land
/// on the free ones their siblings asked for, and those siblings move on instead of failing.
#[tokio::test(flavor = "multi_thread")]
async fn sibling_threads_moved_onto_each_others_ports_all_bind() -> Result<()> {
    let daemon = Daemon::start().await?;
    let held: Vec<u16> = (0..25).map(|i| daemon.base + 100 + i).collect();
    let _holder = port_holder(&held)?;
    let ports: Vec<String> = (0..50)
        .map(|i| (daemon.base + 100 + i).to_string())
        .collect();
    let mut args = vec!["threads"];
    args.extend(ports.iter().map(String::as_str));
    args.push("--exit");
    for round in 0..4 {
        // The last round's claims end with its process (the sweep runs once a second): the
        // range has room for one process's fifty, not two.
        styxy_tests::eventually(10, "the last round's claims to end", || async {
            (daemon.status().await.ok()?.leases == 0).then_some(())
        })
        .await?;
        // What is tested is the collision, not the deadline: a generous one, so a loaded machine
        // (the other tests run alongside) does not turn slow answers into failed binds.
        let mut threads = Spawned::start(probe(&daemon, &args).env("STYXY_TIMEOUT_MS", "2000"))?;
        let lines = threads.rest(30);
        let results: Vec<&String> = lines
            .iter()
            .filter(|l| l.starts_with("bound ") || l.starts_with("failed "))
            .collect();
        assert_eq!(results.len(), 50, "round {round}: {lines:?}");
        let failed: Vec<&&String> = results
            .iter()
            .filter(|l| l.starts_with("failed "))
            .collect();
        assert!(
            failed.is_empty(),
            "round {round}: {failed:?}\n{}",
            daemon.log()
        );
        let distinct: BTreeSet<u16> = results
            .iter()
            .filter_map(|l| bound(l))
            .map(|(_, p)| p)
            .collect();
        assert_eq!(distinct.len(), 50, "round {round}: fifty distinct ports");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tokio_host_binding_inside_its_runtime_is_moved() -> Result<()> {
    let daemon = Daemon::start().await?;
    let asked = daemon.base + 160;
    let _holder = port_holder(&[asked])?;
    let mut host = Spawned::start(&mut probe(
        &daemon,
        &["tokio", &asked.to_string(), "--exit"],
    ))?;
    let line = host.line_where(20, |l| l.starts_with("bound ") || l.starts_with("failed "))?;
    let (_, port) = bound(&line).with_context(|| format!("bind failed: {line}"))?;
    assert_ne!(port, asked, "{:?}", host.rest(5));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_grpc_client_loads_only_when_a_bind_needs_it() -> Result<()> {
    let daemon = Daemon::start().await?;
    let mut probe = Spawned::start(&mut probe(&daemon, &["loaded", "--exit"]))?;
    let line = probe.line_where(20, |l| l.starts_with("preload "))?;
    assert_eq!(line, "preload true client false");
    Ok(())
}

/// What every process of an agent session pays for the shim: a process that never binds (`cat`,
/// which itself needs only libc) maps the shim and nothing else of ours — no client library, no
/// libgcc_s or other runtime the shim would drag in.
#[test]
fn a_process_that_never_binds_loads_the_shim_and_nothing_more() -> Result<()> {
    let native = mapped_libraries(Command::new("cat").arg("/proc/self/maps"))?;
    let shimmed = mapped_libraries(
        Command::new("cat")
            .arg("/proc/self/maps")
            .env("LD_PRELOAD", shim_library()),
    )?;
    let added: Vec<&String> = shimmed.difference(&native).collect();
    assert_eq!(
        added,
        ["libstyxy_preload.so"],
        "loading the shim must add only itself (native: {native:?})"
    );
    Ok(())
}

/// File names of the shared objects a command maps, from the `/proc/self/maps` it prints.
fn mapped_libraries(command: &mut Command) -> Result<BTreeSet<String>> {
    let out = command.output().context("running cat")?;
    ensure!(out.status.success(), "cat failed: {out:?}");
    Ok(String::from_utf8(out.stdout)?
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .filter_map(|path| path.rsplit('/').next())
        .filter(|name| name.contains(".so"))
        .map(str::to_string)
        .collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn styxy_disable_and_port_zero_pass_straight_through() -> Result<()> {
    let daemon = Daemon::start().await?;
    let held = daemon.base + 170;
    let _holder = port_holder(&[held])?;
    let socket = daemon.socket.to_str().context("utf-8 path")?;
    let disabled = python_bind(
        held,
        Some(&[("STYXY_SOCKET", socket), ("STYXY_DISABLE", "1")]),
    )?;
    assert!(disabled.starts_with("failed 98"), "{disabled}");
    let zero = python_bind(0, Some(&[("STYXY_SOCKET", socket)]))?;
    assert!(zero.starts_with("bound "), "{zero}");
    let quiet = python_bind(
        held,
        Some(&[("STYXY_SOCKET", socket), ("STYXY_NOTIFY", "off")]),
    )?;
    assert!(
        quiet.starts_with("bound ") && !quiet.contains("STYXY"),
        "{quiet}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn ports_name_the_agent_session_that_claimed_them() -> Result<()> {
    let daemon = Daemon::start().await?;
    let asked = daemon.base + 190;
    let _holder = http_server(asked)?;
    let mut command = daemon.shimmed_in(
        "agent-7",
        "python3",
        &[
            "-u",
            "-m",
            "http.server",
            &asked.to_string(),
            "--bind",
            "127.0.0.1",
        ],
    );
    let mut server = Spawned::start(&mut command)?;
    let notice = server.line_where(20, |l| l.starts_with(NOTICE))?;
    let moved = notice_port(&notice).context("port")?;
    let pid = server.child.id();
    let mine = styxy_tests::eventually(10, "the moved server in `styxy ports`", || async {
        let out = daemon.cli(&["--json", "ports", "--instance", "agent-7"]);
        let listed: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let holders = listed["holders"].as_array()?.clone();
        (!holders.is_empty()).then_some(holders)
    })
    .await?;
    assert_eq!(mine.len(), 1, "only this session's server: {mine:?}");
    assert_eq!(mine[0]["port"], u32::from(moved));
    assert_eq!(mine[0]["pid"], pid);
    assert_eq!(mine[0]["instanceId"], "agent-7");
    // The session is named after its directory (the test's working directory here).
    let name = mine[0]["sessionName"].as_str().context("a session name")?;
    assert!(!name.is_empty() && name != "agent-7", "{mine:?}");
    // The holder of the asked port belongs to no session; the table says so, and shows the
    // moved server's session by its name.
    let table = String::from_utf8(daemon.cli(&["ports"]).stdout)?;
    let row = table
        .lines()
        .find(|l| l.starts_with(&moved.to_string()))
        .context("a row for the moved port")?;
    assert!(row.contains(&format!(" {name} ")), "{table}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_successful_bind_leaves_errno_as_the_host_had_it() -> Result<()> {
    let daemon = Daemon::start().await?;
    let held = daemon.base + 195;
    let _holder = port_holder(&[held])?;
    let mut moved = Spawned::start(&mut probe(&daemon, &["errno", &held.to_string(), "--exit"]))?;
    let line = moved.line_where(20, |l| l.starts_with("rc "))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words[1], "0", "the bind succeeded: {line}");
    assert_eq!(
        words[3],
        libc::EAGAIN.to_string(),
        "errno untouched: {line}"
    );
    assert_ne!(words[5], held.to_string(), "and it was moved: {line}");
    Ok(())
}

/// A daemon that accepts connections and never answers: binds still finish, as asked.
#[tokio::test(flavor = "multi_thread")]
async fn a_process_keeps_being_moved_after_the_daemon_restarts() -> Result<()> {
    let mut daemon = Daemon::start().await?;
    let held = [daemon.base + 170, daemon.base + 171];
    let _holder = port_holder(&held)?;
    let range = daemon.base + 100..=daemon.base + 199;
    let mut probe = Spawned::start(&mut probe(&daemon, &["stdin"]))?;

    probe.send_line(&held[0].to_string())?;
    let line = probe.line_where(30, |l| l.starts_with("bound ") || l.starts_with("failed "))?;
    let (_, first) = bound(&line).with_context(|| format!("first bind failed: {line}"))?;
    assert!(first != held[0] && range.contains(&first), "{line}");

    // The shim's pooled connection now leads to a daemon that is gone; the next bind must find
    // the new one, not fail open.
    daemon.kill9_and_restart().await?;
    probe.send_line(&held[1].to_string())?;
    let line = probe.line_where(30, |l| l.starts_with("bound ") || l.starts_with("failed "))?;
    let (_, second) = bound(&line).with_context(|| format!("second bind failed: {line}"))?;
    assert!(
        second != held[1] && range.contains(&second) && second != first,
        "moved by the restarted daemon: {line}"
    );
    Ok(())
}

/// A process whose IPv4 server was moved binds its IPv6 server of the same port on the same new
/// port even while the daemon cannot answer: stalled (SIGSTOP), then gone. The holder listens on
/// 127.0.0.1 only, so `[::1]:asked` is free and, without the shim's memory, the IPv6 server would
/// stay there, apart from its IPv4 twin.
#[tokio::test(flavor = "multi_thread")]
async fn the_other_family_follows_a_move_while_the_daemon_cannot_answer() -> Result<()> {
    let mut daemon = Daemon::start().await?;
    let held = [daemon.base + 172, daemon.base + 173];
    let _holder = port_holder(&held)?;
    let mut probe = Spawned::start(probe(&daemon, &["stdin"]).env("STYXY_TIMEOUT_MS", "300"))?;
    let mut bind = |line: String| -> Result<(u16, u16)> {
        probe.send_line(&line)?;
        let reply =
            probe.line_where(30, |l| l.starts_with("bound ") || l.starts_with("failed "))?;
        bound(&reply).with_context(|| format!("{line}: {reply}"))
    };
    let (_, first) = bind(format!("127.0.0.1 {}", held[0]))?;
    let (_, second) = bind(format!("127.0.0.1 {}", held[1]))?;
    assert!(first != held[0] && second != held[1] && first != second);

    daemon.signal(libc::SIGSTOP)?;
    let stalled = bind(format!("::1 {}", held[0]));
    daemon.signal(libc::SIGCONT)?;
    assert_eq!(
        stalled?,
        (held[0], first),
        "stalled daemon: IPv6 follows IPv4"
    );

    daemon.kill9()?;
    let (_, gone) = bind(format!("::1 {}", held[1]))?;
    assert_eq!(gone, second, "no daemon: IPv6 follows IPv4");
    // A port this process never moved still binds as asked (fail-open).
    let free = daemon.base + 190;
    assert!(![first, second].contains(&free));
    assert_eq!(bind(format!("::1 {free}"))?, (free, free));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_daemon_never_hangs_a_bind() -> Result<()> {
    let dir_guard = tempfile::tempdir()?;
    let dir = dir_guard.path().to_path_buf();
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("hung.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket)?;
    // Accept and hold every connection, reading nothing.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    let base = styxy_tests::port_block();
    let held = base + 1;
    let _holder = port_holder(&[held])?;
    let env = [("STYXY_SOCKET", socket.to_str().context("utf-8 path")?)];
    let started = std::time::Instant::now();
    // A free port binds as asked; a held one fails as it would without the shim.
    assert!(python_bind(base + 2, Some(&env))?.starts_with("bound "));
    assert!(python_bind(held, Some(&env))?.starts_with("failed 98"));
    // Generous: the point is that nothing waits forever (deadline 50 ms, second chance 1 s).
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    Ok(())
}

/// The shim's own HTTP/2 client against the real daemon: an answer in several DATA frames, an
/// error status (trailers only), an unknown method, and the connection staying usable throughout.
#[tokio::test(flavor = "multi_thread")]
async fn the_shim_client_speaks_grpc_with_the_real_daemon() -> Result<()> {
    use prost::Message;
    use styxy_shim_client::http2::{request_header_block, Connection};
    use styxy_tests::v1 as pb;

    let daemon = Daemon::start().await?;
    let mut client = daemon.client().await?;
    for n in 0..240 {
        client
            .allocate(pb::AllocateRequest {
                service_type: "bulk".into(),
                // Long ids make a large answer.
                instance_id: Some(format!("agent-session-{n:03}-{}", "x".repeat(48))),
                ..Default::default()
            })
            .await?;
    }
    let socket = daemon.socket.clone();
    let free = daemon.base + 180;
    tokio::task::spawn_blocking(move || -> Result<()> {
        let deadline = || std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut conn = Connection::open(&socket, deadline())?;

        let list = request_header_block("/styxy.v1.PortBroker/ListPorts");
        let reply = conn.unary(&list, &pb::ListPortsRequest {}.encode_to_vec(), deadline())?;
        ensure!(reply.grpc_status == 0, "ListPorts: {}", reply.grpc_status);
        ensure!(
            reply.message.len() > 16_384,
            "the answer should need more than one DATA frame: {} bytes",
            reply.message.len()
        );
        let listed = pb::ListPortsResponse::decode(reply.message.as_slice())?;
        ensure!(listed.leases.len() == 240, "{} leases", listed.leases.len());

        let resolve = request_header_block("/styxy.v1.PortBroker/ResolveBind");
        let mut bad =
            styxy_tests::resolve_bind_request(std::process::id(), free, pb::Protocol::Tcp);
        bad.port = 70_000;
        let reply = conn.unary(&resolve, &bad.encode_to_vec(), deadline())?;
        ensure!(
            reply.grpc_status == 3,
            "InvalidArgument expected: {}",
            reply.grpc_status
        );

        let unknown = request_header_block("/styxy.v1.PortBroker/NoSuchMethod");
        let reply = conn.unary(&unknown, &[], deadline())?;
        ensure!(
            reply.grpc_status == 12,
            "Unimplemented expected: {}",
            reply.grpc_status
        );

        let good = styxy_tests::resolve_bind_request(std::process::id(), free, pb::Protocol::Tcp);
        let reply = conn.unary(&resolve, &good.encode_to_vec(), deadline())?;
        ensure!(reply.grpc_status == 0, "ResolveBind: {}", reply.grpc_status);
        let answer = pb::ResolveBindResponse::decode(reply.message.as_slice())?;
        ensure!(
            answer.action == pb::BindAction::Keep as i32 && answer.port == u32::from(free),
            "{answer:?}"
        );
        ensure!(conn.reusable(), "the connection survives error answers");
        Ok(())
    })
    .await??;
    Ok(())
}

/// Closes 0–2, puts its own TCP sockets there (fd 2 unconnected, or connected to PEER), then
/// binds HELD (moved by the shim) and writes the port it got to OUT.
const CLOSED_STDIO: &str = "import os, socket, sys\n\
held, out, peer = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])\n\
os.close(0); os.close(1); os.close(2)\n\
mine = [socket.socket() for _ in range(3)]\n\
assert [s.fileno() for s in mine] == [0, 1, 2]\n\
if peer:\n    mine[2].connect(('127.0.0.1', peer))\n\
s = socket.socket()\n\
s.bind(('127.0.0.1', held))\n\
open(out, 'w').write(str(s.getsockname()[1]))\n";

/// The same in Perl, which (unlike Python, Rust and node) leaves SIGPIPE's default action, death,
/// in place: fd 2 an unconnected TCP socket.
const CLOSED_STDIO_PERL: &str = "use POSIX; use Socket;\n\
my ($held, $out) = @ARGV;\n\
POSIX::close($_) for 0 .. 2;\n\
my @mine = map { socket(my $s, PF_INET, SOCK_STREAM, 0) or die; $s } 1 .. 3;\n\
socket(my $s, PF_INET, SOCK_STREAM, 0) or die;\n\
bind($s, pack_sockaddr_in($held, inet_aton('127.0.0.1'))) or die;\n\
my ($port) = unpack_sockaddr_in(getsockname($s));\n\
open(my $o, '>', $out) or die; print $o $port; close $o;\n";

/// A host that closed 0–2 and has its own socket at fd 2: the notice is not written there, and
/// no SIGPIPE kills it (it did: a host that kept SIGPIPE's default died when fd 2 was an
/// unconnected TCP socket).
#[tokio::test(flavor = "multi_thread")]
async fn the_notice_never_goes_to_a_socket_the_host_has_at_fd_2() -> Result<()> {
    use std::io::Read;
    let daemon = Daemon::start().await?;
    let held = daemon.base + 120;
    let _holder = http_server(held)?;
    let dir = tempfile::tempdir()?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let peer = listener.local_addr()?.port();
    for (case, peer) in [("unconnected", 0), ("connected", peer)] {
        let out = dir.path().join(case);
        let status = daemon
            .shimmed("python3", &["-c", CLOSED_STDIO, &held.to_string()])
            .arg(&out)
            .arg(peer.to_string())
            .env_remove("STYXY_NOTIFY")
            .stdin(std::process::Stdio::null())
            .status()?;
        ensure!(status.success(), "{case}: the host died: {status:?}");
        let port: u16 = std::fs::read_to_string(&out)?.trim().parse()?;
        ensure!(port != held, "{case}: the bind was moved (to {port})");
    }
    let out = dir.path().join("perl");
    let status = daemon
        .shimmed("perl", &["-e", CLOSED_STDIO_PERL, &held.to_string()])
        .arg(&out)
        .env_remove("STYXY_NOTIFY")
        .stdin(std::process::Stdio::null())
        .status()?;
    ensure!(status.success(), "perl: the host died: {status:?}");
    let port: u16 = std::fs::read_to_string(&out)?.trim().parse()?;
    ensure!(port != held, "perl: the bind was moved (to {port})");
    let (mut accepted, _) = listener.accept()?;
    accepted.set_read_timeout(Some(std::time::Duration::from_millis(500)))?;
    let mut received = Vec::new();
    let _ = accepted.read_to_end(&mut received);
    ensure!(
        received.is_empty(),
        "the notice went into the host's connection: {:?}",
        String::from_utf8_lossy(&received)
    );
    Ok(())
}

/// Binds PORT on COUNT fresh sockets and prints, per bind, its errno (0 when bound) and how long
/// it took in milliseconds.
const TIMED_BINDS: &str = "import socket, sys, time\n\
port, count = int(sys.argv[1]), int(sys.argv[2])\n\
for _ in range(count):\n    s = socket.socket()\n    t = time.monotonic()\n    \
try:\n        s.bind(('127.0.0.1', port)); e = 0\n    except OSError as err:\n        e = err.errno\n    \
print(e, int((time.monotonic() - t) * 1000), flush=True)\n    s.close()\n";

/// A stopped daemon (SIGSTOP) costs the first conflicting bind its deadlines, and every later one
/// the normal deadline at most — not the one-second second chance each time. Bounds are generous
/// (10× the normal deadline): the point is the second that is no longer spent.
#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_daemon_costs_later_binds_the_normal_deadline_at_most() -> Result<()> {
    let daemon = Daemon::start().await?;
    let held = daemon.base + 125;
    let _holder = http_server(held)?;
    daemon.signal(libc::SIGSTOP)?;
    let out = daemon
        .shimmed("python3", &["-c", TIMED_BINDS, &held.to_string(), "5"])
        .env("STYXY_TIMEOUT_MS", "50")
        .output();
    daemon.signal(libc::SIGCONT)?;
    let out = out?;
    let text = String::from_utf8_lossy(&out.stdout);
    let binds: Vec<(i32, u64)> = text
        .lines()
        .map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.parse().ok()?, w.next()?.parse().ok()?))
        })
        .collect::<Option<_>>()
        .context("errno and ms per line")?;
    ensure!(
        binds.len() == 5,
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (errno, _) in &binds {
        ensure!(
            *errno == libc::EADDRINUSE,
            "fails as without the shim: {binds:?}"
        );
    }
    for (_, ms) in &binds[1..] {
        ensure!(*ms < 500, "a later bind waited {ms} ms: {binds:?}");
    }
    Ok(())
}
