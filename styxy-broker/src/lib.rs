//! The broker: every port decision Styxy makes, as plain data in and plain data out.
//!
//! It holds the port table (sockets the observers saw in the kernel), the leases and the instances, and
//! answers: which ports are free for a service type, which port an `Allocate` gets, whether a `bind()` keeps
//! its port or moves, who holds a port. It reads no files, opens no sockets and reads no clock: the caller
//! passes `now` and a [`ProcessView`], and gets back [`Effects`] to persist and publish.
//!
//! This file holds the [`Broker`] and answers "who decides that 6006 is taken?" ([`Broker::is_taken`]);
//! the rooms: `socket_table` (sockets seen, events and readings), `leases` (`Allocate`, claims,
//! expiry, user limits), `instances` (agent sessions), `resolve` (`ResolveBind`: keep or move,
//! and where), `hold` (a session's port between two lives of its server), `sticky`, `lingering`,
//! `view` (sessions' views), `kernel_move` (moves the kernel made), `moves_told` (one move, told once),
//! `session_report`, `names` (every live server's names, for the human).
#![warn(missing_docs)]

mod error;
mod focus;
mod hold;
mod instances;
mod kernel_move;
mod leases;
mod lingering;
pub mod model;
mod moves_told;
pub mod names;
mod portset;
#[cfg(test)]
mod proptests;
pub mod ranges;
mod resolve;
mod session_report;
mod socket_table;
mod sticky;
pub mod stopping;
#[cfg(test)]
mod tests;
mod view;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use portset::PortSet;

pub use model::*;
pub use ranges::{PortRange, ServiceRanges, ServiceType, UserLimits};
pub use session_report::{session_changes, SessionChanges, SessionServer};
pub use sticky::{StickyKey, StickyPort, STICKY_PER_USER};
pub use stopping::{StopCandidate, StopRefused, StopTarget};
pub use view::ViewEntry;

pub use error::BrokerError;
pub use focus::{retargets, Focus, FocusChange, Retarget};
pub use instances::InstanceLabel;
pub use leases::{AllocateRequest, LeaseSettings, Suggestion};
pub use names::{NamedServer, Names, SessionName, NAME_SUFFIX, RESERVED_NAME};
pub use resolve::{BindDecision, BindRequest, HolderView};
pub use socket_table::{is_own_other_family, Held, Scope, UNLISTED_TCP_GRACE_MS};

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
    /// Moves already told, so that a probe and the real bind make one (see `moves_told`).
    moves_told: moves_told::MovesTold,
    /// Service types already inferred, by (command line, comm): inference scans every pattern,
    /// and a busy machine binds from the same few commands over and over.
    inferred: HashMap<(String, String), String>,
}

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
            moves_told: moves_told::MovesTold::default(),
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
        self.held_sockets().cloned().collect()
    }

    /// Every socket in the table, by port, without copying them.
    pub(crate) fn held_sockets(&self) -> impl Iterator<Item = &Held> + '_ {
        self.by_port
            .values()
            .flatten()
            .filter_map(|cookie| self.sockets.get(cookie))
    }

    /// Whether anything holds `port`: a socket of any protocol, or a lease.
    pub fn is_taken(&self, port: u16) -> bool {
        self.taken.contains(port)
    }

    /// Brings `taken` up to date for one port after the socket table or the leases changed.
    pub(crate) fn retake(&mut self, port: u16) {
        let taken = self.leases.contains_key(&port) || self.is_bound(port, None);
        self.taken.set(port, taken);
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
}
