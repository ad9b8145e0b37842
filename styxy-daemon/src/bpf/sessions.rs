//! Kernel sessions: the daemon's side of the session view the eBPF programs enforce, for every
//! program of a session, static binaries included (layouts in `styxy_common::session`).
//!
//! A session is an instance (`styxy run`, an agent's SessionStart hook) whose first process the
//! daemon placed in the kernel's `SESSIONS` map; its descendants join at fork. Here the daemon
//! numbers the sessions, places processes, and keeps what the programs read in step with the
//! broker, under the broker lock and before a decision's answer leaves (like the shim's table):
//! who holds a lease on each port, the spare ports a moved bind may take, each session's view, and
//! the sticky ports of each session's project (the project of the process it was placed with).
//!
//! Ownership: a session belongs to the uid that placed it first. The programs steer only its
//! processes running as that uid (any uid for root's sessions), so its view holds that uid's
//! moves (every uid's, for root's). Membership entries are stamped (see
//! `styxy_common::session::Member`): an entry never covers a process newer than it, so a pid
//! reused after a member's exit is never steered, whatever was left in the map.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use aya::maps::{HashMap as BpfHashMap, MapData};
use styxy_broker::ProcessId;
use styxy_broker::StateChange;
use styxy_broker::{Broker, Effects, Notice};
use styxy_common::event::{port_slot, IPPROTO_TCP, IPPROTO_UDP};
use styxy_common::session::{
    Member, PortInfo, StickyKey, ViewKey, RANGES_MAX, RESERVED_BY_OTHER, SPARE_SLOTS,
    STICKY_LINGERING,
};

use super::mapped::MappedArray;
use super::session_programs::SessionPrograms;
use crate::clock::{boottime_ns, monotonic_ns};

/// The maps the daemon writes, taken from the loaded object.
pub struct KernelSessionMaps {
    pub sessions: BpfHashMap<MapData, u32, Member>,
    pub views: BpfHashMap<MapData, ViewKey, u32>,
    pub sticky: BpfHashMap<MapData, StickyKey, u32>,
    pub port_info: MappedArray<AtomicU64>,
    pub spares: MappedArray<AtomicU32>,
    /// The kernel's per-port socket counts (read only here).
    pub ports: MappedArray<AtomicU64>,
    /// The programs sessions need, attached while one is live.
    pub programs: SessionPrograms,
}

/// Which sessions exist and what the kernel's view map holds.
#[derive(Default)]
struct Registry {
    /// Instance id → (session number, the uid that placed it).
    numbers: HashMap<String, (u32, u32)>,
    instances: HashMap<u32, String>,
    /// The view entries written to `VIEWS`.
    views: HashMap<ViewKey, u32>,
    /// Session number → the uid that placed it and the project of the process it was placed
    /// with, while the session may have live processes.
    projects: HashMap<u32, (u32, Option<String>)>,
    /// The entries written to `STICKY`, and the broker's lingering generation they reflect.
    sticky: HashMap<StickyKey, u32>,
    sticky_lingering_generation: u64,
}

/// The daemon's handle on the kernel sessions.
pub struct KernelSessions {
    sessions: Mutex<BpfHashMap<MapData, u32, Member>>,
    views: Mutex<BpfHashMap<MapData, ViewKey, u32>>,
    sticky: Mutex<BpfHashMap<MapData, StickyKey, u32>>,
    port_info: MappedArray<AtomicU64>,
    spares: MappedArray<AtomicU32>,
    ports: MappedArray<AtomicU64>,
    registry: Mutex<Registry>,
    /// Held while a process is placed, and while the programs are detached for want of any.
    programs: Mutex<SessionPrograms>,
    /// Idle checks so far (see [`KernelSessions::detach_if_idle`]).
    idle_checks: AtomicU64,
}

/// Every how many idle checks (one a second) the session map is searched for tasks that ended
/// without the exit program seeing them.
const STALE_TASK_CHECK_EVERY: u64 = 30;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl KernelSessions {
    pub fn new(maps: KernelSessionMaps) -> KernelSessions {
        KernelSessions {
            sessions: Mutex::new(maps.sessions),
            views: Mutex::new(maps.views),
            sticky: Mutex::new(maps.sticky),
            port_info: maps.port_info,
            spares: maps.spares,
            ports: maps.ports,
            registry: Mutex::new(Registry::default()),
            programs: Mutex::new(maps.programs),
            idle_checks: AtomicU64::new(0),
        }
    }

    /// Puts `process` (and from now on its descendants) in the kernel session of `instance_id`,
    /// placed by `uid`. The caller has checked that `uid` may act for it, and the broker that
    /// `uid` owns the instance.
    pub fn place(
        &self,
        instance_id: &str,
        uid: u32,
        process: ProcessId,
        broker: &Broker,
    ) -> Result<u32> {
        let pid = process.pid;
        // Held from before the identity check until after the entry is written: if the process
        // is alive after both, the entry is its own (its pid cannot have been reused meanwhile),
        // and the exit program, attached by then, removes it when it ends.
        let pidfd = crate::procs::pidfd_open(pid)
            .with_context(|| format!("process {pid} is not running"))?;
        if crate::procs::process_id(pid) != Some(process) {
            bail!("process {pid} ended (its pid now names another process)");
        }
        let number = {
            let mut registry = lock(&self.registry);
            let next = u32::try_from(registry.numbers.len() + 1).context("too many sessions")?;
            if next == RESERVED_BY_OTHER {
                bail!("too many kernel sessions");
            }
            let (number, owner) = *registry
                .numbers
                .entry(instance_id.to_string())
                .or_insert((next, uid));
            // The uid that placed it first owns it (the broker keeps other users off the id).
            registry.instances.insert(number, instance_id.to_string());
            (number, owner)
        };
        let (number, owner) = number;
        // Its project: where its first placed process runs (an agent's worktree, the directory
        // `styxy run` was started in).
        let project = crate::procs::project_of(pid);
        {
            // Attached before the process is in the map, and not detached until it is; the
            // idle check (which also forgets ended sessions) waits for this lock.
            let mut programs = lock(&self.programs);
            programs
                .attach()
                .context("attaching the kernel session programs")?;
            // What its environment turns off (`STYXY_VIEW=off styxy run -- ./server`): the
            // kernel's answer to the shim's question keeps it up to date where the shim runs;
            // a static binary keeps what it started with.
            let member = Member {
                session: number,
                owner,
                stamp_ns: monotonic_ns(),
                flags: crate::procs::member_flags_of(pid),
                _pad: 0,
            };
            let mut sessions = lock(&self.sessions);
            sessions
                .insert(pid, member, 0)
                .with_context(|| format!("adding pid {pid} to the kernel's session map"))?;
            if !crate::procs::pidfd_alive(&pidfd) {
                let _ = sessions.remove(&pid);
                bail!("process {pid} ended while it was being placed");
            }
            drop(sessions);
            lock(&self.registry)
                .projects
                .entry(number)
                .or_insert((uid, project));
        }
        // Its moves so far (through the shim) join the kernel's view, its project's sticky ports
        // its choices, and its leases count as its own.
        self.sync_views(broker);
        self.sync_sticky(broker, true);
        let registry = lock(&self.registry);
        for lease in broker
            .leases()
            .filter(|l| l.instance_id.as_deref() == Some(instance_id))
        {
            self.republish_holder(broker, &registry, lease.port);
        }
        Ok(number)
    }

    /// At start: puts back in the kernel's session map the sessions whose first process still
    /// runs — after a restart (an upgrade, a crash, `kill -9`) the new daemon's maps are empty,
    /// and without this their processes would fall out of their sessions (their connections
    /// reaching other sessions' servers, their binds no longer moved). Each such process and its
    /// live descendants are placed, stamped with the time taken before `/proc` was read: a
    /// process started after that reading (a reused pid among them) is not covered; one forked
    /// since by a placed process joins through the fork program, attached first. A descendant
    /// that left the tree (reparented to init by a double fork) is not found: it stays outside.
    /// Every process registered with a session (each `styxy run`, the agent) is a root of such a
    /// tree. Returns how many sessions and processes were placed.
    pub fn adopt(&self, broker: &Broker) -> (usize, usize) {
        let live: Vec<(String, u32, ProcessId)> = broker
            .instances()
            .flat_map(|i| i.processes().map(|p| (i.id.clone(), i.owner_uid, p)))
            .filter(|(_, _, p)| crate::procs::process_id(p.pid) == Some(*p))
            .collect();
        let mut sessions = std::collections::HashSet::new();
        let mut processes = 0;
        for (instance, owner, process) in live {
            match self.place(&instance, owner, process, broker) {
                Ok(number) => {
                    sessions.insert(number);
                    processes += 1 + self.place_descendants(number, owner, process.pid);
                }
                Err(e) => tracing::warn!(instance = %instance, cause = %format!("{e:#}"),
                    "a session of the last run could not be put back in the kernel"),
            }
        }
        (sessions.len(), processes)
    }

    /// Places the live descendants of `pid` in session `number` (see [`KernelSessions::adopt`]);
    /// how many.
    fn place_descendants(&self, number: u32, owner: u32, pid: u32) -> usize {
        let mut placed = std::collections::HashSet::new();
        // Twice: a child forked between the first reading and its parent's entry is in the
        // second (and from then on the fork program sees every new one).
        for _ in 0..2 {
            let stamp_ns = monotonic_ns();
            let children = crate::procs::children_by_parent();
            let mut queue = vec![pid];
            let mut sessions = lock(&self.sessions);
            while let Some(parent) = queue.pop() {
                for child in children.get(&parent).into_iter().flatten() {
                    let member = Member {
                        session: number,
                        owner,
                        stamp_ns,
                        flags: crate::procs::member_flags_of(*child),
                        _pad: 0,
                    };
                    if placed.insert(*child) || sessions.get(child, 0).is_err() {
                        if let Err(e) = sessions.insert(*child, member, 0) {
                            tracing::warn!(cause = %e, task = child, "the kernel's session map refused a process");
                        }
                    }
                    queue.push(*child);
                }
            }
        }
        placed.len()
    }

    /// The instance of session `number`.
    pub fn instance_of(&self, number: u32) -> Option<String> {
        lock(&self.registry).instances.get(&number).cloned()
    }

    /// Once a second: detaches the session programs when no session has had a live process for
    /// a few checks in a row (see `session_programs`).
    pub fn detach_if_idle(&self, broker: &Broker) {
        let mut programs = lock(&self.programs);
        if !programs.is_attached() {
            return;
        }
        let live = {
            let mut sessions = lock(&self.sessions);
            let entries: Vec<(u32, Member)> = sessions.iter().filter_map(Result::ok).collect();
            // Entries whose task ended without the exit program seeing it (the programs were
            // detached meanwhile) never hold for anyone (see `Member`), but would fill the map
            // and keep the programs attached for good. Looked for now and then (a read of
            // /proc/<task>/stat per task).
            let checks = self.idle_checks.fetch_add(1, Ordering::Relaxed);
            let sweep = checks.is_multiple_of(STALE_TASK_CHECK_EVERY);
            let mut live = std::collections::HashSet::new();
            for (task, member) in entries {
                if sweep && !entry_holds(task, &member) {
                    let _ = sessions.remove(&task);
                } else {
                    live.insert(member.session);
                }
            }
            live
        };
        // Sessions with no process left lose their sticky entries (they come back if the
        // session is placed again).
        let ended = {
            let mut registry = lock(&self.registry);
            let before = registry.projects.len();
            registry.projects.retain(|n, _| live.contains(n));
            registry.projects.len() != before
        };
        if ended {
            self.sync_sticky(broker, true);
        }
        programs.check_idle(live.is_empty());
    }

    /// Whether the session programs are attached now.
    pub fn programs_attached(&self) -> bool {
        lock(&self.programs).is_attached()
    }

    /// How many sessions have at least one live process in the kernel: entries that hold for a
    /// running task (a stale one, left by a task the exit program did not see, counts for none).
    pub fn live_sessions(&self) -> usize {
        let sessions = lock(&self.sessions);
        let mut live: Vec<u32> = sessions
            .iter()
            .filter_map(|e| e.ok())
            .filter(|(task, member)| entry_holds(*task, member))
            .map(|(_, m)| m.session)
            .collect();
        live.sort_unstable();
        live.dedup();
        live.len()
    }

    /// Everything, at start: the lease holders (the ranges are in the map since the programs
    /// were loaded; every holder starts as none), the views and the spares.
    pub fn publish_all(&self, broker: &Broker) {
        {
            let registry = lock(&self.registry);
            for lease in broker.leases() {
                self.republish_holder(broker, &registry, lease.port);
            }
        }
        self.sync_views(broker);
        self.refill_spares(broker);
    }

    /// Writes who holds a lease on `port` into `PORT_INFO`, keeping the port's range.
    fn republish_holder(&self, broker: &Broker, registry: &Registry, port: u16) {
        let slot = self.port_info.slot(usize::from(port));
        let range = PortInfo(slot.load(Ordering::Acquire)).range();
        // A claim that names no session is still its process's own: where that process is a
        // member, its session's (so the kernel never moves a process off its own claim).
        let session_of = |pid: u32| lock(&self.sessions).get(&pid, 0).ok().map(|m| m.session);
        let info = PortInfo::new(reserved_by(broker, registry, port, session_of), range);
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
                    Notice::Bound(h) | Notice::Released(h) => h.socket.port,
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
        self.refill_spares(broker);
    }

    /// Makes `STICKY` equal to the sticky ports of the placed sessions' projects and the ports
    /// held for them, when these or the lingering ports changed (`changed`, or a new lingering
    /// generation).
    fn sync_sticky(&self, broker: &Broker, changed: bool) {
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
    fn sync_views(&self, broker: &Broker) {
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

    fn kernel_bound(&self, port: u16) -> bool {
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
    fn refill_spares(&self, broker: &Broker) {
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
fn write_changes<K, V>(
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
/// broker counts a claim as its process's own whatever it names: so must the kernel.)
fn reserved_by(
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

/// A `STICKY` value: the port, flagged when old connections linger there (see
/// `STICKY_LINGERING`).
fn sticky_value(broker: &Broker, port: u16) -> u32 {
    let lingering = if broker.is_lingering(port) {
        STICKY_LINGERING
    } else {
        0
    };
    u32::from(port) | lingering
}

/// Whether a `SESSIONS` entry still holds for the task it names: the task runs, and its
/// process started no later than the entry was written. `/proc` gives start times in clock ticks
/// of CLOCK_BOOTTIME, which runs ahead of CLOCK_MONOTONIC by the time spent suspended: taken
/// back to the monotonic clock, to within a tick (a process started within a tick after the
/// entry counts as its own here; the kernel programs, which compare nanoseconds, are exact).
fn entry_holds(task: u32, member: &Member) -> bool {
    let Ok(stat) = procfs::process::Process::new(task as i32).and_then(|p| p.stat()) else {
        return false;
    };
    let tick_ns = 1_000_000_000 / procfs::ticks_per_second().max(1);
    let suspended_ns = boottime_ns().saturating_sub(monotonic_ns());
    let started_ns = stat
        .starttime
        .saturating_mul(tick_ns)
        .saturating_sub(suspended_ns);
    started_ns <= member.stamp_ns.saturating_add(tick_ns)
}
