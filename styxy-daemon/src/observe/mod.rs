//! The kernel's socket tables, read: [`KernelTables`] (netlink sock_diag, each socket with its
//! process) for the engine's point checks before it calls a port free and for the socket-table
//! observer's full readings (`daemon::observers`, at a fixed interval, reconciled into the broker,
//! which turns differences into bind and release notices). [`PortCounts`] is the faster answer
//! the eBPF side gives instead (`bpf::counts`), where it runs.

pub mod sockets;

use std::collections::HashSet;
use std::io;
use std::sync::Mutex;

use styxy_broker::{BoundSocket, Protocol};

/// Per-port socket counts kept by the kernel as binds happen (the eBPF observer's `PORTS` map),
/// when they cover the whole machine: they answer "is anything bound on this port right now"
/// without a socket-table dump.
pub trait PortCounts: Send + Sync {
    /// Sockets bound on `port` for `protocol` (TCP and UDP together when `None`); `None` when the
    /// counts cannot be read.
    fn bound(&self, port: u16, protocol: Option<Protocol>) -> Option<u64>;
}
use crate::procs::{self, SocketOwners};
use sockets::{KernelSocket, SockDiag};

/// The kernel's socket tables with each socket's owning process.
#[derive(Default)]
pub struct KernelTables {
    /// Idle netlink connections, reused across calls (one per concurrent caller at most).
    pool: Mutex<Vec<SockDiag>>,
    owners: Mutex<SocketOwners>,
}

impl KernelTables {
    pub fn new() -> Self {
        Self::default()
    }

    fn query(
        &self,
        port: Option<u16>,
        protocol: Option<Protocol>,
    ) -> io::Result<Vec<KernelSocket>> {
        let pooled = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut diag = match pooled {
            Some(d) => d,
            None => SockDiag::new()?,
        };
        let result = diag.bound_sockets(port, protocol);
        if result.is_ok() {
            self.pool
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(diag);
        }
        result
    }

    fn lock_owners(&self) -> std::sync::MutexGuard<'_, procs::SocketOwners> {
        self.owners.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bound sockets on one port (or all ports), with their owners found in `/proc`.
    pub fn read(
        &self,
        port: Option<u16>,
        protocol: Option<Protocol>,
    ) -> io::Result<Vec<BoundSocket>> {
        let raw = self.query(port, protocol)?;
        let inodes: Vec<u64> = raw.iter().map(|s| s.inode).collect();
        // The /proc scan runs without the lock, so a point check never waits behind a full scan.
        let missing = self.lock_owners().missing(&inodes);
        let scanned = (!missing.is_empty())
            .then(|| procs::find_owners(&missing, &sockets::owners_uids(&raw)));
        let mut owners = self.lock_owners();
        if let Some(scanned) = scanned {
            owners.learn(scanned);
        }
        let found = owners.owners(&inodes);
        if port.is_none() && protocol.is_none() {
            owners.retain(&inodes.iter().copied().collect::<HashSet<_>>());
        }
        drop(owners);
        Ok(raw
            .into_iter()
            .map(|s| BoundSocket {
                cookie: s.cookie,
                protocol: s.protocol,
                family: s.family,
                address: s.address,
                port: s.port,
                uid: s.uid,
                owner: found.get(&s.inode).cloned(),
                since_ms: 0,
            })
            .collect())
    }
}
