//! The broker: every port decision Styxy makes, as plain data in and plain data out.
//!
//! It holds the port table (sockets the observers saw in the kernel), the leases and the instances, and
//! answers: which ports are free for a service type, which port an `Allocate` gets, whether a `bind()` keeps
//! its port or moves, who holds a port. It reads no files, opens no sockets and reads no clock: the caller
//! passes `now` and a [`ProcessView`], and gets back [`Effects`] to persist and publish. This file answers
//! "who decides that 6006 is taken?".
#![warn(missing_docs)]

mod hold;
mod kernel_move;
mod lingering;
pub mod model;
mod portset;
#[cfg(test)]
mod proptests;
pub mod ranges;
mod session_report;
mod sticky;
#[cfg(test)]
mod tests;
mod view;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use portset::PortSet;

pub use model::*;
pub use ranges::{PortRange, ServiceRanges, ServiceType, UserLimits};
pub use session_report::{session_changes, SessionChanges, SessionServer};
pub use sticky::{StickyKey, StickyPort, STICKY_PER_USER};
pub use view::ViewEntry;

/// Lease lifetimes the daemon applies when a caller does not give one, and how much one user
/// may lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseSettings {
    /// TTL of an `Allocate` lease that is tied to no process.
    pub default_ttl_ms: u64,
    /// How long a `ResolveBind` claim waits for its process to bind before it lapses.
    pub claim_ttl_ms: u64,
    /// How long a session's port stays its own after its server stopped (see `hold`); 0: not.
    pub restart_hold_ms: u64,
    /// Each user's share of the leases.
    pub user_limits: UserLimits,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        LeaseSettings {
            default_ttl_ms: 3_600_000,
            claim_ttl_ms: 30_000,
            restart_hold_ms: 30_000,
            user_limits: UserLimits::default(),
        }
    }
}

/// Why the broker refused a request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BrokerError {
    #[error("no free port left in {service_type} range {start}-{end}")]
    /// Every port of the range is bound, leased or claimed.
    NoFreePort {
        /// The service type whose range is full.
        service_type: String,
        /// First port of the range.
        start: u16,
        /// Last port of the range.
        end: u16,
    },
    /// A service type nobody configured.
    #[error(transparent)]
    UnknownServiceType(#[from] ranges::UnknownServiceType),
    /// The user holds its share already; root and the shim's claims are not limited.
    #[error("uid {uid} holds {held} lease(s) {what}, its limit: release one (`styxy ports`, `styxy release ID`), or raise [limits] {setting} in the daemon's config")]
    UserLimit {
        /// The caller.
        uid: u32,
        /// How many it holds.
        held: usize,
        /// Which limit: over all ranges, or in one range.
        what: String,
        /// The config setting that raises it.
        setting: &'static str,
    },
    /// The instance id belongs to another user.
    #[error("instance {id} belongs to uid {owner_uid}; another user may not take, extend or end it (pick another id)")]
    InstanceTaken {
        /// The id asked for.
        id: String,
        /// Its owner.
        owner_uid: u32,
    },
    #[error("no lease {0}")]
    /// No lease has this id.
    NoSuchLease(String),
    #[error("no lease on port {0}")]
    /// The port has no lease.
    NoLeaseOnPort(u16),
    #[error("lease {lease_id} belongs to uid {owner_uid}; only that user or root may release it")]
    /// The lease is another user's.
    NotOwner {
        /// The lease asked for.
        lease_id: String,
        /// Its owner.
        owner_uid: u32,
    },
}

/// A socket in the table with the service type inferred from its owner's command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    /// The socket as the observer saw it.
    pub socket: BoundSocket,
    /// Inferred from the owner's command line (or the port's range when the owner is unknown).
    pub service_type: String,
    /// The agent session (`STYXY_INSTANCE`) whose shim claimed this port for the holder, if any.
    pub instance_id: Option<String>,
    /// When the bind hooks (eBPF) reported this socket bound; `None` when only a reading showed it.
    pub reported_bound_ms: Option<u64>,
}

/// How long a TCP socket the bind hooks reported stays in the table while readings do not show
/// it: the socket tables list a TCP socket only once it listens or connects, so between a
/// server's `bind()` and its `listen()` a reading cannot see it. Its release is reported by the
/// hooks too; this only bounds how long a lost release record can leave it behind.
pub const UNLISTED_TCP_GRACE_MS: u64 = 2_000;

impl Held {
    /// Whether a reading that does not show this socket may simply be too early to see it.
    fn may_be_unlisted(&self, now_ms: u64) -> bool {
        self.socket.protocol == Protocol::Tcp
            && self
                .reported_bound_ms
                .is_some_and(|at| now_ms.saturating_sub(at) < UNLISTED_TCP_GRACE_MS)
    }
}

/// Who holds a port, as told to a process whose bind was moved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HolderView {
    /// A socket bound in the kernel.
    Socket(Held),
    /// A lease or a claim, not bound yet.
    Lease(Lease),
}

/// What `ResolveBind` tells the shim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BindDecision {
    /// Bind the port asked for.
    Keep {
        /// The port asked for.
        port: u16,
    },
    /// Bind `port` instead: the one asked for is held.
    Reassign {
        /// The free port picked in the asked port's range.
        port: u16,
        /// Who holds the asked port, when known.
        holder: Option<HolderView>,
    },
}

/// A `bind()` about to happen, as the shim reported it and the daemon identified the asker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindRequest {
    /// The process that is about to bind.
    pub asker: ProcessInfo,
    /// Its user, as the transport identified it.
    pub uid: u32,
    /// The port it asked for.
    pub port: u16,
    /// TCP or UDP: the two protocols' ports are separate.
    pub protocol: Protocol,
    /// IPv4 or IPv6: a process's own socket on a port is in its way only in the same family.
    pub family: Family,
    /// The socket has `SO_REUSEPORT` (or a UDP `SO_REUSEADDR`): intended sharing, never moved.
    pub reuseport: bool,
    /// The agent session (`STYXY_INSTANCE`) of the asking process.
    pub instance_id: Option<String>,
    /// The asker's project (git worktree root, else working directory): with the uid, the
    /// service type and the asked port, what a move's sticky port is remembered by.
    pub project: Option<String>,
}

/// An `Allocate` call, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocateRequest {
    /// Whose range to pick from (`dev` for an unknown type).
    pub service_type: String,
    /// Taken when it is free.
    pub preferred_port: Option<u16>,
    /// The process the lease lives with; `None`: it lives by its TTL.
    pub process: Option<ProcessId>,
    /// The caller's user, who owns the lease.
    pub uid: u32,
    /// The agent session the lease belongs to.
    pub instance_id: Option<String>,
    /// Lifetime; `None`: the default TTL, or the process's life when there is one.
    pub ttl_ms: Option<u64>,
    /// The caller's project (git worktree root, else working directory): an allocation's sticky
    /// port is remembered by it, the uid, the service type and the preferred port.
    pub project: Option<String>,
}

/// Free ports of one service type's range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Suggestion {
    /// The range's service type (`dev` when the type asked for is unknown).
    pub service_type: String,
    /// Free ports, lowest first.
    pub ports: Vec<u16>,
    /// First port of the range.
    pub start: u16,
    /// Last port of the range.
    pub end: u16,
}

/// Everything known about one port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortView {
    /// The port asked about.
    pub port: u16,
    /// Sockets bound on it.
    pub holders: Vec<Held>,
    /// Its lease or claim, if any.
    pub lease: Option<Lease>,
    /// The service type whose range holds the port, if any.
    pub range_type: Option<String>,
}

/// Which part of the port table a fresh socket-table reading covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every port.
    All,
    /// One port.
    Port {
        /// The port.
        port: u16,
        /// One protocol, or both when `None`.
        protocol: Option<Protocol>,
    },
    /// A range of ports, ends included.
    Range {
        /// First port.
        start: u16,
        /// Last port.
        end: u16,
    },
}

impl Scope {
    fn covers(&self, socket: &BoundSocket) -> bool {
        match *self {
            Scope::All => true,
            Scope::Port { port, protocol } => {
                socket.port == port && protocol.is_none_or(|p| p == socket.protocol)
            }
            Scope::Range { start, end } => (start..=end).contains(&socket.port),
        }
    }
}

/// The port table, leases and instances.
#[derive(Debug)]
pub struct Broker {
    ranges: ServiceRanges,
    settings: LeaseSettings,
    sockets: HashMap<u64, Held>,
    by_port: BTreeMap<(u16, Protocol), BTreeSet<u64>>,
    leases: BTreeMap<u16, Lease>,
    lease_ports: HashMap<String, u16>,
    /// Ports held by a socket of any protocol or by a lease: derived from the two maps above, kept in step
    /// by [`Broker::retake`] so that searches for free ports do not walk them.
    taken: PortSet,
    instances: BTreeMap<String, Instance>,
    /// The ports identities got, to give them back (see `sticky`).
    sticky: sticky::StickyPorts,
    /// Ports a plain bind may still find refused (see `lingering`).
    lingering: lingering::LingeringPorts,
    next_lease_seq: u64,
    reassignments: u64,
    /// Service types already inferred, by (command line, comm): inference scans every pattern,
    /// and a busy machine binds from the same few commands over and over.
    inferred: HashMap<(String, String), String>,
}

/// Bound on [`Broker::inferred`]; it is cleared when full.
const INFERRED_MAX: usize = 4096;

impl Broker {
    /// An empty broker: no sockets, no leases, no instances.
    pub fn new(ranges: ServiceRanges, settings: LeaseSettings) -> Self {
        Broker {
            ranges,
            settings,
            sockets: HashMap::new(),
            by_port: BTreeMap::new(),
            leases: BTreeMap::new(),
            lease_ports: HashMap::new(),
            taken: PortSet::default(),
            instances: BTreeMap::new(),
            sticky: sticky::StickyPorts::default(),
            lingering: lingering::LingeringPorts::default(),
            inferred: HashMap::new(),
            next_lease_seq: 1,
            reassignments: 0,
        }
    }

    /// A broker holding the leases and instances read back from the state dir.
    pub fn restore(
        ranges: ServiceRanges,
        settings: LeaseSettings,
        leases: impl IntoIterator<Item = Lease>,
        instances: impl IntoIterator<Item = Instance>,
    ) -> Self {
        let mut broker = Broker::new(ranges, settings);
        for lease in leases {
            broker.insert_lease(lease);
        }
        broker.next_lease_seq = broker
            .leases
            .values()
            .filter_map(|l| l.id.strip_prefix("lease-")?.parse::<u64>().ok())
            .max()
            .map_or(1, |n| n + 1);
        broker.instances = instances.into_iter().map(|i| (i.id.clone(), i)).collect();
        broker
    }

    /// Issues lease ids after `lease-{issued}` from now on (ids of released leases, which the
    /// leases no longer show, are never issued again).
    pub fn issue_lease_ids_after(&mut self, issued: u64) {
        self.next_lease_seq = self.next_lease_seq.max(issued.saturating_add(1));
    }

    /// The service ranges in force.
    pub fn ranges(&self) -> &ServiceRanges {
        &self.ranges
    }

    /// How many leases and claims are live.
    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// The user that registered instance `id`, if it is registered.
    pub fn instance_owner(&self, id: &str) -> Option<u32> {
        self.instances.get(id).map(|i| i.owner_uid)
    }

    /// How many instances are registered.
    pub fn instance_count(&self) -> usize {
        self.instances.len()
    }

    /// How many distinct ports have a socket bound (either protocol).
    pub fn bound_port_count(&self) -> usize {
        self.by_port
            .keys()
            .map(|(port, _)| *port)
            .collect::<BTreeSet<_>>()
            .len()
    }

    /// How many binds were moved since start.
    pub fn reassignments(&self) -> u64 {
        self.reassignments
    }

    /// The lease or claim on `port`, if any.
    pub fn lease_on(&self, port: u16) -> Option<&Lease> {
        self.leases.get(&port)
    }

    /// Every live lease and claim, by port.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    /// Every registered instance (session), with the process it was registered with.
    pub fn instances(&self) -> impl Iterator<Item = &Instance> {
        self.instances.values()
    }

    /// Every socket in the table, by port.
    pub fn holders(&self) -> Vec<Held> {
        self.by_port
            .values()
            .flatten()
            .filter_map(|cookie| self.sockets.get(cookie).cloned())
            .collect()
    }

    /// Whether anything holds `port`: a socket of any protocol, or a lease.
    pub fn is_taken(&self, port: u16) -> bool {
        self.taken.contains(port)
    }

    /// Brings `taken` up to date for one port after the socket table or the leases changed.
    fn retake(&mut self, port: u16) {
        let taken = self.leases.contains_key(&port) || self.is_bound(port, None);
        self.taken.set(port, taken);
    }

    fn is_bound(&self, port: u16, protocol: Option<Protocol>) -> bool {
        match protocol {
            Some(p) => self.by_port.contains_key(&(port, p)),
            None => Protocol::ALL
                .iter()
                .any(|p| self.by_port.contains_key(&(port, *p))),
        }
    }

    fn sockets_on(&self, port: u16, protocol: Option<Protocol>) -> impl Iterator<Item = &Held> {
        Protocol::ALL
            .into_iter()
            .filter(move |p| protocol.is_none_or(|want| want == *p))
            .filter_map(move |p| self.by_port.get(&(port, p)))
            .flatten()
            .filter_map(|cookie| self.sockets.get(cookie))
    }

    /// Whether the table has any socket bound on `port` (either protocol).
    pub fn has_socket_on(&self, port: u16) -> bool {
        self.sockets_on(port, None).next().is_some()
    }

    /// How many sockets the table has on `port` (for `protocol`, or both).
    pub fn socket_count_on(&self, port: u16, protocol: Option<Protocol>) -> usize {
        self.sockets_on(port, protocol).count()
    }

    /// Whether the table has a socket on `port` in the way of a bind: any socket, except (when
    /// `except` names a process and a family) that process's own sockets of the other family
    /// (its IPv4 socket does not keep its IPv6 one off the port; a sibling thread's socket of the
    /// same family does).
    pub fn has_socket_of_other(
        &self,
        port: u16,
        protocol: Option<Protocol>,
        except: Option<(ProcessId, Family)>,
    ) -> bool {
        self.sockets_on(port, protocol)
            .any(|h| !is_own_other_family(&h.socket, except))
    }

    /// Everything known about `port` (all protocols when `protocol` is `None`).
    pub fn observe(&self, port: u16, protocol: Option<Protocol>) -> PortView {
        PortView {
            port,
            holders: self.sockets_on(port, protocol).cloned().collect(),
            lease: self.leases.get(&port).cloned(),
            range_type: self.ranges.type_of_port(port).map(|t| t.name.clone()),
        }
    }

    /// Up to `count` free ports of `service_type`'s range, lowest first; an unknown type is an
    /// error that lists the known ones.
    pub fn suggest(&self, service_type: &str, count: usize) -> Result<Suggestion, BrokerError> {
        let t = self.ranges.get(service_type)?;
        // Lingering ports only when there are not enough others (see `lingering`).
        let ports = self
            .settled_free_in(t.start, t.end)
            .chain(
                self.taken
                    .free_in(t.start, t.end)
                    .filter(|p| self.is_lingering(*p)),
            )
            .take(count)
            .collect();
        Ok(Suggestion {
            service_type: t.name.clone(),
            ports,
            start: t.start,
            end: t.end,
        })
    }

    // ---- observer input ----------------------------------------------------------------------------

    /// Applies one event from an observer.
    pub fn apply(&mut self, event: PortEvent, now_ms: u64) -> Effects {
        let mut effects = Effects::default();
        match event {
            PortEvent::Bound(socket) => {
                self.insert_socket(socket, now_ms, Some(now_ms), &mut effects)
            }
            PortEvent::Released { cookie } => self.remove_socket(cookie, now_ms, &mut effects),
            PortEvent::MovedByKernel {
                socket,
                asked,
                instance_id,
                project,
            } => self.apply_kernel_move(socket, asked, instance_id, project, now_ms, &mut effects),
        }
        effects
    }

    /// Makes the part of the table that `scope` covers equal to a fresh reading of the kernel's socket
    /// tables: sockets no longer there are released, new ones are bound, known ones keep their history.
    pub fn reconcile(&mut self, scope: Scope, reading: Vec<BoundSocket>, now_ms: u64) -> Effects {
        let mut effects = Effects::default();
        let fresh: HashMap<u64, BoundSocket> = reading
            .into_iter()
            .filter(|s| scope.covers(s))
            .map(|s| (s.cookie, s))
            .collect();
        let gone: Vec<u64> = self
            .sockets
            .iter()
            .filter(|(cookie, held)| {
                scope.covers(&held.socket)
                    && !fresh.contains_key(cookie)
                    && !held.may_be_unlisted(now_ms)
            })
            .map(|(cookie, _)| *cookie)
            .collect();
        for cookie in gone {
            self.remove_socket(cookie, now_ms, &mut effects);
        }
        for (cookie, socket) in fresh {
            match self.sockets.get_mut(&cookie) {
                // Known: keep its `since`; learn the owner if this reading found it and the last did not.
                Some(held)
                    if held.socket.port == socket.port
                        && held.socket.protocol == socket.protocol =>
                {
                    if held.socket.owner.is_none() && socket.owner.is_some() {
                        held.service_type = infer_type(&self.ranges, &mut self.inferred, &socket);
                        held.instance_id = claimed_for_instance(&self.leases, &socket);
                        held.socket.owner = socket.owner;
                    }
                }
                _ => self.insert_socket(socket, now_ms, None, &mut effects),
            }
        }
        effects
    }

    fn insert_socket(
        &mut self,
        socket: BoundSocket,
        now_ms: u64,
        reported_bound_ms: Option<u64>,
        effects: &mut Effects,
    ) {
        if self.sockets.contains_key(&socket.cookie) {
            self.remove_socket_quietly(socket.cookie);
        }
        let (port, protocol, cookie) = (socket.port, socket.protocol, socket.cookie);
        self.settle_leases_on_bind(&socket, effects);
        let held = Held {
            service_type: infer_type(&self.ranges, &mut self.inferred, &socket),
            instance_id: claimed_for_instance(&self.leases, &socket),
            reported_bound_ms,
            socket: BoundSocket {
                since_ms: if socket.since_ms == 0 {
                    now_ms
                } else {
                    socket.since_ms
                },
                ..socket
            },
        };
        effects.notices.push(Notice::Bound(held.clone()));
        self.sockets.insert(cookie, held);
        self.by_port
            .entry((port, protocol))
            .or_default()
            .insert(cookie);
        self.retake(port);
    }

    /// A lease turns into "bound" when its holder binds its port: an Allocate lease ends (the socket now
    /// holds the port); a claim stays, no longer lapsing, to live as long as its process.
    fn settle_leases_on_bind(&mut self, socket: &BoundSocket, effects: &mut Effects) {
        let Some(lease) = self.leases.get(&socket.port) else {
            return;
        };
        let owner = socket.owner.as_ref().map(|o| o.id);
        let binder_owns = match lease.process {
            Some(p) => owner == Some(p),
            // A hold: its session's server, back.
            None if lease.claim => {
                lease.instance_id.is_some()
                    && socket.owner.as_ref().and_then(|o| o.instance_id.as_ref())
                        == lease.instance_id.as_ref()
            }
            None => lease.owner_uid == socket.uid,
        };
        if !binder_owns {
            return;
        }
        if lease.claim {
            if lease.expires_ms.is_some() || lease.process.is_none() {
                let mut settled = lease.clone();
                settled.expires_ms = None;
                settled.process = settled.process.or(owner);
                effects.changes.push(StateChange::PutLease {
                    lease: settled.clone(),
                });
                self.leases.insert(settled.port, settled);
            }
        } else if let Some(lease) = self.take_lease(socket.port) {
            effects.lease_removed(lease);
        }
    }

    fn remove_socket_quietly(&mut self, cookie: u64) -> Option<Held> {
        let held = self.sockets.remove(&cookie)?;
        let key = (held.socket.port, held.socket.protocol);
        if let Some(set) = self.by_port.get_mut(&key) {
            set.remove(&cookie);
            if set.is_empty() {
                self.by_port.remove(&key);
            }
        }
        self.retake(key.0);
        Some(held)
    }

    fn remove_socket(&mut self, cookie: u64, now_ms: u64, effects: &mut Effects) {
        if let Some(held) = self.remove_socket_quietly(cookie) {
            self.note_release(&held);
            self.end_view_entry_of(&held, now_ms, effects);
            self.hold_released_port(&held, now_ms, effects);
            effects.notices.push(Notice::Released(held));
        }
    }

    // ---- leases ------------------------------------------------------------------------------------

    fn insert_lease(&mut self, lease: Lease) {
        let port = lease.port;
        self.lease_ports.insert(lease.id.clone(), port);
        if let Some(old) = self.leases.insert(port, lease) {
            self.lease_ports.remove(&old.id);
        }
        self.retake(port);
    }

    fn take_lease(&mut self, port: u16) -> Option<Lease> {
        let lease = self.leases.remove(&port)?;
        self.lease_ports.remove(&lease.id);
        self.retake(port);
        Some(lease)
    }

    fn new_lease_id(&mut self) -> String {
        let id = format!("lease-{}", self.next_lease_seq);
        self.next_lease_seq += 1;
        id
    }

    /// Refuses a user (not root) who holds its share already: `leases_per_user` in all, or
    /// `range_share_percent` of `range`. Claims (the shim's) do not count.
    fn check_user_limits(&self, uid: u32, range: &ServiceType) -> Result<(), BrokerError> {
        if uid == 0 {
            return Ok(());
        }
        let limits = self.settings.user_limits;
        let mine: Vec<u16> = self
            .leases
            .values()
            .filter(|l| !l.claim && l.owner_uid == uid)
            .map(|l| l.port)
            .collect();
        if mine.len() >= limits.leases_per_user {
            return Err(BrokerError::UserLimit {
                uid,
                held: mine.len(),
                what: "in all".into(),
                setting: "leases_per_user",
            });
        }
        let in_range = mine.iter().filter(|p| range.contains(**p)).count();
        let cap = limits.range_cap(usize::from(range.end - range.start) + 1);
        if in_range >= cap {
            return Err(BrokerError::UserLimit {
                uid,
                held: in_range,
                what: format!(
                    "in the {} range ({}-{}: {}% of it)",
                    range.name, range.start, range.end, limits.range_share_percent
                ),
                setting: "range_share_percent",
            });
        }
        Ok(())
    }

    /// `preferred` when it is free, else the port this identity got last when it is free, else
    /// the lowest free port of the range that is not lingering and no other identity remembers,
    /// else the lowest free one not lingering, else the lowest free.
    fn pick_for_allocate(
        &self,
        range: &ServiceType,
        preferred: Option<u16>,
        key: Option<&StickyKey>,
    ) -> Option<u16> {
        preferred
            .filter(|p| !self.is_taken(*p))
            .or_else(|| key.and_then(|k| self.sticky_port_for(k, range.start, range.end)))
            .or_else(|| {
                self.settled_free_in(range.start, range.end)
                    .find(|p| !self.remembered_by_other(*p, key))
            })
            .or_else(|| self.settled_free_in(range.start, range.end).next())
            .or_else(|| self.taken.first_free(range.start, range.end))
    }

    /// Atomically picks a free port and leases it.
    pub fn allocate(
        &mut self,
        req: AllocateRequest,
        now_ms: u64,
    ) -> Result<(Lease, Effects), BrokerError> {
        let range = self.ranges.get(&req.service_type)?.clone();
        self.check_user_limits(req.uid, &range)?;
        let key = req.project.clone().map(|project| StickyKey {
            uid: req.uid,
            project,
            service_type: range.name.clone(),
            asked: req.preferred_port.unwrap_or(0),
        });
        let port = self
            .pick_for_allocate(&range, req.preferred_port, key.as_ref())
            .ok_or_else(|| BrokerError::NoFreePort {
                service_type: range.name.clone(),
                start: range.start,
                end: range.end,
            })?;
        let ttl_ms = match (req.ttl_ms, req.process) {
            (Some(ttl), _) => Some(ttl),
            (None, None) => Some(self.settings.default_ttl_ms),
            (None, Some(_)) => None,
        };
        let lease = Lease {
            id: self.new_lease_id(),
            port,
            service_type: range.name,
            owner_uid: req.uid,
            process: req.process,
            instance_id: req.instance_id,
            created_ms: now_ms,
            expires_ms: ttl_ms.map(|ttl| now_ms.saturating_add(ttl)),
            claim: false,
            requested_port: None,
            protocol: None,
        };
        let mut effects = Effects::default();
        effects.lease_put(&lease);
        self.insert_lease(lease.clone());
        if let Some(key) = key {
            self.remember_sticky(key, port, now_ms, &mut effects);
        }
        Ok((lease, effects))
    }

    /// Ends a lease named by id.
    pub fn release_id(
        &mut self,
        id: &str,
        caller: Caller,
    ) -> Result<(Lease, Effects), BrokerError> {
        let port = *self
            .lease_ports
            .get(id)
            .ok_or_else(|| BrokerError::NoSuchLease(id.to_string()))?;
        self.release_port(port, caller)
    }

    /// Ends the lease on a port.
    pub fn release_port(
        &mut self,
        port: u16,
        caller: Caller,
    ) -> Result<(Lease, Effects), BrokerError> {
        let lease = self
            .leases
            .get(&port)
            .ok_or(BrokerError::NoLeaseOnPort(port))?;
        if !caller.is_root() && caller.uid != lease.owner_uid {
            return Err(BrokerError::NotOwner {
                lease_id: lease.id.clone(),
                owner_uid: lease.owner_uid,
            });
        }
        let mut effects = Effects::default();
        let lease = self
            .take_lease(port)
            .ok_or(BrokerError::NoLeaseOnPort(port))?;
        effects.lease_removed(lease.clone());
        Ok((lease, effects))
    }

    /// Takes back a lease the daemon just made but cannot honour: the kernel showed its port taken after all.
    pub fn withdraw_lease(&mut self, id: &str) -> Effects {
        let mut effects = Effects::default();
        if let Some(lease) = self
            .lease_ports
            .get(id)
            .copied()
            .and_then(|port| self.take_lease(port))
        {
            effects.lease_removed(lease);
        }
        effects
    }

    /// Ends leases whose TTL has passed or whose process has exited, and instances whose process has exited.
    /// A claim whose process holds its port keeps living with the process.
    pub fn expire(&mut self, now_ms: u64, processes: &dyn ProcessView) -> Effects {
        let mut effects = Effects::default();
        // (port, whether its process is gone: a session's claim is then held for it, see `hold`).
        let ended: Vec<(u16, bool)> = self
            .leases
            .values()
            .filter_map(|l| {
                let process_gone = l.process.is_some_and(|p| !processes.is_alive(p));
                let lapsed = l.expires_ms.is_some_and(|t| t <= now_ms);
                let holds_port = l.claim
                    && self
                        .sockets_on(l.port, None)
                        .any(|h| h.socket.owner.as_ref().map(|o| o.id) == l.process);
                (process_gone || (lapsed && !holds_port)).then_some((l.port, process_gone))
            })
            .collect();
        for (port, process_gone) in ended {
            if process_gone {
                self.hold_or_end(port, now_ms, &mut effects);
            } else if let Some(lease) = self.take_lease(port) {
                effects.lease_removed(lease);
            }
        }
        // An instance lives while any of its processes does; the dead ones are forgotten.
        for instance in self.instances.values_mut() {
            let before = instance.placed.len();
            instance.placed.retain(|p| processes.is_alive(*p));
            if instance.placed.len() != before && !instance.placed.is_empty() {
                effects.changes.push(StateChange::PutInstance {
                    instance: instance.clone(),
                });
            }
        }
        let gone: Vec<String> = self
            .instances
            .values()
            .filter(|i| !i.processes().any(|p| processes.is_alive(p)))
            .map(|i| i.id.clone())
            .collect();
        for id in gone {
            self.instances.remove(&id);
            self.end_holds_of(&id, &mut effects);
            effects.changes.push(StateChange::RemoveInstance { id });
        }
        effects
    }

    /// Ends a session (Claude Code's SessionEnd): every lease and claim of instance `id` that
    /// `uid` owns (root: all) ends, and the instance is forgotten. Nothing is killed: a server of
    /// the session keeps its socket, as any process does. Returns how many leases ended.
    pub fn end_instance(&mut self, id: &str, uid: u32) -> Result<(usize, Effects), BrokerError> {
        if let Some(owner) = self
            .instances
            .get(id)
            .map(|i| i.owner_uid)
            .filter(|owner| *owner != uid && uid != 0)
        {
            return Err(BrokerError::InstanceTaken {
                id: id.to_string(),
                owner_uid: owner,
            });
        }
        let mut effects = Effects::default();
        let ports: Vec<u16> = self
            .leases
            .values()
            .filter(|l| l.instance_id.as_deref() == Some(id) && (uid == 0 || l.owner_uid == uid))
            .map(|l| l.port)
            .collect();
        for port in &ports {
            if let Some(lease) = self.take_lease(*port) {
                effects.lease_removed(lease);
            }
        }
        if self.instances.remove(id).is_some() {
            effects
                .changes
                .push(StateChange::RemoveInstance { id: id.to_string() });
        }
        Ok((ports.len(), effects))
    }

    /// Names a group of processes; `ldpreload-<pid>` when no id is given.
    pub fn register_instance(
        &mut self,
        id: Option<String>,
        process: ProcessId,
        uid: u32,
        now_ms: u64,
    ) -> Result<(String, Effects), BrokerError> {
        let id = id.unwrap_or_else(|| format!("ldpreload-{}", process.pid));
        if let Some(taken) = self
            .instances
            .get(&id)
            .filter(|i| i.owner_uid != uid && uid != 0)
        {
            return Err(BrokerError::InstanceTaken {
                id,
                owner_uid: taken.owner_uid,
            });
        }
        // Its processes so far stay with it (a session's servers outlive the `styxy run` of a
        // short client registered after them).
        let mut placed: Vec<ProcessId> = self
            .instances
            .get(&id)
            .filter(|i| i.owner_uid == uid)
            .map(|i| i.processes().filter(|p| *p != process).collect())
            .unwrap_or_default();
        placed.push(process);
        if placed.len() > INSTANCE_PROCESSES_MAX {
            placed.drain(..placed.len() - INSTANCE_PROCESSES_MAX);
        }
        let instance = Instance {
            id: id.clone(),
            process,
            registered_ms: now_ms,
            owner_uid: uid,
            placed,
        };
        let mut effects = Effects::default();
        effects.changes.push(StateChange::PutInstance {
            instance: instance.clone(),
        });
        self.instances.insert(id.clone(), instance);
        Ok((id, effects))
    }

    // ---- the shim's question -----------------------------------------------------------------------

    /// Decides whether a `bind()` keeps its port or moves, and claims the answer for the asker so that two
    /// racing processes never get the same port.
    pub fn resolve_bind(
        &mut self,
        req: &BindRequest,
        processes: &dyn ProcessView,
        now_ms: u64,
    ) -> Result<(BindDecision, Effects), BrokerError> {
        let mut effects = Effects::default();
        // Intended sharing (worker pools): never moved, never claimed.
        if req.reuseport {
            return Ok((BindDecision::Keep { port: req.port }, effects));
        }
        let me = req.asker.id;

        // The same process binding the same port again (IPv4 then IPv6) goes where its first bind
        // went — unless that port lingers and the process holds no socket there: then this is the
        // shim asking again because the kernel refused the move (a program binding without
        // SO_REUSEADDR over old connections), and it moves elsewhere.
        // The refused claim stays until the answer is sure (an error changes nothing): while it
        // does, its port is taken, so no pick below gives it again.
        let mut refused = None;
        if let Some(port) = self.earlier_move(me, req.port) {
            if self.is_lingering(port) && !self.holds_socket_on(me, port, req.protocol) {
                refused = Some(port);
            } else {
                let holder = self.holder_of(req.port, req.protocol, me);
                self.audit_move(req, port, holder.as_ref(), &mut effects, now_ms);
                return Ok((BindDecision::Reassign { port, holder }, effects));
            }
        }

        // The session's server for this port is back: the port held for it since the last one
        // stopped is its own (see `hold`).
        if let Some(port) = req
            .instance_id
            .as_deref()
            .and_then(|i| self.held_for(i, req.uid, req.port, req.protocol, processes))
            .filter(|_| refused.is_none())
        {
            self.take_hold(port, me, now_ms, &mut effects);
            if port == req.port {
                return Ok((BindDecision::Keep { port }, effects));
            }
            let holder = self.holder_of(req.port, req.protocol, me);
            self.audit_move(req, port, holder.as_ref(), &mut effects, now_ms);
            return Ok((BindDecision::Reassign { port, holder }, effects));
        }

        // A lease whose process has exited holds nothing, whatever the last sweep saw. It is
        // dropped only on the way to an answer: an error must leave the broker as it found it,
        // or the change would be lost with the error while the journal still held the lease.
        let dead_lease = self
            .leases
            .get(&req.port)
            .is_some_and(|l| l.process.is_some_and(|p| !processes.is_alive(p)));
        // But a dead claim of a live session is that session's hold (see `hold`), whether or not
        // the sweep has made it one yet.
        let dead_but_held = dead_lease
            && self
                .leases
                .get(&req.port)
                .is_some_and(|l| self.is_held_when_its_server_goes(l));
        let holder = self
            .holder_of(req.port, req.protocol, me)
            .or_else(|| {
                self.leases
                    .get(&req.port)
                    .filter(|l| {
                        (!dead_lease || dead_but_held) && !self.lease_belongs_to(l, req, processes)
                    })
                    .cloned()
                    .map(HolderView::Lease)
            })
            .or_else(|| {
                // A sibling thread of the asker was moved onto this port (from another one): the
                // two are different servers, so this bind moves too, rather than collide.
                self.leases
                    .get(&req.port)
                    .filter(|l| {
                        l.claim
                            && l.process == Some(me)
                            && l.requested_port.is_some_and(|asked| asked != req.port)
                    })
                    .cloned()
                    .map(HolderView::Lease)
            });
        let Some(holder) = holder else {
            if let Some(claim) = refused.and_then(|port| self.take_lease(port)) {
                effects.lease_removed(claim);
            }
            if dead_lease {
                if let Some(lease) = self.take_lease(req.port) {
                    effects.lease_removed(lease);
                }
            }
            if !self.leases.contains_key(&req.port) {
                let claim = self.new_claim(req, req.port, None, now_ms);
                effects.lease_put(&claim);
                self.insert_lease(claim);
            }
            return Ok((BindDecision::Keep { port: req.port }, effects));
        };

        let range = self.ranges.move_range(req.port);
        let key = req.project.clone().map(|project| StickyKey {
            uid: req.uid,
            project,
            service_type: range.service_type.clone(),
            asked: req.port,
        });
        let port = self
            .pick_for_move(&range, req.port, key.as_ref())
            .ok_or_else(|| BrokerError::NoFreePort {
                service_type: range.service_type.clone(),
                start: range.start,
                end: range.end,
            })?;
        if let Some(claim) = refused.and_then(|port| self.take_lease(port)) {
            effects.lease_removed(claim);
        }
        if dead_lease {
            // Held for its session from now on (or ended, if its session is gone).
            self.hold_or_end(req.port, now_ms, &mut effects);
        }
        let claim = self.new_claim(req, port, Some(req.port), now_ms);
        effects.lease_put(&claim);
        self.insert_lease(claim);
        if let Some(key) = key {
            self.remember_sticky(key, port, now_ms, &mut effects);
        }
        self.audit_move(req, port, Some(&holder), &mut effects, now_ms);
        Ok((
            BindDecision::Reassign {
                port,
                holder: Some(holder),
            },
            effects,
        ))
    }

    /// Where process `me` was moved when it asked for `asked` before (its claim), if anywhere.
    pub fn earlier_move(&self, me: ProcessId, asked: u16) -> Option<u16> {
        self.leases
            .values()
            .find(|l| l.claim && l.process == Some(me) && l.requested_port == Some(asked))
            .map(|l| l.port)
    }

    /// Whether process `me` holds a `protocol` socket on `port`.
    fn holds_socket_on(&self, me: ProcessId, port: u16, protocol: Protocol) -> bool {
        self.sockets_on(port, Some(protocol))
            .any(|h| h.socket.owner.as_ref().map(|o| o.id) == Some(me))
    }

    /// A socket on `port` that another process holds. (The kernel's bind programs decide the
    /// same question for a session's binds — `styxy-ebpf/src/moving.rs`, `taken` — from the
    /// kernel's counts and the reservations the daemon writes from this broker's leases.)
    fn holder_of(&self, port: u16, protocol: Protocol, me: ProcessId) -> Option<HolderView> {
        self.sockets_on(port, Some(protocol))
            .find(|h| h.socket.owner.as_ref().map(|o| o.id) != Some(me))
            .cloned()
            .map(HolderView::Socket)
    }

    /// Whether a lease is the asker's own: leased to it or to one of its ancestors (a shell that allocated
    /// a port for the server it starts), to its instance, or, tied to no process, to its user.
    fn lease_belongs_to(
        &self,
        lease: &Lease,
        req: &BindRequest,
        processes: &dyn ProcessView,
    ) -> bool {
        // Of the asker's session — as its owner's, or in root's session — not merely of a
        // session of the same name (names are global: another user may use one).
        let same_owner = lease.owner_uid == req.uid
            || lease
                .instance_id
                .as_ref()
                .and_then(|i| self.instances.get(i))
                .is_some_and(|i| i.owner_uid == 0);
        if lease.instance_id.is_some() && lease.instance_id == req.instance_id && same_owner {
            return true;
        }
        match lease.process {
            // A hold is its session's alone (above).
            None if lease.claim => false,
            None => lease.owner_uid == req.uid,
            Some(p) if p == req.asker.id => true,
            Some(p) => processes.ancestors(req.asker.id.pid).contains(&p),
        }
    }

    /// The port this identity got last when it is free (a sticky port is given back even while
    /// it lingers: most servers bind with SO_REUSEADDR, and a restart right after a stop is when
    /// the port matters most); else the next free port after `requested` in its range (wrapping
    /// around to the range's start) that is not lingering and no other identity remembers; else
    /// the next one not lingering; else the next free one.
    fn pick_for_move(
        &self,
        range: &PortRange,
        requested: u16,
        key: Option<&StickyKey>,
    ) -> Option<u16> {
        if let Some(port) = key.and_then(|k| self.sticky_port_for(k, range.start, range.end)) {
            return Some(port);
        }
        let after = requested.saturating_add(1).max(range.start);
        let before = requested.min(range.end);
        let candidates = || {
            let after = self.taken.free_in(after, range.end);
            let before = self.taken.free_in(range.start, before);
            after.chain(before).filter(move |p| *p != requested)
        };
        let settled = || {
            let after = self.settled_free_in(after, range.end);
            let before = self.settled_free_in(range.start, before);
            after.chain(before).filter(move |p| *p != requested)
        };
        settled()
            .find(|p| !self.remembered_by_other(*p, key))
            .or_else(|| settled().next())
            .or_else(|| candidates().next())
    }

    fn new_claim(
        &mut self,
        req: &BindRequest,
        port: u16,
        requested: Option<u16>,
        now_ms: u64,
    ) -> Lease {
        Lease {
            id: self.new_lease_id(),
            port,
            service_type: self.ranges.move_range(port).service_type,
            owner_uid: req.uid,
            process: Some(req.asker.id),
            instance_id: req.instance_id.clone(),
            created_ms: now_ms,
            expires_ms: Some(now_ms.saturating_add(self.settings.claim_ttl_ms)),
            claim: true,
            requested_port: requested,
            protocol: Some(req.protocol),
        }
    }

    fn audit_move(
        &mut self,
        req: &BindRequest,
        port: u16,
        holder: Option<&HolderView>,
        effects: &mut Effects,
        now_ms: u64,
    ) {
        self.reassignments += 1;
        let (holder_pid, holder_comm) = match holder {
            Some(HolderView::Socket(h)) => (
                h.socket.owner.as_ref().map(|o| o.id.pid),
                h.socket.owner.as_ref().map(|o| o.comm.clone()),
            ),
            Some(HolderView::Lease(l)) => (l.process.map(|p| p.pid), None),
            None => (None, None),
        };
        effects.notices.push(Notice::Reassigned(AuditRecord {
            at_ms: now_ms,
            pid: req.asker.id.pid,
            comm: req.asker.comm.clone(),
            uid: req.uid,
            requested_port: req.port,
            assigned_port: port,
            protocol: req.protocol,
            service_type: self.ranges.move_range(port).service_type,
            holder_pid,
            holder_comm,
            instance_id: req.instance_id.clone(),
        }));
    }
}

/// Whether `socket` belongs to the process of `except` and is of the other family.
pub fn is_own_other_family(socket: &BoundSocket, except: Option<(ProcessId, Family)>) -> bool {
    except.is_some_and(|(id, family)| {
        socket.owner.as_ref().map(|o| o.id) == Some(id) && socket.family != family
    })
}

/// The agent session of a socket: the instance of the claim its process took for the port, else
/// the one in its process's environment (a bind the shim made without asking), if any.
fn claimed_for_instance(leases: &BTreeMap<u16, Lease>, socket: &BoundSocket) -> Option<String> {
    let owner = socket.owner.as_ref()?;
    leases
        .get(&socket.port)
        .filter(|l| l.process == Some(owner.id))
        .and_then(|l| l.instance_id.clone())
        .or_else(|| owner.instance_id.clone())
}

fn infer_type(
    ranges: &ServiceRanges,
    inferred: &mut HashMap<(String, String), String>,
    socket: &BoundSocket,
) -> String {
    match &socket.owner {
        Some(owner) => {
            let key = (owner.cmdline.clone(), owner.comm.clone());
            if let Some(known) = inferred.get(&key) {
                return known.clone();
            }
            if inferred.len() >= INFERRED_MAX {
                inferred.clear();
            }
            let found = ranges.infer(&owner.cmdline, &owner.comm).to_string();
            inferred.insert(key, found.clone());
            found
        }
        None => ranges
            .type_of_port(socket.port)
            .map_or(ranges::FALLBACK_TYPE, |t| t.name.as_str())
            .to_string(),
    }
}
