//! What the dashboard shows, as plain data read from the daemon in one go: the sessions (name,
//! worktree, agent, age) with their servers (names, asked → bound, command, pid, whom a moved
//! server moved off), the servers outside every session, the orphans (servers whose session
//! ended), recent moves, leases and sticky ports.
//! Built from the broker's own records by [`Dashboard::build`], which does no I/O but what its
//! caller passes in (`agent_of`), so it is tested as data.

use std::collections::HashMap;

use serde::Serialize;
use styxy_broker::{AuditRecord, Instance, Lease, LeaseKind, Names, SessionName, StickyPort};

/// Recent moves shown.
pub const MOVES_SHOWN: usize = 20;

#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Dashboard {
    pub sessions: Vec<SessionView>,
    /// Named servers outside every session.
    pub outside: Vec<ServerView>,
    /// Servers whose session ended while they run on (`styxy prune` stops them).
    pub orphans: Vec<OrphanView>,
    /// Newest first.
    pub moves: Vec<MoveView>,
    pub leases: Vec<LeaseView>,
    pub sticky: Vec<StickyView>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct SessionView {
    pub name: String,
    /// The name it wanted, when another session had it first.
    pub wanted: Option<String>,
    pub instance_id: String,
    /// Its worktree (the project directory).
    pub worktree: Option<String>,
    /// The agent: the process the session lives with (`claude (pid 4242)`).
    pub agent: String,
    pub uid: u32,
    /// Since its first registration.
    pub age_secs: u64,
    /// The users who gave it the focus (`styxy focus`): their localhost:PORT outside the
    /// sessions reaches its servers.
    pub focused_by: Vec<u32>,
    pub servers: Vec<ServerView>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ServerView {
    /// Its names, most general first (`feature-x.localhost`, …).
    pub names: Vec<String>,
    pub asked: u16,
    pub port: u16,
    pub command: String,
    pub pid: u32,
    /// Who held the asked port when it was moved (`vite (pid 4100, session feature-y)`).
    pub moved_off: Option<String>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct OrphanView {
    pub pid: u32,
    pub command: String,
    pub ports: Vec<u16>,
    /// The session that ended.
    pub session: String,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct MoveView {
    pub at_ms: u64,
    pub command: String,
    pub pid: u32,
    pub asked: u16,
    pub port: u16,
    pub session: Option<String>,
    pub holder: Option<String>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct LeaseView {
    pub port: u16,
    pub service_type: String,
    /// `lease` (taken by `styxy allocate`) or `claim` (a moved server's).
    pub kind: &'static str,
    pub uid: u32,
    pub session: Option<String>,
    pub expires_ms: Option<u64>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct StickyView {
    pub project: String,
    pub service_type: String,
    pub asked: u16,
    pub port: u16,
    pub uid: u32,
}

/// The daemon's records the dashboard is built from.
pub struct Records<'a> {
    pub sessions: &'a [(Instance, SessionName)],
    pub names: &'a Names,
    /// Newest last, as the audit log keeps them.
    pub audit: &'a [AuditRecord],
    pub leases: &'a [Lease],
    pub sticky: &'a [StickyPort],
    /// Servers whose session ended.
    pub orphans: &'a [styxy_broker::StopCandidate],
    pub now_ms: u64,
}

impl Dashboard {
    /// The dashboard of `records`; `agent_of(pid)` names a session's agent process (`claude`).
    pub fn build(records: &Records, agent_of: impl Fn(u32) -> Option<String>) -> Dashboard {
        let session_names: HashMap<&str, &str> = records
            .sessions
            .iter()
            .map(|(i, n)| (i.id.as_str(), n.name.as_str()))
            .collect();
        let session_of = |id: &Option<String>| {
            id.as_deref()
                .map(|id| session_names.get(id).map_or(id, |n| n).to_string())
        };
        let holder = |record: &AuditRecord| {
            let command = record
                .holder_cmdline
                .clone()
                .or_else(|| record.holder_comm.clone())?;
            let mut said = shown(&command, "", &[record.requested_port]);
            if let Some(pid) = record.holder_pid {
                said.push_str(&format!(" (pid {pid}"));
                if let Some(session) = session_of(&record.holder_instance_id) {
                    said.push_str(&format!(", session {session}"));
                }
                said.push(')');
            }
            Some(said)
        };
        // The newest move of each (pid, asked, bound).
        let mut moved: HashMap<(u32, u16, u16), &AuditRecord> = HashMap::new();
        for record in records.audit {
            moved.insert(
                (record.pid, record.requested_port, record.assigned_port),
                record,
            );
        }
        let mut by_session: HashMap<&str, Vec<ServerView>> = HashMap::new();
        let mut outside = Vec::new();
        for server in &records.names.servers {
            let view = ServerView {
                names: server.names.clone(),
                asked: server.asked,
                port: server.port,
                command: shown(&server.cmdline, "", &[server.asked, server.port]),
                pid: server.pid,
                moved_off: (server.asked != server.port)
                    .then(|| moved.get(&(server.pid, server.asked, server.port)))
                    .flatten()
                    .and_then(|r| holder(r)),
            };
            match server.instance_id.as_deref() {
                Some(id) => by_session.entry(id).or_default().push(view),
                None => outside.push(view),
            }
        }
        let mut sessions: Vec<SessionView> = records
            .sessions
            .iter()
            .map(|(instance, name)| SessionView {
                name: name.name.clone(),
                wanted: name.wanted.clone(),
                instance_id: instance.id.clone(),
                worktree: instance.project.clone(),
                agent: match agent_of(instance.process.pid) {
                    Some(comm) => format!("{comm} (pid {})", instance.process.pid),
                    None => format!("pid {}", instance.process.pid),
                },
                uid: instance.owner_uid,
                age_secs: records.now_ms.saturating_sub(instance.since_ms()) / 1000,
                focused_by: instance.focused_by.clone(),
                servers: by_session.remove(instance.id.as_str()).unwrap_or_default(),
            })
            .collect();
        sessions.sort_by(|a, b| a.name.cmp(&b.name));
        let moves = records
            .audit
            .iter()
            .rev()
            .take(MOVES_SHOWN)
            .map(|r| MoveView {
                at_ms: r.at_ms,
                command: r.comm.clone(),
                pid: r.pid,
                asked: r.requested_port,
                port: r.assigned_port,
                session: session_of(&r.instance_id),
                holder: holder(r),
            })
            .collect();
        let mut leases: Vec<LeaseView> = records
            .leases
            .iter()
            .map(|l| LeaseView {
                port: l.port,
                service_type: l.service_type.clone(),
                kind: match l.kind {
                    LeaseKind::Allocated => "lease",
                    _ => "claim",
                },
                uid: l.owner_uid,
                session: session_of(&l.instance_id),
                expires_ms: l.expires_ms,
            })
            .collect();
        leases.sort_by_key(|l| l.port);
        let mut sticky: Vec<StickyView> = records
            .sticky
            .iter()
            .map(|s| StickyView {
                project: s.key.project.clone(),
                service_type: s.key.service_type.clone(),
                asked: s.key.asked,
                port: s.port,
                uid: s.key.uid,
            })
            .collect();
        sticky.sort_by(|a, b| (&a.project, a.asked).cmp(&(&b.project, b.asked)));
        let orphans = records
            .orphans
            .iter()
            .map(|o| OrphanView {
                pid: o.pid,
                command: shown(&o.cmdline, &o.comm, &o.ports),
                ports: o.ports.clone(),
                session: o.instance_id.clone().unwrap_or_default(),
            })
            .collect();
        Dashboard {
            sessions,
            outside,
            orphans,
            moves,
            leases,
            sticky,
        }
    }
}

/// A command line as the dashboard shows it: at most 120 characters, its port arguments kept.
fn shown(cmdline: &str, comm: &str, ports: &[u16]) -> String {
    styxy_common::command_line::shown(cmdline, comm, 120, ports)
}

#[cfg(test)]
mod tests {
    use super::*;
    use styxy_broker::{NamedServer, ProcessId};
    use styxy_common::net::Protocol;

    fn instance(id: &str, pid: u32, project: &str, since_ms: u64) -> Instance {
        Instance {
            id: id.into(),
            process: ProcessId { pid, start_time: 1 },
            registered_ms: since_ms,
            owner_uid: 1000,
            placed: Vec::new(),
            project: Some(project.into()),
            name: None,
            first_registered_ms: since_ms,
            focused_by: Vec::new(),
        }
    }

    fn server(
        names: &[&str],
        asked: u16,
        port: u16,
        pid: u32,
        instance: Option<&str>,
    ) -> NamedServer {
        NamedServer {
            names: names.iter().map(|n| n.to_string()).collect(),
            port,
            asked,
            addresses: vec!["127.0.0.1".into()],
            pid,
            cmdline: format!("vite --port {asked}"),
            uid: 1000,
            service_type: "dev".into(),
            instance_id: instance.map(String::from),
            session: None,
        }
    }

    fn moved(at_ms: u64, pid: u32, asked: u16, port: u16) -> AuditRecord {
        AuditRecord {
            at_ms,
            pid,
            comm: "node".into(),
            uid: 1000,
            requested_port: asked,
            assigned_port: port,
            protocol: Protocol::Tcp,
            service_type: "dev".into(),
            holder_pid: Some(10),
            holder_comm: Some("node".into()),
            holder_cmdline: Some("vite --port 5173".into()),
            holder_instance_id: Some("claude-a".into()),
            instance_id: Some("claude-b".into()),
        }
    }

    #[test]
    fn sessions_carry_their_servers_and_whom_a_moved_one_moved_off() {
        let sessions = vec![
            (
                instance("claude-b", 21, "/src/feature-y", 40_000),
                SessionName {
                    instance_id: "claude-b".into(),
                    name: "feature-y".into(),
                    wanted: None,
                },
            ),
            (
                instance("claude-a", 11, "/src/feature-x", 10_000),
                SessionName {
                    instance_id: "claude-a".into(),
                    name: "feature-x".into(),
                    wanted: None,
                },
            ),
        ];
        let mut names = Names::default();
        names.servers = vec![
            server(&["feature-x.localhost"], 5173, 5173, 10, Some("claude-a")),
            server(&["feature-y.localhost"], 5173, 5174, 20, Some("claude-b")),
            server(&["5432.localhost"], 5432, 5432, 30, None),
        ];
        let audit: Vec<AuditRecord> = (0..30)
            .map(|n| moved(n, 99, 8000, 8001))
            .chain([moved(50_000, 20, 5173, 5174)])
            .collect();
        let d = Dashboard::build(
            &Records {
                sessions: &sessions,
                names: &names,
                audit: &audit,
                leases: &[],
                sticky: &[],
                orphans: &[],
                now_ms: 100_000,
            },
            |pid| (pid == 11).then(|| "claude".to_string()),
        );
        // By name; each with its own servers; the agent named where it could be read.
        let names: Vec<&str> = d.sessions.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["feature-x", "feature-y"]);
        assert_eq!(d.sessions[0].agent, "claude (pid 11)");
        assert_eq!(d.sessions[1].agent, "pid 21");
        assert_eq!(d.sessions[0].age_secs, 90);
        assert_eq!(d.sessions[0].servers[0].moved_off, None);
        assert_eq!(
            d.sessions[1].servers[0].moved_off.as_deref(),
            Some("vite --port 5173 (pid 10, session feature-x)")
        );
        assert_eq!(d.outside.len(), 1);
        // The newest moves first, at most MOVES_SHOWN.
        assert_eq!(d.moves.len(), MOVES_SHOWN);
        assert_eq!(
            (d.moves[0].at_ms, d.moves[0].session.as_deref()),
            (50_000, Some("feature-y"))
        );
    }
}
