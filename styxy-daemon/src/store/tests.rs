//! The store against a real state dir: durability, replay, damage, rotation, hardening.

use super::*;
use std::fs::{self, OpenOptions};

use styxy_broker::{Lease, LeaseKind, ProcessId, Protocol};

fn lease(id: &str, port: u16) -> Lease {
    Lease {
        id: id.into(),
        port,
        service_type: "dev".into(),
        owner_uid: 1000,
        process: Some(ProcessId {
            pid: 1,
            start_time: 2,
        }),
        instance_id: None,
        created_ms: 1,
        expires_ms: None,
        kind: LeaseKind::Allocated,
    }
}

fn audit(port: u16) -> AuditRecord {
    AuditRecord {
        at_ms: 1,
        pid: 2,
        comm: "node".into(),
        uid: 1000,
        requested_port: port,
        assigned_port: port + 1,
        protocol: Protocol::Tcp,
        service_type: "dev".into(),
        holder_pid: None,
        holder_comm: None,
        holder_cmdline: None,
        holder_instance_id: None,
        instance_id: None,
    }
}

#[tokio::test]
async fn changes_nobody_waits_for_still_reach_the_disk() {
    let dir_guard = tempfile::tempdir().unwrap();
    let dir = dir_guard.path().to_path_buf();
    let (store, _, _) = Store::open(&dir, 100).unwrap();
    // One waited-for write first, so the writer is idle, asleep, when the others come.
    let t = store.enqueue(
        &[StateChange::PutLease {
            lease: lease("lease-0", 2999),
        }],
        &[],
    );
    store.durable(t).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    // Two in a row: the second finds the writer awake (lingering) and does not wake it.
    for (id, port) in [("claim-1", 3000), ("claim-2", 3001)] {
        store.enqueue(
            &[StateChange::PutLease {
                lease: lease(id, port),
            }],
            &[audit(port)],
        );
    }
    let written = |file: &str, wanted: &str| {
        fs::read_to_string(dir.join(file)).is_ok_and(|text| text.contains(wanted))
    };
    // Generous: the point is that they arrive without anyone asking, not how fast.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !(written(JOURNAL, "claim-2") && written(AUDIT, "3002")) {
        assert!(
            std::time::Instant::now() < deadline,
            "lingering changes were never written"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(written(JOURNAL, "claim-1"));
}

#[tokio::test]
async fn changes_survive_reopen_and_a_torn_line_is_skipped() {
    let dir_guard = tempfile::tempdir().unwrap();
    let dir = dir_guard.path().to_path_buf();
    let (store, snap, _) = Store::open(&dir, 100).unwrap();
    assert!(snap.leases.is_empty());
    store.enqueue(
        &[StateChange::PutLease {
            lease: lease("lease-1", 3000),
        }],
        &[],
    );
    store.enqueue(
        &[StateChange::PutLease {
            lease: lease("lease-2", 3001),
        }],
        &[audit(3000)],
    );
    let t = store.enqueue(
        &[StateChange::RemoveLease {
            id: "lease-1".into(),
        }],
        &[],
    );
    store.durable(t).await.unwrap();
    // As after kill -9: no close, a torn line at the end of the journal (where its zeros begin).
    let journal = OpenOptions::new()
        .write(true)
        .open(dir.join(JOURNAL))
        .unwrap();
    let end = fs::read(dir.join(JOURNAL))
        .unwrap()
        .iter()
        .position(|b| *b == 0)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&journal, b"{\"op\":\"put_le", end as u64).unwrap();

    let (store2, snap, audit_back) = Store::open(&dir, 100).unwrap();
    assert_eq!(snap.leases, vec![lease("lease-2", 3001)]);
    assert_eq!(audit_back, vec![audit(3000)]);
    store2.close().await.unwrap();
    let (_, snap, _) = Store::open(&dir, 100).unwrap();
    assert_eq!(snap.leases.len(), 1);
}

#[tokio::test]
async fn the_audit_log_rotates_and_the_newest_entries_come_back() {
    let dir_guard = tempfile::tempdir().unwrap();
    let dir = dir_guard.path().to_path_buf();
    // Records are about 180 bytes: a rotation every third one, checked after each write.
    let (store, _, _) = Store::open_with(&dir, 100, 400).unwrap();
    for port in 3000..3010 {
        let ticket = store.enqueue(&[], &[audit(port)]);
        store.durable(ticket).await.unwrap();
    }
    store.close().await.unwrap();
    let current = fs::metadata(dir.join(AUDIT)).unwrap().len();
    let rotated = fs::metadata(dir.join(AUDIT_ROTATED)).unwrap().len();
    assert!(
        current < 400 && rotated < 600,
        "bounded: {current} + {rotated}"
    );
    let (_, _, back) = Store::open_with(&dir, 100, 400).unwrap();
    let ports: Vec<u16> = back.iter().map(|r| r.requested_port).collect();
    assert_eq!(ports.last(), Some(&3009), "{ports:?}");
    assert!(ports.windows(2).all(|w| w[0] < w[1]), "in order: {ports:?}");
}

#[tokio::test]
async fn a_journal_longer_than_its_zeroed_chunks_comes_back_whole() {
    let dir_guard = tempfile::tempdir().unwrap();
    let dir = dir_guard.path().to_path_buf();
    let (store, _, _) = Store::open(&dir, 100).unwrap();
    // Batches of growing size, one larger than a chunk: over 3 MiB of journal in all.
    let mut next = 0u32;
    for batch in [1, 7, 300, 9000, 2] {
        let changes: Vec<StateChange> = (next..next + batch)
            .map(|n| StateChange::PutLease {
                // One port each: a port has one lease (the load checks it).
                lease: lease(&format!("lease-{n:0>200}"), 3000 + n as u16),
            })
            .collect();
        next += batch;
        store.durable(store.enqueue(&changes, &[])).await.unwrap();
    }
    let on_disk = fs::metadata(dir.join(JOURNAL)).unwrap().len();
    assert!(on_disk > 3 * JOURNAL_CHUNK, "{on_disk}");
    // As after kill -9: no close.
    let (_, snap, _) = Store::open(&dir, 100).unwrap();
    assert_eq!(snap.leases.len(), next as usize);
}

#[test]
fn waits_end_through_a_threads_relay_and_without_it_once_it_is_gone() {
    let dir_guard = tempfile::tempdir().unwrap();
    let dir = dir_guard.path().to_path_buf();
    let (store, _, _) = Store::open(&dir, 100).unwrap();
    let put = |store: &Store, id: String, port: u16| {
        store.enqueue(
            &[StateChange::PutLease {
                lease: lease(&id, port),
            }],
            &[],
        )
    };
    let single_threaded = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let patience = std::time::Duration::from_secs(10);
    single_threaded().block_on(async {
        tokio::spawn(store.relay_durable_here());
        assert!(store.relayed_receiver().is_some());
        // Many waiters at once, as under load: each must be woken by the relay.
        let waiters: Vec<_> = (0..20u16)
            .map(|n| {
                let store = store.clone();
                tokio::spawn(async move {
                    let ticket = put(&store, format!("lease-{n}"), 3000 + n);
                    store.durable(ticket).await
                })
            })
            .collect();
        for waiter in waiters {
            let waited = tokio::time::timeout(patience, waiter).await;
            assert!(
                matches!(waited, Ok(Ok(Ok(())))),
                "a wait through the relay did not end: {waited:?}"
            );
        }
    });
    // That runtime, and its relay, are gone: waits on this thread go straight to the writer.
    assert!(store.relayed_receiver().is_none());
    single_threaded().block_on(async {
        let ticket = put(&store, "lease-after".into(), 3100);
        let waited = tokio::time::timeout(patience, store.durable(ticket)).await;
        assert!(matches!(waited, Ok(Ok(()))), "{waited:?}");
    });
    let journal = fs::read_to_string(dir.join(JOURNAL)).unwrap();
    assert!(journal.contains("lease-19") && journal.contains("lease-after"));
}

#[test]
fn released_lease_ids_are_remembered_across_restarts_and_compactions() {
    let dir_guard = tempfile::tempdir().unwrap();
    let dir = dir_guard.path().to_path_buf();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (store, snapshot, _) = Store::open(&dir, 10).unwrap();
        assert_eq!(snapshot.lease_ids_issued, 0);
        let ticket = store.enqueue(
            &[
                StateChange::PutLease {
                    lease: lease("lease-7", 3000),
                },
                StateChange::RemoveLease {
                    id: "lease-7".into(),
                },
            ],
            &[],
        );
        store.durable(ticket).await.unwrap();
        store.close().await.unwrap();
    });
    // Opened twice: the first folds the journal into the snapshot, the second reads that.
    for _ in 0..2 {
        let (store, snapshot, _) = Store::open(&dir, 10).unwrap();
        assert!(snapshot.leases.is_empty());
        assert_eq!(
            snapshot.lease_ids_issued, 7,
            "lease-7 is gone, its id is not free"
        );
        runtime.block_on(store.close()).unwrap();
    }
}

#[test]
fn a_corrupt_snapshot_is_moved_aside_reported_and_the_daemon_starts() {
    let dir_guard = tempfile::tempdir().unwrap();
    let dir = dir_guard.path().to_path_buf();
    fs::write(dir.join(SNAPSHOT), "not json").unwrap();
    let (_, snap, _) = Store::open(&dir, 10).expect("starts");
    assert!(snap.leases.is_empty());
    assert_eq!(snap.damage.len(), 1, "{:?}", snap.damage);
    assert!(
        snap.damage[0].contains("state.json is not a state snapshot"),
        "{:?}",
        snap.damage
    );
    let aside: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("state.json.damaged-"))
        .collect();
    assert_eq!(aside.len(), 1, "the damaged snapshot is kept aside");
    assert_eq!(fs::read_to_string(dir.join(&aside[0])).unwrap(), "not json");
}

#[test]
fn a_damaged_journal_keeps_what_came_before_and_says_what_was_dropped() {
    let dir_guard = tempfile::tempdir().unwrap();
    let dir = dir_guard.path().to_path_buf();
    let mut bytes = Vec::new();
    for n in 0..5u16 {
        journal::append_record(
            &mut bytes,
            &StateChange::PutLease {
                lease: lease(&format!("lease-{n}"), 3000 + n),
            },
        );
    }
    // One flipped byte in the third record.
    let third = bytes
        .split(|b| *b == b'\n')
        .take(2)
        .map(|l| l.len() + 1)
        .sum::<usize>();
    bytes[third + 30] ^= 0x20;
    fs::write(dir.join(JOURNAL), &bytes).unwrap();
    let (_, snap, _) = Store::open(&dir, 10).expect("starts");
    let ids: Vec<&str> = snap.leases.iter().map(|l| l.id.as_str()).collect();
    assert_eq!(ids, ["lease-0", "lease-1"]);
    assert_eq!(snap.damage.len(), 1);
    assert!(
        snap.damage[0].contains("damaged at record 3")
            && snap.damage[0].contains("kept the 2 record(s) before it, dropped 3"),
        "{:?}",
        snap.damage
    );
    // The fresh journal replaced it; the damaged one is kept aside.
    assert!(fs::read_dir(&dir).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("journal.jsonl.damaged-")));
}

#[test]
fn two_leases_on_one_port_are_cut_to_the_first_and_reported() {
    let dir_guard = tempfile::tempdir().unwrap();
    let dir = dir_guard.path().to_path_buf();
    let snapshot = Snapshot {
        leases: vec![
            lease("lease-4", 3000),
            lease("lease-2", 3000),
            lease("lease-3", 3001),
        ],
        instances: vec![],
        sticky: vec![],
        lease_ids_issued: 4,
        damage: vec![],
    };
    fs::write(dir.join(SNAPSHOT), serde_json::to_vec(&snapshot).unwrap()).unwrap();
    let (_, snap, _) = Store::open(&dir, 10).unwrap();
    let ids: Vec<&str> = snap.leases.iter().map(|l| l.id.as_str()).collect();
    assert_eq!(ids, ["lease-2", "lease-3"], "the first issued stays");
    assert_eq!(snap.damage.len(), 1);
    assert!(snap.damage[0].contains("lease-4 held port 3000, which lease-2 holds too"));
}
