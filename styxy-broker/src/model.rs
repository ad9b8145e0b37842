//! Plain data the broker reasons about: sockets seen in the kernel, leases, processes, events.
//!
//! Nothing here does I/O; observers and the RPC layer build these values and hand them in.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

pub use styxy_common::net::{Family, Protocol};

/// A process, identified by pid *and* start time (clock ticks since boot, from `/proc/<pid>/stat`), because
/// pids are reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ProcessId {
    /// The process id.
    pub pid: u32,
    /// Clock ticks since boot when the process started (field 22 of `/proc/<pid>/stat`).
    pub start_time: u64,
}

/// What is known of a process that holds a socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessInfo {
    /// Who it is.
    pub id: ProcessId,
    /// The kernel's short name for it (`comm`).
    pub comm: String,
    /// Its command line, arguments joined by spaces.
    pub cmdline: String,
    /// The agent session it was started in (`STYXY_INSTANCE` in its environment), if any.
    pub instance_id: Option<String>,
}

/// A socket bound in the kernel, as an observer saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundSocket {
    /// The kernel's socket cookie: the same value in sock_diag answers and in eBPF programs.
    pub cookie: u64,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// IPv4 or IPv6.
    pub family: Family,
    /// The local address it is bound to.
    pub address: IpAddr,
    /// The local port.
    pub port: u16,
    /// The socket's owner uid.
    pub uid: u32,
    /// `None` when the owning process could not be found (e.g. another user's process, not root).
    pub owner: Option<ProcessInfo>,
    /// When the daemon first saw it bound (Unix ms).
    pub since_ms: u64,
}

/// A port reserved for someone: by `Allocate`, or a claim taken by `ResolveBind` for the asking process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "LeaseRecord", into = "LeaseRecord")]
pub struct Lease {
    /// `lease-N`: what `Release` takes.
    pub id: String,
    /// The port reserved.
    pub port: u16,
    /// The service type whose range the port was picked from.
    pub service_type: String,
    /// The user who took it: only that user or root may release it.
    pub owner_uid: u32,
    /// The process the lease lives with; `None` for a lease that lives by its TTL alone.
    pub process: Option<ProcessId>,
    /// The agent session it belongs to.
    pub instance_id: Option<String>,
    /// When it was taken (Unix ms).
    pub created_ms: u64,
    /// `None`: lives as long as its process.
    pub expires_ms: Option<u64>,
    /// Taken by `Allocate`, or a claim taken by `ResolveBind`.
    pub kind: LeaseKind,
}

/// How a lease came to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseKind {
    /// Reserved by `Allocate`.
    Allocated,
    /// Taken by `ResolveBind` for a bind about to happen (or held for a session between two
    /// lives of its server, with no process).
    Claim {
        /// For a claim made by a move: the port the process asked for, so a second bind of that
        /// port by the same process (IPv4 then IPv6) moves to the same new port.
        asked: Option<u16>,
        /// The protocol of the bind it was taken for (`None` for claims saved before protocols
        /// were recorded).
        protocol: Option<Protocol>,
    },
}

impl Lease {
    /// Whether `ResolveBind` took it (not `Allocate`).
    pub fn is_claim(&self) -> bool {
        matches!(self.kind, LeaseKind::Claim { .. })
    }

    /// For a claim made by a move: the port the process asked for.
    pub fn asked(&self) -> Option<u16> {
        match self.kind {
            LeaseKind::Claim { asked, .. } => asked,
            LeaseKind::Allocated => None,
        }
    }

    /// For a claim: the protocol of its bind, when recorded.
    pub fn protocol(&self) -> Option<Protocol> {
        match self.kind {
            LeaseKind::Claim { protocol, .. } => protocol,
            LeaseKind::Allocated => None,
        }
    }
}

/// A lease as the state dir and the journal have always held it (flags rather than a kind), so
/// state written by any daemon reads back.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct LeaseRecord {
    id: String,
    port: u16,
    service_type: String,
    owner_uid: u32,
    process: Option<ProcessId>,
    instance_id: Option<String>,
    created_ms: u64,
    expires_ms: Option<u64>,
    claim: bool,
    requested_port: Option<u16>,
    #[serde(default)]
    protocol: Option<Protocol>,
}

impl From<LeaseRecord> for Lease {
    fn from(r: LeaseRecord) -> Lease {
        Lease {
            id: r.id,
            port: r.port,
            service_type: r.service_type,
            owner_uid: r.owner_uid,
            process: r.process,
            instance_id: r.instance_id,
            created_ms: r.created_ms,
            expires_ms: r.expires_ms,
            kind: if r.claim {
                LeaseKind::Claim {
                    asked: r.requested_port,
                    protocol: r.protocol,
                }
            } else {
                LeaseKind::Allocated
            },
        }
    }
}

impl From<Lease> for LeaseRecord {
    fn from(l: Lease) -> LeaseRecord {
        let (claim, requested_port, protocol) = match l.kind {
            LeaseKind::Allocated => (false, None, None),
            LeaseKind::Claim { asked, protocol } => (true, asked, protocol),
        };
        LeaseRecord {
            id: l.id,
            port: l.port,
            service_type: l.service_type,
            owner_uid: l.owner_uid,
            process: l.process,
            instance_id: l.instance_id,
            created_ms: l.created_ms,
            expires_ms: l.expires_ms,
            claim,
            requested_port,
            protocol,
        }
    }
}

/// A named group of processes (an agent session, or `ldpreload-<pid>-<start time>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// The id (`claude-<session>`, `ldpreload-<pid>-<start time>`, …).
    pub id: String,
    /// The process the instance lives with.
    pub process: ProcessId,
    /// When it was registered (Unix ms).
    pub registered_ms: u64,
    /// The uid that registered it first: only that user (or root) may register it again.
    #[serde(default)]
    pub owner_uid: u32,
    /// Every process registered with it that may still run, `process` (the newest) last: the
    /// session lives while any of them does, and a restarted daemon puts each back in the kernel.
    /// At most [`INSTANCE_PROCESSES_MAX`], the oldest dropped first.
    #[serde(default)]
    pub placed: Vec<ProcessId>,
    /// The project (git worktree root, else working directory) of the process that registered
    /// it first: the session's name comes from it (see `names`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// The name its user gave it (`styxy run --name`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// When it was first registered (Unix ms); 0 in instances saved before it was kept.
    #[serde(default)]
    pub first_registered_ms: u64,
    /// The users who gave this session the focus (see `focus`): their processes outside every
    /// session reach its servers at the ports they asked for. A user focuses one session at a
    /// time; the focus ends with the session.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub focused_by: Vec<u32>,
}

/// Processes an instance remembers (see [`Instance::placed`]).
pub const INSTANCE_PROCESSES_MAX: usize = 64;

impl Instance {
    /// When it was first registered (its registration, for instances saved before that was kept).
    pub fn since_ms(&self) -> u64 {
        if self.first_registered_ms == 0 {
            self.registered_ms
        } else {
            self.first_registered_ms
        }
    }

    /// Its processes that may still run: `placed`, or `process` alone for an instance saved
    /// before `placed` was kept.
    pub fn processes(&self) -> impl Iterator<Item = ProcessId> + '_ {
        let only = self.placed.is_empty().then_some(self.process);
        self.placed.iter().copied().chain(only)
    }
}

/// What an observer reports. Both eBPF and the socket-table scanner produce these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortEvent {
    /// A socket was bound.
    Bound(BoundSocket),
    /// A socket was released.
    Released {
        /// The released socket's cookie.
        cookie: u64,
    },
    /// A socket was bound on another port than its process asked for: the kernel's bind program
    /// moved it (a process of a kernel session asking for a taken port).
    MovedByKernel {
        /// The socket, on the port it got.
        socket: BoundSocket,
        /// The port its process asked for.
        asked: u16,
        /// The kernel session (instance) of the process.
        instance_id: String,
        /// The process's project (git worktree root, else working directory): the move is
        /// remembered as a sticky port of it.
        project: Option<String>,
    },
}

/// What happened, for `Watch` subscribers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// A socket was bound.
    Bound(crate::Held),
    /// A socket was released.
    Released(crate::Held),
    /// A bind was moved.
    Reassigned(AuditRecord),
    /// A lease or claim was taken.
    Leased(Lease),
    /// A lease or claim ended.
    LeaseEnded(Lease),
}

/// One reassigned bind, as written to the audit log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When (Unix ms).
    pub at_ms: u64,
    /// The process whose bind was moved.
    pub pid: u32,
    /// Its `comm`.
    pub comm: String,
    /// Its user.
    pub uid: u32,
    /// The port it asked for.
    pub requested_port: u16,
    /// The port it got.
    pub assigned_port: u16,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The service type of the range it moved within.
    pub service_type: String,
    /// The process holding the asked port, when known.
    pub holder_pid: Option<u32>,
    /// That process's `comm`, when known.
    pub holder_comm: Option<String>,
    /// That process's command line, when known (not in records written before it was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder_cmdline: Option<String>,
    /// The agent session the holder belongs to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder_instance_id: Option<String>,
    /// The agent session of the moved process.
    pub instance_id: Option<String>,
}

/// A change to the persistent state, in the order the broker made it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum StateChange {
    /// A lease or claim was taken or changed.
    PutLease {
        /// The lease as it now is.
        lease: Lease,
    },
    /// A lease or claim ended.
    RemoveLease {
        /// Its id.
        id: String,
    },
    /// An instance was registered.
    PutInstance {
        /// The instance.
        instance: Instance,
    },
    /// An instance ended.
    RemoveInstance {
        /// Its id.
        id: String,
    },
    /// An identity got a port (a sticky port, remembered or refreshed).
    PutSticky {
        /// The entry as it now is.
        sticky: crate::StickyPort,
    },
    /// A sticky port was forgotten.
    RemoveSticky {
        /// Whose.
        key: crate::StickyKey,
    },
}

/// Everything a mutating broker call did, for the I/O layer to persist, publish and audit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// What to persist, in order.
    pub changes: Vec<StateChange>,
    /// What to tell `Watch` subscribers and the audit log.
    pub notices: Vec<Notice>,
}

impl Effects {
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.notices.is_empty()
    }

    /// Appends `other`'s changes and notices after this one's.
    pub fn extend(&mut self, other: Effects) {
        self.changes.extend(other.changes);
        self.notices.extend(other.notices);
    }

    pub(crate) fn lease_put(&mut self, lease: &Lease) {
        self.changes.push(StateChange::PutLease {
            lease: lease.clone(),
        });
        self.notices.push(Notice::Leased(lease.clone()));
    }

    pub(crate) fn lease_removed(&mut self, lease: Lease) {
        self.changes.push(StateChange::RemoveLease {
            id: lease.id.clone(),
        });
        self.notices.push(Notice::LeaseEnded(lease));
    }
}

/// Who is calling, as the transport identified them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The caller's user.
    pub uid: u32,
    /// The caller's process, when the transport tells it.
    pub pid: Option<u32>,
}

impl Caller {
    /// Whether the caller is root (uid 0), who may act for anyone.
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
}

/// The I/O-free view of processes the broker needs: whether a process still runs, and its ancestors.
/// The daemon reads `/proc`; tests pass a table.
pub trait ProcessView {
    /// Whether the process is still running (same pid, same start time).
    fn is_alive(&self, id: ProcessId) -> bool;
    /// The process's ancestors, parent first, as far as they can be read.
    fn ancestors(&self, pid: u32) -> Vec<ProcessId>;
}
