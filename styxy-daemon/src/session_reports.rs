//! The last report each agent session was given (`SessionReport`), so that the next one tells only
//! what changed since. Kept in memory: after a daemon restart a session is told its servers once
//! more, which costs a few lines of context and loses nothing.

use std::collections::HashMap;
use std::sync::Mutex;

use styxy_broker::{session_changes, SessionChanges, SessionServer};

/// At most this many sessions are remembered; past it the one told longest ago is forgotten (it
/// would be told its servers again). Instance ids are the callers' choice, so the map is bounded.
const SESSIONS_KEPT: usize = 1024;

/// Per session: a counter value saying when it was last told, the servers it was told of, and
/// whether it was told it has the focus.
#[derive(Default)]
struct Told {
    clock: u64,
    sessions: HashMap<String, (u64, Vec<SessionServer>, bool)>,
}

/// The last report of each session.
#[derive(Default)]
pub struct SessionReports {
    last: Mutex<Told>,
}

impl SessionReports {
    /// What changed for `instance` since its last report, given its servers now, and whether
    /// its focus changed (`focused`: whether a user focuses it now); unless `peek`, `current`
    /// and `focused` become the last report.
    pub fn next(
        &self,
        instance: &str,
        current: &[SessionServer],
        focused: bool,
        peek: bool,
    ) -> (SessionChanges, bool) {
        let mut guard = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let Told {
            clock,
            sessions: last,
        } = &mut *guard;
        let changes = session_changes(
            last.get(instance)
                .map_or(&[][..], |(_, servers, _)| servers),
            current,
        );
        let focus_changed = last.get(instance).is_some_and(|(_, _, f)| *f) != focused;
        if !peek {
            *clock += 1;
            if last.len() >= SESSIONS_KEPT && !last.contains_key(instance) {
                if let Some(oldest) = last
                    .iter()
                    .min_by_key(|(_, (told, _, _))| *told)
                    .map(|(id, _)| id.clone())
                {
                    last.remove(&oldest);
                }
            }
            last.insert(instance.to_string(), (*clock, current.to_vec(), focused));
        }
        (changes, focus_changed)
    }

    /// Forgets a session that ended.
    pub fn forget(&self, instance: &str) {
        let mut guard = self.last.lock().unwrap_or_else(|e| e.into_inner());
        guard.sessions.remove(instance);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use styxy_common::net::Protocol;

    fn server(pid: u32, port: u16) -> SessionServer {
        SessionServer {
            pid,
            comm: "python3".into(),
            cmdline: "python3 -m http.server".into(),
            protocol: Protocol::Tcp,
            port,
            asked: None,
            addresses: vec!["0.0.0.0".into()],
            uid: 0,
        }
    }

    #[test]
    fn each_change_is_told_once_and_peeking_tells_it_again() {
        let reports = SessionReports::default();
        let now = vec![server(1, 8000)];
        let next =
            |id: &str, now: &[SessionServer], peek: bool| reports.next(id, now, false, peek).0;
        assert_eq!(next("a", &now, true).started.len(), 1);
        assert_eq!(next("a", &now, false).started.len(), 1);
        assert!(next("a", &now, false).is_empty());
        assert!(next("b", &[], false).is_empty());
        assert_eq!(next("a", &[], false).stopped.len(), 1);
        reports.forget("a");
        assert_eq!(next("a", &now, false).started.len(), 1);
    }

    #[test]
    fn a_focus_gained_or_lost_is_told_once() {
        let reports = SessionReports::default();
        assert!(!reports.next("a", &[], false, false).1, "never focused");
        assert!(reports.next("a", &[], true, true).1, "a peek tells it");
        assert!(reports.next("a", &[], true, false).1, "gained");
        assert!(!reports.next("a", &[], true, false).1, "told");
        assert!(reports.next("a", &[], false, false).1, "lost");
        assert!(!reports.next("a", &[], false, false).1);
    }

    #[test]
    fn the_map_stays_bounded_and_forgets_the_oldest() {
        let reports = SessionReports::default();
        let now = vec![server(1, 8000)];
        for i in 0..SESSIONS_KEPT + 10 {
            reports.next(&format!("s{i}"), &now, false, false);
        }
        let kept = reports.last.lock().map(|g| g.sessions.len()).unwrap_or(0);
        assert_eq!(kept, SESSIONS_KEPT);
        // The newest is remembered; the first was forgotten and is told again.
        assert!(reports
            .next(&format!("s{}", SESSIONS_KEPT + 9), &now, false, true)
            .0
            .is_empty());
        assert!(!reports.next("s0", &now, false, true).0.is_empty());
    }
}
