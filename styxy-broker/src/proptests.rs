//! The broker as a state machine under random operations — binds asked through `ResolveBind` and
//! then made in a model kernel, releases, allocations, lease releases, process deaths, time
//! passing and restarts from what the journal holds — checked after every step: it never hands
//! one port to two holders, never moves a bind out of its range, and never loses or revives a
//! lease (nor reuses an id).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use proptest::prelude::*;

use crate::*;

/// Processes 0..PROCESSES, each its own user (so a lease tied to no process is one user's alone).
const PROCESSES: u32 = 4;
const SMALL: (u16, u16) = (7000, 7005);
const TINY: (u16, u16) = (7100, 7102);

fn ranges() -> ServiceRanges {
    ServiceRanges::from_toml(&format!(
        "[services.small]\nrange = [{}, {}]\n[services.tiny]\nrange = [{}, {}]\n",
        SMALL.0, SMALL.1, TINY.0, TINY.1
    ))
    .expect("a valid config")
}

#[derive(Clone, Debug)]
enum Op {
    /// Process `p` binds `port` (asking the broker first, as the shim does).
    Bind { p: u32, port: u16, udp: bool },
    /// The socket `n`-th in the kernel (modulo their count) is closed.
    Close { n: usize },
    /// `Allocate` for a type, maybe a preferred port, tied to a process or living by a TTL.
    Allocate {
        tiny: bool,
        preferred: Option<u16>,
        p: Option<u32>,
        ttl_ms: Option<u64>,
    },
    /// Its owner releases the `n`-th lease (modulo their count).
    ReleaseLease { n: usize },
    /// Process `p` dies: the kernel closes its sockets.
    Kill { p: u32 },
    /// Time passes and the daemon sweeps.
    Tick { ms: u64 },
    /// The daemon restarts from its journal, and reads the kernel's sockets again.
    Restart,
    /// A reading finds old TCP connections (TIME_WAIT) on these ports: they linger.
    Linger { ports: Vec<u16> },
}

fn port() -> impl Strategy<Value = u16> {
    prop_oneof![SMALL.0..=SMALL.1, TINY.0..=TINY.1]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..PROCESSES, port(), any::<bool>()).prop_map(|(p, port, udp)| Op::Bind { p, port, udp }),
        2 => any::<usize>().prop_map(|n| Op::Close { n }),
        3 => (any::<bool>(), proptest::option::of(port()), proptest::option::of(0..PROCESSES),
              proptest::option::of(1u64..5_000))
            .prop_map(|(tiny, preferred, p, ttl_ms)| Op::Allocate { tiny, preferred, p, ttl_ms }),
        1 => any::<usize>().prop_map(|n| Op::ReleaseLease { n }),
        1 => (0..PROCESSES).prop_map(|p| Op::Kill { p }),
        2 => (1u64..40_000).prop_map(|ms| Op::Tick { ms }),
        1 => Just(Op::Restart),
        1 => proptest::collection::vec(port(), 0..4).prop_map(|ports| Op::Linger { ports }),
    ]
}

/// Which processes run; a killed one is replaced by a new process (new start time) at the same index.
struct Procs {
    generation: [u64; PROCESSES as usize],
    alive: [bool; PROCESSES as usize],
}

impl Procs {
    fn id(&self, p: u32) -> ProcessId {
        ProcessId {
            pid: 100 + p,
            start_time: self.generation[p as usize],
        }
    }
}

impl ProcessView for Procs {
    fn is_alive(&self, id: ProcessId) -> bool {
        let p = id.pid.wrapping_sub(100) as usize;
        p < PROCESSES as usize && self.alive[p] && self.generation[p] == id.start_time
    }
    fn ancestors(&self, _pid: u32) -> Vec<ProcessId> {
        Vec::new()
    }
}

/// The model kernel: bound sockets by cookie.
#[derive(Default)]
struct Kernel {
    sockets: BTreeMap<u64, (u16, Protocol, u32)>,
    next_cookie: u64,
}

impl Kernel {
    fn bound_by_other(&self, port: u16, protocol: Protocol, p: u32) -> bool {
        self.sockets
            .values()
            .any(|(q, proto, owner)| *q == port && *proto == protocol && *owner != p)
    }
}

struct World {
    broker: Broker,
    procs: Procs,
    kernel: Kernel,
    now: u64,
    /// What the journal holds: every change the broker made, folded.
    journal_leases: BTreeMap<String, Lease>,
    /// The sticky ports the journal holds.
    journal_sticky: BTreeMap<crate::StickyKey, crate::StickyPort>,
    issued: u64,
    /// Every lease id that ended (none may come back).
    ended_ids: BTreeSet<String>,
}

fn socket(
    cookie: u64,
    port: u16,
    protocol: Protocol,
    owner: &ProcessInfo,
    uid: u32,
) -> BoundSocket {
    BoundSocket {
        cookie,
        protocol,
        family: Family::Inet,
        address: IpAddr::V4(Ipv4Addr::LOCALHOST),
        port,
        uid,
        owner: Some(owner.clone()),
        since_ms: 0,
    }
}

impl World {
    fn new() -> World {
        World {
            broker: Broker::new(ranges(), LeaseSettings::default()),
            procs: Procs {
                generation: [1; PROCESSES as usize],
                alive: [true; PROCESSES as usize],
            },
            kernel: Kernel::default(),
            now: 1_000,
            journal_leases: BTreeMap::new(),
            journal_sticky: BTreeMap::new(),
            issued: 0,
            ended_ids: BTreeSet::new(),
        }
    }

    fn info(&self, p: u32) -> ProcessInfo {
        ProcessInfo {
            id: self.procs.id(p),
            comm: "server".into(),
            cmdline: "server".into(),
            instance_id: None,
        }
    }

    /// Folds what the broker did into the journal and the id books.
    fn record(&mut self, effects: &Effects) {
        for change in &effects.changes {
            match change {
                StateChange::PutLease { lease } => {
                    let n = lease.id.trim_start_matches("lease-").parse().unwrap_or(0);
                    self.issued = self.issued.max(n);
                    self.journal_leases.insert(lease.id.clone(), lease.clone());
                }
                StateChange::RemoveLease { id } => {
                    self.ended_ids.insert(id.clone());
                    self.journal_leases.remove(id);
                }
                StateChange::PutSticky { sticky } => {
                    self.journal_sticky
                        .insert(sticky.key.clone(), sticky.clone());
                }
                StateChange::RemoveSticky { key } => {
                    self.journal_sticky.remove(key);
                }
                _ => {}
            }
        }
    }

    fn apply(&mut self, event: PortEvent) {
        let effects = self.broker.apply(event, self.now);
        self.record(&effects);
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Bind { p, port, udp } => {
                if !self.procs.alive[p as usize] {
                    return Ok(());
                }
                let protocol = if udp { Protocol::Udp } else { Protocol::Tcp };
                let req = BindRequest {
                    asker: self.info(p),
                    uid: 1000 + p,
                    port,
                    protocol,
                    family: Family::Inet,
                    reuseport: false,
                    instance_id: None,
                    // Two projects: sticky ports are given back and passed over.
                    project: Some(format!("/src/p{}", p % 2)),
                };
                let Ok((decision, effects)) = self.broker.resolve_bind(&req, &self.procs, self.now)
                else {
                    return Ok(()); // a full range: an error, not a wrong answer
                };
                self.record(&effects);
                let given = match decision {
                    BindDecision::Keep { port: given } => given,
                    BindDecision::Reassign { port: given, .. } => {
                        let range = self.broker.ranges().move_range(port);
                        prop_assert!(
                            (range.start..=range.end).contains(&given),
                            "moved {port} to {given}, outside {range:?}"
                        );
                        given
                    }
                };
                self.check_port_is_free_for(given, protocol, p)?;
                if self.kernel.bound_by_other(given, protocol, p) {
                    return Ok(()); // the kernel refuses; the shim would ask again
                }
                self.kernel.next_cookie += 1;
                let cookie = self.kernel.next_cookie;
                self.kernel.sockets.insert(cookie, (given, protocol, p));
                let owner = self.info(p);
                self.apply(PortEvent::Bound(socket(
                    cookie,
                    given,
                    protocol,
                    &owner,
                    1000 + p,
                )));
            }
            Op::Close { n } => {
                let Some(&cookie) = self
                    .kernel
                    .sockets
                    .keys()
                    .nth(n % self.kernel.sockets.len().max(1))
                else {
                    return Ok(());
                };
                self.kernel.sockets.remove(&cookie);
                self.apply(PortEvent::Released { cookie });
            }
            Op::Allocate {
                tiny,
                preferred,
                p,
                ttl_ms,
            } => {
                let process = p
                    .filter(|p| self.procs.alive[*p as usize])
                    .map(|p| self.procs.id(p));
                let uid = p.map_or(1000, |p| 1000 + p);
                let req = AllocateRequest {
                    service_type: if tiny { "tiny" } else { "small" }.into(),
                    preferred_port: preferred,
                    process,
                    uid,
                    instance_id: None,
                    project: Some(format!("/src/p{}", uid % 2)),
                    ttl_ms,
                };
                if let Ok((lease, effects)) = self.broker.allocate(req, self.now) {
                    self.record(&effects);
                    let (start, end) = if tiny { TINY } else { SMALL };
                    prop_assert!(
                        (start..=end).contains(&lease.port) || Some(lease.port) == preferred,
                        "allocated {} outside its range",
                        lease.port
                    );
                    prop_assert!(
                        !self
                            .kernel
                            .sockets
                            .values()
                            .any(|(q, _, _)| *q == lease.port),
                        "allocated {}, which a socket holds",
                        lease.port
                    );
                    let others = self
                        .broker
                        .leases()
                        .filter(|l| l.port == lease.port)
                        .count();
                    prop_assert_eq!(others, 1, "two leases on {}", lease.port);
                }
            }
            Op::ReleaseLease { n } => {
                let leases: Vec<Lease> = self.broker.leases().cloned().collect();
                if let Some(lease) = leases.get(n % leases.len().max(1)) {
                    let owner = Caller {
                        uid: lease.owner_uid,
                        pid: None,
                    };
                    let (_, effects) = self.broker.release_id(&lease.id, owner).map_err(|e| {
                        TestCaseError::fail(format!("its owner could not release it: {e}"))
                    })?;
                    self.record(&effects);
                }
            }
            Op::Kill { p } => {
                let i = p as usize;
                let closed: Vec<u64> = self
                    .kernel
                    .sockets
                    .iter()
                    .filter(|(_, (_, _, owner))| *owner == p)
                    .map(|(cookie, _)| *cookie)
                    .collect();
                for cookie in closed {
                    self.kernel.sockets.remove(&cookie);
                    self.apply(PortEvent::Released { cookie });
                }
                // A new process takes its place (same index, new identity).
                self.procs.generation[i] += 1;
                self.procs.alive[i] = true;
            }
            Op::Linger { ref ports } => {
                self.broker.begin_lingering_reading();
                self.broker.set_lingering(ports.iter().copied());
            }
            Op::Tick { ms } => {
                self.now += ms;
                let effects = self.broker.expire(self.now, &self.procs);
                self.record(&effects);
            }
            Op::Restart => {
                let leases: Vec<Lease> = self.journal_leases.values().cloned().collect();
                let before: BTreeSet<String> = self.broker.leases().map(|l| l.id.clone()).collect();
                let mut broker = Broker::restore(ranges(), LeaseSettings::default(), leases, []);
                broker.issue_lease_ids_after(self.issued);
                broker.restore_sticky(self.journal_sticky.values().cloned());
                prop_assert_eq!(
                    broker.sticky_ports(),
                    self.broker.sticky_ports(),
                    "sticky ports come back from the journal as they were"
                );
                let reading: Vec<BoundSocket> = self
                    .kernel
                    .sockets
                    .iter()
                    .map(|(cookie, (port, protocol, p))| {
                        socket(*cookie, *port, *protocol, &self.info(*p), 1000 + p)
                    })
                    .collect();
                let effects = broker.reconcile(Scope::All, reading, self.now);
                self.broker = broker;
                self.record(&effects);
                let after: BTreeSet<String> = self.broker.leases().map(|l| l.id.clone()).collect();
                prop_assert_eq!(before, after, "a restart lost or revived a lease");
            }
        }
        self.check_invariants()
    }

    /// The port the broker just gave `p` is held by no one else: no other process's socket of
    /// that protocol, no lease that is not `p`'s own.
    fn check_port_is_free_for(
        &self,
        port: u16,
        protocol: Protocol,
        p: u32,
    ) -> Result<(), TestCaseError> {
        prop_assert!(
            !self.kernel.bound_by_other(port, protocol, p),
            "gave {port}/{protocol:?} to process {p} while another holds it"
        );
        if let Some(lease) = self.broker.leases().find(|l| l.port == port) {
            let mine = match lease.process {
                Some(owner) => owner == self.procs.id(p),
                None => lease.owner_uid == 1000 + p,
            };
            prop_assert!(mine, "gave {port} to process {p} while {lease:?} holds it");
        }
        Ok(())
    }

    fn check_invariants(&self) -> Result<(), TestCaseError> {
        // At most one lease per port (the broker keys them so) and ids never reused or revived.
        let mut by_port: HashMap<u16, usize> = HashMap::new();
        for lease in self.broker.leases() {
            *by_port.entry(lease.port).or_default() += 1;
            prop_assert!(
                !self.ended_ids.contains(&lease.id),
                "{} ended and came back",
                lease.id
            );
        }
        prop_assert!(by_port.values().all(|n| *n == 1));
        // What the journal holds is what the broker holds.
        let held: BTreeSet<&String> = self.broker.leases().map(|l| &l.id).collect();
        let journaled: BTreeSet<&String> = self.journal_leases.keys().collect();
        prop_assert_eq!(held, journaled, "the journal and the broker disagree");
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn the_broker_never_double_books_leaves_a_range_or_loses_a_lease(ops in proptest::collection::vec(op(), 1..80)) {
        let mut world = World::new();
        for op in &ops {
            world.step(op)?;
        }
    }
}
