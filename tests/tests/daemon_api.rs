//! The daemon's gRPC API end to end: real daemon binary, real servers, real sockets, real clients —
//! what each call answers, and how bad input is refused.

use std::collections::HashSet;
use std::process::{Command, Stdio};

use styxy_tests::v1 as pb;
use styxy_tests::{http_server, next_event, resolve_bind_request, Daemon};
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
            name: None,
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
    // The live heap the `styxy` binary's allocator counts: a daemon holds some hundreds of kB
    // to some MB, and Status says the same within what one call moves.
    let heap = value("styxy_heap_live_bytes{}").expect("the heap gauge");
    assert!((100e3..1e9).contains(&heap), "{heap}");
    let status_heap = daemon
        .status()
        .await?
        .heap_live_bytes
        .expect("Status carries the live heap") as f64;
    assert!((status_heap - heap).abs() < 1e6, "{status_heap} vs {heap}");
    let shown = String::from_utf8_lossy(&daemon.cli(&["status"]).stdout).to_string();
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("heap:") && l.contains(" MB live")),
        "{shown}"
    );

    let refused = Daemon::start_with(&["--metrics", "0.0.0.0:9"]).await;
    let error = format!("{:#}", refused.err().expect("not loopback: refused"));
    assert!(error.contains("loopback"), "{error}");
    Ok(())
}
