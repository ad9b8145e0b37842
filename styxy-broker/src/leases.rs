//! Leases: `Allocate`'s reservations and `ResolveBind`'s claims — taken, released, expired, and
//! each user's share of them.

use crate::{
    Broker, BrokerError, Caller, Effects, Lease, LeaseKind, ProcessId, ProcessView, ServiceType,
    StateChange, StickyKey, UserLimits,
};

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

impl Broker {
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

    // ---- leases ------------------------------------------------------------------------------------

    pub(crate) fn insert_lease(&mut self, lease: Lease) {
        let port = lease.port;
        self.lease_ports.insert(lease.id.clone(), port);
        if let Some(old) = self.leases.insert(port, lease) {
            self.lease_ports.remove(&old.id);
        }
        self.retake(port);
    }

    pub(crate) fn take_lease(&mut self, port: u16) -> Option<Lease> {
        let lease = self.leases.remove(&port)?;
        self.lease_ports.remove(&lease.id);
        self.retake(port);
        Some(lease)
    }

    pub(crate) fn new_lease_id(&mut self) -> String {
        let id = format!("lease-{}", self.next_lease_seq);
        self.next_lease_seq += 1;
        id
    }

    /// Refuses a user (not root) who holds its share already: `leases_per_user` in all, or
    /// `range_share_percent` of `range`. Claims (the shim's) do not count.
    pub(crate) fn check_user_limits(
        &self,
        uid: u32,
        range: &ServiceType,
    ) -> Result<(), BrokerError> {
        if uid == 0 {
            return Ok(());
        }
        let limits = self.settings.user_limits;
        let mine: Vec<u16> = self
            .leases
            .values()
            .filter(|l| !l.is_claim() && l.owner_uid == uid)
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
    pub(crate) fn pick_for_allocate(
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
            kind: LeaseKind::Allocated,
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
                let holds_port = l.is_claim()
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
}
