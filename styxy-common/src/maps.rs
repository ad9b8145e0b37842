//! The kernel contract: every map the programs of `styxy-ebpf` share with the daemon, defined
//! once — its name, kind, key and value sizes, capacity and flags. The record and key layouts
//! live in [`event`](crate::event) (observing) and [`session`](crate::session) (kernel
//! sessions); the capacities are constants here or there, taken by the kernel crate for its
//! map definitions. A map's name in the object is its static's identifier in the kernel crate
//! (Rust cannot take it from a constant), so the names are checked instead: the daemon takes
//! maps out of the object by [`MapSpec::name`], and a test reads the built object and checks
//! every map against [`MAPS`], and that the object holds no other
//! (`tests/tests/kernel_contract.rs`).

use core::mem::size_of;

use crate::event::{
    BindEvent, BoundRecord, BOUND_MAP, CONFIG_MAP, DROPPED_MAP, EVENTS_MAP, EVENTS_RING_BYTES,
    PORTS_MAP, PORT_SLOTS, REQUESTED_MAP,
};
use crate::protection::{REFUSALS_MAP, REFUSALS_RING_BYTES};
use crate::session::{
    Member, MoveKey, Requested, ReverseKey, StickyKey, ViewKey, FOCUSING_LEN, FOCUSING_MAP,
    FOCUS_MAP, FOCUS_MAX, MOVES_MAP, MOVES_MAX, PORT_INFO_MAP, READER_MAP, REVERSE_MAP,
    REVERSE_MAX, SESSIONS_MAP, SESSIONS_MAX, SPARES_LEN, SPARES_MAP, STICKY_MAP, STICKY_MAX,
    VIEWS_MAP, VIEWS_MAX,
};

/// `BPF_F_MMAPABLE`: an array the daemon maps into its memory.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

pub const UNREPORTED_MAP: &str = "UNREPORTED";
pub const REWRITES_MAP: &str = "REWRITES";
pub const LAST_BINDER_MAP: &str = "LAST_BINDER";
/// The proxy's spliced tunnels: each socket under its peer's cookie (see `styxy-ebpf`'s
/// `splicing`).
pub const SPLICED_MAP: &str = "SPLICED";
/// Entries of `SPLICED`: two per spliced tunnel.
pub const SPLICED_MAX: u32 = 8_192;

/// Entries of `REQUESTED` (moved binds between bind4|6 and post_bind4|6).
pub const REQUESTED_MAX: u32 = 16_384;
/// Entries of `BOUND` (one per bound socket the programs track).
pub const BOUND_MAX: u32 = 65_536;
/// Entries of `PORT_INFO`: one per port.
pub const PORT_INFO_LEN: u32 = 65_536;

/// The kernel's kind of map (`enum bpf_map_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    Hash = 1,
    Array = 2,
    PerCpuArray = 6,
    LruHash = 9,
    SockHash = 18,
    RingBuf = 27,
}

/// One map of the contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    pub name: &'static str,
    pub kind: MapKind,
    pub key_size: u32,
    pub value_size: u32,
    /// Entries; for a ring buffer, its size in bytes.
    pub max_entries: u32,
    pub flags: u32,
}

const fn spec<K, V>(name: &'static str, kind: MapKind, max_entries: u32, flags: u32) -> MapSpec {
    MapSpec {
        name,
        kind,
        key_size: size_of::<K>() as u32,
        value_size: size_of::<V>() as u32,
        max_entries,
        flags,
    }
}

/// Every map the kernel programs and the daemon share.
pub const MAPS: &[MapSpec] = &[
    // Observing: every bind and release on the machine.
    MapSpec {
        name: EVENTS_MAP,
        kind: MapKind::RingBuf,
        key_size: 0,
        value_size: 0,
        max_entries: EVENTS_RING_BYTES,
        flags: 0,
    },
    spec::<u32, u64>(DROPPED_MAP, MapKind::PerCpuArray, 1, 0),
    spec::<u32, u64>(UNREPORTED_MAP, MapKind::PerCpuArray, 1, 0),
    spec::<u32, u64>(CONFIG_MAP, MapKind::Array, 1, 0),
    spec::<u32, u32>(READER_MAP, MapKind::Array, 1, BPF_F_MMAPABLE),
    spec::<u32, u64>(PORTS_MAP, MapKind::Array, PORT_SLOTS, BPF_F_MMAPABLE),
    spec::<u32, u32>(LAST_BINDER_MAP, MapKind::Array, PORT_SLOTS, 0),
    spec::<u64, BoundRecord>(BOUND_MAP, MapKind::LruHash, BOUND_MAX, 0),
    // Moving a session's binds.
    spec::<u64, Requested>(REQUESTED_MAP, MapKind::LruHash, REQUESTED_MAX, 0),
    spec::<u32, u64>(REWRITES_MAP, MapKind::Array, 1, 0),
    spec::<u32, Member>(SESSIONS_MAP, MapKind::Hash, SESSIONS_MAX, 0),
    spec::<u32, u64>(PORT_INFO_MAP, MapKind::Array, PORT_INFO_LEN, BPF_F_MMAPABLE),
    spec::<u32, u32>(SPARES_MAP, MapKind::Array, SPARES_LEN, BPF_F_MMAPABLE),
    spec::<MoveKey, u32>(MOVES_MAP, MapKind::LruHash, MOVES_MAX, 0),
    spec::<StickyKey, u32>(STICKY_MAP, MapKind::Hash, STICKY_MAX, 0),
    // The sessions' views.
    spec::<ViewKey, u32>(VIEWS_MAP, MapKind::Hash, VIEWS_MAX, 0),
    spec::<ReverseKey, u32>(REVERSE_MAP, MapKind::LruHash, REVERSE_MAX, 0),
    // The users' focus (`styxy focus`).
    spec::<u32, u32>(FOCUS_MAP, MapKind::Hash, FOCUS_MAX, 0),
    spec::<u32, u32>(FOCUSING_MAP, MapKind::Array, FOCUSING_LEN, 0),
    // The names' proxy's WebSocket tunnels, spliced in the kernel: socket cookie → the peer's
    // socket (its fd on update).
    spec::<u64, u32>(SPLICED_MAP, MapKind::SockHash, SPLICED_MAX, 0),
    // Signals refused between sessions (`lsm/task_kill`).
    MapSpec {
        name: REFUSALS_MAP,
        kind: MapKind::RingBuf,
        key_size: 0,
        value_size: 0,
        max_entries: REFUSALS_RING_BYTES,
        flags: 0,
    },
];

/// The contract's entry for the map called `name`.
pub fn spec_of(name: &str) -> Option<&'static MapSpec> {
    MAPS.iter().find(|m| m.name == name)
}

// The ring carries whole records.
const _: () = assert!(EVENTS_RING_BYTES as usize > 8 + BindEvent::SIZE);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_map_is_in_the_contract_once() {
        for (i, map) in MAPS.iter().enumerate() {
            assert!(
                MAPS.iter().skip(i + 1).all(|other| other.name != map.name),
                "{} twice",
                map.name
            );
            assert_eq!(spec_of(map.name), Some(map));
        }
        assert_eq!(spec_of("NO_SUCH_MAP"), None);
    }
}
