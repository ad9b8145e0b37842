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
//!
//! The maps are pinned (see `bpf::pins`): a daemon that starts after another reuses them, with
//! every membership, view and sticky port as it was, and takes back which number is which
//! instance from `numbers`.
//!
//! Here: the maps and the registry, and when the programs may detach; `placement` puts
//! processes in (and back after a restart); `publish` keeps the maps in step with the broker;
//! `numbers` keeps the session numbers in the state directory.

mod focus;
mod numbers;
mod placement;
mod publish;

pub use numbers::NUMBERS_FILE;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use aya::maps::{Array as BpfArray, HashMap as BpfHashMap, MapData};
use styxy_broker::ProcessId;
use styxy_broker::StateChange;
use styxy_broker::{Broker, Effects, Notice};
use styxy_common::event::{port_slot, IPPROTO_TCP, IPPROTO_UDP};
use styxy_common::session::{
    Member, PortInfo, StickyKey, ViewKey, RANGES_MAX, RESERVED_BY_OTHER, SPARE_SLOTS,
    STICKY_LINGERING,
};

use super::mapped::MappedArray;
use super::protection::{KillProtection, Refusals};
use super::session_programs::SessionPrograms;
use crate::clock::{boottime_ns, monotonic_ns};

/// The maps the daemon writes, taken from the loaded object.
pub struct KernelSessionMaps {
    pub sessions: BpfHashMap<MapData, u32, Member>,
    pub views: BpfHashMap<MapData, ViewKey, u32>,
    pub sticky: BpfHashMap<MapData, StickyKey, u32>,
    /// uid → focused session number, and how many there are (see `focus`).
    pub focus: BpfHashMap<MapData, u32, u32>,
    pub focusing: BpfArray<MapData, u32>,
    pub port_info: MappedArray<AtomicU64>,
    pub spares: MappedArray<AtomicU32>,
    /// The kernel's per-port socket counts (read only here).
    pub ports: MappedArray<AtomicU64>,
    /// The programs sessions need, attached while one is live.
    pub programs: SessionPrograms,
    /// The signals `lsm/task_kill` refused (see `bpf::protection`).
    pub refusals: Refusals,
    /// Where the session numbers are kept (see `numbers`).
    pub numbers_file: std::path::PathBuf,
    /// The maps are the last daemon's (pinned), with its sessions in them.
    pub reused: bool,
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
    /// The entries written to `FOCUS`: uid → session number.
    focus: HashMap<u32, u32>,
    /// The highest session number the taken-over maps hold (see `take_over`): new sessions are
    /// numbered above it, whatever the saved numbers say.
    numbers_floor: u32,
}

/// `FOCUS` (uid → session number) and `FOCUSING` (how many), written together.
type FocusMaps = (BpfHashMap<MapData, u32, u32>, BpfArray<MapData, u32>);

/// The daemon's handle on the kernel sessions.
pub struct KernelSessions {
    sessions: Mutex<BpfHashMap<MapData, u32, Member>>,
    views: Mutex<BpfHashMap<MapData, ViewKey, u32>>,
    sticky: Mutex<BpfHashMap<MapData, StickyKey, u32>>,
    focus: Mutex<FocusMaps>,
    port_info: MappedArray<AtomicU64>,
    spares: MappedArray<AtomicU32>,
    ports: MappedArray<AtomicU64>,
    registry: Mutex<Registry>,
    /// Held while a process is placed, and while the programs are detached for want of any.
    programs: Mutex<SessionPrograms>,
    refusals: Mutex<Refusals>,
    /// Idle checks so far (see [`KernelSessions::detach_if_idle`]).
    idle_checks: AtomicU64,
    numbers_file: std::path::PathBuf,
}

/// Every how many idle checks (one a second) the session map is searched for tasks that ended
/// without the exit program seeing them.
const STALE_TASK_CHECK_EVERY: u64 = 30;

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl KernelSessions {
    pub fn new(maps: KernelSessionMaps) -> KernelSessions {
        let reused = maps.reused;
        let sessions = KernelSessions {
            sessions: Mutex::new(maps.sessions),
            views: Mutex::new(maps.views),
            sticky: Mutex::new(maps.sticky),
            focus: Mutex::new((maps.focus, maps.focusing)),
            port_info: maps.port_info,
            spares: maps.spares,
            ports: maps.ports,
            registry: Mutex::new(Registry::default()),
            programs: Mutex::new(maps.programs),
            refusals: Mutex::new(maps.refusals),
            idle_checks: AtomicU64::new(0),
            numbers_file: maps.numbers_file,
        };
        if reused {
            sessions.take_over();
        }
        sessions
    }

    /// The registry of the last daemon, whose maps these are: what `VIEWS` and `STICKY` hold,
    /// and which number is which instance (from the state directory).
    fn take_over(&self) {
        let entries: Vec<(u32, Member)> =
            lock(&self.sessions).iter().filter_map(Result::ok).collect();
        let in_maps = entries.iter().map(|(_, m)| m.session).max().unwrap_or(0);
        let live = live_numbers(&entries);
        let mut registry = lock(&self.registry);
        registry.views = lock(&self.views).iter().filter_map(Result::ok).collect();
        registry.sticky = lock(&self.sticky).iter().filter_map(Result::ok).collect();
        registry.focus = lock(&self.focus).0.iter().filter_map(Result::ok).collect();
        registry.numbers_floor = registry
            .views
            .keys()
            .map(|k| k.session)
            .chain(registry.sticky.keys().map(|k| k.session))
            .fold(in_maps, u32::max);
        for saved in numbers::load(&self.numbers_file) {
            if live.contains(&saved.number) {
                registry
                    .projects
                    .insert(saved.number, (saved.owner, saved.project));
            }
            registry
                .instances
                .insert(saved.number, saved.instance.clone());
            registry
                .numbers
                .insert(saved.instance, (saved.number, saved.owner));
        }
        let unknown = live
            .iter()
            .filter(|n| !registry.instances.contains_key(n))
            .count();
        tracing::info!(
            live_sessions = live.len(),
            unknown,
            "the kernel sessions of the last daemon taken over (pinned maps)"
        );
    }

    /// Writes which number is which instance to the state directory: the sessions that may have
    /// a live process (and `placing`, about to), so the file does not grow with every session
    /// there ever was. A session left out that comes back gets a new number.
    fn save_numbers(&self, registry: &Registry, placing: u32) {
        let sessions = registry
            .numbers
            .iter()
            .filter(|(_, (number, _))| *number == placing || registry.projects.contains_key(number))
            .map(|(instance, (number, owner))| numbers::SavedSession {
                instance: instance.clone(),
                number: *number,
                owner: *owner,
                project: registry.projects.get(number).and_then(|(_, p)| p.clone()),
            })
            .collect();
        if let Err(e) = numbers::save(&self.numbers_file, sessions) {
            tracing::warn!(cause = %format!("{e:#}"),
                "the kernel session numbers could not be saved: a daemon after this one starts its sessions over");
        }
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

    /// The instance whose kernel session process `pid` is in, when its entry holds for it (the
    /// kernel's membership follows forks, so a server that double-forked or called `setsid` is
    /// still its session's).
    pub fn instance_of_task(&self, pid: u32) -> Option<String> {
        let member = lock(&self.sessions).get(&pid, 0).ok()?;
        if !entry_holds(pid, &member) {
            return None;
        }
        self.instance_of(member.session)
    }

    /// Whether the kernel refuses signals between sessions, and why not.
    pub fn kill_protection(&self) -> KillProtection {
        lock(&self.programs).kill_protection().clone()
    }

    /// The signals refused between sessions since the last call.
    pub fn refused_signals(&self) -> Vec<styxy_common::protection::SignalRefusal> {
        lock(&self.refusals).drain()
    }

    /// Whether the session programs are attached now.
    pub fn programs_attached(&self) -> bool {
        lock(&self.programs).is_attached()
    }

    /// How many sessions have at least one live process in the kernel: entries that hold for a
    /// running task (a stale one, left by a task the exit program did not see, counts for none).
    pub fn live_sessions(&self) -> usize {
        let entries: Vec<(u32, Member)> =
            lock(&self.sessions).iter().filter_map(Result::ok).collect();
        live_numbers(&entries).len()
    }
}

/// The sessions of `entries` (the `SESSIONS` map's) with an entry that holds for a running task.
fn live_numbers(entries: &[(u32, Member)]) -> std::collections::HashSet<u32> {
    entries
        .iter()
        .filter(|(task, member)| entry_holds(*task, member))
        .map(|(_, m)| m.session)
        .collect()
}

/// Whether a `SESSIONS` entry still holds for the task it names: the task runs, and its
/// process started no later than the entry was written. `/proc` gives start times in clock ticks
/// of CLOCK_BOOTTIME, which runs ahead of CLOCK_MONOTONIC by the time spent suspended: taken
/// back to the monotonic clock, to within a tick (a process started within a tick after the
/// entry counts as its own here; the kernel programs, which compare nanoseconds, are exact).
pub(super) fn entry_holds(task: u32, member: &Member) -> bool {
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
