//! The broker's decisions, tested as plain data: no sockets, no files, no clock.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};

use super::*;

/// A process table for tests: who is alive, and each pid's parent.
#[derive(Default)]
struct Procs {
    alive: HashSet<ProcessId>,
    parent: HashMap<u32, ProcessId>,
}

impl ProcessView for Procs {
    fn is_alive(&self, id: ProcessId) -> bool {
        self.alive.contains(&id)
    }
    fn ancestors(&self, pid: u32) -> Vec<ProcessId> {
        let mut out = Vec::new();
        let mut cur = pid;
        while let Some(p) = self.parent.get(&cur) {
            out.push(*p);
            cur = p.pid;
        }
        out
    }
}

fn pid(pid: u32) -> ProcessId {
    ProcessId {
        pid,
        start_time: u64::from(pid) * 10,
    }
}

fn proc_info(p: u32, comm: &str, cmdline: &str) -> ProcessInfo {
    ProcessInfo {
        id: pid(p),
        comm: comm.into(),
        cmdline: cmdline.into(),
        instance_id: None,
    }
}

fn socket(cookie: u64, port: u16, owner: Option<ProcessInfo>) -> BoundSocket {
    BoundSocket {
        cookie,
        protocol: Protocol::Tcp,
        family: Family::Inet,
        address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        port,
        uid: 1000,
        owner,
        since_ms: 0,
    }
}

fn broker() -> Broker {
    Broker::new(ServiceRanges::default(), LeaseSettings::default())
}

fn bind_req(p: u32, port: u16) -> BindRequest {
    BindRequest {
        asker: proc_info(p, "node", "node server.js"),
        uid: 1000,
        port,
        protocol: Protocol::Tcp,
        family: Family::Inet,
        reuseport: false,
        instance_id: None,
        project: None,
    }
}

fn alloc(service: &str) -> AllocateRequest {
    AllocateRequest {
        service_type: service.into(),
        preferred_port: None,
        process: None,
        uid: 1000,
        instance_id: None,
        project: None,
        ttl_ms: None,
    }
}

fn user(uid: u32) -> Caller {
    Caller { uid, pid: None }
}

fn storybook_holder() -> BoundSocket {
    socket(
        1,
        6006,
        Some(proc_info(4121, "node", "node .bin/storybook dev -p 6006")),
    )
}

// ---- suggest and allocate ------------------------------------------------------------------------------

#[test]
fn suggest_is_lowest_free_first_excluding_bound_and_leased() {
    let mut b = broker();
    b.apply(PortEvent::Bound(socket(1, 3000, None)), 1);
    b.allocate(
        AllocateRequest {
            preferred_port: Some(3001),
            ..alloc("dev")
        },
        1,
    )
    .unwrap();
    let s = b.suggest("dev", 3).unwrap();
    assert_eq!(s.ports, vec![3002, 3003, 3004]);
    assert_eq!(
        (s.service_type.as_str(), s.start, s.end),
        ("dev", 3000, 3099)
    );
}

#[test]
fn a_udp_socket_also_takes_the_port() {
    let mut b = broker();
    b.apply(
        PortEvent::Bound(BoundSocket {
            protocol: Protocol::Udp,
            ..socket(9, 3000, None)
        }),
        1,
    );
    let s = b.suggest("dev", 1).unwrap();
    assert_eq!(
        (s.service_type.as_str(), s.ports.as_slice()),
        ("dev", &[3001][..])
    );
}

#[test]
fn an_unknown_service_type_is_an_error_naming_the_known_ones_and_the_nearest() {
    let mut b = broker();
    let err = b.suggest("storybok", 1).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("unknown service type \"storybok\""), "{text}");
    assert!(text.contains("did you mean \"storybook\"?"), "{text}");
    assert!(
        text.contains("api, auth, build"),
        "sorted, all of them: {text}"
    );
    let err = b.allocate(alloc("whatever"), 1).unwrap_err();
    assert!(
        matches!(&err, BrokerError::UnknownServiceType(u) if u.nearest.is_none() && u.name == "whatever"),
        "{err:?}"
    );
    assert_eq!(b.lease_count(), 0, "nothing was leased");
}

#[test]
fn allocations_are_distinct_until_the_range_is_exhausted() {
    let mut b = broker();
    let mut seen = HashSet::new();
    // As root: a user may lease only its share of a range.
    let root = || AllocateRequest {
        uid: 0,
        ..alloc("storybook")
    };
    for _ in 0..24 {
        let (lease, effects) = b.allocate(root(), 5).unwrap();
        assert!((6006..=6029).contains(&lease.port));
        assert!(
            seen.insert(lease.port),
            "port {} handed out twice",
            lease.port
        );
        assert!(matches!(effects.changes[0], StateChange::PutLease { .. }));
    }
    assert_eq!(
        b.allocate(root(), 5).unwrap_err(),
        BrokerError::NoFreePort {
            service_type: "storybook".into(),
            start: 6006,
            end: 6029
        }
    );
}

#[test]
fn allocate_takes_the_preferred_port_only_when_free() {
    let mut b = broker();
    b.apply(PortEvent::Bound(socket(1, 8080, None)), 1);
    let pick = |b: &mut Broker, p| {
        b.allocate(
            AllocateRequest {
                preferred_port: Some(p),
                ..alloc("api")
            },
            1,
        )
        .unwrap()
        .0
        .port
    };
    assert_eq!(pick(&mut b, 8050), 8050);
    assert_eq!(
        pick(&mut b, 8080),
        8000,
        "held preferred port falls back to lowest free"
    );
}

#[test]
fn lease_lifetimes_follow_pid_and_ttl() {
    let mut b = broker();
    let (free_standing, _) = b.allocate(alloc("dev"), 1_000).unwrap();
    assert_eq!(
        free_standing.expires_ms,
        Some(1_000 + 3_600_000),
        "no pid: default TTL"
    );
    assert_eq!(
        free_standing.process, None,
        "never tied to the short-lived client"
    );
    let (with_pid, _) = b
        .allocate(
            AllocateRequest {
                process: Some(pid(7)),
                ..alloc("dev")
            },
            1_000,
        )
        .unwrap();
    assert_eq!(with_pid.expires_ms, None, "lives with its process");
    let (with_ttl, _) = b
        .allocate(
            AllocateRequest {
                ttl_ms: Some(5_000),
                ..alloc("dev")
            },
            1_000,
        )
        .unwrap();
    assert_eq!(with_ttl.expires_ms, Some(6_000));
}

#[test]
fn release_is_for_the_owner_or_root() {
    let mut b = broker();
    let (lease, _) = b.allocate(alloc("dev"), 1).unwrap();
    assert_eq!(
        b.release_id(&lease.id, user(1001)).unwrap_err(),
        BrokerError::NotOwner {
            lease_id: lease.id.clone(),
            owner_uid: 1000
        }
    );
    let (released, effects) = b.release_port(lease.port, user(1000)).unwrap();
    assert_eq!(released.id, lease.id);
    assert_eq!(
        effects.changes,
        vec![StateChange::RemoveLease {
            id: lease.id.clone()
        }]
    );
    assert_eq!(
        b.release_id(&lease.id, user(0)).unwrap_err(),
        BrokerError::NoSuchLease(lease.id)
    );
    let (again, _) = b.allocate(alloc("dev"), 1).unwrap();
    assert_eq!(again.port, released.port, "released port is free again");
    assert!(
        b.release_id(&again.id, user(0)).is_ok(),
        "root may release any lease"
    );
    assert_eq!(
        b.release_port(3099, user(0)).unwrap_err(),
        BrokerError::NoLeaseOnPort(3099)
    );
}

// ---- resolve_bind --------------------------------------------------------------------------------------

#[test]
fn free_port_is_kept_and_claimed_so_a_racing_process_moves() {
    let mut b = broker();
    let procs = Procs {
        alive: [pid(10), pid(11)].into(),
        ..Procs::default()
    };
    let (first, effects) = b.resolve_bind(&bind_req(10, 6006), &procs, 1).unwrap();
    assert_eq!(first, BindDecision::Keep { port: 6006 });
    assert!(
        matches!(&effects.changes[..], [StateChange::PutLease { lease }] if lease.is_claim() && lease.port == 6006)
    );
    let (second, _) = b.resolve_bind(&bind_req(11, 6006), &procs, 2).unwrap();
    assert!(matches!(
        second,
        BindDecision::Reassign {
            port: 6007,
            holder: Some(HolderView::Lease(_))
        }
    ));
}

#[test]
fn held_port_moves_within_its_range_and_names_the_holder() {
    let mut b = broker();
    b.apply(PortEvent::Bound(storybook_holder()), 1);
    let (decision, effects) = b
        .resolve_bind(&bind_req(20, 6006), &Procs::default(), 2)
        .unwrap();
    let BindDecision::Reassign { port, holder } = decision else {
        panic!("expected a move, got {decision:?}");
    };
    assert_eq!(port, 6007);
    let Some(HolderView::Socket(held)) = holder else {
        panic!("holder should be the socket");
    };
    assert_eq!(
        (
            held.service_type.as_str(),
            held.socket.owner.unwrap().id.pid
        ),
        ("storybook", 4121)
    );
    let audit: Vec<_> = effects
        .notices
        .iter()
        .filter_map(|n| match n {
            Notice::Reassigned(a) => Some(a),
            _ => None,
        })
        .collect();
    assert_eq!(audit.len(), 1);
    assert_eq!(
        (
            audit[0].requested_port,
            audit[0].assigned_port,
            audit[0].holder_pid
        ),
        (6006, 6007, Some(4121))
    );
    assert_eq!(b.reassignments(), 1);
}

#[test]
fn an_api_port_never_moves_to_the_dev_range() {
    let mut b = broker();
    b.apply(PortEvent::Bound(socket(1, 8000, None)), 1);
    let (d, _) = b
        .resolve_bind(&bind_req(20, 8000), &Procs::default(), 2)
        .unwrap();
    assert!(matches!(d, BindDecision::Reassign { port: 8001, .. }));
}

#[test]
fn a_move_wraps_around_to_the_start_of_the_range() {
    let mut b = broker();
    for (i, port) in (6027..=6029).enumerate() {
        b.apply(PortEvent::Bound(socket(i as u64 + 1, port, None)), 1);
    }
    let (d, _) = b
        .resolve_bind(&bind_req(20, 6028), &Procs::default(), 2)
        .unwrap();
    assert!(
        matches!(d, BindDecision::Reassign { port: 6006, .. }),
        "{d:?}"
    );
}

#[test]
fn a_full_range_is_an_error_not_a_wrong_answer() {
    let mut b = broker();
    for (i, port) in (6006..=6029).enumerate() {
        b.apply(PortEvent::Bound(socket(i as u64 + 1, port, None)), 1);
    }
    assert!(matches!(
        b.resolve_bind(&bind_req(20, 6006), &Procs::default(), 2),
        Err(BrokerError::NoFreePort { .. })
    ));
}

#[test]
fn a_port_in_no_range_moves_upwards_nearby() {
    let mut b = broker();
    b.apply(PortEvent::Bound(socket(1, 20000, None)), 1);
    b.apply(PortEvent::Bound(socket(2, 20001, None)), 1);
    let (d, _) = b
        .resolve_bind(&bind_req(20, 20000), &Procs::default(), 2)
        .unwrap();
    assert!(matches!(d, BindDecision::Reassign { port: 20002, .. }));
}

#[test]
fn the_same_process_never_conflicts_with_itself() {
    let mut b = broker();
    let me = proc_info(30, "node", "node server.js");
    b.apply(PortEvent::Bound(socket(1, 3000, Some(me))), 1);
    let (d, _) = b
        .resolve_bind(&bind_req(30, 3000), &Procs::default(), 2)
        .unwrap();
    assert_eq!(d, BindDecision::Keep { port: 3000 });
}

#[test]
fn a_moved_process_binding_the_same_port_again_gets_the_same_new_port() {
    let mut b = broker();
    b.apply(PortEvent::Bound(storybook_holder()), 1);
    let procs = Procs {
        alive: [pid(40)].into(),
        ..Procs::default()
    };
    let (v4, _) = b.resolve_bind(&bind_req(40, 6006), &procs, 2).unwrap();
    // The IPv4 bind is seen by the observer in between; the IPv6 bind of 6006 must follow it.
    b.apply(
        PortEvent::Bound(socket(
            2,
            6007,
            Some(proc_info(40, "node", "node server.js")),
        )),
        3,
    );
    let (v6, _) = b.resolve_bind(&bind_req(40, 6006), &procs, 4).unwrap();
    assert!(matches!(v4, BindDecision::Reassign { port: 6007, .. }));
    assert!(
        matches!(v6, BindDecision::Reassign { port: 6007, .. }),
        "{v6:?}"
    );
    let (other, _) = b.resolve_bind(&bind_req(41, 6006), &procs, 5).unwrap();
    assert!(
        matches!(other, BindDecision::Reassign { port: 6008, .. }),
        "{other:?}"
    );
}

#[test]
fn reuseport_binds_are_never_moved_or_claimed() {
    let mut b = broker();
    b.apply(PortEvent::Bound(socket(1, 3000, None)), 1);
    let req = BindRequest {
        reuseport: true,
        ..bind_req(50, 3000)
    };
    let (d, effects) = b.resolve_bind(&req, &Procs::default(), 2).unwrap();
    assert_eq!(d, BindDecision::Keep { port: 3000 });
    assert!(effects.is_empty());
}

#[test]
fn only_the_asking_protocol_conflicts() {
    let mut b = broker();
    b.apply(
        PortEvent::Bound(BoundSocket {
            protocol: Protocol::Udp,
            ..socket(1, 5353, None)
        }),
        1,
    );
    let (d, _) = b
        .resolve_bind(&bind_req(60, 5353), &Procs::default(), 2)
        .unwrap();
    assert_eq!(d, BindDecision::Keep { port: 5353 });
}

#[test]
fn a_lease_of_an_ancestor_or_instance_or_same_user_is_the_askers_own() {
    let mut b = broker();
    let shell = pid(70);
    let procs = Procs {
        alive: [shell, pid(71), pid(72)].into(),
        parent: [(72, pid(71)), (71, shell)].into(),
    };
    // A shell allocated 3000 for the server it starts (pid 72, its grandchild).
    b.allocate(
        AllocateRequest {
            preferred_port: Some(3000),
            process: Some(shell),
            ..alloc("dev")
        },
        1,
    )
    .unwrap();
    assert_eq!(
        b.resolve_bind(&bind_req(72, 3000), &procs, 2).unwrap().0,
        BindDecision::Keep { port: 3000 }
    );
    let stranger = Procs {
        alive: procs.alive.clone(),
        ..Procs::default()
    };
    assert!(matches!(
        b.resolve_bind(&bind_req(99, 3000), &stranger, 2).unwrap().0,
        BindDecision::Reassign { .. }
    ));

    // A script reserved 3050 for later, tied to no process: same uid keeps it, another uid moves.
    b.allocate(
        AllocateRequest {
            preferred_port: Some(3050),
            ..alloc("dev")
        },
        1,
    )
    .unwrap();
    assert_eq!(
        b.resolve_bind(&bind_req(80, 3050), &procs, 2).unwrap().0,
        BindDecision::Keep { port: 3050 }
    );
    let other_user = BindRequest {
        uid: 1001,
        ..bind_req(81, 3050)
    };
    assert!(matches!(
        b.resolve_bind(&other_user, &procs, 2).unwrap().0,
        BindDecision::Reassign { .. }
    ));

    // An agent session's lease: any process of that instance (of its user) keeps it.
    b.allocate(
        AllocateRequest {
            preferred_port: Some(3060),
            instance_id: Some("session-1".into()),
            project: None,
            uid: 1001,
            ..alloc("dev")
        },
        1,
    )
    .unwrap();
    let in_session = BindRequest {
        instance_id: Some("session-1".into()),
        project: None,
        uid: 1001,
        ..bind_req(82, 3060)
    };
    // Another user's process naming the same session does not (session names are global).
    let stranger = BindRequest {
        uid: 1000,
        instance_id: Some("session-1".into()),
        project: None,
        ..bind_req(83, 3060)
    };
    assert!(matches!(
        b.resolve_bind(&stranger, &procs, 2).unwrap().0,
        BindDecision::Reassign { .. }
    ));
    assert_eq!(
        b.resolve_bind(&in_session, &procs, 3).unwrap().0,
        BindDecision::Keep { port: 3060 }
    );
}

#[test]
fn a_lease_whose_process_died_does_not_block() {
    let mut b = broker();
    b.allocate(
        AllocateRequest {
            preferred_port: Some(3000),
            process: Some(pid(90)),
            ..alloc("dev")
        },
        1,
    )
    .unwrap();
    let (d, effects) = b
        .resolve_bind(&bind_req(91, 3000), &Procs::default(), 2)
        .unwrap();
    assert_eq!(d, BindDecision::Keep { port: 3000 });
    assert!(effects
        .changes
        .iter()
        .any(|c| matches!(c, StateChange::RemoveLease { .. })));
}

#[test]
fn a_withdrawn_claim_frees_the_port() {
    let mut b = broker();
    let (d, effects) = b
        .resolve_bind(&bind_req(10, 3000), &Procs::default(), 1)
        .unwrap();
    assert_eq!(d, BindDecision::Keep { port: 3000 });
    let [StateChange::PutLease { lease }] = &effects.changes[..] else {
        panic!("expected one claim, got {effects:?}");
    };
    assert!(b.is_taken(3000));
    assert!(
        b.withdraw_lease("lease-999").is_empty(),
        "unknown id: nothing happens"
    );
    assert_eq!(b.withdraw_lease(&lease.id).changes.len(), 1);
    assert!(!b.is_taken(3000));
}

// ---- observer input ------------------------------------------------------------------------------------

#[test]
fn bound_and_released_events_update_the_table_and_notify() {
    let mut b = broker();
    let effects = b.apply(PortEvent::Bound(storybook_holder()), 77);
    assert!(
        matches!(&effects.notices[..], [Notice::Bound(h)] if h.socket.since_ms == 77 && h.service_type == "storybook")
    );
    let view = b.observe(6006, None);
    assert_eq!(view.holders[0].service_type, "storybook");
    assert_eq!(view.range_type.as_deref(), Some("storybook"));
    let effects = b.apply(PortEvent::Released { cookie: 1 }, 78);
    assert!(matches!(&effects.notices[..], [Notice::Released(h)] if h.socket.port == 6006));
    assert!(b.observe(6006, None).holders.is_empty());
    assert!(
        b.apply(PortEvent::Released { cookie: 1 }, 79).is_empty(),
        "unknown release is a no-op"
    );
}

#[test]
fn reconcile_touches_only_its_scope_and_keeps_history() {
    let mut b = broker();
    b.apply(PortEvent::Bound(socket(1, 3000, None)), 10);
    b.apply(PortEvent::Bound(socket(2, 3001, None)), 10);
    // A point reading of port 3000 that no longer has socket 1 but a new socket 3 (late enough
    // that 1 is not merely between bind() and listen()).
    let later = 10 + UNLISTED_TCP_GRACE_MS;
    let effects = b.reconcile(
        Scope::Port {
            port: 3000,
            protocol: Some(Protocol::Tcp),
        },
        vec![socket(3, 3000, None), socket(4, 3005, None)],
        later,
    );
    assert_eq!(effects.notices.len(), 2, "{effects:?}");
    assert!(
        b.observe(3001, None).holders.len() == 1,
        "outside the scope: untouched"
    );
    assert!(
        b.observe(3005, None).holders.is_empty(),
        "outside the scope: not added"
    );
    // A full reading that still has 3 (its owner now known) and 2.
    let owner = proc_info(5, "vite", "node vite");
    b.reconcile(
        Scope::All,
        vec![socket(3, 3000, Some(owner)), socket(2, 3001, None)],
        later + 10,
    );
    let held = &b.observe(3000, None).holders[0];
    assert_eq!(held.socket.since_ms, later, "first seen time kept");
    assert_eq!(
        held.socket.owner.as_ref().unwrap().id.pid,
        5,
        "owner learnt later"
    );
}

#[test]
fn a_tcp_socket_just_reported_bound_outlives_readings_that_cannot_show_it_yet() {
    let mut b = broker();
    b.apply(PortEvent::Bound(socket(1, 3000, None)), 1000);
    let udp = BoundSocket {
        protocol: Protocol::Udp,
        ..socket(2, 3001, None)
    };
    b.apply(PortEvent::Bound(udp.clone()), 1000);
    b.reconcile(Scope::All, vec![udp, socket(3, 3002, None)], 1000);
    // Between bind() and listen() the socket tables do not list a TCP socket: the reported one
    // stays. A UDP socket is listed once bound, and one that only a reading showed gets no grace.
    let effects = b.reconcile(Scope::All, vec![], 1500);
    assert_eq!(b.observe(3000, None).holders.len(), 1, "{effects:?}");
    assert!(b.observe(3001, None).holders.is_empty());
    assert!(b.observe(3002, None).holders.is_empty());
    assert_eq!(effects.notices.len(), 2, "{effects:?}");
    // Past the grace, a reading without it ends it.
    let effects = b.reconcile(Scope::All, vec![], 1000 + UNLISTED_TCP_GRACE_MS);
    assert!(b.observe(3000, None).holders.is_empty(), "{effects:?}");
    // Its release, reported by the hooks, ends it at once.
    b.apply(PortEvent::Bound(socket(4, 3004, None)), 5000);
    b.apply(PortEvent::Released { cookie: 4 }, 5001);
    assert!(b.observe(3004, None).holders.is_empty());
}

#[test]
fn an_allocate_lease_turns_into_bound_when_its_holder_binds() {
    let mut b = broker();
    let (lease, _) = b
        .allocate(
            AllocateRequest {
                preferred_port: Some(3000),
                process: Some(pid(5)),
                ..alloc("dev")
            },
            1,
        )
        .unwrap();
    let stranger_bind = b.apply(
        PortEvent::Bound(socket(9, 3000, Some(proc_info(6, "x", "x")))),
        2,
    );
    assert!(
        stranger_bind.changes.is_empty(),
        "someone else's bind does not end the lease"
    );
    let effects = b.apply(
        PortEvent::Bound(socket(1, 3000, Some(proc_info(5, "vite", "vite")))),
        2,
    );
    assert_eq!(
        effects.changes,
        vec![StateChange::RemoveLease { id: lease.id }]
    );
    assert_eq!(b.lease_count(), 0);
}

// ---- expiry and restore --------------------------------------------------------------------------------

#[test]
fn expire_ends_lapsed_and_orphaned_leases_but_keeps_bound_claims() {
    let mut b = broker();
    let procs = Procs {
        alive: [pid(1), pid(2)].into(),
        ..Procs::default()
    };
    b.allocate(
        AllocateRequest {
            ttl_ms: Some(10),
            ..alloc("dev")
        },
        0,
    )
    .unwrap();
    b.allocate(
        AllocateRequest {
            process: Some(pid(3)),
            ..alloc("dev")
        },
        0,
    )
    .unwrap();
    b.resolve_bind(&bind_req(1, 6006), &procs, 0).unwrap();
    b.resolve_bind(&bind_req(2, 6010), &procs, 0).unwrap();
    b.apply(
        PortEvent::Bound(socket(1, 6006, Some(proc_info(1, "node", "node")))),
        1,
    );
    b.register_instance(None, pid(1), 1000, 0).unwrap();
    b.register_instance(Some("gone".into()), pid(3), 1000, 0)
        .unwrap();
    let effects = b.expire(1_000_000, &procs);
    let removed: Vec<_> = effects
        .changes
        .iter()
        .map(|c| match c {
            StateChange::RemoveLease { id } => id.clone(),
            StateChange::RemoveInstance { id } => id.clone(),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        removed.len(),
        4,
        "ttl lease, dead pid lease, unbound claim, dead instance: {removed:?}"
    );
    assert!(removed.contains(&"gone".to_string()));
    assert_eq!(
        b.leases().map(|l| l.port).collect::<Vec<_>>(),
        vec![6006],
        "bound claim lives on"
    );
    assert_eq!(
        b.instances().map(|i| i.id.as_str()).collect::<Vec<_>>(),
        vec!["ldpreload-1-10"]
    );
}

/// A process that got an earlier process's pid is not that process's group: without an id it
/// gets an instance of its own, and the earlier one's processes and claims stay with it.
#[test]
fn a_reused_pid_never_joins_the_earlier_processs_instance() {
    let mut b = broker();
    let first = pid(4242);
    let (first_id, _) = b.register_instance(None, first, 1000, 0).unwrap();
    let later = ProcessId {
        pid: 4242,
        start_time: first.start_time + 1,
    };
    let (later_id, _) = b.register_instance(None, later, 1000, 1).unwrap();
    assert_ne!(first_id, later_id);
    let group = |id: &str| -> Vec<ProcessId> {
        b.instances()
            .find(|i| i.id == id)
            .map(|i| i.processes().collect())
            .unwrap_or_default()
    };
    assert_eq!(group(&first_id), vec![first]);
    assert_eq!(group(&later_id), vec![later]);
}

#[test]
fn restore_keeps_leases_and_never_reuses_an_id() {
    let mut b = broker();
    let (a, _) = b.allocate(alloc("dev"), 1).unwrap();
    let (c, _) = b.allocate(alloc("dev"), 1).unwrap();
    let mut restored = Broker::restore(
        ServiceRanges::default(),
        LeaseSettings::default(),
        vec![a.clone(), c.clone()],
        vec![],
    );
    assert_eq!(restored.lease_count(), 2);
    let (next, _) = restored.allocate(alloc("dev"), 2).unwrap();
    assert_ne!(next.id, a.id);
    assert_ne!(next.id, c.id);
    assert_eq!(next.port, 3002);
    restored.issue_lease_ids_after(40);
    let (after, _) = restored.allocate(alloc("dev"), 3).unwrap();
    assert_eq!(after.id, "lease-41", "after every id ever issued");
    restored.issue_lease_ids_after(5);
    let (later, _) = restored.allocate(alloc("dev"), 3).unwrap();
    assert_eq!(later.id, "lease-42", "never backwards");
}

#[test]
fn a_socket_bound_on_a_claimed_port_carries_the_claims_instance() {
    let mut b = broker();
    b.apply(PortEvent::Bound(storybook_holder()), 1);
    let mut asked = bind_req(20, 6006);
    asked.instance_id = Some("agent-7".into());
    let (decision, _) = b.resolve_bind(&asked, &Procs::default(), 2).unwrap();
    let BindDecision::Reassign { port, .. } = decision else {
        panic!("expected a move, got {decision:?}");
    };
    // The asker binds the port it was given: its socket belongs to the session.
    let mine = socket(2, port, Some(proc_info(20, "node", "node server.js")));
    b.apply(PortEvent::Bound(mine), 3);
    let view = b.observe(port, None);
    assert_eq!(view.holders[0].instance_id.as_deref(), Some("agent-7"));
    // Another process on a port nobody claimed belongs to no session.
    assert_eq!(b.observe(6006, None).holders[0].instance_id, None);
}

// ---- session views -------------------------------------------------------------------------------------

fn session_bind(p: u32, port: u16, protocol: Protocol, instance: &str) -> BindRequest {
    BindRequest {
        protocol,
        instance_id: Some(instance.into()),
        project: None,
        ..bind_req(p, port)
    }
}

fn bound_by(cookie: u64, port: u16, p: u32, protocol: Protocol) -> PortEvent {
    PortEvent::Bound(BoundSocket {
        protocol,
        ..socket(
            cookie,
            port,
            Some(proc_info(p, "python3", "python3 -m http.server")),
        )
    })
}

#[test]
fn a_moved_bind_of_a_session_enters_its_view_until_the_moved_socket_is_released() {
    let mut b = broker();
    let procs = Procs {
        alive: [pid(40)].into(),
        ..Procs::default()
    };
    b.apply(bound_by(1, 8000, 30, Protocol::Tcp), 1);
    let (moved, _) = b
        .resolve_bind(&session_bind(40, 8000, Protocol::Tcp, "B"), &procs, 2)
        .unwrap();
    assert!(matches!(moved, BindDecision::Reassign { port: 8001, .. }));
    let entry = ViewEntry {
        instance_id: "B".into(),
        protocol: Protocol::Tcp,
        asked: 8000,
        bound: 8001,
        pid: 40,
        uid: 1000,
    };
    assert_eq!(b.views(), vec![entry.clone()], "from the move on");
    assert_eq!(b.view_of("B"), vec![entry.clone()]);
    assert!(b.view_of("A").is_empty(), "other sessions see nothing");

    // Bound over IPv4 and IPv6: releasing one keeps the entry, releasing both ends it.
    b.apply(bound_by(2, 8001, 40, Protocol::Tcp), 3);
    b.apply(
        PortEvent::Bound(BoundSocket {
            family: Family::Inet6,
            ..socket(3, 8001, Some(proc_info(40, "python3", "python3")))
        }),
        3,
    );
    b.apply(PortEvent::Released { cookie: 2 }, 4);
    assert_eq!(b.views(), vec![entry], "one socket of the server remains");
    let effects = b.apply(PortEvent::Released { cookie: 3 }, 5);
    assert!(b.views().is_empty(), "the moved server is gone");
    assert!(
        effects
            .changes
            .iter()
            .any(|c| matches!(c, StateChange::RemoveLease { .. })),
        "the claim's end is persisted: {effects:?}"
    );
    assert!(b.leases().next().is_none());
}

/// A dev server that binds its port for TCP and UDP, moved once (one claim for the port): its
/// session reaches it over both, and the UDP bind is what adds the UDP entry.
#[test]
fn a_server_moved_for_tcp_and_udp_is_in_its_view_for_both() {
    let mut b = broker();
    let procs = Procs {
        alive: [pid(40)].into(),
        ..Procs::default()
    };
    b.apply(bound_by(1, 8000, 30, Protocol::Tcp), 1);
    b.apply(bound_by(2, 8000, 30, Protocol::Udp), 1);
    let (moved, _) = b
        .resolve_bind(&session_bind(40, 8000, Protocol::Tcp, "B"), &procs, 2)
        .unwrap();
    assert!(matches!(moved, BindDecision::Reassign { port: 8001, .. }));
    b.apply(bound_by(3, 8001, 40, Protocol::Tcp), 3);
    let (again, _) = b
        .resolve_bind(&session_bind(40, 8000, Protocol::Udp, "B"), &procs, 4)
        .unwrap();
    assert!(
        matches!(again, BindDecision::Reassign { port: 8001, .. }),
        "{again:?}"
    );
    let udp = bound_by(4, 8001, 40, Protocol::Udp);
    b.apply(udp, 5);
    let protocols: Vec<(Protocol, u16, u16)> = b
        .views()
        .iter()
        .map(|e| (e.protocol, e.asked, e.bound))
        .collect();
    assert_eq!(
        protocols,
        vec![(Protocol::Tcp, 8000, 8001), (Protocol::Udp, 8000, 8001)]
    );
    let held = b
        .sockets_on(8001, Some(Protocol::Udp))
        .next()
        .cloned()
        .expect("the UDP socket");
    assert!(
        b.changes_a_view(&held),
        "its bind is published as a view change"
    );
    // The UDP socket goes: the TCP entry stays.
    b.apply(PortEvent::Released { cookie: 4 }, 6);
    assert_eq!(b.views().len(), 1);
    assert_eq!(b.views()[0].protocol, Protocol::Tcp);
}

#[test]
fn a_view_entry_ends_with_its_process_and_needs_an_instance_and_a_move() {
    let mut b = broker();
    let mut procs = Procs {
        alive: [pid(40), pid(41), pid(42)].into(),
        ..Procs::default()
    };
    b.apply(bound_by(1, 8000, 30, Protocol::Tcp), 1);
    // No instance: moved, but no session to see it.
    b.resolve_bind(&bind_req(41, 8000), &procs, 2).unwrap();
    // A kept bind of a session is no view entry either.
    b.resolve_bind(&session_bind(42, 8050, Protocol::Tcp, "B"), &procs, 2)
        .unwrap();
    assert!(b.views().is_empty(), "{:?}", b.views());

    b.apply(bound_by(5, 8000, 30, Protocol::Udp), 3);
    b.resolve_bind(&session_bind(40, 8000, Protocol::Udp, "B"), &procs, 3)
        .unwrap();
    assert_eq!(b.views().len(), 1);
    assert_eq!(
        b.views()[0].protocol,
        Protocol::Udp,
        "only the moved protocol"
    );
    procs.alive.remove(&pid(40));
    b.expire(4, &procs);
    assert!(b.views().is_empty(), "the moved process died");
}

#[test]
fn when_a_session_moved_two_servers_off_one_port_the_newest_is_in_its_view() {
    let mut b = broker();
    let procs = Procs {
        alive: [pid(40), pid(41)].into(),
        ..Procs::default()
    };
    b.apply(bound_by(1, 8000, 30, Protocol::Tcp), 1);
    b.resolve_bind(&session_bind(40, 8000, Protocol::Tcp, "B"), &procs, 2)
        .unwrap();
    b.resolve_bind(&session_bind(41, 8000, Protocol::Tcp, "B"), &procs, 3)
        .unwrap();
    let views = b.views();
    assert_eq!(views.len(), 1, "{views:?}");
    assert_eq!((views[0].pid, views[0].bound), (41, 8002));
}

#[test]
fn claims_saved_without_a_protocol_still_load() {
    let old = r#"{"id":"lease-1","port":8001,"service_type":"api","owner_uid":0,"process":{"pid":4,"start_time":9},
                  "instance_id":"B","created_ms":1,"expires_ms":null,"claim":true,"requested_port":8000}"#;
    let lease: Lease = serde_json::from_str(old).expect("an old claim parses");
    assert_eq!(lease.protocol(), None);
    let b = Broker::restore(
        ServiceRanges::default(),
        LeaseSettings::default(),
        [lease],
        [],
    );
    assert!(b.views().is_empty(), "no protocol, no redirect");
}

#[test]
fn a_socket_bound_without_asking_carries_the_session_of_its_process() {
    let mut b = broker();
    let owner = ProcessInfo {
        instance_id: Some("session-b".into()),
        ..proc_info(40, "python3", "python3 -m http.server")
    };
    b.apply(PortEvent::Bound(socket(1, 8050, Some(owner))), 1);
    assert_eq!(
        b.observe(8050, None).holders[0].instance_id.as_deref(),
        Some("session-b")
    );
}

#[test]
fn a_user_may_lease_its_share_and_no_more_while_root_and_claims_go_on() {
    let mut b = Broker::new(
        ServiceRanges::default(),
        LeaseSettings {
            user_limits: UserLimits {
                leases_per_user: 30,
                range_share_percent: 50,
            },
            ..LeaseSettings::default()
        },
    );
    let user = |uid| AllocateRequest {
        uid,
        ..alloc("storybook")
    };
    // storybook is 6006-6029: 24 ports, 12 for one user.
    for _ in 0..12 {
        b.allocate(user(1000), 1).unwrap();
    }
    let refused = b.allocate(user(1000), 1).unwrap_err();
    assert!(
        matches!(
            &refused,
            BrokerError::UserLimit {
                uid: 1000,
                held: 12,
                ..
            }
        ),
        "{refused:?}"
    );
    assert!(
        refused.to_string().contains("range_share_percent"),
        "{refused}"
    );
    b.allocate(user(1001), 1)
        .expect("another user has its own share");
    b.allocate(user(0), 1).expect("root is not limited");
    let procs = Procs {
        alive: [pid(50)].into(),
        ..Procs::default()
    };
    let claim = BindRequest {
        uid: 1000,
        ..bind_req(50, 6029)
    };
    b.resolve_bind(&claim, &procs, 2)
        .expect("the shim's claims are not limited");
    // Over all ranges.
    for _ in 0..18 {
        b.allocate(
            AllocateRequest {
                uid: 1000,
                ..alloc("api")
            },
            1,
        )
        .unwrap();
    }
    let refused = b
        .allocate(
            AllocateRequest {
                uid: 1000,
                ..alloc("dev")
            },
            1,
        )
        .unwrap_err();
    assert!(refused.to_string().contains("leases_per_user"), "{refused}");
}

#[test]
fn limits_come_from_the_config_or_default() {
    assert_eq!(UserLimits::from_toml("").unwrap(), UserLimits::default());
    let set =
        UserLimits::from_toml("[limits]\nleases_per_user = 5\nrange_share_percent = 10\n").unwrap();
    assert_eq!((set.leases_per_user, set.range_share_percent), (5, 10));
    assert!(UserLimits::from_toml("[limits]\nrange_share_percent = 0\n").is_err());
    assert!(UserLimits::from_toml("[limits]\nnope = 1\n").is_err());
    assert!(
        ServiceRanges::from_toml("[limits]\nleases_per_user = 5\n").is_ok(),
        "ranges ignore [limits]"
    );
    assert_eq!(set.range_cap(24), 2);
    assert_eq!(
        UserLimits {
            range_share_percent: 1,
            ..set
        }
        .range_cap(24),
        1,
        "at least one"
    );
}

#[test]
fn an_instance_id_belongs_to_its_first_user() {
    let mut b = broker();
    b.register_instance(Some("claude-abc".into()), pid(1), 0, 1)
        .unwrap();
    let taken = b
        .register_instance(Some("claude-abc".into()), pid(2), 1000, 2)
        .unwrap_err();
    assert!(
        matches!(&taken, BrokerError::InstanceTaken { owner_uid: 0, .. }),
        "{taken:?}"
    );
    b.register_instance(Some("claude-abc".into()), pid(3), 0, 3)
        .expect("its owner may register it again");
    b.register_instance(Some("mine".into()), pid(2), 1000, 4)
        .unwrap();
    b.register_instance(Some("mine".into()), pid(1), 0, 5)
        .expect("root may");
}

#[test]
fn views_are_per_user_so_another_user_cannot_join_a_session() {
    let mut b = broker();
    let procs = Procs {
        alive: [pid(40), pid(41)].into(),
        ..Procs::default()
    };
    b.apply(bound_by(1, 8000, 30, Protocol::Tcp), 1);
    b.resolve_bind(&session_bind(40, 8000, Protocol::Tcp, "B"), &procs, 2)
        .unwrap();
    let intruder = BindRequest {
        uid: 2000,
        ..session_bind(41, 8000, Protocol::Tcp, "B")
    };
    b.resolve_bind(&intruder, &procs, 3).unwrap();
    let views = b.view_of("B");
    assert_eq!(views.len(), 2, "one entry per user: {views:?}");
    let owners: Vec<(u32, u16)> = views.iter().map(|v| (v.uid, v.bound)).collect();
    assert!(
        owners.contains(&(1000, 8001)) && owners.contains(&(2000, 8002)),
        "{owners:?}"
    );
}

// ---- binds the kernel moved ------------------------------------------------------------------------------

fn kernel_moved(cookie: u64, asked: u16, bound: u16, p: u32, family: Family) -> PortEvent {
    PortEvent::MovedByKernel {
        socket: BoundSocket {
            family,
            ..socket(
                cookie,
                bound,
                Some(proc_info(p, "server", "./static-server")),
            )
        },
        asked,
        instance_id: "K".into(),
        project: Some("/src/k".into()),
    }
}

#[test]
fn a_kernel_move_is_recorded_as_the_shim_records_one_claim_audit_view_once_per_server() {
    let mut b = broker();
    b.apply(bound_by(1, 8000, 30, Protocol::Tcp), 1);
    let effects = b.apply(kernel_moved(2, 8000, 8001, 40, Family::Inet), 2);
    let audits: Vec<&AuditRecord> = effects
        .notices
        .iter()
        .filter_map(|n| match n {
            Notice::Reassigned(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(audits.len(), 1, "{effects:?}");
    assert_eq!(
        (
            audits[0].requested_port,
            audits[0].assigned_port,
            audits[0].holder_pid
        ),
        (8000, 8001, Some(30))
    );
    assert_eq!(audits[0].instance_id.as_deref(), Some("K"));
    assert!(effects
        .notices
        .iter()
        .any(|n| matches!(n, Notice::Bound(_))));
    let claim = b.lease_on(8001).expect("the move's claim");
    assert!(
        claim.is_claim() && claim.expires_ms.is_none(),
        "settled by the bind: {claim:?}"
    );
    assert_eq!(b.view_of("K").len(), 1);
    assert_eq!(b.view_of("K")[0].asked, 8000);

    // Its IPv6 bind of the same port, moved to the same place: no second claim or audit entry.
    let again = b.apply(kernel_moved(3, 8000, 8001, 40, Family::Inet6), 3);
    assert!(!again
        .notices
        .iter()
        .any(|n| matches!(n, Notice::Reassigned(_))));
    assert_eq!(b.lease_count(), 1);

    // Gone with its sockets, like any move.
    b.apply(PortEvent::Released { cookie: 2 }, 4);
    b.apply(PortEvent::Released { cookie: 3 }, 5);
    assert!(b.views().is_empty() && b.lease_on(8001).is_none());
}

#[test]
fn a_kernel_move_of_a_process_already_gone_records_only_the_socket() {
    let mut b = broker();
    let event = PortEvent::MovedByKernel {
        socket: socket(9, 8001, None),
        asked: 8000,
        instance_id: "K".into(),
        project: Some("/src/w".into()),
    };
    let effects = b.apply(event, 1);
    assert!(b.lease_count() == 0 && b.views().is_empty());
    assert!(effects
        .notices
        .iter()
        .any(|n| matches!(n, Notice::Bound(_))));
}

#[test]
fn a_port_a_sibling_thread_was_moved_onto_moves_the_next_bind_of_the_same_process() {
    let mut b = broker();
    let procs = Procs {
        alive: [pid(40)].into(),
        ..Procs::default()
    };
    b.apply(bound_by(1, 8000, 30, Protocol::Tcp), 1);
    // Thread one asks 8000 (held): moved to 8001.
    let (first, _) = b.resolve_bind(&bind_req(40, 8000), &procs, 2).unwrap();
    assert!(matches!(first, BindDecision::Reassign { port: 8001, .. }));
    // Thread two of the same process asks 8001 itself (free when it looked): not the same
    // server as thread one's, so it moves on rather than fail with EADDRINUSE.
    let (second, _) = b.resolve_bind(&bind_req(40, 8001), &procs, 3).unwrap();
    let BindDecision::Reassign { port, .. } = second else {
        panic!("moved: {second:?}");
    };
    assert!(port != 8000 && port != 8001, "{port}");
    // The same process binding 8000 again (its IPv6 socket) still follows its first move.
    let (again, _) = b.resolve_bind(&bind_req(40, 8000), &procs, 4).unwrap();
    assert!(
        matches!(again, BindDecision::Reassign { port: 8001, .. }),
        "{again:?}"
    );
}

#[test]
fn ending_a_session_ends_its_leases_and_claims_and_no_one_elses() {
    let mut b = broker();
    let procs = Procs {
        alive: [pid(40), pid(41)].into(),
        ..Procs::default()
    };
    b.register_instance(Some("claude-s1".into()), pid(40), 1000, 1)
        .unwrap();
    b.apply(bound_by(1, 8000, 30, Protocol::Tcp), 1);
    let moved = session_bind(40, 8000, Protocol::Tcp, "claude-s1");
    b.resolve_bind(&moved, &procs, 2).unwrap();
    let other = session_bind(41, 8000, Protocol::Tcp, "claude-s2");
    b.resolve_bind(&other, &procs, 3).unwrap();
    assert_eq!(b.lease_count(), 2);
    // Another user may not end it.
    assert!(matches!(
        b.end_instance("claude-s1", 2000),
        Err(BrokerError::InstanceTaken { .. })
    ));
    let (ended, effects) = b.end_instance("claude-s1", 1000).unwrap();
    assert_eq!(ended, 1);
    assert_eq!(b.lease_count(), 1, "the other session's claim stays");
    assert!(b.view_of("claude-s1").is_empty());
    assert!(effects
        .changes
        .iter()
        .any(|c| matches!(c, StateChange::RemoveInstance { id } if id == "claude-s1")));
    assert_eq!(b.instance_count(), 0);
    // Ending an unknown (or already ended) session is no error: nothing to do.
    assert_eq!(b.end_instance("claude-s1", 1000).unwrap().0, 0);
}

#[test]
fn a_session_lives_while_any_of_its_registered_processes_does() {
    let mut b = broker();
    // A server registered first, then a short client of the same session, then another user's
    // try at the name.
    b.register_instance(Some("claude-s1".into()), pid(40), 1000, 1)
        .unwrap();
    b.register_instance(Some("claude-s1".into()), pid(41), 1000, 2)
        .unwrap();
    assert!(b
        .register_instance(Some("claude-s1".into()), pid(42), 2000, 3)
        .is_err());
    let placed = |b: &Broker| -> Vec<u32> {
        b.instances()
            .flat_map(|i| i.processes().map(|p| p.pid))
            .collect()
    };
    assert_eq!(placed(&b), [40, 41]);
    // The client ends: the session lives on with its server, and the change is saved.
    let server_only = Procs {
        alive: [pid(40)].into(),
        ..Procs::default()
    };
    let effects = b.expire(10, &server_only);
    assert_eq!(placed(&b), [40]);
    assert!(effects.changes.iter().any(
        |c| matches!(c, StateChange::PutInstance { instance } if instance.placed == [pid(40)])
    ));
    assert_eq!(b.instance_count(), 1);
    // Registering the server again adds nothing twice.
    b.register_instance(Some("claude-s1".into()), pid(40), 1000, 11)
        .unwrap();
    assert_eq!(placed(&b), [40]);
    // The server ends too: so does the session.
    let effects = b.expire(20, &Procs::default());
    assert_eq!(b.instance_count(), 0);
    assert!(effects
        .changes
        .iter()
        .any(|c| matches!(c, StateChange::RemoveInstance { id } if id == "claude-s1")));
}

// ---- a session's port between two lives of its server --------------------------------------------

#[test]
fn a_sessions_port_is_held_for_it_between_two_lives_of_its_server() {
    let mut b = broker();
    let mut procs = Procs {
        alive: [pid(39), pid(40), pid(41), pid(50)].into(),
        ..Procs::default()
    };
    b.register_instance(Some("B".into()), pid(39), 1000, 1)
        .unwrap();
    b.register_instance(Some("C".into()), pid(50), 1000, 1)
        .unwrap();
    b.apply(bound_by(1, 8000, 30, Protocol::Tcp), 1);
    // B's server is moved off the outsider's 8000, and stops.
    let (moved, _) = b
        .resolve_bind(&session_bind(40, 8000, Protocol::Tcp, "B"), &procs, 2)
        .unwrap();
    assert!(matches!(moved, BindDecision::Reassign { port: 8001, .. }));
    b.apply(bound_by(2, 8001, 40, Protocol::Tcp), 3);
    b.apply(PortEvent::Released { cookie: 2 }, 4);
    let view = b.view_of("B");
    assert_eq!(
        (view.len(), view[0].asked, view[0].bound, view[0].pid),
        (1, 8000, 8001, 0),
        "held: B's clients still go to 8001 (nothing there: refused), not to the outsider"
    );
    assert!(b.is_taken(8001));
    // Another session asking 8001 meanwhile is moved off it.
    let (other, _) = b
        .resolve_bind(&session_bind(50, 8001, Protocol::Tcp, "C"), &procs, 5)
        .unwrap();
    assert!(
        matches!(other, BindDecision::Reassign { port, .. } if port != 8001),
        "{other:?}"
    );
    // B's next server gets the same port back.
    let (back, effects) = b
        .resolve_bind(&session_bind(41, 8000, Protocol::Tcp, "B"), &procs, 6)
        .unwrap();
    assert!(
        matches!(back, BindDecision::Reassign { port: 8001, .. }),
        "{back:?}"
    );
    assert!(effects
        .changes
        .iter()
        .any(|c| matches!(c, StateChange::PutLease { lease } if lease.process == Some(pid(41)))));
    b.apply(bound_by(3, 8001, 41, Protocol::Tcp), 7);
    assert_eq!(b.view_of("B")[0].pid, 41);
    // It dies without a release record: held again, and after the hold, gone.
    procs.alive.remove(&pid(41));
    b.apply(PortEvent::Released { cookie: 3 }, 8);
    b.expire(9, &procs);
    assert_eq!(b.view_of("B")[0].pid, 0);
    b.expire(9 + LeaseSettings::default().restart_hold_ms, &procs);
    assert!(b.view_of("B").is_empty(), "the hold is over");
    assert!(!b.is_taken(8001));
}

/// A port a session's server was moved to stands, in the session's view, for the port it asked:
/// the session's other server asking that port itself is moved, whether the port is claimed by a
/// live server (about to bind) or held since it stopped — else the asked port's clients would
/// reach the other server.
#[test]
fn a_sessions_server_asking_the_port_another_was_moved_to_is_moved_too() {
    let mut b = broker();
    let procs = Procs {
        alive: [pid(39), pid(40), pid(41), pid(42), pid(43)].into(),
        ..Procs::default()
    };
    b.register_instance(Some("B".into()), pid(39), 1000, 1)
        .unwrap();
    b.apply(bound_by(1, 8000, 30, Protocol::Tcp), 1);
    let (moved, _) = b
        .resolve_bind(&session_bind(40, 8000, Protocol::Tcp, "B"), &procs, 2)
        .unwrap();
    assert!(matches!(moved, BindDecision::Reassign { port: 8001, .. }));
    // Claimed, not bound yet: B's server for 8001 does not get it.
    let (second, _) = b
        .resolve_bind(&session_bind(41, 8001, Protocol::Tcp, "B"), &procs, 3)
        .unwrap();
    let BindDecision::Reassign {
        port: elsewhere, ..
    } = second
    else {
        panic!("B's server for 8001 kept the port B's server for 8000 was moved to: {second:?}");
    };
    assert_ne!(elsewhere, 8001);
    b.apply(bound_by(2, 8001, 40, Protocol::Tcp), 4);
    b.apply(bound_by(3, elsewhere, 41, Protocol::Tcp), 5);
    // Both stop: 8001 is held for B's server for 8000.
    b.apply(PortEvent::Released { cookie: 2 }, 6);
    b.apply(PortEvent::Released { cookie: 3 }, 7);
    // B's next server for 8001 is moved (to its earlier port) rather than onto the hold.
    let (again, _) = b
        .resolve_bind(&session_bind(42, 8001, Protocol::Tcp, "B"), &procs, 8)
        .unwrap();
    assert!(
        matches!(again, BindDecision::Reassign { port, .. } if port == elsewhere),
        "{again:?}"
    );
    b.apply(bound_by(4, elsewhere, 42, Protocol::Tcp), 9);
    let mut view: Vec<(u16, u16)> = b.view_of("B").iter().map(|v| (v.asked, v.bound)).collect();
    view.sort_unstable();
    assert_eq!(view, [(8000, 8001), (8001, elsewhere)]);
    // B's next server for 8000 takes its hold back.
    let (back, _) = b
        .resolve_bind(&session_bind(43, 8000, Protocol::Tcp, "B"), &procs, 10)
        .unwrap();
    assert!(
        matches!(back, BindDecision::Reassign { port: 8001, .. }),
        "{back:?}"
    );
}

#[test]
fn a_port_a_session_bound_free_is_held_too_and_ends_with_the_session() {
    let mut b = broker();
    let procs = Procs {
        alive: [pid(39), pid(42), pid(43), pid(50)].into(),
        ..Procs::default()
    };
    b.register_instance(Some("B".into()), pid(39), 1000, 1)
        .unwrap();
    b.register_instance(Some("C".into()), pid(50), 1000, 1)
        .unwrap();
    let of_b = |p: u32| ProcessInfo {
        instance_id: Some("B".into()),
        ..proc_info(p, "python3", "python3 -m http.server 8050")
    };
    b.apply(PortEvent::Bound(socket(1, 8050, Some(of_b(42)))), 1);
    b.apply(PortEvent::Released { cookie: 1 }, 2);
    assert!(b.is_taken(8050), "held for B");
    let (other, _) = b
        .resolve_bind(&session_bind(50, 8050, Protocol::Tcp, "C"), &procs, 3)
        .unwrap();
    assert!(
        matches!(other, BindDecision::Reassign { .. }),
        "C is moved off B's port"
    );
    let (back, _) = b
        .resolve_bind(&session_bind(43, 8050, Protocol::Tcp, "B"), &procs, 4)
        .unwrap();
    assert_eq!(
        back,
        BindDecision::Keep { port: 8050 },
        "B's next server keeps it"
    );
    // A server bound straight away (the kernel let it: the port is its session's) takes it too.
    b.apply(PortEvent::Bound(socket(2, 8050, Some(of_b(43)))), 5);
    assert_eq!(b.lease_on(8050).and_then(|l| l.process), Some(pid(43)));
    b.apply(PortEvent::Released { cookie: 2 }, 6);
    assert!(b.is_taken(8050));
    b.end_instance("B", 1000).unwrap();
    assert!(!b.is_taken(8050), "the session ended: so did its hold");
    // Outside every session nothing is held.
    b.apply(bound_by(3, 8060, 44, Protocol::Tcp), 7);
    b.apply(PortEvent::Released { cookie: 3 }, 8);
    assert!(!b.is_taken(8060));
}

#[test]
fn a_dead_servers_claim_is_its_sessions_hold_before_any_sweep() {
    let mut b = broker();
    let mut procs = Procs {
        alive: [pid(39), pid(42), pid(50)].into(),
        ..Procs::default()
    };
    b.register_instance(Some("B".into()), pid(39), 1000, 1)
        .unwrap();
    b.register_instance(Some("C".into()), pid(50), 1000, 1)
        .unwrap();
    // B's server asked 8050 and kept it (a claim), and then died; no sweep has run since.
    let (kept, _) = b
        .resolve_bind(&session_bind(42, 8050, Protocol::Tcp, "B"), &procs, 2)
        .unwrap();
    assert_eq!(kept, BindDecision::Keep { port: 8050 });
    procs.alive.remove(&pid(42));
    let (other, effects) = b
        .resolve_bind(&session_bind(50, 8050, Protocol::Tcp, "C"), &procs, 3)
        .unwrap();
    assert!(
        matches!(other, BindDecision::Reassign { port, .. } if port != 8050),
        "{other:?}"
    );
    assert!(
        effects.changes.iter().any(|c| matches!(c, StateChange::PutLease { lease } if lease.port == 8050 && lease.process.is_none())),
        "the dead claim became B's hold: {effects:?}"
    );
    procs.alive.insert(pid(43));
    procs.alive.insert(pid(44));
    // Another user naming the session B does not get B's port (session names are global).
    let stranger = BindRequest {
        uid: 2000,
        ..session_bind(44, 8050, Protocol::Tcp, "B")
    };
    let (theirs, _) = b.resolve_bind(&stranger, &procs, 4).unwrap();
    assert!(
        matches!(theirs, BindDecision::Reassign { port, .. } if port != 8050),
        "{theirs:?}"
    );
    let (back, _) = b
        .resolve_bind(&session_bind(43, 8050, Protocol::Tcp, "B"), &procs, 5)
        .unwrap();
    assert_eq!(back, BindDecision::Keep { port: 8050 });
}

// ---- sticky ports --------------------------------------------------------------------------------------

fn in_project(p: u32, port: u16, project: &str) -> BindRequest {
    BindRequest {
        project: Some(project.into()),
        ..bind_req(p, port)
    }
}

/// A moved server of `project` binds, runs, and stops; returns the port it was moved to. The
/// holders these tests bind (pids 30, 50, 51, 4121) live; the moved servers have exited.
fn move_and_stop(b: &mut Broker, p: u32, cookie: u64, asked: u16, project: &str, now: u64) -> u16 {
    let procs = Procs {
        alive: [pid(30), pid(50), pid(51), pid(4121)].into(),
        ..Procs::default()
    };
    let (decision, _) = b
        .resolve_bind(&in_project(p, asked, project), &procs, now)
        .expect("decision");
    let BindDecision::Reassign { port, .. } = decision else {
        panic!("{decision:?}");
    };
    b.apply(bound_by(cookie, port, p, Protocol::Tcp), now);
    b.apply(PortEvent::Released { cookie }, now + 1);
    port
}

#[test]
fn a_project_gets_its_moved_port_back_and_other_projects_pass_it_over() {
    let mut b = broker();
    b.apply(bound_by(1, 3000, 30, Protocol::Tcp), 1);
    // Worktree W was moved to 3001 and stopped; meanwhile someone took... nothing: 3001 is free.
    let first = move_and_stop(&mut b, 40, 2, 3000, "/src/w", 10);
    assert_eq!(first, 3001);
    assert_eq!(b.lease_count(), 0, "the claim ended with its socket");
    // Another worktree asking 3000 is moved past W's port.
    let other = move_and_stop(&mut b, 41, 3, 3000, "/src/v", 20);
    assert_eq!(other, 3002, "3001 is W's");
    // W again (a new process, a new session): 3001, although nothing forces it.
    let again = move_and_stop(&mut b, 42, 4, 3000, "/src/w", 30);
    assert_eq!(again, 3001);
    // While W's port is held, W gets the next port that nobody remembers.
    b.apply(bound_by(5, 3001, 50, Protocol::Tcp), 40);
    let busy = move_and_stop(&mut b, 43, 6, 3000, "/src/w", 41);
    assert_eq!(busy, 3003, "3001 is held, 3002 is V's");
    // ... which becomes W's port from then on (the last one it got).
    b.apply(PortEvent::Released { cookie: 5 }, 50);
    assert_eq!(move_and_stop(&mut b, 44, 7, 3000, "/src/w", 60), 3003);
    // Without a project nothing is remembered, and remembered ports (V's 3002, W's 3003) are
    // passed over; 3001 is nobody's any more, so it is taken here first.
    b.apply(bound_by(8, 3001, 51, Protocol::Tcp), 65);
    let (decision, effects) = b
        .resolve_bind(&bind_req(45, 3000), &Procs::default(), 70)
        .expect("decision");
    assert!(
        matches!(decision, BindDecision::Reassign { port: 3004, .. }),
        "{decision:?}"
    );
    assert!(!effects
        .changes
        .iter()
        .any(|c| matches!(c, StateChange::PutSticky { .. })));
}

#[test]
fn another_user_never_gets_a_users_sticky_port_back() {
    let mut b = broker();
    b.apply(bound_by(1, 3000, 30, Protocol::Tcp), 1);
    assert_eq!(move_and_stop(&mut b, 40, 2, 3000, "/src/w", 10), 3001);
    let (decision, _) = b
        .resolve_bind(
            &BindRequest {
                uid: 2000,
                ..in_project(41, 3000, "/src/w")
            },
            &Procs::default(),
            20,
        )
        .expect("decision");
    assert!(
        matches!(decision, BindDecision::Reassign { port: 3002, .. }),
        "{decision:?}"
    );
}

#[test]
fn remembered_ports_are_used_by_others_only_when_nothing_else_is_free() {
    let mut b = Broker::new(
        ServiceRanges::from_toml("[services.tiny]\nrange = [5000, 5002]\n").expect("ranges"),
        LeaseSettings::default(),
    );
    b.apply(bound_by(1, 5000, 30, Protocol::Tcp), 1);
    assert_eq!(move_and_stop(&mut b, 40, 2, 5000, "/src/w", 10), 5001);
    b.apply(bound_by(3, 5002, 31, Protocol::Tcp), 11);
    assert_eq!(
        move_and_stop(&mut b, 41, 4, 5000, "/src/v", 20),
        5001,
        "the only free port"
    );
}

#[test]
fn allocations_are_sticky_per_project_type_and_preferred_port() {
    let mut b = broker();
    let in_w = || AllocateRequest {
        project: Some("/src/w".into()),
        ..alloc("api")
    };
    let (first, _) = b.allocate(in_w(), 1).expect("allocate");
    b.release_id(&first.id, user(1000)).expect("release");
    let (other, _) = b
        .allocate(
            AllocateRequest {
                project: Some("/src/v".into()),
                ..alloc("api")
            },
            2,
        )
        .expect("allocate");
    assert_ne!(other.port, first.port, "W's port is passed over");
    let (again, _) = b.allocate(in_w(), 3).expect("allocate");
    assert_eq!(again.port, first.port, "W gets its port back");
    // A preferred port that is free wins over the remembered one.
    b.release_id(&again.id, user(1000)).expect("release");
    let preferred = first.port + 50;
    let (chosen, _) = b
        .allocate(
            AllocateRequest {
                preferred_port: Some(preferred),
                ..in_w()
            },
            4,
        )
        .expect("allocate");
    assert_eq!(chosen.port, preferred);
}

#[test]
fn forget_clears_by_project_port_or_all_and_only_the_callers_own() {
    let mut b = broker();
    b.apply(bound_by(1, 3000, 30, Protocol::Tcp), 1);
    move_and_stop(&mut b, 40, 2, 3000, "/src/w", 10);
    move_and_stop(&mut b, 41, 3, 3000, "/src/v", 20);
    assert_eq!(b.sticky_ports().len(), 2);
    let (none, _) = b.forget_sticky(2000, None, None);
    assert!(
        none.is_empty(),
        "another user forgets nothing of uid 1000's"
    );
    let (gone, effects) = b.forget_sticky(1000, Some("/src/w"), None);
    assert_eq!(gone.len(), 1);
    assert!(matches!(
        effects.changes[..],
        [StateChange::RemoveSticky { .. }]
    ));
    // W is forgotten: it is moved like anyone else (3001 is free and nobody remembers it, and a
    // reading of the socket tables shows no connections left there).
    read_lingering(&mut b, []);
    assert_eq!(move_and_stop(&mut b, 42, 4, 3000, "/src/w", 30), 3001);
    let (all, _) = b.forget_sticky(0, None, None);
    assert_eq!(all.len(), 2, "root forgets everyone's");
    assert!(b.sticky_ports().is_empty());
}

#[test]
fn sticky_ports_per_user_are_bounded_and_survive_a_restore() {
    let mut b = broker();
    let mut effects = Effects::default();
    for i in 0..STICKY_PER_USER + 5 {
        let key = StickyKey {
            uid: 1000,
            project: format!("/src/p{i}"),
            service_type: "dev".into(),
            asked: 3000,
        };
        b.remember_sticky(key, 3001, i as u64, &mut effects);
    }
    assert_eq!(b.sticky_ports().len(), STICKY_PER_USER);
    assert!(
        !b.sticky_ports().iter().any(|e| e.key.project == "/src/p0"),
        "the oldest went"
    );
    let mut restored = broker();
    restored.restore_sticky(b.sticky_ports());
    assert_eq!(restored.sticky_ports(), b.sticky_ports());
}

#[test]
fn a_kernel_move_is_remembered_for_its_project_and_its_shim_moves_get_it_back() {
    let mut b = broker();
    b.apply(bound_by(1, 8000, 30, Protocol::Tcp), 1);
    b.apply(kernel_moved(2, 8000, 8001, 40, Family::Inet), 2);
    let sticky = b.sticky_ports();
    assert_eq!(sticky.len(), 1);
    assert_eq!(
        (
            sticky[0].key.project.as_str(),
            sticky[0].key.asked,
            sticky[0].port
        ),
        ("/src/k", 8000, 8001)
    );
    assert!(b.is_sticky(8001) && !b.is_sticky(8002));
    b.apply(PortEvent::Released { cookie: 2 }, 3);
    // Another project's shim move passes 8001 over; the same project's gets it.
    let other = move_and_stop(&mut b, 41, 3, 8000, "/src/v", 10);
    assert_eq!(other, 8002);
    let same = move_and_stop(&mut b, 42, 4, 8000, "/src/k", 20);
    assert_eq!(same, 8001);
}

// ---- lingering ports (old TCP connections, TIME_WAIT) ----------------------------------------------

/// A reading of the socket tables, begun and ended now, that found connections on `ports`.
fn read_lingering<const N: usize>(b: &mut Broker, ports: [u16; N]) {
    b.begin_lingering_reading();
    b.set_lingering(ports);
}

#[test]
fn moves_allocations_and_suggestions_pass_lingering_ports_over_until_a_reading_clears_them() {
    let mut b = broker();
    b.apply(PortEvent::Bound(storybook_holder()), 1);
    read_lingering(&mut b, [6007, 3000]);
    assert!(b.is_lingering(6007) && !b.is_lingering(6008));
    let procs = Procs::default();
    let (moved, _) = b.resolve_bind(&bind_req(40, 6006), &procs, 11).unwrap();
    assert!(
        matches!(moved, BindDecision::Reassign { port: 6008, .. }),
        "{moved:?}"
    );
    let (lease, _) = b.allocate(alloc("dev"), 12).unwrap();
    assert_eq!(lease.port, 3001);
    let suggested = b.suggest("dev", 3).unwrap().ports;
    assert_eq!(suggested, [3002, 3003, 3004]);

    // The next reading shows them free.
    read_lingering(&mut b, []);
    assert_eq!(b.lingering_count(), 0);
    let (moved, _) = b.resolve_bind(&bind_req(41, 6006), &procs, 21).unwrap();
    assert!(
        matches!(moved, BindDecision::Reassign { port: 6007, .. }),
        "{moved:?}"
    );
    assert_eq!(b.suggest("dev", 1).unwrap().ports, [3000]);
}

#[test]
fn a_full_range_but_for_lingering_ports_still_gets_them() {
    let mut b = broker();
    let ports: Vec<u16> = (6006..=6029).collect();
    for (i, port) in ports.iter().enumerate().skip(2) {
        b.apply(PortEvent::Bound(socket(100 + i as u64, *port, None)), 1);
    }
    b.apply(PortEvent::Bound(storybook_holder()), 1);
    read_lingering(&mut b, [6007]);
    let (moved, _) = b
        .resolve_bind(&bind_req(40, 6006), &Procs::default(), 3)
        .unwrap();
    assert!(
        matches!(moved, BindDecision::Reassign { port: 6007, .. }),
        "{moved:?}"
    );
}

#[test]
fn a_released_tcp_port_lingers_until_a_reading_started_after_the_release() {
    let mut b = broker();
    b.apply(PortEvent::Bound(socket(2, 6007, None)), 1);
    let mut udp = socket(3, 6008, None);
    udp.protocol = Protocol::Udp;
    b.apply(PortEvent::Bound(udp), 1);
    b.begin_lingering_reading();
    b.apply(PortEvent::Released { cookie: 2 }, 100);
    b.apply(PortEvent::Released { cookie: 3 }, 100);
    assert!(b.is_lingering(6007), "its connections may be closing");
    assert!(!b.is_lingering(6008), "UDP has no connections to linger");
    b.set_lingering([]);
    assert!(
        b.is_lingering(6007),
        "a reading begun before the release proves nothing"
    );
    read_lingering(&mut b, []);
    assert!(!b.is_lingering(6007));
    // A server's own connections: its port is taken, not lingering (nothing to read again for).
    b.apply(PortEvent::Bound(socket(4, 6009, None)), 102);
    read_lingering(&mut b, [6009]);
    assert_eq!(b.lingering_count(), 0);
}

#[test]
fn a_move_the_kernel_refused_on_a_lingering_port_moves_again_but_a_second_family_follows() {
    let mut b = broker();
    b.apply(PortEvent::Bound(storybook_holder()), 1);
    let procs = Procs {
        alive: [pid(40), pid(41)].into(),
        ..Procs::default()
    };
    // Process 40 is moved to 6007; then a reading finds old connections there, and its bind
    // fails (no SO_REUSEADDR): it asks again, holding no socket on 6007.
    let (first, _) = b.resolve_bind(&bind_req(40, 6006), &procs, 2).unwrap();
    assert!(matches!(first, BindDecision::Reassign { port: 6007, .. }));
    read_lingering(&mut b, [6007]);
    let (again, effects) = b.resolve_bind(&bind_req(40, 6006), &procs, 4).unwrap();
    assert!(
        matches!(again, BindDecision::Reassign { port: 6008, .. }),
        "{again:?}"
    );
    assert!(effects
        .notices
        .iter()
        .any(|n| matches!(n, Notice::LeaseEnded(l) if l.port == 6007)));
    assert_eq!(
        b.observe(6007, None).lease,
        None,
        "the refused claim is gone"
    );

    // Process 41 binds IPv4 on its move (6009, 6007 lingering), which a reading then finds
    // lingering too: its IPv6 bind of the same port still goes there, next to its own socket.
    let (v4, _) = b.resolve_bind(&bind_req(41, 6006), &procs, 5).unwrap();
    assert!(
        matches!(v4, BindDecision::Reassign { port: 6009, .. }),
        "{v4:?}"
    );
    b.apply(
        PortEvent::Bound(socket(
            9,
            6009,
            Some(proc_info(41, "node", "node server.js")),
        )),
        6,
    );
    read_lingering(&mut b, [6007, 6009]);
    let (v6, _) = b.resolve_bind(&bind_req(41, 6006), &procs, 8).unwrap();
    assert!(
        matches!(v6, BindDecision::Reassign { port: 6009, .. }),
        "{v6:?}"
    );
}

#[test]
fn a_sticky_port_comes_back_while_it_lingers_unless_its_bind_was_refused() {
    let mut b = broker();
    b.apply(PortEvent::Bound(storybook_holder()), 1);
    let procs = Procs {
        alive: [pid(40), pid(50)].into(),
        ..Procs::default()
    };
    let in_project = |p: u32| BindRequest {
        project: Some("/work/app".into()),
        ..bind_req(p, 6006)
    };
    let (first, _) = b.resolve_bind(&in_project(40), &procs, 2).unwrap();
    assert!(matches!(first, BindDecision::Reassign { port: 6007, .. }));
    b.apply(
        PortEvent::Bound(socket(
            7,
            6007,
            Some(proc_info(40, "node", "node server.js")),
        )),
        3,
    );
    // The server stops (its port lingers) and the same project starts it again at once.
    b.apply(PortEvent::Released { cookie: 7 }, 4);
    b.expire(5, &Procs::default());
    assert!(b.is_lingering(6007));
    let (back, _) = b.resolve_bind(&in_project(50), &procs, 6).unwrap();
    assert!(
        matches!(back, BindDecision::Reassign { port: 6007, .. }),
        "sticky while lingering: {back:?}"
    );
    // Its bind is refused there (no SO_REUSEADDR): asked again, it moves on, and that port
    // becomes the project's.
    read_lingering(&mut b, [6007]);
    let (next, _) = b.resolve_bind(&in_project(50), &procs, 8).unwrap();
    assert!(
        matches!(next, BindDecision::Reassign { port: 6008, .. }),
        "{next:?}"
    );
}

#[test]
fn a_projects_sticky_ports_are_listed_for_the_kernel_and_no_one_elses() {
    let mut b = broker();
    b.apply(bound_by(1, 3000, 30, Protocol::Tcp), 1);
    b.apply(bound_by(2, 6006, 31, Protocol::Tcp), 1);
    let w = move_and_stop(&mut b, 40, 3, 3000, "/src/w", 10);
    let w_storybook = move_and_stop(&mut b, 41, 4, 6006, "/src/w", 20);
    move_and_stop(&mut b, 42, 5, 3000, "/src/wx", 30); // a project whose name starts alike
    move_and_stop(&mut b, 43, 6, 3000, "/src/v", 40);
    let mut listed: Vec<(u16, u16)> = b
        .sticky_ports_of_project(1000, "/src/w")
        .map(|e| (e.key.asked, e.port))
        .collect();
    listed.sort_unstable();
    assert_eq!(listed, [(3000, w), (6006, w_storybook)]);
    assert_eq!(b.sticky_ports_of_project(2000, "/src/w").count(), 0);
    // The lingering generation moves when the set of lingering ports does, only then.
    let generation = b.lingering_generation();
    read_lingering(&mut b, []);
    let cleared = b.lingering_generation();
    assert_ne!(cleared, generation, "the releases' ports were read clean");
    read_lingering(&mut b, []);
    assert_eq!(b.lingering_generation(), cleared);
    read_lingering(&mut b, [3333]);
    assert_ne!(b.lingering_generation(), cleared);
}

#[test]
fn a_leases_kind_is_saved_as_the_flags_every_daemon_reads() {
    let allocated = r#"{"id":"lease-2","port":9000,"service_type":"dev","owner_uid":1000,"process":null,
                        "instance_id":null,"created_ms":1,"expires_ms":5,"claim":false,"requested_port":null,
                        "protocol":null}"#;
    let lease: Lease = serde_json::from_str(allocated).expect("an allocation parses");
    assert_eq!(lease.kind, LeaseKind::Allocated);
    let claim = r#"{"id":"lease-3","port":8001,"service_type":"api","owner_uid":0,"process":null,
                    "instance_id":"B","created_ms":1,"expires_ms":null,"claim":true,"requested_port":8000,
                    "protocol":"udp"}"#;
    let lease: Lease = serde_json::from_str(claim).expect("a claim parses");
    assert_eq!(
        lease.kind,
        LeaseKind::Claim {
            asked: Some(8000),
            protocol: Some(Protocol::Udp)
        }
    );
    // Written back in the same words, so an older daemon reads what this one saved.
    let written: serde_json::Value = serde_json::to_value(&lease).expect("serializes");
    let original: serde_json::Value = serde_json::from_str(claim).expect("json");
    assert_eq!(written, original);
}

// ---- a restart is the same server ---------------------------------------------------------------------

/// Process `p` of `project` (and `instance`, when given) asking for `asked`.
fn restart_req(p: u32, asked: u16, project: &str, instance: Option<&str>) -> BindRequest {
    BindRequest {
        instance_id: instance.map(String::from),
        ..in_project(p, asked, project)
    }
}

/// `req` must be moved: returns where, with its socket (`cookie`) bound there.
fn moved_and_bound(b: &mut Broker, procs: &Procs, req: &BindRequest, cookie: u64, now: u64) -> u16 {
    let (decision, _) = b.resolve_bind(req, procs, now).expect("decision");
    let BindDecision::Reassign { port, .. } = decision else {
        panic!("{decision:?}");
    };
    b.apply(bound_by(cookie, port, req.asker.id.pid, Protocol::Tcp), now);
    port
}

#[test]
fn a_restarted_server_gets_its_port_back_before_its_old_process_is_seen_gone() {
    // An autoreloader's child replaced at once, ten times: the old child has exited, but neither
    // its socket's release nor the sweep has been seen yet when the new one binds. Each new child
    // gets the same port, in a session and outside one (by its project).
    for instance in [Some("feature-x"), None] {
        let mut b = broker();
        b.register_instance(Some("feature-x".into()), pid(1), 1000, 0)
            .unwrap();
        b.apply(bound_by(1, 6006, 4121, Protocol::Tcp), 1);
        let mut procs = Procs {
            alive: [pid(1), pid(4121), pid(40)].into(),
            ..Procs::default()
        };
        let first = moved_and_bound(
            &mut b,
            &procs,
            &restart_req(40, 6006, "/src/w", instance),
            2,
            2,
        );
        assert_eq!(first, 6007);
        for child in 41..51u32 {
            procs.alive.remove(&pid(child - 1));
            procs.alive.insert(pid(child));
            let now = u64::from(child) * 10;
            let req = restart_req(child, 6006, "/src/w", instance);
            let port = moved_and_bound(&mut b, &procs, &req, u64::from(child), now);
            assert_eq!(port, first, "child {child} of {instance:?}");
            // The old child's socket goes from the table when the observer sees it.
            b.apply(
                PortEvent::Released {
                    cookie: u64::from(child) - 1,
                },
                now + 1,
            );
        }
    }
}

#[test]
fn a_port_left_by_an_exited_server_of_another_session_is_not_taken_over() {
    let mut b = broker();
    b.register_instance(Some("feature-x".into()), pid(1), 1000, 0)
        .unwrap();
    b.register_instance(Some("feature-y".into()), pid(2), 1000, 0)
        .unwrap();
    b.apply(bound_by(1, 6006, 4121, Protocol::Tcp), 1);
    let mut procs = Procs {
        alive: [pid(1), pid(2), pid(4121), pid(40), pid(50)].into(),
        ..Procs::default()
    };
    let x = moved_and_bound(
        &mut b,
        &procs,
        &restart_req(40, 6006, "/src/w", Some("feature-x")),
        2,
        2,
    );
    assert_eq!(x, 6007);
    procs.alive.remove(&pid(40));
    // Same project, another session: X's port stays X's (it is held for X).
    let y = moved_and_bound(
        &mut b,
        &procs,
        &restart_req(50, 6006, "/src/w", Some("feature-y")),
        3,
        3,
    );
    assert_eq!(y, 6008);
}

#[test]
fn a_port_held_for_a_session_whose_processes_all_exited_goes_to_the_next_server() {
    // `styxy run --instance s1 -- server` stopped, then `--instance s2` (same project) at once:
    // s1 is over (its only process exited), although the sweep has not ended it yet.
    let mut b = broker();
    b.apply(bound_by(1, 6006, 4121, Protocol::Tcp), 1);
    b.register_instance(Some("s1".into()), pid(40), 1000, 1)
        .unwrap();
    b.register_instance(Some("s2".into()), pid(50), 1000, 2)
        .unwrap();
    let mut procs = Procs {
        alive: [pid(4121), pid(40), pid(50)].into(),
        ..Procs::default()
    };
    let s1 = moved_and_bound(
        &mut b,
        &procs,
        &restart_req(40, 6006, "/src/w", Some("s1")),
        2,
        3,
    );
    procs.alive.remove(&pid(40));
    let s2 = moved_and_bound(
        &mut b,
        &procs,
        &restart_req(50, 6006, "/src/w", Some("s2")),
        3,
        4,
    );
    assert_eq!((s1, s2), (6007, 6007));
}

#[test]
fn a_socket_whose_owner_lives_is_never_taken_over() {
    // The old process's socket was inherited by a live child: the port is bound, whatever the
    // claim says; the restart moves elsewhere.
    let mut b = broker();
    b.apply(bound_by(1, 6006, 4121, Protocol::Tcp), 1);
    let mut procs = Procs {
        alive: [pid(4121), pid(40), pid(50)].into(),
        ..Procs::default()
    };
    let first = moved_and_bound(&mut b, &procs, &restart_req(40, 6006, "/src/w", None), 2, 2);
    b.apply(bound_by(3, first, 45, Protocol::Tcp), 3);
    procs.alive.insert(pid(45));
    procs.alive.remove(&pid(40));
    let again = moved_and_bound(&mut b, &procs, &restart_req(50, 6006, "/src/w", None), 4, 4);
    assert_ne!(again, first);
}

#[test]
fn sticky_ports_come_back_for_asked_ports_in_no_range() {
    // 40000 is in the kernel's ephemeral range and in no service range.
    let mut b = broker();
    b.apply(bound_by(1, 40000, 4121, Protocol::Tcp), 1);
    let procs = Procs {
        alive: [pid(4121)].into(),
        ..Procs::default()
    };
    let first = move_and_stop(&mut b, 40, 2, 40000, "/src/w", 10);
    b.expire(11, &procs);
    let second = move_and_stop(&mut b, 41, 3, 40000, "/src/w", 20);
    b.expire(21, &procs);
    assert_eq!((first, second), (40001, 40001));
}

// ---- names for the human ------------------------------------------------------------------------------

/// A socket of process `p` (`cmdline`) on `port`, in session `instance` when given.
fn server_socket(
    cookie: u64,
    port: u16,
    p: u32,
    cmdline: &str,
    instance: Option<&str>,
) -> PortEvent {
    let comm = cmdline.split(' ').next().unwrap_or_default();
    PortEvent::Bound(socket(
        cookie,
        port,
        Some(ProcessInfo {
            instance_id: instance.map(String::from),
            ..proc_info(p, comm, cmdline)
        }),
    ))
}

fn label(project: &str) -> InstanceLabel {
    InstanceLabel {
        project: Some(project.into()),
        name: None,
    }
}

fn resolved(names: &Names, host: &str) -> Option<(u16, Option<String>)> {
    names.resolve(host).map(|s| (s.port, s.session.clone()))
}

#[test]
fn two_worktrees_on_one_asked_port_each_get_their_names() {
    let mut b = broker();
    let procs = Procs {
        alive: [pid(1), pid(2), pid(10), pid(20)].into(),
        ..Procs::default()
    };
    b.register_named_instance(
        Some("claude-a".into()),
        pid(1),
        1000,
        label("/src/feature-x"),
        1,
    )
    .unwrap();
    b.register_named_instance(
        Some("claude-b".into()),
        pid(2),
        1000,
        label("/src/feature-y"),
        2,
    )
    .unwrap();
    // A's vite keeps 5173; B's asks 5173 and is moved.
    let vite = "node /src/node_modules/.bin/vite --port 5173";
    b.apply(server_socket(1, 5173, 10, vite, Some("claude-a")), 3);
    let req = BindRequest {
        asker: ProcessInfo {
            instance_id: Some("claude-b".into()),
            ..proc_info(20, "node", vite)
        },
        instance_id: Some("claude-b".into()),
        ..bind_req(20, 5173)
    };
    let (decision, _) = b.resolve_bind(&req, &procs, 4).unwrap();
    let BindDecision::Reassign { port: moved, .. } = decision else {
        panic!("{decision:?}");
    };
    b.apply(server_socket(2, moved, 20, vite, Some("claude-b")), 5);
    let names = b.names(&(32768..=60999), 1);
    for (host, want) in [
        ("feature-x.localhost", (5173, "feature-x")),
        ("dev.feature-x.localhost", (5173, "feature-x")),
        ("5173.feature-x.localhost", (5173, "feature-x")),
        ("feature-y.localhost", (moved, "feature-y")),
        ("Dev.Feature-Y.localhost:443", (moved, "feature-y")),
        ("5173.feature-y.localhost", (moved, "feature-y")),
    ] {
        assert_eq!(
            resolved(&names, host),
            Some((want.0, Some(want.1.to_string()))),
            "{host}: {names:#?}"
        );
    }
    // No name carries the bound port.
    assert!(resolved(&names, &format!("{moved}.feature-y.localhost")).is_none());
    assert!(resolved(&names, "feature-z.localhost").is_none());
}

#[test]
fn a_name_follows_its_server_to_another_port() {
    let mut b = broker();
    b.register_named_instance(Some("s".into()), pid(1), 1000, label("/src/shop"), 1)
        .unwrap();
    b.apply(
        server_socket(1, 8000, 10, "python3 manage.py runserver 8000", Some("s")),
        2,
    );
    assert_eq!(
        resolved(&b.names(&(32768..=60999), 1), "shop.localhost"),
        Some((8000, Some("shop".into())))
    );
    b.apply(PortEvent::Released { cookie: 1 }, 3);
    assert_eq!(
        resolved(&b.names(&(32768..=60999), 1), "shop.localhost"),
        None
    );
    b.apply(
        server_socket(2, 8000, 11, "python3 manage.py runserver 8000", Some("s")),
        4,
    );
    assert_eq!(
        resolved(&b.names(&(32768..=60999), 1), "api.shop.localhost"),
        Some((8000, Some("shop".into())))
    );
}

#[test]
fn the_proxys_own_ports_get_no_name() {
    let mut b = broker();
    b.apply(
        server_socket(1, 8080, 77, "styxy daemon --proxy 127.0.0.1:8080", None),
        1,
    );
    b.apply(
        server_socket(2, 8000, 78, "python3 -m http.server 8000", None),
        2,
    );
    let names = b.names(&(32768..=60999), 77);
    assert!(resolved(&names, "8080.localhost").is_none(), "{names:#?}");
    assert_eq!(resolved(&names, "8000.localhost"), Some((8000, None)));
    // Seen from another process, the same socket is a server like any other.
    assert_eq!(
        resolved(&b.names(&(32768..=60999), 1), "8080.localhost"),
        Some((8080, None))
    );
}

#[test]
fn no_session_is_named_like_the_dashboard() {
    let mut b = broker();
    b.register_named_instance(Some("s".into()), pid(1), 1000, label("/src/styxy"), 1)
        .unwrap();
    b.apply(
        server_socket(1, 8000, 10, "python3 -m http.server 8000", Some("s")),
        2,
    );
    let names = b.names(&(32768..=60999), 99);
    assert_eq!(
        (
            names.sessions[0].name.as_str(),
            names.sessions[0].wanted.as_deref()
        ),
        ("styxy-2", Some("styxy"))
    );
    assert!(resolved(&names, "styxy.localhost").is_none());
    assert_eq!(
        resolved(&names, "styxy-2.localhost"),
        Some((8000, Some("styxy-2".into())))
    );
}

#[test]
fn colliding_session_names_go_by_age_and_session_names_beat_service_names() {
    let mut b = broker();
    b.register_named_instance(Some("zz-old".into()), pid(1), 1000, label("/src/app"), 1)
        .unwrap();
    b.register_named_instance(Some("aa-new".into()), pid(2), 1000, label("/other/app"), 2)
        .unwrap();
    b.register_named_instance(
        Some("named".into()),
        pid(3),
        1000,
        InstanceLabel {
            project: Some("/src/x".into()),
            name: Some("API".into()),
        },
        3,
    )
    .unwrap();
    let sessions = b.session_names();
    let name_of = |id: &str| {
        sessions
            .iter()
            .find(|s| s.instance_id == id)
            .map(|s| (s.name.clone(), s.wanted.clone()))
    };
    assert_eq!(name_of("zz-old"), Some(("app".into(), None)));
    assert_eq!(
        name_of("aa-new"),
        Some(("app-2".into(), Some("app".into())))
    );
    assert_eq!(name_of("named"), Some(("api".into(), None)));
    // Re-registering keeps the first registration's age, project and name.
    b.register_named_instance(Some("zz-old".into()), pid(4), 1000, label("/elsewhere"), 9)
        .unwrap();
    assert_eq!(b.session_names(), sessions);
    // Outside sessions: by service and port; `api.localhost` is the session's.
    b.apply(
        server_socket(1, 5432, 30, "postgres -D /var/lib/pg", None),
        10,
    );
    b.apply(
        server_socket(2, 8001, 31, "uvicorn app:app --port 8001", None),
        10,
    );
    b.apply(
        server_socket(3, 3000, 32, "node server.js 3000", Some("named")),
        10,
    );
    let names = b.names(&(32768..=60999), 1);
    assert_eq!(resolved(&names, "database.localhost"), Some((5432, None)));
    assert_eq!(resolved(&names, "5432.localhost"), Some((5432, None)));
    assert_eq!(resolved(&names, "8001.localhost"), Some((8001, None)));
    assert_eq!(
        resolved(&names, "api.localhost"),
        Some((3000, Some("api".into())))
    );
}

#[test]
fn helper_ports_and_udp_get_no_names() {
    let mut b = broker();
    b.register_named_instance(Some("s".into()), pid(1), 1000, label("/src/nb"), 1)
        .unwrap();
    b.apply(
        server_socket(1, 8888, 10, "jupyter-server --port 8888", Some("s")),
        2,
    );
    b.apply(
        server_socket(
            2,
            40001,
            11,
            "python3 -m ipykernel_launcher -f k.json",
            Some("s"),
        ),
        2,
    );
    b.apply(
        PortEvent::Bound(BoundSocket {
            protocol: Protocol::Udp,
            ..socket(3, 5353, Some(proc_info(12, "avahi", "avahi-daemon")))
        }),
        2,
    );
    let names = b.names(&(32768..=60999), 1);
    assert_eq!(names.servers.len(), 1, "{names:#?}");
    assert_eq!(
        resolved(&names, "nb.localhost"),
        Some((8888, Some("nb".into())))
    );
    assert_eq!(
        resolved(&names, "ai.nb.localhost"),
        Some((8888, Some("nb".into())))
    );
    assert!(resolved(&names, "40001.nb.localhost").is_none());
    assert!(resolved(&names, "5353.localhost").is_none());
}

// ---- styxy stop ----------------------------------------------------------------------------------------

/// Session A's server kept 8000; session B's asked 8000 too and was moved to 8001; a process of
/// no session holds 9000.
fn two_sessions_on_one_port() -> Broker {
    let mut b = broker();
    let procs = Procs {
        alive: [pid(30), pid(40)].into(),
        ..Procs::default()
    };
    let (kept, _) = b
        .resolve_bind(&session_bind(30, 8000, Protocol::Tcp, "A"), &procs, 1)
        .unwrap();
    assert!(matches!(kept, BindDecision::Keep { .. }), "{kept:?}");
    b.apply(bound_by(1, 8000, 30, Protocol::Tcp), 2);
    let (moved, _) = b
        .resolve_bind(&session_bind(40, 8000, Protocol::Tcp, "B"), &procs, 3)
        .unwrap();
    assert!(matches!(moved, BindDecision::Reassign { port: 8001, .. }));
    b.apply(bound_by(2, 8001, 40, Protocol::Tcp), 4);
    b.apply(bound_by(3, 9000, 60, Protocol::Tcp), 5);
    b
}

/// A stop's processes as (pid, bound ports, asked port).
type Stopping = Vec<(u32, Vec<u16>, Option<u16>)>;

fn stop(b: &Broker, instance: &str, target: StopTarget) -> Result<Stopping, StopRefused> {
    b.servers_to_stop(instance, &target, &Names::default(), &|_| None)
        .map(|found| {
            found
                .into_iter()
                .map(|c| (c.pid, c.ports, c.asked))
                .collect()
        })
}

#[test]
fn a_port_is_stopped_as_the_session_sees_it() {
    let b = two_sessions_on_one_port();
    // In B, 8000 is B's moved server (its view sends B there), not A's.
    assert_eq!(
        stop(&b, "B", StopTarget::Port(8000)),
        Ok(vec![(40, vec![8001], Some(8000))])
    );
    // In A, 8000 is A's own.
    assert_eq!(
        stop(&b, "A", StopTarget::Port(8000)),
        Ok(vec![(30, vec![8000], None)])
    );
    // B may name its server by the port it landed on too.
    assert_eq!(
        stop(&b, "B", StopTarget::Port(8001)),
        Ok(vec![(40, vec![8001], None)])
    );
}

#[test]
fn another_sessions_server_or_nobodys_is_refused_with_its_owner() {
    let b = two_sessions_on_one_port();
    // B's view has no entry for 8001's other meaning: in A, 8001 is B's server.
    assert_eq!(
        stop(&b, "A", StopTarget::Port(8001)),
        Err(StopRefused::NotYours {
            pid: 40,
            comm: "python3".into(),
            ports: vec![8001],
            instance_id: Some("B".into()),
        })
    );
    // A third session with no server on 8000 reaches A's: refused.
    assert!(matches!(
        stop(&b, "C", StopTarget::Port(8000)),
        Err(StopRefused::NotYours { pid: 30, instance_id: Some(ref a), .. }) if a == "A"
    ));
    // A process of no session.
    assert!(matches!(
        stop(&b, "B", StopTarget::Port(9000)),
        Err(StopRefused::NotYours {
            pid: 60,
            instance_id: None,
            ..
        })
    ));
    assert_eq!(
        stop(&b, "B", StopTarget::Port(7000)),
        Err(StopRefused::NotFound("nothing holds port 7000".into()))
    );
}

#[test]
fn every_server_of_a_session_includes_those_the_kernel_says_are_its() {
    let b = two_sessions_on_one_port();
    assert_eq!(
        stop(&b, "B", StopTarget::All),
        Ok(vec![(40, vec![8001], None)])
    );
    // The kernel's membership says 60 (which holds 9000, claimed by no one) is B's: a server
    // that double-forked away from its session's shim is still the session's.
    let kernel = |pid: u32| (pid == 60 || pid == 40).then(|| "B".to_string());
    let all: Vec<u32> = b
        .servers_to_stop("B", &StopTarget::All, &Names::default(), &kernel)
        .unwrap()
        .iter()
        .map(|c| c.pid)
        .collect();
    assert_eq!(all, vec![40, 60]);
    // And its port 9000 may be stopped from B, not from A.
    assert!(b
        .servers_to_stop("B", &StopTarget::Port(9000), &Names::default(), &kernel)
        .is_ok());
    assert!(matches!(
        b.servers_to_stop("A", &StopTarget::Port(9000), &Names::default(), &kernel),
        Err(StopRefused::NotYours { pid: 60, .. })
    ));
    assert_eq!(
        stop(&b, "D", StopTarget::All),
        Err(StopRefused::NotFound(
            "the session has no server running".into()
        ))
    );
}

#[test]
fn a_pid_is_stopped_only_from_its_own_session() {
    assert_eq!(
        stopping::check_session("B", 40, "python3", vec![8001], Some("B".into())),
        Ok(())
    );
    assert!(matches!(
        stopping::check_session("B", 30, "python3", vec![8000], Some("A".into())),
        Err(StopRefused::NotYours { pid: 30, .. })
    ));
    assert!(stopping::check_session("B", 1, "systemd", vec![], None).is_err());
}

#[test]
fn a_server_whose_session_ended_is_an_orphan_and_no_other_is() {
    let mut b = two_sessions_on_one_port();
    // Both sessions are registered: nobody is an orphan (60 is in no session).
    for (id, p) in [("A", 30), ("B", 40)] {
        b.register_instance(Some(id.into()), pid(p), 1000, 6)
            .unwrap();
    }
    assert!(b.orphans(&|_| None).is_empty());
    // A ends (SessionEnd): its server runs on, an orphan; B's is not.
    b.end_instance("A", 1000).unwrap();
    let orphans: Vec<(u32, Option<String>)> = b
        .orphans(&|_| None)
        .into_iter()
        .map(|c| (c.pid, c.instance_id))
        .collect();
    assert_eq!(orphans, vec![(30, Some("A".into()))]);
    // A server the kernel knows to be A's (it double-forked away) is A's orphan too.
    let kernel = |pid: u32| (pid == 60).then(|| "A".to_string());
    let pids: Vec<u32> = b.orphans(&kernel).iter().map(|c| c.pid).collect();
    assert_eq!(pids, vec![30, 60]);
}
