//! The daemon end to end over gRPC: real daemon binary, real servers, real sockets.

use std::collections::HashSet;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use styxy_tests::v1 as pb;
use styxy_tests::{eventually, http_server, is_root, next_event, resolve_bind_request, Daemon};
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
async fn observe_reports_the_holder_pid_and_inferred_service_type() -> anyhow::Result<()> {
    let daemon = Daemon::start().await?;
    let port = daemon.base + 3; // in this daemon's storybook range
    let server = http_server(port)?;
    let mut client = daemon.client().await?;
    // Observe checks the kernel at call time: no waiting for the observer's next reading.
    let seen = client
        .observe(pb::ObserveRequest {
            port: u32::from(port),
            protocol: 0,
        })
        .await?
        .into_inner();
    assert!(seen.bound, "{seen:?}");
    assert_eq!(seen.range_service_type, "storybook");
    let holder = &seen.holders[0];
    assert_eq!(holder.pid, server.pid());
    assert_eq!(
        holder.service_type, "api",
        "python's http.server is an api server"
    );
    assert!(holder.cmdline.contains("http.server"), "{holder:?}");
    assert_eq!(holder.protocol, pb::Protocol::Tcp as i32);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn suggest_skips_the_held_port() -> anyhow::Result<()> {
    let daemon = Daemon::start().await?;
    let _server = http_server(daemon.base)?;
    let mut client = daemon.client().await?;
    let s = client
        .suggest(pb::SuggestRequest {
            service_type: "storybook".into(),
            count: 3,
        })
        .await?
        .into_inner();
    let b = u32::from(daemon.base);
    assert_eq!(s.ports, vec![b + 1, b + 2, b + 3]);
    assert_eq!((s.range_start, s.range_end), (b, b + 23));
    // A typo is an error that names the known types, not a silent `dev` port.
    for call in ["suggest", "allocate"] {
        let refused = if call == "suggest" {
            client
                .suggest(pb::SuggestRequest {
                    service_type: "storybok".into(),
                    count: 1,
                })
                .await
                .map(drop)
        } else {
            client
                .allocate(pb::AllocateRequest {
                    service_type: "storybok".into(),
                    ..Default::default()
                })
                .await
                .map(drop)
        };
        let status = refused.expect_err("an unknown type is refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{call}: {status:?}");
        assert!(
            status.message().contains("did you mean \"storybook\"?")
                && status.message().contains("known types: ai, api"),
            "{call}: {}",
            status.message()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_concurrent_allocations_get_two_hundred_distinct_ports() -> anyhow::Result<()> {
    let daemon = Daemon::start().await?;
    let client = daemon.client().await?;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let mut client = client.clone();
        tasks.spawn(async move {
            client
                .allocate(pb::AllocateRequest {
                    service_type: "bulk".into(),
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner())
        });
    }
    let mut ports = HashSet::new();
    let mut ids = HashSet::new();
    while let Some(result) = tasks.join_next().await {
        let lease = result??;
        assert_eq!(lease.service_type, "bulk");
        assert!(
            ports.insert(lease.port),
            "port {} handed out twice",
            lease.port
        );
        assert!(ids.insert(lease.lease_id));
    }
    assert_eq!(ports.len(), 200);
    let range = u32::from(daemon.base + 300)..=u32::from(daemon.base + 549);
    assert!(ports.iter().all(|p| range.contains(p)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn release_frees_the_port_by_id_and_by_port() -> anyhow::Result<()> {
    let daemon = Daemon::start().await?;
    let mut client = daemon.client().await?;
    let preferred = u32::from(daemon.base + 150);
    let allocate = |port| pb::AllocateRequest {
        service_type: "api".into(),
        preferred_port: Some(port),
        ..Default::default()
    };
    let first = client.allocate(allocate(preferred)).await?.into_inner();
    assert_eq!(first.port, preferred);
    let second = client.allocate(allocate(preferred)).await?.into_inner();
    assert_ne!(
        second.port, preferred,
        "a leased port is not handed out again"
    );

    let released = client
        .release(pb::ReleaseRequest {
            target: Some(pb::release_request::Target::LeaseId(first.lease_id.clone())),
        })
        .await?
        .into_inner();
    assert_eq!(released.released_lease_ids, vec![first.lease_id]);
    let seen = client
        .observe(pb::ObserveRequest {
            port: preferred,
            protocol: 0,
        })
        .await?
        .into_inner();
    assert!(seen.lease.is_none());
    assert_eq!(
        client
            .allocate(allocate(preferred))
            .await?
            .into_inner()
            .port,
        preferred
    );

    client
        .release(pb::ReleaseRequest {
            target: Some(pb::release_request::Target::Port(second.port)),
        })
        .await?;
    let gone = client
        .release(pb::ReleaseRequest {
            target: Some(pb::release_request::Target::Port(second.port)),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_streams_a_bind_and_a_release() -> anyhow::Result<()> {
    let daemon = Daemon::start().await?;
    let mut client = daemon.client().await?;
    let mut events = client.watch(pb::WatchRequest {}).await?.into_inner();
    let port = daemon.base + 7;
    let server = http_server(port)?;
    let pid = server.pid();
    let bound = next_event(&mut events, |e| {
        e.kind == pb::EventKind::Bound as i32 && e.port == u32::from(port)
    })
    .await?;
    assert_eq!(bound.pid, pid);
    assert_eq!(bound.service_type, "api");
    assert_eq!(bound.protocol, pb::Protocol::Tcp as i32);
    drop(server);
    let released = next_event(&mut events, |e| {
        e.kind == pb::EventKind::Released as i32 && e.port == u32::from(port)
    })
    .await?;
    assert_eq!(released.pid, pid);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_inputs_are_invalid_argument_with_a_message() -> anyhow::Result<()> {
    let daemon = Daemon::start().await?;
    let mut c = daemon.client().await?;
    let mut errors = Vec::new();
    errors.push(
        c.suggest(pb::SuggestRequest {
            service_type: "Bad Type".into(),
            count: 1,
        })
        .await
        .unwrap_err(),
    );
    errors.push(
        c.suggest(pb::SuggestRequest {
            service_type: "dev".into(),
            count: 100_000,
        })
        .await
        .unwrap_err(),
    );
    errors.push(
        c.observe(pb::ObserveRequest {
            port: 0,
            protocol: 0,
        })
        .await
        .unwrap_err(),
    );
    errors.push(
        c.observe(pb::ObserveRequest {
            port: 70000,
            protocol: 0,
        })
        .await
        .unwrap_err(),
    );
    errors.push(
        c.observe(pb::ObserveRequest {
            port: 80,
            protocol: 42,
        })
        .await
        .unwrap_err(),
    );
    errors.push(
        c.allocate(pb::AllocateRequest {
            service_type: "dev".into(),
            ttl_seconds: Some(0),
            ..Default::default()
        })
        .await
        .unwrap_err(),
    );
    errors.push(
        c.allocate(pb::AllocateRequest {
            service_type: "dev".into(),
            preferred_port: Some(0),
            ..Default::default()
        })
        .await
        .unwrap_err(),
    );
    errors.push(
        c.allocate(pb::AllocateRequest {
            service_type: "dev".into(),
            pid: Some(0),
            ..Default::default()
        })
        .await
        .unwrap_err(),
    );
    errors.push(
        c.release(pb::ReleaseRequest { target: None })
            .await
            .unwrap_err(),
    );
    errors.push(
        c.resolve_bind(pb::ResolveBindRequest {
            pid: std::process::id(),
            port: 8000,
            protocol: 0,
            ..Default::default()
        })
        .await
        .unwrap_err(),
    );
    errors.push(
        c.register_instance(pb::RegisterInstanceRequest {
            instance_id: Some("has spaces".into()),
            pid: std::process::id(),
        })
        .await
        .unwrap_err(),
    );
    errors.push(
        c.list_audit(pb::ListAuditRequest {
            since_ms: None,
            limit: 1_000_000,
        })
        .await
        .unwrap_err(),
    );
    for e in &errors {
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().len() > 20,
            "the message should say what was wrong: {e:?}"
        );
    }
    // The daemon is still up and well.
    c.status(pb::StatusRequest {}).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn leases_survive_kill_9_and_restart() -> anyhow::Result<()> {
    let mut daemon = Daemon::start().await?;
    let mut sleeper = Command::new("sleep")
        .arg("300")
        .stdout(Stdio::null())
        .spawn()?;
    let mut client = daemon.client().await?;
    let mut made = Vec::new();
    for i in 0..10u32 {
        let lease = client
            .allocate(pb::AllocateRequest {
                service_type: if i % 2 == 0 { "api" } else { "storybook" }.into(),
                pid: (i % 3 == 0).then_some(sleeper.id()),
                ttl_seconds: (i % 3 == 1).then_some(600),
                instance_id: Some(format!("agent-{i}")),
                ..Default::default()
            })
            .await?
            .into_inner();
        made.push((lease.lease_id, lease.port));
    }
    let instance = client
        .register_instance(pb::RegisterInstanceRequest {
            instance_id: None,
            pid: sleeper.id(),
        })
        .await?
        .into_inner();
    assert_eq!(instance.instance_id, format!("ldpreload-{}", sleeper.id()));

    daemon.kill9_and_restart().await?;
    let mut client = daemon.client().await?;
    let listed = client
        .list_ports(pb::ListPortsRequest {})
        .await?
        .into_inner();
    let mut back: Vec<(String, u32)> = listed
        .leases
        .iter()
        .map(|l| (l.lease_id.clone(), l.port))
        .collect();
    back.sort();
    made.sort();
    assert_eq!(back, made, "every lease is back, none twice");
    assert_eq!(
        client
            .status(pb::StatusRequest {})
            .await?
            .into_inner()
            .instances,
        1
    );

    let fresh = client
        .allocate(pb::AllocateRequest {
            service_type: "api".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(made
        .iter()
        .all(|(id, port)| *id != fresh.lease_id && *port != fresh.port));

    // Leases tied to a process end with it, across a restart too.
    sleeper.kill()?;
    sleeper.wait()?;
    let tied = made.len() - 6; // i = 0, 3, 6, 9
    eventually(10, "leases of the dead process to end", || {
        let mut client = client.clone();
        let expected = made.len() + 1 - tied;
        async move {
            let n = client
                .list_ports(pb::ListPortsRequest {})
                .await
                .ok()?
                .into_inner()
                .leases
                .len();
            (n == expected).then_some(())
        }
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn tcp_serves_reads_and_refuses_writes_with_the_way_to_do_them() -> anyhow::Result<()> {
    let daemon = Daemon::start().await?;
    let mut tcp = daemon.tcp_client().await?;
    tcp.status(pb::StatusRequest {}).await?;
    tcp.suggest(pb::SuggestRequest {
        service_type: "api".into(),
        count: 2,
    })
    .await?;
    let refused = tcp
        .allocate(pb::AllocateRequest {
            service_type: "api".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(
        refused
            .message()
            .contains(&daemon.socket.display().to_string()),
        "{refused:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn resolve_bind_moves_a_held_port_within_its_range_and_audits_it() -> anyhow::Result<()> {
    let daemon = Daemon::start().await?;
    let held = daemon.base + 5;
    let server = http_server(held)?;
    let mut client = daemon.client().await?;
    let ask = |port: u16| resolve_bind_request(std::process::id(), port, pb::Protocol::Tcp);
    let moved = client.resolve_bind(ask(held)).await?.into_inner();
    assert_eq!(moved.action, pb::BindAction::Reassign as i32);
    assert_eq!(moved.port, u32::from(held + 1));
    assert_eq!(moved.service_type, "storybook");
    let holder = moved.holder.expect("holder");
    assert_eq!(holder.pid, server.pid());
    // Same process, same port again (IPv6 after IPv4): the same new port.
    assert_eq!(
        client.resolve_bind(ask(held)).await?.into_inner().port,
        moved.port
    );
    // A free port is kept.
    let free = client.resolve_bind(ask(held + 10)).await?.into_inner();
    assert_eq!(
        (free.action, free.port),
        (pb::BindAction::Keep as i32, u32::from(held + 10))
    );
    let audit = client
        .list_audit(pb::ListAuditRequest {
            since_ms: None,
            limit: 10,
        })
        .await?
        .into_inner();
    let entry = &audit.entries[0];
    assert_eq!(
        (entry.requested_port, entry.assigned_port),
        (u32::from(held), u32::from(held + 1))
    );
    assert_eq!(entry.holder_pid, server.pid());
    assert_eq!(entry.pid, std::process::id());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_owner_or_root_may_release_a_lease() -> anyhow::Result<()> {
    if !styxy_tests::can_act_as_another_user() {
        return Ok(());
    }
    let daemon = Daemon::start().await?;
    let mut client = daemon.client().await?;
    let lease = client
        .allocate(pb::AllocateRequest {
            service_type: "api".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let as_nobody = daemon.cli_as_other_user(&["release", &lease.lease_id]);
    assert!(!as_nobody.status.success());
    let stderr = String::from_utf8_lossy(&as_nobody.stderr);
    assert!(stderr.contains("belongs to uid 0"), "{stderr}");
    // The lease is still there; its owner may release it.
    let out = daemon.cli(&["release", &lease.lease_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The log is plain text when stderr is not a terminal — no colour codes in files or the journal —
/// also when the daemon inherited a `JOURNAL_STREAM` that does not name its stderr (a program
/// started from a systemd service with its output redirected).
#[tokio::test(flavor = "multi_thread")]
async fn the_log_is_plain_text_when_stderr_is_not_a_terminal() -> anyhow::Result<()> {
    let daemon = Daemon::start().await?;
    let log = daemon.log();
    assert!(log.contains("listening on"), "{log}");
    assert!(!log.contains('\u{1b}'), "colour codes in a file: {log:?}");

    let dir = tempfile::tempdir()?;
    let log_path = dir.path().join("daemon.log");
    let mut child = Command::new(styxy_tests::styxy_bin())
        .arg("daemon")
        .arg("--socket")
        .arg(dir.path().join("styxy.sock"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--listen", "none", "--observer", "sockets"])
        .env("JOURNAL_STREAM", "8:12345")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path)?)
        .spawn()?;
    let log = styxy_tests::eventually(10, "the daemon's first lines", || async {
        let text = std::fs::read_to_string(&log_path).ok()?;
        text.contains("listening on").then_some(text)
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let log = log?;
    assert!(!log.contains('\u{1b}'), "colour codes: {log:?}");
    assert!(
        log.lines()
            .any(|l| l.contains("INFO") && l.contains("listening on")),
        "plain lines with their level: {log}"
    );
    Ok(())
}

/// A released lease's id is never issued again, not even after `kill -9` and a restart: a
/// script that releases by id cannot end someone else's lease.
#[tokio::test(flavor = "multi_thread")]
async fn lease_ids_are_never_reused_across_restarts() -> anyhow::Result<()> {
    let mut daemon = Daemon::start().await?;
    let allocate = || pb::AllocateRequest {
        service_type: "api".into(),
        ttl_seconds: Some(600),
        ..Default::default()
    };
    let mut client = daemon.client().await?;
    let first = client.allocate(allocate()).await?.into_inner();
    client
        .release(pb::ReleaseRequest {
            target: Some(pb::release_request::Target::LeaseId(first.lease_id.clone())),
        })
        .await?;
    drop(client);
    daemon.kill9_and_restart().await?;
    let mut client = daemon.client().await?;
    let second = client.allocate(allocate()).await?.into_inner();
    assert_ne!(second.lease_id, first.lease_id, "a released id came back");
    daemon.kill9_and_restart().await?;
    let mut client = daemon.client().await?;
    let third = client.allocate(allocate()).await?.into_inner();
    assert!(
        ![&first.lease_id, &second.lease_id].contains(&&third.lease_id),
        "{third:?}"
    );
    Ok(())
}

/// A user may tie a lease only to its own processes, and lease no port below 1024: the range
/// cannot be held for the life of pid 1, nor port 80 taken from root's server (root may do both).
#[tokio::test(flavor = "multi_thread")]
async fn another_user_cannot_lease_for_someone_elses_process_or_a_privileged_port(
) -> anyhow::Result<()> {
    if !styxy_tests::can_act_as_another_user() {
        return Ok(());
    }
    let daemon = Daemon::start().await?;
    let refused = daemon.cli_as_other_user(&["allocate", "api", "--pid", "1"]);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("pid 1 belongs to uid 0"), "{stderr}");
    let refused = daemon.cli_as_other_user(&["allocate", "api", "--port", "80", "--ttl", "60"]);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("below 1024"), "{stderr}");
    let ports = daemon.cli(&["--json", "ports"]);
    let listed: serde_json::Value = serde_json::from_slice(&ports.stdout)?;
    assert!(
        listed.get("leases").is_none(),
        "nothing was leased: {listed}"
    );

    // Its own process, and an ordinary port: fine. Root: anything.
    let mut own = Command::new("sleep").arg("60").uid(65534).spawn()?;
    let ok = daemon.cli_as_other_user(&["allocate", "api", "--pid", &own.id().to_string()]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let ok = daemon.cli(&["allocate", "api", "--pid", "1"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    own.kill()?;
    own.wait()?;
    Ok(())
}

/// Starts `styxy daemon` on `state_dir` (no TCP, socket tables) and returns its output once it
/// exits, or `None` when it came up (then it is stopped).
fn daemon_on_state_dir(
    state_dir: &std::path::Path,
) -> anyhow::Result<Option<std::process::Output>> {
    let run_dir = tempfile::tempdir()?;
    let mut child = Command::new(styxy_tests::styxy_bin())
        .arg("daemon")
        .arg("--socket")
        .arg(run_dir.path().join("styxy.sock"))
        .arg("--state-dir")
        .arg(state_dir)
        .args(["--listen", "none", "--observer", "sockets"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        if child.try_wait()?.is_some() {
            return Ok(Some(child.wait_with_output()?));
        }
        if run_dir.path().join("styxy.sock").exists() {
            // Up: stop it cleanly, so it writes what it writes on the way out too.
            // SAFETY: kill has no memory preconditions; the pid is our own child's.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            child.wait()?;
            return Ok(None);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the daemon neither started nor exited"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The state dir is the daemon's own: created 0700 with 0600 files; no link planted in it is
/// ever followed (the daemon refuses to start, and the link's target is untouched); a dir that
/// belongs to another user or that others may write to is refused, with the fix.
#[tokio::test(flavor = "multi_thread")]
async fn the_state_dir_is_private_and_no_planted_link_is_followed() -> anyhow::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let base = tempfile::tempdir()?;
    let fresh = base.path().join("fresh");
    assert!(
        daemon_on_state_dir(&fresh)?.is_none(),
        "starts on a fresh dir"
    );
    assert_eq!(std::fs::metadata(&fresh)?.mode() & 0o777, 0o700);
    for file in ["journal.jsonl", "state.json", "audit.jsonl"] {
        let mode = std::fs::metadata(fresh.join(file))?.mode() & 0o777;
        assert_eq!(mode, 0o600, "{file}");
    }

    let precious = base.path().join("precious");
    for planted in [
        "journal.jsonl",
        "audit.jsonl",
        "state.json",
        "state.json.tmp",
    ] {
        std::fs::write(&precious, "precious\n")?;
        let dir = base.path().join(format!("planted-{planted}"));
        std::fs::create_dir(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        std::os::unix::fs::symlink(&precious, dir.join(planted))?;
        let outcome = daemon_on_state_dir(&dir)?;
        assert_eq!(
            std::fs::read_to_string(&precious)?,
            "precious\n",
            "{planted}: the link's target was written"
        );
        match planted {
            // A leftover temporary is removed (the link, never its target) and made anew.
            "state.json.tmp" => assert!(outcome.is_none(), "{planted}: starts"),
            _ => {
                let out = outcome.expect("refuses to start");
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert!(
                    stderr.contains(planted) && stderr.contains("symbolic link"),
                    "{planted}: {stderr}"
                );
            }
        }
    }

    let open = base.path().join("world-writable");
    std::fs::create_dir(&open)?;
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777))?;
    let out = daemon_on_state_dir(&open)?.expect("refused");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("chmod 700"),
        "{out:?}"
    );
    if is_root() {
        let foreign = base.path().join("foreign");
        std::fs::create_dir(&foreign)?;
        std::os::unix::fs::chown(&foreign, Some(65534), Some(65534))?;
        let out = daemon_on_state_dir(&foreign)?.expect("refused");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("belongs to uid 65534"), "{stderr}");
    }
    Ok(())
}

/// Bad input gets a short answer: a request over 16 KiB is refused before it is decoded, and an
/// invalid value is quoted by a short prefix (a 4 MB service type once came back as a 34 MB
/// message). Over loopback TCP, which any local process may use.
#[tokio::test(flavor = "multi_thread")]
async fn oversized_input_is_refused_with_a_short_message() -> anyhow::Result<()> {
    let daemon = Daemon::start().await?;
    let mut client = daemon.tcp_client().await?;
    let huge = client
        .suggest(pb::SuggestRequest {
            service_type: "x".repeat(4 << 20),
            count: 1,
        })
        .await
        .expect_err("a 4 MB request is refused");
    assert!(huge.message().len() < 300, "{} bytes", huge.message().len());
    let bad = client
        .suggest(pb::SuggestRequest {
            service_type: "Y".repeat(10_000),
            count: 1,
        })
        .await
        .expect_err("an invalid type is refused");
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(
        bad.message().len() < 300 && bad.message().contains("(10000 bytes)"),
        "{}",
        bad.message()
    );
    // The daemon is fine afterwards.
    client.status(pb::StatusRequest {}).await?;
    Ok(())
}

/// Reads OpenMetrics text on stdin with Python's prometheus_client parser (what a Prometheus
/// ecosystem tool would use) and prints every sample as `name{labels} value`, labels sorted.
const PARSE_OPENMETRICS: &str = "import sys\n\
from prometheus_client.openmetrics.parser import text_string_to_metric_families\n\
for family in text_string_to_metric_families(sys.stdin.read()):\n    \
for s in family.samples:\n        \
labels = ','.join(f'{k}={v}' for k, v in sorted(s.labels.items()))\n        \
print(f'{s.name}{{{labels}}} {s.value}')\n";

/// `--metrics ADDR` serves what operators watch, in a format a real parser reads.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_served_and_parse_as_openmetrics() -> anyhow::Result<()> {
    let base = styxy_tests::port_block();
    let addr = format!("127.0.0.1:{}", base + 1);
    let daemon = Daemon::start_with(&["--metrics", &addr]).await?;
    let mut client = daemon.client().await?;
    client
        .suggest(pb::SuggestRequest {
            service_type: "api".into(),
            count: 1,
        })
        .await?;
    let _ = client
        .suggest(pb::SuggestRequest {
            service_type: "Not Valid".into(),
            count: 1,
        })
        .await
        .expect_err("invalid");
    client
        .allocate(pb::AllocateRequest {
            service_type: "api".into(),
            ttl_seconds: Some(60),
            ..Default::default()
        })
        .await?;
    let held = daemon.base + 150;
    let server = http_server(held)?;
    client
        .resolve_bind(styxy_tests::resolve_bind_request(
            std::process::id(),
            held,
            pb::Protocol::Tcp,
        ))
        .await?;
    drop(server);

    let scrape = Command::new("curl")
        .args(["-sS", "--max-time", "10", &format!("http://{addr}/metrics")])
        .output()?;
    assert!(scrape.status.success(), "{scrape:?}");
    let mut parser = Command::new("python3")
        .args(["-c", PARSE_OPENMETRICS])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(parser.stdin.as_mut().expect("stdin"), &scrape.stdout)?;
    let parsed = parser.wait_with_output()?;
    assert!(
        parsed.status.success(),
        "not OpenMetrics: {}\n{}",
        String::from_utf8_lossy(&parsed.stderr),
        String::from_utf8_lossy(&scrape.stdout)
    );
    let samples: std::collections::HashMap<String, f64> = String::from_utf8(parsed.stdout)?
        .lines()
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect();
    let value = |name: &str| samples.get(name).copied();
    assert_eq!(
        value("styxy_rpcs_total{code=OK,method=Suggest}"),
        Some(1.0),
        "{samples:?}"
    );
    assert_eq!(
        value("styxy_rpcs_total{code=INVALID_ARGUMENT,method=Suggest}"),
        Some(1.0)
    );
    assert_eq!(
        value("styxy_rpcs_total{code=OK,method=Allocate}"),
        Some(1.0)
    );
    assert_eq!(
        value("styxy_rpcs_total{code=OK,method=ResolveBind}"),
        Some(1.0)
    );
    assert_eq!(value("styxy_resolve_bind_seconds_count{}"), Some(1.0));
    assert_eq!(
        value("styxy_leases{kind=lease,service_type=api}"),
        Some(1.0)
    );
    assert_eq!(
        value("styxy_moves_total{}"),
        Some(1.0),
        "the ResolveBind was moved off {held}"
    );
    assert!(value("styxy_binds_seen_total{}").is_some_and(|n| n >= 1.0));
    assert!(value("styxy_resyncs_total{}").is_some_and(|n| n >= 1.0));
    assert_eq!(value("styxy_lost_records_total{}"), Some(0.0));
    assert_eq!(value("styxy_observer{observer=sockets-table}"), Some(1.0));

    let refused = Daemon::start_with(&["--metrics", "0.0.0.0:9"]).await;
    let error = format!("{:#}", refused.err().expect("not loopback: refused"));
    assert!(error.contains("loopback"), "{error}");
    Ok(())
}

/// Out of file descriptors, the daemon cannot read `/proc`: that is no proof a process died. A
/// lease tied to a live process survives a flood of idle connections that exhausts the daemon's
/// descriptors (it was ended and journaled, with nothing logged), and Status counts the checks
/// that could not be made.
#[tokio::test(flavor = "multi_thread")]
async fn a_descriptor_flood_never_ends_a_live_process_lease() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("styxy.sock");
    // A low hard limit (the daemon raises its soft limit to the hard one, and no further): its
    // own ~24 descriptors and the 16 connections it always admits go past 34, so /proc reads
    // fail with EMFILE. (That they did is checked below: processes_unchecked.)
    let daemon = styxy_tests::KillOnDrop(
        Command::new("prlimit")
            .arg("--nofile=34:34")
            .arg(styxy_tests::styxy_bin())
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
                "200",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let cli = |args: &[&str]| {
        Command::new(styxy_tests::styxy_bin())
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .output()
    };
    styxy_tests::eventually(10, "the daemon up", || async {
        cli(&["status"]).ok()?.status.success().then_some(())
    })
    .await?;
    let mut owner = Command::new("sleep").arg("120").spawn()?;
    let leased = cli(&[
        "--json",
        "allocate",
        "api",
        "--pid",
        &owner.id().to_string(),
    ])?;
    assert!(leased.status.success(), "{leased:?}");
    let lease: serde_json::Value = serde_json::from_slice(&leased.stdout)?;
    // Idle connections until the daemon has no descriptor left, held over a few lease sweeps.
    let flood: Vec<std::os::unix::net::UnixStream> = (0..100)
        .filter_map(|_| std::os::unix::net::UnixStream::connect(&socket).ok())
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(3500));
    drop(flood);
    let seen = styxy_tests::eventually(15, "the daemon answering again", || async {
        let out = cli(&["--json", "status"]).ok()?;
        out.status.success().then_some(out)
    })
    .await?;
    let status: serde_json::Value = serde_json::from_slice(&seen.stdout)?;
    let ports = cli(&["--json", "ports"])?;
    let listed: serde_json::Value = serde_json::from_slice(&ports.stdout)?;
    let leases = listed["leases"].as_array().cloned().unwrap_or_default();
    drop(daemon);
    owner.kill()?;
    owner.wait()?;
    assert!(
        leases.iter().any(|l| l["leaseId"] == lease["leaseId"]),
        "the lease of a live process was ended: {listed}"
    );
    assert!(
        status["processesUnchecked"]
            .as_str()
            .and_then(|n| n.parse::<u64>().ok())
            > Some(0),
        "Status counts the checks it could not make: {status}"
    );
    Ok(())
}

/// A damaged journal is found, not read past: the daemon starts with what came before the
/// damage, keeps the damaged file aside, and says what it dropped in Status and `styxy status`.
#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_journal_is_reported_with_what_was_dropped() -> anyhow::Result<()> {
    let mut daemon = Daemon::start().await?;
    let mut client = daemon.client().await?;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let lease = client
            .allocate(pb::AllocateRequest {
                service_type: "api".into(),
                ttl_seconds: Some(600),
                ..Default::default()
            })
            .await?
            .into_inner();
        ids.push(lease.lease_id);
    }
    drop(client);
    daemon.kill9()?;
    let journal = daemon.dir.join("state/journal.jsonl");
    let mut bytes = std::fs::read(&journal)?;
    let second = bytes
        .iter()
        .position(|b| *b == b'\n')
        .expect("a first record")
        + 1;
    bytes[second + 12] ^= 0x04;
    std::fs::write(&journal, &bytes)?;
    daemon.kill9_and_restart().await?;

    let status = daemon.status().await?;
    assert_eq!(status.state_damage.len(), 1, "{status:?}");
    assert!(
        // Each Allocate wrote two records (the lease, and its sticky port): 6 in all, 1 kept.
        status.state_damage[0].contains("damaged at record 2")
            && status.state_damage[0].contains("dropped 5"),
        "{:?}",
        status.state_damage
    );
    let listed = daemon.cli(&["--json", "ports"]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout)?;
    let held: Vec<&str> = listed["leases"]
        .as_array()
        .map(|l| l.iter().filter_map(|x| x["leaseId"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(held, vec![ids[0].as_str()], "what came before the damage");
    let human = String::from_utf8(daemon.cli(&["status"]).stdout)?;
    assert!(human.contains("damaged state found at start"), "{human}");
    assert!(std::fs::read_dir(daemon.dir.join("state"))?
        .filter_map(|e| e.ok())
        .any(|e| e
            .file_name()
            .to_string_lossy()
            .starts_with("journal.jsonl.damaged-")));
    Ok(())
}

/// One user cannot lease a whole range: past its share (half of it by default) Allocate answers
/// ResourceExhausted with the limit and how to raise it, while root and the user's own shimmed
/// binds (claims) go on.
#[tokio::test(flavor = "multi_thread")]
async fn a_user_cannot_lease_more_than_its_share_of_a_range() -> anyhow::Result<()> {
    if !styxy_tests::can_act_as_another_user() {
        return Ok(());
    }
    let daemon = Daemon::start().await?;
    // The test daemon's storybook range has 24 ports: 12 for one user.
    for n in 0..12 {
        let out = daemon.cli_as_other_user(&["allocate", "storybook", "--ttl", "600"]);
        assert!(
            out.status.success(),
            "lease {n}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let refused = daemon.cli_as_other_user(&["allocate", "storybook", "--ttl", "600"]);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("uid 65534 holds 12 lease(s) in the storybook range")
            && stderr.contains("range_share_percent"),
        "{stderr}"
    );
    let root = daemon.cli(&["allocate", "storybook", "--ttl", "600"]);
    assert!(root.status.success(), "root is not limited: {root:?}");
    let held = daemon.base + 20;
    let _holder = http_server(held)?;
    let mut shimmed = daemon.shimmed_http_server(held);
    let moved = styxy_tests::Spawned::start(shimmed.uid(65534))?
        .line_where(20, |l| l.starts_with("✓ STYXY: Auto-assigned port"));
    assert!(
        moved.is_ok(),
        "the user's shimmed bind still moves: {moved:?}"
    );
    Ok(())
}

/// Opens N connections to SOCKET, then counts those the daemon closed at once (EOF) and those it
/// kept (its HTTP/2 settings arrive, or nothing yet).
const HOLD_CONNECTIONS: &str = "import socket, sys\n\
path, n = sys.argv[1], int(sys.argv[2])\n\
held = []\n\
for _ in range(n):\n    s = socket.socket(socket.AF_UNIX)\n    s.connect(path)\n    held.append(s)\n\
closed = kept = 0\n\
for s in held:\n    s.settimeout(0.2)\n    \
try:\n        gone = s.recv(1) == b''\n    except socket.timeout:\n        gone = False\n    except OSError:\n        gone = True\n    \
closed += gone\n    kept += not gone\n\
print(kept, closed, flush=True)\n\
sys.stdin.read()\n";

/// One user cannot take every connection: past 256 of its own the daemon closes new ones at
/// once (counted in Status and the metrics), while root's calls go on being served.
#[tokio::test(flavor = "multi_thread")]
async fn one_user_cannot_hold_every_connection() -> anyhow::Result<()> {
    if !styxy_tests::can_act_as_another_user() {
        return Ok(());
    }
    let daemon = Daemon::start().await?;
    let mut flood = styxy_tests::Spawned::start(
        Command::new("/usr/bin/python3")
            .args(["-c", HOLD_CONNECTIONS])
            .arg(&daemon.socket)
            .arg("300")
            .uid(65534)
            .gid(65534),
    )?;
    let line = flood.line_where(30, |l| l.split_whitespace().count() == 2)?;
    let counts: Vec<usize> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    assert_eq!(counts, vec![256, 44], "kept, closed at once");
    // Root is served meanwhile, and Status says what was refused.
    let status = daemon.status().await?;
    assert!(status.refused_connections >= 44, "{status:?}");
    drop(flood);
    Ok(())
}

/// `kill -9` at random moments under an Allocate load, several rounds: every Allocate that was
/// answered is there after the restarts (an answer waits for its fsync).
#[tokio::test(flavor = "multi_thread")]
async fn every_answered_allocate_survives_kill_9_at_random_moments() -> anyhow::Result<()> {
    let mut daemon = Daemon::start().await?;
    let answered = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, u32)>::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let socket = daemon.socket.clone();
        let answered = answered.clone();
        let stop = stop.clone();
        load.spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let target = styxy_cli::client::Target::Unix(socket.clone());
                let Ok(mut client) = styxy_cli::client::connect(&target).await else {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                };
                while let Ok(Ok(lease)) = tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    client.allocate(pb::AllocateRequest {
                        service_type: "bench".into(),
                        ttl_seconds: Some(3600),
                        ..Default::default()
                    }),
                )
                .await
                {
                    let lease = lease.into_inner();
                    answered
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((lease.lease_id, lease.port));
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                }
            }
        });
    }
    // Random-ish moments: a different pause before each kill.
    let seed = u64::from(std::process::id());
    for round in 0..4u64 {
        let pause = 150 + (seed.wrapping_mul(31).wrapping_add(round * 97) % 350);
        tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
        daemon.kill9_and_restart().await?;
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    while load.join_next().await.is_some() {}
    let answered = answered.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(
        answered.len() > 50,
        "the load ran: {} answers",
        answered.len()
    );
    let mut client = daemon.client().await?;
    let listed = client
        .list_ports(pb::ListPortsRequest {})
        .await?
        .into_inner();
    let held: std::collections::HashMap<&str, u32> = listed
        .leases
        .iter()
        .map(|l| (l.lease_id.as_str(), l.port))
        .collect();
    let lost: Vec<&(String, u32)> = answered
        .iter()
        .filter(|(id, port)| held.get(id.as_str()) != Some(port))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} answered leases lost: {:?}",
        lost.len(),
        answered.len(),
        lost.iter().take(5).collect::<Vec<_>>()
    );
    Ok(())
}

/// A full disk: Allocate (which waits for its change to be on disk) fails promptly with
/// Unavailable and the cause, read calls go on, every answered lease is kept, the daemon writes
/// again by itself once there is room, and SIGTERM still stops it. State on a 3 MiB tmpfs.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_fails_durable_calls_promptly_and_recovers() -> anyhow::Result<()> {
    if !styxy_tests::can_act_as_another_user() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let mount = dir.path().join("small");
    std::fs::create_dir(&mount)?;
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs"])
        .arg(&mount)
        .status()?;
    anyhow::ensure!(mounted.success(), "mount tmpfs: {mounted}");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mount.clone());
    // 6,000 ports for leases, below the test port blocks (20000-32767): a lease tied to no process
    // ends when a process of its user binds the port, and the other tests' servers (root, like
    // this test) bind in those blocks.
    std::fs::write(
        dir.path().join("config.toml"),
        "[services.bench]\nrange = [11000, 16999]\n",
    )?;
    let socket = dir.path().join("styxy.sock");
    let mut daemon = styxy_tests::KillOnDrop(
        Command::new(styxy_tests::styxy_bin())
            .arg("daemon")
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(mount.join("state"))
            .arg("--config")
            .arg(dir.path().join("config.toml"))
            .args(["--listen", "none", "--observer", "sockets"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let target = styxy_cli::client::Target::Unix(socket.clone());
    let mut client = styxy_tests::eventually(10, "the daemon up", || async {
        styxy_cli::client::connect(&target).await.ok()
    })
    .await?;
    // Fill the rest of the disk.
    {
        use std::io::Write;
        let mut filler = std::fs::File::create(mount.join("filler"))?;
        let block = vec![7u8; 64 * 1024];
        while filler.write_all(&block).is_ok() {}
        let _ = filler.sync_all();
    }
    let allocate = || pb::AllocateRequest {
        service_type: "bench".into(),
        ttl_seconds: Some(3600),
        ..Default::default()
    };
    // The journal's zeroed chunk takes records until it is used up; then the disk is full.
    let mut answered = Vec::new();
    let refusal = loop {
        anyhow::ensure!(answered.len() < 6000, "no write ever failed");
        let started = std::time::Instant::now();
        let call = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            client.allocate(allocate()),
        )
        .await
        .map_err(|_| anyhow::anyhow!("an Allocate hung on a full disk"))?;
        match call {
            Ok(lease) => answered.push(lease.into_inner().lease_id),
            Err(status) => break (status, started.elapsed()),
        }
    };
    let (status, took) = refusal;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("cannot be written")
            && status.message().contains("No space left"),
        "{}",
        status.message()
    );
    assert!(
        took < std::time::Duration::from_secs(3),
        "refused after {took:?}"
    );
    // Read calls go on.
    client.status(pb::StatusRequest {}).await?;
    client.list_ports(pb::ListPortsRequest {}).await?;

    // Room again: the daemon writes again by itself.
    std::fs::remove_file(mount.join("filler"))?;
    styxy_tests::eventually(15, "an Allocate accepted again", || {
        let mut client = client.clone();
        async move { client.allocate(allocate()).await.ok() }
    })
    .await?;
    let listed = client
        .list_ports(pb::ListPortsRequest {})
        .await?
        .into_inner();
    let held: std::collections::HashSet<&str> =
        listed.leases.iter().map(|l| l.lease_id.as_str()).collect();
    let lost: Vec<&String> = answered
        .iter()
        .filter(|id| !held.contains(id.as_str()))
        .collect();
    assert!(lost.is_empty(), "{} answered leases lost", lost.len());

    // SIGTERM still stops it.
    // SAFETY: kill has no memory preconditions; the pid is our own child's.
    unsafe { libc::kill(daemon.0.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let stopped = loop {
        if let Some(status) = daemon.0.try_wait()? {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(
        stopped.is_some(),
        "SIGTERM did not stop the daemon within 10 s"
    );
    Ok(())
}

/// A connection that goes silent — before the HTTP/2 preface, or half-way through a frame — is
/// closed after `--idle-timeout-secs`, on the Unix socket and over TCP; a live client's `Watch`
/// stream outlasts it (the daemon's pings and their answers keep it).
#[tokio::test(flavor = "multi_thread")]
async fn silent_and_half_open_connections_are_closed_live_ones_stay() -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let daemon = Daemon::start_with(&["--idle-timeout-secs", "3"]).await?;
    let mut watch = daemon
        .client()
        .await?
        .watch(pb::WatchRequest {})
        .await?
        .into_inner();

    let socket = daemon.socket.clone();
    let tcp_address = daemon.tcp.clone();
    // Blocking reads, off the runtime that keeps the Watch client's connection answering pings.
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut silent = std::os::unix::net::UnixStream::connect(&socket)?;
        let mut half = std::os::unix::net::UnixStream::connect(&socket)?;
        // The preface and the start of a SETTINGS frame header, then nothing.
        half.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00")?;
        let mut tcp = std::net::TcpStream::connect(tcp_address.as_str())?;
        // Never hang the test if the daemon keeps them open: a read then fails.
        let patience = Some(std::time::Duration::from_secs(10));
        silent.set_read_timeout(patience)?;
        half.set_read_timeout(patience)?;
        tcp.set_read_timeout(patience)?;
        let started = std::time::Instant::now();
        for (name, stream) in [
            ("silent", &mut silent as &mut dyn Read),
            ("half a frame", &mut half),
            ("silent over TCP", &mut tcp),
        ] {
            // Whatever the server sent first (its SETTINGS), then end of file when it closes.
            let mut sink = Vec::new();
            match stream.read_to_end(&mut sink) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                Err(e) => return Err(e.into()),
            }
            let after = started.elapsed();
            anyhow::ensure!(
                after < std::time::Duration::from_secs(8),
                "{name}: closed after {after:?}"
            );
        }
        anyhow::ensure!(
            started.elapsed() >= std::time::Duration::from_secs(2),
            "not before the idle time"
        );
        Ok(())
    })
    .await??;

    // The Watch stream, idle all along, still delivers.
    let port = daemon.base + 60;
    let _server = http_server(port)?;
    next_event(&mut watch, |e| e.port == u32::from(port)).await?;
    Ok(())
}
