//! The port table: the sockets the observers saw, kept in step with bind and release events and
//! with socket-table readings, each with its inferred service type and session.

use std::collections::{BTreeMap, HashMap};

use crate::{
    ranges, BoundSocket, Broker, Effects, Family, Lease, Notice, PortEvent, ProcessId, Protocol,
    ServiceRanges, StateChange,
};

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
    pub(crate) fn may_be_unlisted(&self, now_ms: u64) -> bool {
        self.socket.protocol == Protocol::Tcp
            && self
                .reported_bound_ms
                .is_some_and(|at| now_ms.saturating_sub(at) < UNLISTED_TCP_GRACE_MS)
    }
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
    pub(crate) fn covers(&self, socket: &BoundSocket) -> bool {
        match *self {
            Scope::All => true,
            Scope::Port { port, protocol } => {
                socket.port == port && protocol.is_none_or(|p| p == socket.protocol)
            }
            Scope::Range { start, end } => (start..=end).contains(&socket.port),
        }
    }
}

/// Bound on [`Broker::inferred`]; it is cleared when full.
pub(crate) const INFERRED_MAX: usize = 4096;

impl Broker {
    pub(crate) fn is_bound(&self, port: u16, protocol: Option<Protocol>) -> bool {
        match protocol {
            Some(p) => self.by_port.contains_key(&(port, p)),
            None => Protocol::ALL
                .iter()
                .any(|p| self.by_port.contains_key(&(port, *p))),
        }
    }

    pub(crate) fn sockets_on(
        &self,
        port: u16,
        protocol: Option<Protocol>,
    ) -> impl Iterator<Item = &Held> {
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

    pub(crate) fn insert_socket(
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
    pub(crate) fn settle_leases_on_bind(&mut self, socket: &BoundSocket, effects: &mut Effects) {
        let Some(lease) = self.leases.get(&socket.port) else {
            return;
        };
        let owner = socket.owner.as_ref().map(|o| o.id);
        let binder_owns = match lease.process {
            Some(p) => owner == Some(p),
            // A hold: its session's server, back.
            None if lease.is_claim() => {
                lease.instance_id.is_some()
                    && socket.owner.as_ref().and_then(|o| o.instance_id.as_ref())
                        == lease.instance_id.as_ref()
            }
            None => lease.owner_uid == socket.uid,
        };
        if !binder_owns {
            return;
        }
        if lease.is_claim() {
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

    pub(crate) fn remove_socket_quietly(&mut self, cookie: u64) -> Option<Held> {
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

    pub(crate) fn remove_socket(&mut self, cookie: u64, now_ms: u64, effects: &mut Effects) {
        if let Some(held) = self.remove_socket_quietly(cookie) {
            self.note_release(&held);
            self.end_view_entry_of(&held, now_ms, effects);
            self.hold_released_port(&held, now_ms, effects);
            effects.notices.push(Notice::Released(held));
        }
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
pub(crate) fn claimed_for_instance(
    leases: &BTreeMap<u16, Lease>,
    socket: &BoundSocket,
) -> Option<String> {
    let owner = socket.owner.as_ref()?;
    leases
        .get(&socket.port)
        .filter(|l| l.process == Some(owner.id))
        .and_then(|l| l.instance_id.clone())
        .or_else(|| owner.instance_id.clone())
}

pub(crate) fn infer_type(
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
