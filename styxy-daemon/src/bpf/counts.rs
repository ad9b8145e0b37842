//! The kernel's per-port socket counts (`PORTS`), read from the daemon's own memory: "is anything
//! bound on this port right now" without a socket-table dump.

use std::sync::atomic::{AtomicU64, Ordering};

use styxy_broker::Protocol;
use styxy_common::event::{port_slot, IPPROTO_TCP, IPPROTO_UDP};

use super::mapped::MappedArray;
use crate::observe::PortCounts;

/// The kernel's `PORTS` counts, mapped into memory: a read is a load, no syscall. The daemon adds
/// the sockets bound before the programs attached (whose release the kernel then counts down),
/// so the counts are every socket bound now, for the programs as for the daemon. Any error in
/// them leans to "bound" (a socket counted twice), never to "free": the engine then reads the
/// socket tables, as without counts.
pub struct KernelPortCounts {
    pub(super) mapped: MappedArray<AtomicU64>,
    /// Ports the programs do not count one by one: ephemeral ports (`ip_local_port_range`)
    /// outside every service range, whose binds are counted only in `UNREPORTED`.
    uncounted: Vec<bool>,
}

impl KernelPortCounts {
    pub(super) fn new(
        mapped: MappedArray<AtomicU64>,
        ranges: &[(u16, u16)],
        (low, high): (u16, u16),
    ) -> KernelPortCounts {
        let uncounted = (0..=u16::MAX)
            .map(|port| {
                (low..=high).contains(&port)
                    && !ranges
                        .iter()
                        .any(|(start, end)| (*start..=*end).contains(&port))
            })
            .collect();
        KernelPortCounts { mapped, uncounted }
    }

    fn slot(&self, protocol: u8, port: u16) -> u64 {
        self.mapped
            .slot(port_slot(protocol, port) as usize)
            .load(Ordering::Relaxed)
    }
}

impl PortCounts for KernelPortCounts {
    fn bound(&self, port: u16, protocol: Option<Protocol>) -> Option<u64> {
        if self.uncounted[usize::from(port)] {
            return None;
        }
        let tcp = || self.slot(IPPROTO_TCP, port);
        let udp = || self.slot(IPPROTO_UDP, port);
        Some(match protocol {
            Some(Protocol::Tcp) => tcp(),
            Some(Protocol::Udp) => udp(),
            None => tcp().wrapping_add(udp()),
        })
    }
}
