//! The daemon between users end to end: what one user may do to another's leases and processes,
//! each user's share, and connections that would exhaust the daemon.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use styxy_tests::v1 as pb;
use styxy_tests::{http_server, next_event, Daemon};

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
            .stderr(std::fs::File::create(dir.path().join("daemon.log"))?)
            .spawn()?,
    );
    let log = || std::fs::read_to_string(dir.path().join("daemon.log")).unwrap_or_default();
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
    .await
    .map_err(|e| e.context(format!("the daemon's log:\n{}", log())))?;
    let mut owner = Command::new("sleep").arg("120").spawn()?;
    let owner_pid = owner.id().to_string();
    // With so few descriptors, the daemon may still be closing the connections of the calls
    // above when this one asks it to read /proc: it then says so (and that the process runs),
    // rather than that the process is gone. Asked again, it answers.
    let leased = styxy_tests::eventually(10, "the lease", || async {
        let out = cli(&["--json", "allocate", "api", "--pid", &owner_pid]).ok()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() || stderr.contains("runs, but the daemon could not read"),
            "{out:?}"
        );
        out.status.success().then_some(out)
    })
    .await
    .map_err(|e| e.context(format!("the daemon's log:\n{}", log())))?;
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
    .await
    .map_err(|e| e.context(format!("the daemon's log:\n{}", log())))?;
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
