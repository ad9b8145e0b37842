//! The users' focus in the kernel (`FOCUS`, `FOCUSING`): which session's view each user's
//! processes outside the sessions follow (see `styxy_broker::focus`), and which processes'
//! sockets a switch leaves alone (those of the sessions, which keep their own views).

use styxy_common::session::{FOCUSING_COUNT, FOCUSING_DAEMON};

use super::*;

impl KernelSessions {
    /// Makes `FOCUS` equal to the broker's focuses of placed sessions, with its size and this
    /// daemon's process in `FOCUSING`. A focused session not placed yet (no number) enters when
    /// it is.
    pub(super) fn sync_focus(&self, broker: &Broker) {
        let mut registry = lock(&self.registry);
        let wanted: HashMap<u32, u32> = broker
            .focuses()
            .into_iter()
            .filter_map(|f| Some((f.uid, registry.numbers.get(&f.instance_id)?.0)))
            .collect();
        let mut maps = lock(&self.focus);
        let (focus, focusing) = &mut *maps;
        // Counted up before an entry is added and down after one is removed: the count is never
        // below the entries (a program that reads 0 finds none to follow).
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let raised = count(wanted.len().max(registry.focus.len()));
        // The daemon's own connections (its proxy's) never follow a focus.
        if let Err(e) = focusing.set(FOCUSING_DAEMON, std::process::id(), 0) {
            tracing::warn!(cause = %e, "the kernel's focus settings could not be written: the focus is not followed");
            return;
        }
        if let Err(e) = focusing.set(FOCUSING_COUNT, raised, 0) {
            tracing::warn!(cause = %e, "the kernel's focus count could not be written: the focus is not followed");
        }
        super::publish::write_changes(focus, &registry.focus, &wanted, |e, uid| {
            tracing::warn!(cause = %e, uid, "the kernel's focus map refused an entry: that user's focus is not followed");
        });
        if let Err(e) = focusing.set(FOCUSING_COUNT, count(wanted.len()), 0) {
            tracing::warn!(cause = %e, "the kernel's focus count could not be written");
        }
        registry.focus = wanted;
    }

    /// The session number of `instance`, once one of its processes was placed.
    pub fn number_of(&self, instance: &str) -> Option<u32> {
        lock(&self.registry).numbers.get(instance).map(|(n, _)| *n)
    }

    /// The tasks of every kernel session (ids from `SESSIONS`; threads share their process's
    /// descriptors): whose sockets a focus switch leaves open.
    pub fn session_tasks(&self) -> Vec<u32> {
        lock(&self.sessions).keys().filter_map(Result::ok).collect()
    }
}
