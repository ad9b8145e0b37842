//! The kernel side of the contract (`styxy_common::maps`): every map the programs share with the
//! daemon, with the few atomic updates made on them from several programs.

use aya_ebpf::macros::map;
use aya_ebpf::maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, SockHash};
use styxy_common::event::{port_slot, BoundRecord, EVENTS_RING_BYTES, PORT_SLOTS};
use styxy_common::maps::{BOUND_MAX, PORT_INFO_LEN, REQUESTED_MAX, SPLICED_MAX};
use styxy_common::protection::REFUSALS_RING_BYTES;
use styxy_common::session::{
    Member, MoveKey, Requested, ReverseKey, StickyKey, ViewKey, FOCUSING_LEN, FOCUS_MAX, MOVES_MAX,
    REVERSE_MAX, SESSIONS_MAX, SPARES_LEN, STICKY_MAX, VIEWS_MAX,
};

/// The kernel's `BPF_F_MMAPABLE`: the daemon maps these arrays into its memory.
const BPF_F_MMAPABLE: u32 = aya_ebpf::bindings::BPF_F_MMAPABLE;
const _: () = assert!(BPF_F_MMAPABLE == styxy_common::maps::BPF_F_MMAPABLE);

/// Bind and release records for the daemon.
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

/// Records that did not fit in `EVENTS`, per CPU (index 0).
#[map]
pub(crate) static DROPPED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Binds of ephemeral ports outside every service range (see `counted_only`), per CPU (index
/// 0): not reported one by one; the daemon reads the socket tables when this moves.
#[map]
pub(crate) static UNREPORTED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Settings the daemon writes after loading (see `styxy_common::event::CONFIG_MAP`).
#[map]
pub(crate) static CONFIG: Array<u64> = Array::with_max_entries(1, 0);

/// `READER[0]`: whether the daemon's reader sleeps (see `styxy_common::session`).
#[map]
pub(crate) static READER: Array<u32> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// What bind4/6 saw of a bind it moved, by socket cookie, until post_bind4/6 picks it up (or
/// sock_release, when the moved bind failed).
#[map]
pub(crate) static REQUESTED: LruHashMap<u64, Requested> =
    LruHashMap::with_max_entries(REQUESTED_MAX, 0);

/// `REWRITES[0]`: how many `REQUESTED` entries may be waiting. While none, post_bind and
/// sock_release skip the lookup: every other bind on the machine pays nothing for moves. (An
/// entry the LRU evicts leaves it counted: those lookups then simply find nothing.)
#[map]
pub(crate) static REWRITES: Array<u64> = Array::with_max_entries(1, 0);

/// Adds `delta` (wrapping) to `REWRITES[0]`.
#[inline(always)]
pub(crate) fn count_rewrites(delta: u64) {
    if let Some(slot) = REWRITES.get_ptr_mut(0) {
        // SAFETY: a map value slot, valid and aligned for a u64; every CPU adds atomically.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                slot, delta,
            );
        }
    }
}

/// The `REQUESTED` entry of socket `cookie`, removed, if bind4/6 moved that socket's bind.
#[inline(always)]
pub(crate) fn take_requested(cookie: u64) -> Option<Requested> {
    if REWRITES.get(0).copied().unwrap_or(0) == 0 {
        return None;
    }
    // SAFETY: plain data copied out before the entry is removed.
    let requested = unsafe { REQUESTED.get(cookie) }.copied()?;
    if REQUESTED.remove(cookie).is_ok() {
        count_rewrites(u64::MAX); // - 1, wrapping
    }
    Some(requested)
}

/// Sockets bound per (protocol, port) slot (see `port_slot`), counted up by post_bind and down by
/// sock_release; the daemon adds the sockets bound before it attached. Updated before `bind()`
/// returns, so "is this port bound right now" is one lookup, here and in the daemon.
#[map]
pub(crate) static PORTS: Array<u64> = Array::with_max_entries(PORT_SLOTS, BPF_F_MMAPABLE);

/// The process that bound each slot last: a process binding a port it holds itself (IPv4 next
/// to IPv6) is not in conflict with itself.
#[map]
pub(crate) static LAST_BINDER: Array<u32> = Array::with_max_entries(PORT_SLOTS, 0);

/// What post_bind saw, by socket cookie, so sock_release can report the port.
#[map]
pub(crate) static BOUND: LruHashMap<u64, BoundRecord> = LruHashMap::with_max_entries(BOUND_MAX, 0);

/// Task id → membership, for every process and thread of a kernel session.
#[map]
pub(crate) static SESSIONS: HashMap<u32, Member> = HashMap::with_max_entries(SESSIONS_MAX, 0);

/// Per port: who holds a lease or claim on it, and its service range (daemon-written).
#[map]
pub(crate) static PORT_INFO: Array<u64> = Array::with_max_entries(PORT_INFO_LEN, BPF_F_MMAPABLE);

/// Free ports per range, taken by the bind programs and refilled by the daemon.
#[map]
pub(crate) static SPARES: Array<u32> = Array::with_max_entries(SPARES_LEN, BPF_F_MMAPABLE);

/// A process's earlier moves, so its other binds of the same port go to the same new port.
#[map]
pub(crate) static MOVES: LruHashMap<MoveKey, u32> = LruHashMap::with_max_entries(MOVES_MAX, 0);

/// The sessions' views: (session, protocol, asked port) → bound port.
#[map]
pub(crate) static VIEWS: HashMap<ViewKey, u32> = HashMap::with_max_entries(VIEWS_MAX, 0);

/// (session, asked port) → the port the session's project got before (see `StickyKey`).
#[map]
pub(crate) static STICKY: HashMap<StickyKey, u32> = HashMap::with_max_entries(STICKY_MAX, 0);

/// (socket, real port) → asked port, for the sockets connect/sendmsg redirected.
#[map]
pub(crate) static REVERSE: LruHashMap<ReverseKey, u32> =
    LruHashMap::with_max_entries(REVERSE_MAX, 0);

/// uid → the session whose view that user's processes outside every session follow.
#[map]
pub(crate) static FOCUS: HashMap<u32, u32> = HashMap::with_max_entries(FOCUS_MAX, 0);

/// `FOCUSING[FOCUSING_COUNT]`: how many entries `FOCUS` holds (daemon-written). While none,
/// traffic outside the sessions is looked at no further: the machine pays one array read per
/// connect for the focus. `FOCUSING[FOCUSING_DAEMON]`: the daemon's process, which never follows
/// a focus (its proxy reaches each server by its real port).
#[map]
pub(crate) static FOCUSING: Array<u32> = Array::with_max_entries(FOCUSING_LEN, 0);

/// Signals `lsm/task_kill` refused between sessions, for the daemon (see
/// `styxy_common::protection`).
#[map]
pub(crate) static REFUSALS: RingBuf = RingBuf::with_byte_size(REFUSALS_RING_BYTES, 0);

/// Atomically adds `delta` (wrapping) to a `PORTS` slot.
#[inline(always)]
pub(crate) fn count_port(protocol: u8, port: u16, delta: u64) {
    if let Some(slot) = PORTS.get_ptr_mut(port_slot(protocol, port)) {
        // SAFETY: the pointer is the map's value slot, valid and aligned for a u64; other CPUs
        // and the daemon touch it only through atomic operations too.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                slot, delta,
            );
        }
    }
}

/// The names' proxy's spliced tunnels: each socket under its peer's cookie (see `splicing`).
#[map]
pub(crate) static SPLICED: SockHash<u64> = SockHash::with_max_entries(SPLICED_MAX, 0);
