//! What `styxy stop` may stop: a target — a port as the session sees it, a server's name, or
//! every server of the session — resolved against the session's view and the sockets held on the
//! machine, and refused when any process it names belongs to another session or to none. A pid
//! is checked the same way (see [`check_session`]). Plain data in, a decision out: sending the
//! signals is the daemon's.

use std::collections::BTreeMap;

use crate::{Broker, Names};

/// What to stop, in the caller's session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopTarget {
    /// A port as the session's processes use it: the asked port of a moved server (its view
    /// sends the session there), or a port its server kept.
    Port(u16),
    /// A server's name in the session: its service (`storybook`), as in its URL.
    Name(String),
    /// Every server of the session.
    All,
}

/// A process a stop would end, with the ports it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StopCandidate {
    /// The process.
    pub pid: u32,
    /// Its comm.
    pub comm: String,
    /// Its command line.
    pub cmdline: String,
    /// Its bound ports, lowest first.
    pub ports: Vec<u16>,
    /// The port the session asked for, when the target was an asked port the server was moved
    /// from (or its one moved server).
    pub asked: Option<u16>,
    /// Its session, as far as the broker knows (the shim's claim, the kernel's report); the
    /// caller's `session_of` has the last word.
    pub instance_id: Option<String>,
}

/// Why a stop was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopRefused {
    /// Nothing the target names runs.
    NotFound(String),
    /// A process it names is another session's, or nobody's.
    NotYours {
        /// The process.
        pid: u32,
        /// Its comm.
        comm: String,
        /// The ports it holds.
        ports: Vec<u16>,
        /// Its session; `None` when it is in none.
        instance_id: Option<String>,
    },
}

impl Broker {
    /// The processes `target` names for session `instance`. `session_of(pid)` is the session a
    /// process is in when the caller knows better than the broker (the kernel's membership);
    /// `names` is the names' reading, for a name target.
    pub fn servers_to_stop(
        &self,
        instance: &str,
        target: &StopTarget,
        names: &Names,
        session_of: &dyn Fn(u32) -> Option<String>,
    ) -> Result<Vec<StopCandidate>, StopRefused> {
        let mut candidates = match target {
            StopTarget::Port(port) => self.holders_of_asked_port(instance, *port),
            StopTarget::Name(name) => {
                let wanted = name.trim().to_ascii_lowercase();
                let pids: Vec<(u32, u16)> = names
                    .servers
                    .iter()
                    .filter(|s| s.instance_id.as_deref() == Some(instance))
                    .filter(|s| {
                        s.service_type == wanted
                            || s.names.iter().any(|n| n.split('.').next() == Some(&wanted))
                    })
                    .map(|s| (s.pid, s.asked))
                    .collect();
                let mut found =
                    self.processes_holding(|pid, _| pids.iter().any(|(p, _)| *p == pid));
                for candidate in &mut found {
                    candidate.asked = pids
                        .iter()
                        .find(|(p, asked)| *p == candidate.pid && !candidate.ports.contains(asked))
                        .map(|(_, asked)| *asked);
                }
                found
            }
            StopTarget::All => {
                self.processes_holding(|_, held_instance| held_instance == Some(instance))
            }
        };
        if matches!(target, StopTarget::All) {
            // Servers the kernel knows to be the session's, whatever the broker was told.
            let more =
                self.processes_holding(|pid, _| session_of(pid).as_deref() == Some(instance));
            for candidate in more {
                if !candidates.iter().any(|c| c.pid == candidate.pid) {
                    candidates.push(candidate);
                }
            }
            candidates.sort_by_key(|c| c.pid);
        }
        for candidate in &mut candidates {
            if let Some(known) = session_of(candidate.pid) {
                candidate.instance_id = Some(known);
            }
        }
        if candidates.is_empty() {
            return Err(StopRefused::NotFound(match target {
                StopTarget::Port(port) => format!("nothing holds port {port}"),
                StopTarget::Name(name) => format!("the session has no server named {name:?}"),
                StopTarget::All => "the session has no server running".to_string(),
            }));
        }
        if let Some(other) = candidates
            .iter()
            .find(|c| c.instance_id.as_deref() != Some(instance))
        {
            return Err(StopRefused::NotYours {
                pid: other.pid,
                comm: other.comm.clone(),
                ports: other.ports.clone(),
                instance_id: other.instance_id.clone(),
            });
        }
        Ok(candidates)
    }

    /// The orphans: servers whose session has ended (its agent gone, or SessionEnd) while they
    /// run on — backgrounded or daemonized dev servers that keep their port and nobody knows
    /// whose they are. A server's session is what `session_of(pid)` says (the kernel's
    /// membership, which follows double forks), else what the broker was told. Servers of no
    /// session are nobody's orphans.
    pub fn orphans(&self, session_of: &dyn Fn(u32) -> Option<String>) -> Vec<StopCandidate> {
        let mut found = self.processes_holding(|_, _| true);
        found.retain_mut(|c| {
            if let Some(known) = session_of(c.pid) {
                c.instance_id = Some(known);
            }
            c.instance_id
                .as_deref()
                .is_some_and(|id| !self.instances.contains_key(id))
        });
        found
    }

    /// The processes holding `port` as session `instance` sees it: its view's server for that
    /// asked port, else whoever holds the port itself.
    fn holders_of_asked_port(&self, instance: &str, port: u16) -> Vec<StopCandidate> {
        let viewed: Vec<u16> = self
            .view_of(instance)
            .into_iter()
            .filter(|e| e.asked == port)
            .map(|e| e.bound)
            .collect();
        if viewed.is_empty() {
            return self.processes_holding_port(port, None);
        }
        let mut found = Vec::new();
        for bound in viewed {
            for candidate in self.processes_holding_port(bound, Some(port)) {
                if !found.iter().any(|c: &StopCandidate| c.pid == candidate.pid) {
                    found.push(candidate);
                }
            }
        }
        found
    }

    fn processes_holding_port(&self, port: u16, asked: Option<u16>) -> Vec<StopCandidate> {
        let holders: Vec<u32> = self
            .held_sockets()
            .filter(|h| h.socket.port == port)
            .filter_map(|h| h.socket.owner.as_ref().map(|o| o.id.pid))
            .collect();
        let mut found = self.processes_holding(|pid, _| holders.contains(&pid));
        for candidate in &mut found {
            candidate.asked = asked;
        }
        found
    }

    /// Every process whose held sockets `wanted(pid, the socket's session)` picks, with all the
    /// ports it holds.
    fn processes_holding(&self, wanted: impl Fn(u32, Option<&str>) -> bool) -> Vec<StopCandidate> {
        let mut by_pid: BTreeMap<u32, StopCandidate> = BTreeMap::new();
        for held in self.held_sockets() {
            let Some(owner) = held.socket.owner.as_ref() else {
                continue;
            };
            let pid = owner.id.pid;
            if !wanted(pid, held.instance_id.as_deref()) && !by_pid.contains_key(&pid) {
                continue;
            }
            let candidate = by_pid.entry(pid).or_insert_with(|| StopCandidate {
                pid,
                comm: owner.comm.clone(),
                cmdline: owner.cmdline.clone(),
                ports: Vec::new(),
                asked: None,
                instance_id: None,
            });
            if !candidate.ports.contains(&held.socket.port) {
                candidate.ports.push(held.socket.port);
            }
            if candidate.instance_id.is_none() {
                candidate.instance_id = held.instance_id.clone();
            }
        }
        // A process picked by one socket is listed with the ports of all its sockets: a second
        // pass for those seen before it was picked.
        for held in self.held_sockets() {
            let Some(owner) = held.socket.owner.as_ref() else {
                continue;
            };
            if let Some(candidate) = by_pid.get_mut(&owner.id.pid) {
                if !candidate.ports.contains(&held.socket.port) {
                    candidate.ports.push(held.socket.port);
                }
            }
        }
        by_pid
            .into_values()
            .map(|mut c| {
                c.ports.sort_unstable();
                c
            })
            .collect()
    }
}

/// Whether process `pid` (of session `its_session`) may be stopped from session `instance`.
pub fn check_session(
    instance: &str,
    pid: u32,
    comm: &str,
    ports: Vec<u16>,
    its_session: Option<String>,
) -> Result<(), StopRefused> {
    if its_session.as_deref() == Some(instance) {
        return Ok(());
    }
    Err(StopRefused::NotYours {
        pid,
        comm: comm.to_string(),
        ports,
        instance_id: its_session,
    })
}
