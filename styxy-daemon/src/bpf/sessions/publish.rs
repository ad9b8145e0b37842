//! Keeping the kernel's session maps in step with the broker: who holds each port (`PORT_INFO`),
//! the sessions' views (`VIEWS`), their projects' sticky ports and holds (`STICKY`), and the
//! spare ports the bind programs take (`SPARES`).

use super::*;

impl KernelSessions {
    /// Everything, at start: the holder of every port (the ranges are in the map since the
    /// programs were loaded; pinned maps still say what the last daemon wrote), the views, the
    /// sticky ports and the spares.
    pub fn publish_all(&self, broker: &Broker) {
        {
            let registry = lock(&self.registry);
            for port in 0..=u16::MAX {
                self.republish_holder(broker, &registry, port);
            }
        }
        self.sync_views(broker);
        self.sync_sticky(broker, true);
        self.sync_focus(broker);
        self.refill_spares(broker);
    }

    /// Writes who holds a lease on `port` into `PORT_INFO`, keeping the port's range.
    pub(super) fn republish_holder(&self, broker: &Broker, registry: &Registry, port: u16) {
        let slot = self.port_info.slot(usize::from(port));
        let range = PortInfo(slot.load(Ordering::Acquire)).range();
        // A claim that names no session is still its process's own: where that process is a
        // member, its session's (so the kernel never moves a process off its own claim).
        let session_of = |pid: u32| lock(&self.sessions).get(&pid, 0).ok().map(|m| m.session);
        let info = PortInfo::new(
            reserved_by(broker, registry, port, session_of),
            held_for(broker, port),
            range,
        );
        slot.store(info.0, Ordering::Release);
    }

    /// What one decision changed: the lease holders of the ports it touched, the views when a
    /// move's claim came or went, and the spare ports it took.
    pub fn publish(&self, broker: &Broker, effects: &Effects) {
        let mut views_changed = false;
        {
            let registry = lock(&self.registry);
            for notice in &effects.notices {
                let port = match notice {
                    Notice::Bound(h) | Notice::Released(h) => {
                        views_changed |= broker.changes_a_view(h);
                        h.socket.port
                    }
                    Notice::Leased(l) | Notice::LeaseEnded(l) => {
                        views_changed |= l.asked().is_some();
                        l.port
                    }
                    Notice::Reassigned(_) => continue,
                };
                self.republish_holder(broker, &registry, port);
            }
        }
        if views_changed {
            self.sync_views(broker);
        }
        // Holds (claims with no process) count among the sticky ports the kernel reads.
        let sticky_changed = views_changed
            || effects.changes.iter().any(|c| {
                matches!(
                    c,
                    StateChange::PutSticky { .. } | StateChange::RemoveSticky { .. }
                )
            });
        self.sync_sticky(broker, sticky_changed);
        // A focus is kept with its session: given, taken or ended with it.
        if effects.changes.iter().any(|c| {
            matches!(
                c,
                StateChange::PutInstance { .. } | StateChange::RemoveInstance { .. }
            )
        }) {
            self.sync_focus(broker);
        }
        self.refill_spares(broker);
    }

    /// Makes `STICKY` equal to the sticky ports of the placed sessions' projects and the ports
    /// held for them, when these or the lingering ports changed (`changed`, or a new lingering
    /// generation).
    pub(super) fn sync_sticky(&self, broker: &Broker, changed: bool) {
        let mut registry = lock(&self.registry);
        let generation = broker.lingering_generation();
        if !changed && generation == registry.sticky_lingering_generation {
            return;
        }
        registry.sticky_lingering_generation = generation;
        let mut wanted = HashMap::new();
        for (session, (uid, project)) in &registry.projects {
            let Some(project) = project else {
                continue;
            };
            for entry in broker.sticky_ports_of_project(*uid, project) {
                let asked = entry.key.asked;
                // A move's entry: the asked port's own range (an allocation's has asked 0).
                let in_range = broker
                    .ranges()
                    .type_of_port(asked)
                    .is_some_and(|t| t.name == entry.key.service_type);
                if asked == 0 || !in_range {
                    continue;
                }
                let key = StickyKey {
                    session: *session,
                    asked,
                    _pad: 0,
                };
                wanted.insert(key, sticky_value(broker, entry.port));
            }
        }
        // Ports held for a session between two lives of its server (`styxy_broker::hold`) come
        // first: its next server goes back where the last one was.
        for lease in broker.leases() {
            let (true, None, Some(asked), Some(instance)) = (
                lease.is_claim(),
                lease.process,
                lease.asked(),
                lease.instance_id.as_ref(),
            ) else {
                continue;
            };
            let Some((session, _)) = registry.numbers.get(instance) else {
                continue;
            };
            let key = StickyKey {
                session: *session,
                asked,
                _pad: 0,
            };
            wanted.insert(key, sticky_value(broker, lease.port));
        }
        write_changes(
            &mut lock(&self.sticky),
            &registry.sticky,
            &wanted,
            |e, key| {
                tracing::warn!(cause = %e, session = key.session, asked = key.asked,
                "the kernel's sticky-port map refused an entry: that session's move of it takes a spare port");
            },
        );
        registry.sticky = wanted;
    }

    /// Makes `VIEWS` equal to the broker's views of the placed sessions.
    pub(super) fn sync_views(&self, broker: &Broker) {
        let mut registry = lock(&self.registry);
        let mut wanted = HashMap::new();
        for entry in broker.views() {
            let Some((session, owner)) = registry.numbers.get(&entry.instance_id) else {
                continue;
            };
            // The owner's moves (any uid's in root's sessions: a `postgres` server started by
            // root's session is that session's server).
            if *owner != 0 && *owner != entry.uid {
                continue;
            }
            let key = ViewKey {
                session: *session,
                asked: entry.asked,
                protocol: entry.protocol.ipproto(),
                _pad: 0,
            };
            wanted.insert(key, u32::from(entry.bound));
        }
        write_changes(
            &mut lock(&self.views),
            &registry.views,
            &wanted,
            |e, key| {
                tracing::warn!(cause = %e, session = key.session, asked = key.asked,
                "the kernel's view map refused an entry: that session reaches the moved port by its real number only");
            },
        );
        registry.views = wanted;
    }

    pub(super) fn kernel_bound(&self, port: u16) -> bool {
        [IPPROTO_TCP, IPPROTO_UDP].into_iter().any(|p| {
            self.ports
                .slot(port_slot(p, port) as usize)
                .load(Ordering::Relaxed)
                != 0
        })
    }

    /// Keeps `SPARE_SLOTS` free ports ready in each range (the lowest free ones), replacing those
    /// taken since, and those where old TCP connections linger (see `crate::lingering`). A spare
    /// is free by all three judges of "who holds this port": the broker (`is_taken`, as its
    /// `holder_of` decides for the shim), the kernel's counts (as the bind program's `taken`
    /// reads them) and lingering connections — the bind program cannot try another.
    pub(super) fn refill_spares(&self, broker: &Broker) {
        // Lingering ports too are not free here: the bind program cannot try another.
        let free = |port: u16| {
            !broker.is_taken(port) && !broker.is_lingering(port) && !self.kernel_bound(port)
        };
        for (index, service) in broker
            .ranges()
            .types()
            .iter()
            .enumerate()
            .take(RANGES_MAX as usize)
        {
            let slots: Vec<&AtomicU32> = (0..SPARE_SLOTS as usize)
                .map(|i| self.spares.slot(index * SPARE_SLOTS as usize + i))
                .collect();
            let current: Vec<u32> = slots.iter().map(|s| s.load(Ordering::Acquire)).collect();
            if current.iter().all(|p| *p != 0 && free(*p as u16)) {
                continue;
            }
            // Ports no project remembers first (sticky ports stay for their projects). The
            // broker's search skips taken and lingering ports 64 at a time: many ports released a
            // moment ago (lingering until read) cost no scan port by port.
            let unused = |p: &u16| !self.kernel_bound(*p) && !current.contains(&u32::from(*p));
            let settled = || broker.settled_free_in(service.start, service.end);
            let mut candidates = settled()
                .filter(|p| unused(p) && !broker.is_sticky(*p))
                .chain(settled().filter(|p| unused(p) && broker.is_sticky(*p)));
            for (slot, held) in slots.iter().zip(&current) {
                if *held != 0 && free(*held as u16) {
                    continue;
                }
                let Some(port) = candidates.next() else {
                    break; // the range is full: the programs leave binds as they are
                };
                // A program may have taken it meanwhile: then the slot is 0, and is filled too.
                if slot
                    .compare_exchange(*held, u32::from(port), Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
                {
                    let _ = slot.compare_exchange(
                        0,
                        u32::from(port),
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                }
            }
        }
    }
}

/// Makes the kernel's `map`, which holds `written`, hold `wanted`: removes what is gone, writes
/// what is new or changed; `refused` hears of each entry the map would not take.
pub(super) fn write_changes<K, V>(
    map: &mut BpfHashMap<MapData, K, V>,
    written: &HashMap<K, V>,
    wanted: &HashMap<K, V>,
    refused: impl Fn(&aya::maps::MapError, &K),
) where
    K: aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod + PartialEq,
{
    for key in written.keys() {
        if !wanted.contains_key(key) {
            let _ = map.remove(key);
        }
    }
    for (key, value) in wanted {
        if written.get(key) != Some(value) {
            if let Err(e) = map.insert(key, value, 0) {
                refused(&e, key);
            }
        }
    }
}

/// `PortInfo::reserved_by` for `port`: the session number of the lease's instance — or, for a
/// lease that names none, of the kernel session its process is a member of (`session_of`) — when
/// it is a placed session of the lease's owner; any other lease is `RESERVED_BY_OTHER`. (The
/// broker counts a claim as its process's own whatever it names: so must the kernel. What a
/// moved claim's port stands for once its server is gone is [`held_for`]'s.)
pub(super) fn reserved_by(
    broker: &Broker,
    registry: &Registry,
    port: u16,
    session_of: impl Fn(u32) -> Option<u32>,
) -> u32 {
    let Some(lease) = broker.lease_on(port) else {
        return 0;
    };
    let named = lease
        .instance_id
        .as_ref()
        .and_then(|id| registry.numbers.get(id));
    let of_its_process = || {
        let number = session_of(lease.process?.pid)?;
        registry
            .instances
            .get(&number)
            .and_then(|id| registry.numbers.get(id))
    };
    named
        .or_else(of_its_process)
        .filter(|(_, owner)| *owner == 0 || *owner == lease.owner_uid)
        .map_or(RESERVED_BY_OTHER, |(number, _)| *number)
}

/// `PortInfo::held_for` for `port`: for a hold of a port a session's server was moved to (a
/// claim with no process), the port that server asked; else 0. (As the broker's
/// `lease_belongs_to` counts a moved claim as no bind's own but its asked port's.)
pub(super) fn held_for(broker: &Broker, port: u16) -> u16 {
    broker
        .lease_on(port)
        .filter(|lease| lease.process.is_none())
        .and_then(|lease| lease.asked())
        .unwrap_or(0)
}

/// A `STICKY` value: the port, flagged when old connections linger there (see
/// `STICKY_LINGERING`).
pub(super) fn sticky_value(broker: &Broker, port: u16) -> u32 {
    let lingering = if broker.is_lingering(port) {
        STICKY_LINGERING
    } else {
        0
    };
    u32::from(port) | lingering
}
