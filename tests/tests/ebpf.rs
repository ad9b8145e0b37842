//! The eBPF observer end to end: the real daemon attached to a fresh child cgroup, real processes
//! binding inside and outside it. Needs root, cgroup v2 and `cargo xtask build-ebpf`: each test
//! says SKIP when one is missing, and fails instead in CI.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use styxy_tests::v1 as pb;
use styxy_tests::{
    ebpf_ready, next_event, port_holder, resolve_bind_request, ChildCgroup, Daemon, EbpfSetup,
    Spawned,
};

async fn ebpf_daemon(setup: &EbpfSetup, cgroup: &ChildCgroup) -> Result<Daemon> {
    let object = setup.object.to_str().context("utf-8 path")?;
    let cgroup = cgroup.path.to_str().context("utf-8 path")?;
    let daemon = Daemon::start_with(&[
        "--observer",
        "ebpf",
        "--cgroup",
        cgroup,
        "--ebpf-object",
        object,
    ])
    .await?;
    let status = daemon.status().await?;
    ensure!(status.observer == "ebpf", "observer: {status:?}");
    Ok(daemon)
}

/// The one `styxy` binary carries its programs: a daemon given no object (no `--ebpf-object`,
/// no `$STYXY_EBPF_OBJECT`) loads the one built into it, says so in `styxy status`, and moves
/// nothing it should not (it sees binds in its cgroup). `cargo xtask test` builds the binaries
/// with the object inside; a plain `cargo test` build has none, and this test says SKIP there.
#[tokio::test(flavor = "multi_thread")]
async fn the_styxy_binary_carries_its_ebpf_programs() -> Result<()> {
    let Some(setup) = ebpf_ready() else {
        return Ok(());
    };
    let cgroup = ChildCgroup::create(&setup.cgroup_root)?;
    let path = cgroup.path.to_str().context("utf-8 path")?;
    if std::env::var_os("STYXY_EBPF_OBJECT").is_some() {
        anyhow::bail!("STYXY_EBPF_OBJECT is set: this test needs the daemon to choose");
    }
    let daemon = Daemon::start_with(&["--observer", "ebpf", "--cgroup", path]).await?;
    let status = daemon.status().await?;
    ensure!(status.observer == "ebpf", "observer: {status:?}");
    if !status.observer_reason.contains("built into this binary") {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI builds the binaries with their programs inside: {}",
            status.observer_reason
        );
        eprintln!(
            "SKIP: this styxy was built without its eBPF programs inside (`cargo xtask test` builds them in): {}",
            status.observer_reason
        );
        return Ok(());
    }
    // It observes: a bind in its cgroup is seen.
    let mut binder = Spawned::start(&mut cgroup.command(
        "python3",
        &["-u", "-c", BINDER, &format!("tcp:4:{}", daemon.base)],
    ))?;
    binder.line_where(10, |l| l.starts_with("tcp 4"))?;
    styxy_tests::eventually(10, "the bind seen", || async {
        let out = daemon.cli(&["observe", &daemon.base.to_string()]);
        String::from_utf8_lossy(&out.stdout)
            .contains("python")
            .then_some(())
    })
    .await?;
    Ok(())
}

/// A python process that binds what it is told and prints `PROTO FAMILY PORT` for each, then waits
/// for stdin to close.
const BINDER: &str = r#"
import socket, sys
kinds = {'tcp': socket.SOCK_STREAM, 'udp': socket.SOCK_DGRAM}
keep = []
for spec in sys.argv[1:]:
    proto, family, port = spec.split(':')
    fam = socket.AF_INET6 if family == '6' else socket.AF_INET
    s = socket.socket(fam, kinds[proto])
    s.bind(({'6': '::1', '4': '127.0.0.1', 'any': '0.0.0.0'}[family], int(port)))
    if proto == 'tcp':
        s.listen(4)
    keep.append(s)
    print(proto, family, s.getsockname()[1], flush=True)
sys.stdin.read()
"#;

fn is_kind(e: &pb::PortEvent, kind: pb::EventKind, port: u32, protocol: pb::Protocol) -> bool {
    e.kind == kind as i32 && e.port == port && e.protocol == protocol as i32
}

#[tokio::test(flavor = "multi_thread")]
async fn binds_in_the_cgroup_stream_as_bound_and_released_with_pid_comm_and_port() -> Result<()> {
    let Some(setup) = ebpf_ready() else {
        return Ok(());
    };
    let cgroup = ChildCgroup::create(&setup.cgroup_root)?;
    let daemon = ebpf_daemon(&setup, &cgroup).await?;
    let mut events = daemon
        .client()
        .await?
        .watch(pb::WatchRequest {})
        .await?
        .into_inner();

    // Outside the cgroup first: it must produce nothing.
    let outside_port = daemon.base + 40;
    let _outside = port_holder(&[outside_port])?;
    // Inside the cgroup but in a network namespace of its own (a container): its ports are not
    // the host's, so nothing either.
    let netns_port = daemon.base + 44;
    // 0.0.0.0: a fresh namespace's loopback is down, and bringing it up needs tools not
    // everywhere.
    let netns_spec = format!("tcp:any:{netns_port}");
    let mut contained = Spawned::start(
        &mut cgroup.command("unshare", &["--net", "python3", "-c", BINDER, &netns_spec]),
    )?;
    contained.line_where(20, |l| l.split_whitespace().count() == 3)?;
    let unrelated =
        |e: &pb::PortEvent| e.port == u32::from(outside_port) || e.port == u32::from(netns_port);

    let (tcp, udp, v6) = (daemon.base + 41, daemon.base + 42, daemon.base + 43);
    let specs = [
        format!("tcp:4:{tcp}"),
        format!("udp:4:{udp}"),
        format!("tcp:6:{v6}"),
    ];
    let mut args = vec!["-c", BINDER];
    args.extend(specs.iter().map(String::as_str));
    let mut inside = Spawned::start(&mut cgroup.command("python3", &args))?;
    for _ in 0..specs.len() {
        inside.line_where(20, |l| l.split_whitespace().count() == 3)?;
    }
    let pid = inside.child.id();

    let mut seen = HashMap::new();
    for (port, protocol, family) in [
        (u32::from(tcp), pb::Protocol::Tcp, pb::Family::Inet),
        (u32::from(udp), pb::Protocol::Udp, pb::Family::Inet),
        (u32::from(v6), pb::Protocol::Tcp, pb::Family::Inet6),
    ] {
        let event = next_event(&mut events, |e| {
            is_kind(e, pb::EventKind::Bound, port, protocol) || unrelated(e)
        })
        .await
        .with_context(|| format!("Bound {port}/{protocol:?}"))?;
        assert!(
            !unrelated(&event),
            "a bind outside the cgroup or in another network namespace was reported: {event:?}"
        );
        assert_eq!(event.pid, pid, "{event:?}");
        assert_eq!(event.comm, "python3", "{event:?}");
        assert_eq!(event.family, family as i32, "{event:?}");
        seen.insert(port, event);
    }

    drop(inside); // kill: the kernel releases every socket
    let mut waiting: Vec<u32> = seen.keys().copied().collect();
    while !waiting.is_empty() {
        let released = next_event(&mut events, |e| {
            e.kind == pb::EventKind::Released as i32 && waiting.contains(&e.port)
        })
        .await
        .with_context(|| format!("Released events for {waiting:?}"))?;
        assert_eq!(released.pid, pid);
        waiting.retain(|p| *p != released.port);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn observe_reports_a_holder_seen_only_through_ebpf() -> Result<()> {
    let Some(setup) = ebpf_ready() else {
        return Ok(());
    };
    let cgroup = ChildCgroup::create(&setup.cgroup_root)?;
    let daemon = ebpf_daemon(&setup, &cgroup).await?;
    let mut client = daemon.client().await?;
    let mut events = client.watch(pb::WatchRequest {}).await?.into_inner();
    let port = daemon.base + 101; // the test daemon's api range
    let _server = Spawned::start(&mut cgroup.command(
        "python3",
        &[
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ],
    ))?;
    // The eBPF observer is the only thing that reads binds here (no socket-table scans).
    let bound = next_event(&mut events, |e| {
        is_kind(e, pb::EventKind::Bound, u32::from(port), pb::Protocol::Tcp)
    })
    .await?;
    let observed = client
        .observe(pb::ObserveRequest {
            port: u32::from(port),
            protocol: 0,
        })
        .await?
        .into_inner();
    ensure!(observed.bound, "{observed:?}");
    let holder = observed.holders.first().context("a holder")?;
    assert_eq!(holder.pid, bound.pid);
    assert_eq!(holder.service_type, "api");
    assert!(holder.cmdline.contains("http.server"), "{holder:?}");
    // The daemon measures how long records take from the kernel to the broker.
    let status = client.status(pb::StatusRequest {}).await?.into_inner();
    assert!(status.observer_delay_samples >= 1, "{status:?}");
    assert!(status.observer_delay_p99_us >= status.observer_delay_p50_us);
    Ok(())
}

fn attached_programs(cgroup: &ChildCgroup) -> Result<String> {
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(&cgroup.path)
        .output()
        .context("running bpftool (apt-get install bpftool)")?;
    ensure!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_stays_attached_after_kill_9() -> Result<()> {
    let Some(setup) = ebpf_ready() else {
        return Ok(());
    };
    let cgroup = ChildCgroup::create(&setup.cgroup_root)?;
    let mut daemon = ebpf_daemon(&setup, &cgroup).await?;
    let attached = attached_programs(&cgroup)?;
    for program in [
        "cgroup_inet4_post_bind",
        "cgroup_inet6_post_bind",
        "cgroup_inet_sock_release",
    ] {
        assert!(attached.contains(program), "{program} attached: {attached}");
    }
    // Below the root there are no kernel sessions, so their programs never attach here.
    assert!(!attached.contains("cgroup_inet4_bind"), "{attached}");
    daemon.kill9()?;
    let mut left = attached_programs(&cgroup)?;
    for _ in 0..50 {
        if !left.contains("styxy") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = attached_programs(&cgroup)?;
    }
    assert!(
        !left.contains("styxy"),
        "still attached after kill -9: {left}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn auto_falls_back_to_the_socket_tables_and_says_why() -> Result<()> {
    // Without the object: works anywhere.
    let daemon = Daemon::start_with(&[
        "--observer",
        "auto",
        "--ebpf-object",
        "/nonexistent/styxy-ebpf.o",
    ])
    .await?;
    let status = daemon.status().await?;
    assert_eq!(status.observer, "sockets-table");
    assert!(
        status.observer_reason.contains("eBPF unavailable")
            && status.observer_reason.contains("/nonexistent/styxy-ebpf.o"),
        "{}",
        status.observer_reason
    );

    // Without privileges: the daemon as uid 65534.
    if !styxy_tests::is_root() {
        eprintln!("SKIP: the unprivileged fallback case needs root to switch to uid 65534");
        return Ok(());
    }
    let Some(setup) = ebpf_ready() else {
        return Ok(());
    };
    let dir_guard = tempfile::tempdir()?;
    let dir = dir_guard.path().to_path_buf();
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
    let socket = dir.join("styxy.sock");
    let mut nobody = Spawned::start(std::os::unix::process::CommandExt::uid(
        Command::new(styxy_tests::styxy_bin())
            .arg("daemon")
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--listen", "none", "--observer", "auto", "--ebpf-object"])
            .arg(&setup.object),
        65534,
    ))?;
    nobody.line_where(20, |l| l.contains("listening on"))?;
    let mut client = styxy_cli::client::connect(&styxy_cli::client::Target::Unix(socket)).await?;
    let status = client.status(pb::StatusRequest {}).await?.into_inner();
    assert_eq!(status.observer, "sockets-table");
    assert!(
        status.observer_reason.contains("needs root"),
        "{}",
        status.observer_reason
    );
    drop(nobody);
    Ok(())
}

/// At the root of the cgroup tree the daemon answers point checks from the kernel's per-port
/// counts: sockets bound before it started (seeded) and after (counted by post_bind) are seen as
/// held, and as free again the moment they close.
#[tokio::test(flavor = "multi_thread")]
async fn at_the_root_point_checks_use_the_kernels_port_counts() -> Result<()> {
    let Some(setup) = ebpf_ready() else {
        return Ok(());
    };
    let before_block = styxy_tests::port_block();
    let before = before_block + 7;
    let early = port_holder(&[before])?;
    let object = setup.object.to_str().context("utf-8 path")?;
    let daemon = Daemon::start_with(&["--observer", "ebpf", "--ebpf-object", object]).await?;
    let status = daemon.status().await?;
    assert!(
        status.observer == "ebpf" && status.observer_reason.contains("per-port counts"),
        "{}",
        status.observer_reason
    );
    let mut client = daemon.client().await?;
    let action = |r: pb::ResolveBindResponse| pb::BindAction::try_from(r.action).ok();

    let after_tcp = daemon.base + 150;
    let after_udp = daemon.base + 151;
    let udp_script = format!(
        "import socket, sys\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(('127.0.0.1', {after_udp}))\nprint('ready', flush=True)\nsys.stdin.read()\n"
    );
    let late_tcp = port_holder(&[after_tcp])?;
    let mut late_udp = Spawned::start(Command::new("python3").args(["-c", &udp_script]))?;
    late_udp.line_where(15, |l| l == "ready")?;

    // Suggest, answered from the counts, leaves the held ports out.
    let suggested = client
        .suggest(pb::SuggestRequest {
            service_type: "api".into(),
            count: 100,
        })
        .await?
        .into_inner()
        .ports;
    assert!(!suggested.is_empty());
    for held in [after_tcp, after_udp] {
        assert!(
            !suggested.contains(&u32::from(held)),
            "{held} suggested: {suggested:?}"
        );
    }
    // The UDP socket does not hold the TCP port of the same number. (Asked first: once this
    // process has been moved off a port, asking for it again goes where the first answer went.)
    let me = std::process::id();
    let tcp_twin = client
        .resolve_bind(resolve_bind_request(me, after_udp, pb::Protocol::Tcp))
        .await?
        .into_inner();
    assert_eq!(action(tcp_twin), Some(pb::BindAction::Keep));
    for (port, protocol) in [
        (before, pb::Protocol::Tcp),
        (after_tcp, pb::Protocol::Tcp),
        (after_udp, pb::Protocol::Udp),
    ] {
        let answer = client
            .resolve_bind(resolve_bind_request(me, port, protocol))
            .await?
            .into_inner();
        assert_eq!(
            action(answer),
            Some(pb::BindAction::Reassign),
            "{port}/{protocol:?} is held"
        );
    }

    // Killed: the kernel releases every socket. Then another asker: this process, moved off
    // those ports, would be sent where it went before.
    drop((early, late_tcp, late_udp));
    let other = Spawned::start(Command::new("sleep").arg("60"))?;
    let other_pid = other.child.id();
    for (port, protocol) in [
        (before, pb::Protocol::Tcp),
        (after_tcp, pb::Protocol::Tcp),
        (after_udp, pb::Protocol::Udp),
    ] {
        let answer = styxy_tests::eventually(10, "the port free again", || {
            let mut client = client.clone();
            async move {
                let r = client
                    .resolve_bind(resolve_bind_request(other_pid, port, protocol))
                    .await
                    .ok()?
                    .into_inner();
                (pb::BindAction::try_from(r.action).ok() == Some(pb::BindAction::Keep)).then_some(r)
            }
        })
        .await?;
        assert_eq!(answer.port, u32::from(port));
    }
    Ok(())
}

/// A stalled daemon (SIGSTOP) lets the ring buffer fill up: the records that did not fit are
/// counted, and once the daemon runs again it reports them and reads the socket tables, so a
/// socket whose record was lost is still known with its holder.
#[tokio::test(flavor = "multi_thread")]
async fn records_lost_to_a_full_ring_buffer_are_counted_and_the_table_resynced() -> Result<()> {
    let Some(setup) = ebpf_ready() else {
        return Ok(());
    };
    let cgroup = ChildCgroup::create(&setup.cgroup_root)?;
    let daemon = ebpf_daemon(&setup, &cgroup).await?;
    let held = daemon.base + 48;
    // 60,000 binds and releases: 120,000 records for a ring that holds ~13,000 (1 MiB of 72-byte
    // records with the kernel's 8-byte headers). The ports are explicit ones of the bulk range:
    // port-0 binds outside every range are only counted, never reported one by one. The socket
    // that stays comes last, so its record is among the lost.
    let bulk = daemon.base + 300;
    let churn = format!(
        "import socket, sys\n\
         for i in range(60000):\n    \
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n    \
             s.bind(('127.0.0.1', {bulk} + i % 250))\n    \
             s.close()\n\
         s = socket.socket()\n\
         s.bind(('127.0.0.1', {held}))\n\
         s.listen(4)\n\
         print('ready', flush=True)\n\
         sys.stdin.read()\n"
    );
    // A first bind and release, read before the stall, so the daemon is in its steady state.
    let warm_up = format!(
        "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).bind(('127.0.0.1', {bulk}))\n"
    );
    let status = cgroup.command("python3", &["-c", &warm_up]).status()?;
    ensure!(status.success(), "warm-up bind: {status}");
    styxy_tests::eventually(10, "the warm-up records read", || async {
        let status = daemon.status().await.ok()?;
        (status.observed_events >= 2).then_some(())
    })
    .await?;
    daemon.signal(libc::SIGSTOP)?;
    let started = Spawned::start(&mut cgroup.command("python3", &["-c", &churn]))
        .and_then(|mut holder| holder.line_where(60, |l| l == "ready").map(|_| holder));
    // Let the daemon go on before any error ends the test.
    daemon.signal(libc::SIGCONT)?;
    let holder = started?; // kept: dropping it kills the process
    let holder_pid = holder.child.id();

    let mut client = daemon.client().await?;
    let dropped = styxy_tests::eventually(20, "lost records reported", || {
        let daemon = &daemon;
        async move {
            let status = daemon.status().await.ok()?;
            (status.dropped_events > 0).then_some(status.dropped_events)
        }
    })
    .await?;
    // 120,002 records, of which a ring's worth (~13,000) fit.
    assert!(
        (50_000..=120_002).contains(&dropped),
        "{dropped} records reported lost"
    );
    let log = daemon.log();
    assert!(log.contains("resyncing from the socket tables"), "{log}");
    let ports = client
        .list_ports(pb::ListPortsRequest::default())
        .await?
        .into_inner();
    let entry = ports
        .holders
        .iter()
        .find(|h| h.port == u32::from(held))
        .with_context(|| format!("{held} missing from {ports:?}\n{}", daemon.log()))?;
    assert_eq!(entry.pid, holder_pid, "{entry:?}");
    Ok(())
}

/// The ring buffer's reader runs on a thread of its own in the `SCHED_BATCH` class, so the
/// wake-up a record causes never preempts the program that is binding.
#[tokio::test(flavor = "multi_thread")]
async fn the_ring_buffer_reader_is_a_batch_thread() -> Result<()> {
    let Some(setup) = ebpf_ready() else {
        return Ok(());
    };
    let cgroup = ChildCgroup::create(&setup.cgroup_root)?;
    let daemon = ebpf_daemon(&setup, &cgroup).await?;
    let tasks = std::path::PathBuf::from(format!("/proc/{}/task", daemon.pid()));
    let mut policies = Vec::new();
    for task in std::fs::read_dir(&tasks)? {
        let task = task?.path();
        let name = std::fs::read_to_string(task.join("comm"))?;
        let tid: libc::pid_t = task
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse().ok())
            .context("task id")?;
        // SAFETY: sched_getscheduler only reads the policy of the given thread.
        let policy = unsafe { libc::sched_getscheduler(tid) };
        policies.push((name.trim().to_string(), policy));
    }
    let reader: Vec<_> = policies.iter().filter(|(n, _)| n == "styxy-ebpf").collect();
    ensure!(reader.len() == 1, "one reader thread: {policies:?}");
    assert_eq!(reader[0].1, libc::SCHED_BATCH, "{policies:?}");
    // The threads that answer calls keep the normal class.
    assert!(
        policies
            .iter()
            .filter(|(n, _)| n.starts_with("styxy-uds"))
            .all(|(_, p)| *p == libc::SCHED_OTHER),
        "{policies:?}"
    );
    Ok(())
}

/// The session view with the eBPF observer: the moved server and its session's client, in the
/// observed cgroup, meet at the asked port; a client outside the session reaches the first server.
#[tokio::test(flavor = "multi_thread")]
async fn session_views_work_with_the_ebpf_observer() -> Result<()> {
    let Some(setup) = ebpf_ready() else {
        return Ok(());
    };
    let cgroup = ChildCgroup::create(&setup.cgroup_root)?;
    let daemon = ebpf_daemon(&setup, &cgroup).await?;
    let asked = daemon.base + 125;
    let dir = tempfile::tempdir()?;
    let socket = daemon.socket.to_str().context("utf-8 path")?.to_string();
    let serve = |name: &str, instance: Option<&str>| -> Result<Spawned> {
        let root = dir.path().join(name);
        std::fs::create_dir_all(&root)?;
        std::fs::write(root.join("whoami.txt"), name)?;
        let root = root.to_str().context("utf-8 path")?.to_string();
        let port = asked.to_string();
        let mut args = vec!["--socket", &socket, "run"];
        if let Some(instance) = instance {
            args.extend(["--instance", instance]);
        }
        args.extend([
            "--",
            "python3",
            "-u",
            "-m",
            "http.server",
            &port,
            "--bind",
            "127.0.0.1",
            "--directory",
            &root,
        ]);
        let styxy = styxy_tests::styxy_bin();
        Spawned::start(&mut cgroup.command(styxy.to_str().context("utf-8 path")?, &args))
    };
    let curl = |instance: Option<&str>| -> Result<String> {
        let styxy = styxy_tests::styxy_bin();
        let url = format!("http://127.0.0.1:{asked}/whoami.txt");
        let mut args = vec!["--socket", &socket, "run"];
        if let Some(instance) = instance {
            args.extend(["--instance", instance]);
        }
        args.extend(["--", "curl", "-sS", "--max-time", "10", &url]);
        let out = cgroup
            .command(styxy.to_str().context("utf-8 path")?, &args)
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let _a = serve("A", None)?;
    styxy_tests::wait_for_listener(asked)?;
    let mut b = serve("B", Some("session-b"))?;
    b.line_where(20, |l| l.starts_with("✓ STYXY: Auto-assigned port"))?;
    styxy_tests::eventually(10, "session-b reaching its own server", || async {
        (curl(Some("session-b")).ok()? == "B").then_some(())
    })
    .await?;
    assert_eq!(curl(None)?, "A", "outside the session");
    Ok(())
}

/// A port-0 bind that lands outside every service range is counted by the programs, not reported
/// one by one (that record would tax every program on the machine for a port no decision needs);
/// the daemon reads the socket tables when the count moves, so the server shows within about a
/// second, and the point checks never trust the kernel's counts for such ports.
#[tokio::test(flavor = "multi_thread")]
async fn an_ephemeral_bind_is_counted_and_found_through_the_socket_tables() -> Result<()> {
    let Some(setup) = ebpf_ready() else {
        return Ok(());
    };
    let cgroup = ChildCgroup::create(&setup.cgroup_root)?;
    let daemon = ebpf_daemon(&setup, &cgroup).await?;
    let mut server = Spawned::start(&mut cgroup.command("python3", &["-c", BINDER, "tcp:4:0"]))?;
    let line = server.line_where(20, |l| l.split_whitespace().count() == 3)?;
    let port: u16 = line.split_whitespace().nth(2).context("port")?.parse()?;
    let pid = server.child.id();
    let mut client = daemon.client().await?;
    let started = std::time::Instant::now();
    styxy_tests::eventually(5, "the port-0 server listed", || {
        let mut client = client.clone();
        async move {
            let ports = client
                .list_ports(pb::ListPortsRequest::default())
                .await
                .ok()?
                .into_inner();
            ports
                .holders
                .iter()
                .any(|h| h.port == u32::from(port) && h.pid == pid)
                .then_some(())
        }
    })
    .await?;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "found within about a second"
    );
    let observed = client
        .observe(pb::ObserveRequest {
            port: u32::from(port),
            protocol: 0,
        })
        .await?
        .into_inner();
    assert!(observed.bound, "a point check finds it: {observed:?}");
    drop(server);
    Ok(())
}

/// `--cgroup` naming a directory that is not in the cgroup v2 file system stops the daemon with
/// what to give instead, not the kernel's bare "bad file descriptor".
#[tokio::test(flavor = "multi_thread")]
async fn a_cgroup_that_is_not_cgroup_v2_is_named_with_the_fix() -> Result<()> {
    let Some(setup) = ebpf_ready() else {
        return Ok(());
    };
    let object = setup.object.to_str().context("utf-8 path")?;
    let plain = tempfile::tempdir()?;
    let path = plain.path().to_str().context("utf-8 path")?;
    let started = Daemon::start_with(&[
        "--observer",
        "ebpf",
        "--cgroup",
        path,
        "--ebpf-object",
        object,
    ])
    .await;
    let Err(e) = started else {
        anyhow::bail!("a daemon attached to {path}, a plain directory");
    };
    let said = format!("{e:#}");
    assert!(
        said.contains(&format!("{path} is not a cgroup v2 directory"))
            && said.contains("findmnt -t cgroup2"),
        "{said}"
    );
    assert!(!said.contains("Bad file descriptor"), "{said}");
    Ok(())
}
