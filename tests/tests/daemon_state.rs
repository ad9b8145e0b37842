//! The daemon's state on disk end to end: leases survive `kill -9` and restarts, ids are never
//! reused, the state dir is private, damage is reported, a full disk fails promptly and recovers.

use std::process::{Command, Stdio};

use styxy_tests::v1 as pb;
use styxy_tests::{eventually, is_root, Daemon};
use tonic::Code;

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
            name: None,
        })
        .await?
        .into_inner();
    assert!(
        instance
            .instance_id
            .starts_with(&format!("ldpreload-{}-", sleeper.id())),
        "{}",
        instance.instance_id
    );

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

/// One daemon per state dir: a second one given the same dir (on another socket) stops at once,
/// names the first, and leaves it serving.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_daemon_on_one_state_dir_stops_and_names_the_first() -> anyhow::Result<()> {
    let daemon = Daemon::start().await?;
    let out = Command::new(styxy_tests::styxy_bin())
        .arg("daemon")
        .arg("--socket")
        .arg(daemon.dir.join("second.sock"))
        .arg("--state-dir")
        .arg(daemon.state_dir())
        .args(["--listen", "127.0.0.1:0", "--observer", "sockets"])
        .stdin(Stdio::null())
        .output()?;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("another daemon uses the state dir")
            && said.contains(&format!("(pid {})", daemon.pid())),
        "{said}"
    );
    assert!(!daemon.dir.join("second.sock").exists());
    daemon.status().await?;
    Ok(())
}
