//! What an agent is told about its own session: the servers of the session (processes that carry
//! its instance, by the shim's claim or `STYXY_INSTANCE` in their environment) with the port each
//! asked for when it was moved, and what changed since the agent was last told — servers that
//! started listening and servers that stopped. An agent starts servers in the background and never
//! reads their stderr, so this is how it learns that `npm run dev` now answers on 5174.
//!
//! Plain data: the daemon keeps the last report per session and passes it back in.

use std::collections::BTreeMap;

use crate::{Broker, ProcessId, Protocol};

/// One server of a session: a process of the session holding a port (its IPv4 and IPv6 sockets on
/// that port are one server).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionServer {
    /// The process holding the port.
    pub pid: u32,
    /// Its short name (`/proc/<pid>/comm`).
    pub comm: String,
    /// Its command line, arguments joined by spaces.
    pub cmdline: String,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The port it is bound to: what a browser outside the session uses.
    pub port: u16,
    /// The port it asked for when it was moved: what the session's own processes use (its view
    /// sends them to `port`). `None` when it kept the port it asked for.
    pub asked: Option<u16>,
    /// The local addresses it is bound to, in the order seen.
    pub addresses: Vec<String>,
    /// Its user.
    pub uid: u32,
}

impl SessionServer {
    /// What identifies a server between two reports.
    pub fn key(&self) -> (u32, Protocol, u16) {
        (self.pid, self.protocol, self.port)
    }
}

/// What changed between two reports of one session.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionChanges {
    /// Servers that hold a port now and did not at the last report.
    pub started: Vec<SessionServer>,
    /// Servers of the last report that hold their port no more.
    pub stopped: Vec<SessionServer>,
}

impl SessionChanges {
    /// Whether there is nothing to tell.
    pub fn is_empty(&self) -> bool {
        self.started.is_empty() && self.stopped.is_empty()
    }
}

impl Broker {
    /// The session of process `pid`: the instance registered for it or for its nearest registered
    /// ancestor (`ancestors`, parent first), if any.
    pub fn instance_of_process(
        &self,
        process: ProcessId,
        ancestors: &[ProcessId],
    ) -> Option<String> {
        std::iter::once(&process)
            .chain(ancestors)
            .find_map(|p| {
                self.instances
                    .values()
                    .filter(|i| i.process == *p)
                    .max_by_key(|i| i.registered_ms)
            })
            .map(|i| i.id.clone())
    }

    /// The servers of session `instance_id`, by (pid, protocol, port); only `uid`'s when given
    /// (a user asks about its own processes only).
    pub fn session_servers(&self, instance_id: &str, uid: Option<u32>) -> Vec<SessionServer> {
        let asked: BTreeMap<(u32, Protocol, u16), u16> = self
            .view_of(instance_id)
            .into_iter()
            .map(|e| ((e.pid, e.protocol, e.bound), e.asked))
            .collect();
        let mut servers: BTreeMap<(u32, Protocol, u16), SessionServer> = BTreeMap::new();
        for held in self.held_sockets() {
            let socket = &held.socket;
            let Some(owner) = socket.owner.as_ref() else {
                continue;
            };
            if held.instance_id.as_deref() != Some(instance_id)
                || uid.is_some_and(|u| u != socket.uid)
            {
                continue;
            }
            let key = (owner.id.pid, socket.protocol, socket.port);
            let address = socket.address.to_string();
            let server = servers.entry(key).or_insert_with(|| SessionServer {
                pid: owner.id.pid,
                comm: owner.comm.clone(),
                cmdline: owner.cmdline.clone(),
                protocol: socket.protocol,
                port: socket.port,
                asked: asked.get(&key).copied(),
                addresses: Vec::new(),
                uid: socket.uid,
            });
            if !server.addresses.contains(&address) {
                server.addresses.push(address);
            }
        }
        servers.into_values().collect()
    }
}

/// What changed from `previous` (the last report) to `current`. A server that was moved after
/// the last report (it holds the same port but now with an asked port) counts as started again,
/// so the agent learns of the move.
pub fn session_changes(previous: &[SessionServer], current: &[SessionServer]) -> SessionChanges {
    let before: BTreeMap<_, _> = previous.iter().map(|s| (s.key(), s)).collect();
    let now: BTreeMap<_, _> = current.iter().map(|s| (s.key(), s)).collect();
    SessionChanges {
        started: current
            .iter()
            .filter(|s| before.get(&s.key()).is_none_or(|b| b.asked != s.asked))
            .cloned()
            .collect(),
        stopped: previous
            .iter()
            .filter(|s| !now.contains_key(&s.key()))
            .cloned()
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(pid: u32, port: u16, asked: Option<u16>) -> SessionServer {
        SessionServer {
            pid,
            comm: "node".into(),
            cmdline: "node server.js".into(),
            protocol: Protocol::Tcp,
            port,
            asked,
            addresses: vec!["127.0.0.1".into()],
            uid: 1000,
        }
    }

    #[test]
    fn nothing_changed_is_empty() {
        let servers = vec![server(1, 6007, Some(6006)), server(2, 8000, None)];
        assert!(session_changes(&servers, &servers).is_empty());
        assert!(session_changes(&[], &[]).is_empty());
    }

    #[test]
    fn started_and_stopped_servers_are_told_once() {
        let before = vec![server(1, 6007, Some(6006)), server(2, 8000, None)];
        let after = vec![server(2, 8000, None), server(3, 5174, Some(5173))];
        let changes = session_changes(&before, &after);
        assert_eq!(changes.started, vec![server(3, 5174, Some(5173))]);
        assert_eq!(changes.stopped, vec![server(1, 6007, Some(6006))]);
        assert!(session_changes(&after, &after).is_empty());
    }

    #[test]
    fn a_server_restarted_under_a_new_pid_is_stopped_and_started() {
        let changes = session_changes(&[server(1, 8000, None)], &[server(9, 8000, None)]);
        assert_eq!(changes.started.len(), 1);
        assert_eq!(changes.stopped.len(), 1);
    }

    #[test]
    fn a_move_seen_late_is_told() {
        let changes = session_changes(&[server(1, 6007, None)], &[server(1, 6007, Some(6006))]);
        assert_eq!(changes.started, vec![server(1, 6007, Some(6006))]);
        assert!(changes.stopped.is_empty());
    }
}
