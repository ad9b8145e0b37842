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
    pub pid: u32,
    pub start_time: u64,
}

/// What is known of a process that holds a socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessInfo {
    pub id: ProcessId,
    pub comm: String,
    pub cmdline: String,
}

/// A socket bound in the kernel, as an observer saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundSocket {
    /// The kernel's socket cookie: the same value in sock_diag answers and in eBPF programs.
    pub cookie: u64,
    pub protocol: Protocol,
    pub family: Family,
    pub address: IpAddr,
    pub port: u16,
    pub uid: u32,
    /// `None` when the owning process could not be found (e.g. another user's process, not root).
    pub owner: Option<ProcessInfo>,
    pub since_ms: u64,
}

/// A port reserved for someone: by `Allocate`, or a claim taken by `ResolveBind` for the asking process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub id: String,
    pub port: u16,
    pub service_type: String,
    pub owner_uid: u32,
    /// The process the lease lives with; `None` for a lease that lives by its TTL alone.
    pub process: Option<ProcessId>,
    pub instance_id: Option<String>,
    pub created_ms: u64,
    /// `None`: lives as long as its process.
    pub expires_ms: Option<u64>,
    /// A claim taken by ResolveBind (as opposed to an Allocate lease).
    pub claim: bool,
    /// For a claim made by a move: the port the process asked for, so a second bind of that port by the same
    /// process (IPv4 then IPv6) moves to the same new port.
    pub requested_port: Option<u16>,
}

/// A named group of processes (an agent session, or `ldpreload-<pid>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub id: String,
    pub process: ProcessId,
    pub registered_ms: u64,
}

/// What an observer reports. Both eBPF and the socket-table scanner produce these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortEvent {
    Bound(BoundSocket),
    Released { cookie: u64 },
}

/// What happened, for `Watch` subscribers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    Bound(crate::Held),
    Released(crate::Held),
    Reassigned(AuditRecord),
    Leased(Lease),
    LeaseEnded(Lease),
}

/// One reassigned bind, as written to the audit log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub at_ms: u64,
    pub pid: u32,
    pub comm: String,
    pub uid: u32,
    pub requested_port: u16,
    pub assigned_port: u16,
    pub protocol: Protocol,
    pub service_type: String,
    pub holder_pid: Option<u32>,
    pub holder_comm: Option<String>,
    pub instance_id: Option<String>,
}

/// A change to the persistent state, in the order the broker made it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum StateChange {
    PutLease { lease: Lease },
    RemoveLease { id: String },
    PutInstance { instance: Instance },
    RemoveInstance { id: String },
}

/// Everything a mutating broker call did, for the I/O layer to persist, publish and audit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Effects {
    pub changes: Vec<StateChange>,
    pub notices: Vec<Notice>,
}

impl Effects {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.notices.is_empty()
    }

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
    pub uid: u32,
    pub pid: Option<u32>,
}

impl Caller {
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
}

/// The I/O-free view of processes the broker needs: whether a process still runs, and its ancestors.
/// The daemon reads `/proc`; tests pass a table.
pub trait ProcessView {
    fn is_alive(&self, id: ProcessId) -> bool;
    /// The process's ancestors, parent first, as far as they can be read.
    fn ancestors(&self, pid: u32) -> Vec<ProcessId>;
}
