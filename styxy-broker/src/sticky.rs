//! Sticky ports: a worktree that got 8001 yesterday gets 8001 again today. A moved bind or an
//! allocation remembers its identity — the user, the project (git worktree root, else working
//! directory), the service type and the asked port — and the port it got. The next time the same
//! identity needs a port there, it gets that one back while it is free; other identities pass it
//! over while any other port of the range is free, so URLs in bookmarks, `.env` files and test
//! configs keep working. Persisted with the leases; `styxy forget` clears them.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::{Broker, Effects, StateChange};

/// At most this many sticky ports per user; past it the one used longest ago is forgotten.
pub const STICKY_PER_USER: usize = 1000;

/// What a sticky port is remembered by.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct StickyKey {
    /// The user it is remembered for (another user's binds never get it back).
    pub uid: u32,
    /// The project directory: the git worktree root, else the working directory.
    pub project: String,
    /// The service type of the range.
    pub service_type: String,
    /// The port asked for (a move's asked port, an allocation's preferred port, 0 for none).
    pub asked: u16,
}

/// A remembered port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StickyPort {
    /// Whose it is.
    #[serde(flatten)]
    pub key: StickyKey,
    /// The port the identity got last.
    pub port: u16,
    /// When it was last given (Unix ms).
    pub used_ms: u64,
}

/// The sticky ports the broker keeps.
#[derive(Clone, Debug, Default)]
pub(crate) struct StickyPorts {
    by_key: BTreeMap<StickyKey, StickyPort>,
    /// How many identities remember each port (to pass it over quickly).
    remembered: HashMap<u16, u32>,
}

impl StickyPorts {
    fn insert(&mut self, entry: StickyPort) {
        *self.remembered.entry(entry.port).or_default() += 1;
        if let Some(old) = self.by_key.insert(entry.key.clone(), entry) {
            self.unremember(old.port);
        }
    }

    fn remove(&mut self, key: &StickyKey) -> Option<StickyPort> {
        let old = self.by_key.remove(key)?;
        self.unremember(old.port);
        Some(old)
    }

    fn unremember(&mut self, port: u16) {
        if let Some(n) = self.remembered.get_mut(&port) {
            *n -= 1;
            if *n == 0 {
                self.remembered.remove(&port);
            }
        }
    }
}

impl Broker {
    /// Loads sticky ports read back from the state dir.
    pub fn restore_sticky(&mut self, entries: impl IntoIterator<Item = StickyPort>) {
        for entry in entries {
            self.sticky.insert(entry);
        }
    }

    /// Every sticky port, by (uid, project, service type, asked port).
    pub fn sticky_ports(&self) -> Vec<StickyPort> {
        self.sticky.by_key.values().cloned().collect()
    }

    /// The sticky ports of `uid`'s `project` (every service type and asked port), for the
    /// kernel's bind programs.
    pub fn sticky_ports_of_project<'a>(
        &'a self,
        uid: u32,
        project: &'a str,
    ) -> impl Iterator<Item = &'a StickyPort> + 'a {
        let from = StickyKey {
            uid,
            project: project.to_string(),
            service_type: String::new(),
            asked: 0,
        };
        self.sticky
            .by_key
            .range(from..)
            .take_while(move |(k, _)| k.uid == uid && k.project == project)
            .map(|(_, entry)| entry)
    }

    /// The port `key` got last, when it is free again and within `start..=end`.
    pub(crate) fn sticky_port_for(&self, key: &StickyKey, start: u16, end: u16) -> Option<u16> {
        self.remembered_port(key, start, end)
            .filter(|port| !self.is_taken(*port))
    }

    /// The port `key` got last, within `start..=end` and not its asked port, free or not.
    pub(crate) fn remembered_port(&self, key: &StickyKey, start: u16, end: u16) -> Option<u16> {
        let port = self.sticky.by_key.get(key)?.port;
        ((start..=end).contains(&port) && port != key.asked).then_some(port)
    }

    /// Whether any identity remembers `port` (the kernel's spare ports pass such ports over).
    pub fn is_sticky(&self, port: u16) -> bool {
        self.sticky.remembered.contains_key(&port)
    }

    /// Whether another identity than `key` remembers `port`.
    pub(crate) fn remembered_by_other(&self, port: u16, key: Option<&StickyKey>) -> bool {
        match self.sticky.remembered.get(&port) {
            None => false,
            Some(&n) => {
                let mine = key
                    .and_then(|k| self.sticky.by_key.get(k))
                    .is_some_and(|e| e.port == port);
                n > u32::from(mine)
            }
        }
    }

    /// Remembers that `key` got `port`; past [`STICKY_PER_USER`] the user's entry used longest
    /// ago is forgotten.
    pub(crate) fn remember_sticky(
        &mut self,
        key: StickyKey,
        port: u16,
        now_ms: u64,
        effects: &mut Effects,
    ) {
        if self
            .sticky
            .by_key
            .get(&key)
            .is_some_and(|e| e.port == port && e.used_ms == now_ms)
        {
            return;
        }
        let is_new = !self.sticky.by_key.contains_key(&key);
        if is_new {
            let users: Vec<&StickyPort> = self
                .sticky
                .by_key
                .values()
                .filter(|e| e.key.uid == key.uid)
                .collect();
            if users.len() >= STICKY_PER_USER {
                if let Some(oldest) = users
                    .iter()
                    .min_by_key(|e| e.used_ms)
                    .map(|e| e.key.clone())
                {
                    self.sticky.remove(&oldest);
                    effects
                        .changes
                        .push(StateChange::RemoveSticky { key: oldest });
                }
            }
        }
        let entry = StickyPort {
            key,
            port,
            used_ms: now_ms,
        };
        effects.changes.push(StateChange::PutSticky {
            sticky: entry.clone(),
        });
        self.sticky.insert(entry);
    }

    /// Forgets the sticky ports of `uid` (root: everyone's) in `project` and/or of `port` (both
    /// `None`: all of them). Returns what was forgotten.
    pub fn forget_sticky(
        &mut self,
        uid: u32,
        project: Option<&str>,
        port: Option<u16>,
    ) -> (Vec<StickyPort>, Effects) {
        let keys: Vec<StickyKey> = self
            .sticky
            .by_key
            .values()
            .filter(|e| uid == 0 || e.key.uid == uid)
            .filter(|e| project.is_none_or(|p| e.key.project == p))
            .filter(|e| port.is_none_or(|p| e.port == p || e.key.asked == p))
            .map(|e| e.key.clone())
            .collect();
        let mut effects = Effects::default();
        let mut forgotten = Vec::new();
        for key in keys {
            if let Some(entry) = self.sticky.remove(&key) {
                effects.changes.push(StateChange::RemoveSticky { key });
                forgotten.push(entry);
            }
        }
        (forgotten, effects)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(uid: u32, project: &str, asked: u16) -> StickyKey {
        StickyKey {
            uid,
            project: project.into(),
            service_type: "dev".into(),
            asked,
        }
    }

    #[test]
    fn counts_follow_inserts_replacements_and_removals() {
        let mut s = StickyPorts::default();
        s.insert(StickyPort {
            key: key(1, "/w", 3000),
            port: 3001,
            used_ms: 1,
        });
        s.insert(StickyPort {
            key: key(1, "/v", 3000),
            port: 3001,
            used_ms: 1,
        });
        assert_eq!(s.remembered.get(&3001), Some(&2));
        s.insert(StickyPort {
            key: key(1, "/w", 3000),
            port: 3002,
            used_ms: 2,
        });
        assert_eq!(s.remembered.get(&3001), Some(&1));
        assert_eq!(s.remembered.get(&3002), Some(&1));
        assert!(s.remove(&key(1, "/v", 3000)).is_some());
        assert!(s.remove(&key(1, "/v", 3000)).is_none());
        assert_eq!(s.remembered.get(&3001), None);
    }
}
