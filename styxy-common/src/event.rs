//! The record the eBPF programs push through the ring buffer, one per bind or release.
//!
//! Fixed layout (`#[repr(C)]`, explicit padding, 72 bytes) so both sides read it the same way.
//! The daemon checks [`BindEvent::SIZE`] against what the ring buffer hands it.

/// `cgroup/post_bind4|6`: the socket is bound (the port actually bound, ephemeral included).
pub const KIND_BOUND: u8 = 2;
/// `cgroup/sock_release`: a bound socket is going away.
pub const KIND_RELEASED: u8 = 3;
/// No event: a record whose only purpose is to wake a reader that went to sleep just as a
/// record was submitted without a wake-up (see `session::READER_MAP`).
pub const KIND_WAKE: u8 = 4;

/// [`BindEvent::flags`]: the bind program moved this bind off `requested_port` (a kernel session).
pub const FLAG_REWRITTEN: u8 = 1;

pub use crate::net::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP};

/// Length of the kernel's task comm.
pub const COMM_LEN: usize = 16;

/// One bind-related event from the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindEvent {
    /// `bpf_ktime_get_ns()` when the program ran.
    pub timestamp_ns: u64,
    /// `bpf_get_socket_cookie()`: identifies the socket for its whole life.
    pub cookie: u64,
    /// Process id (kernel tgid).
    pub tgid: u32,
    pub uid: u32,
    /// One of `KIND_*`.
    pub kind: u8,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u8,
    /// [`IPPROTO_TCP`] or [`IPPROTO_UDP`] (0 when the kernel did not say).
    pub protocol: u8,
    /// `FLAG_*`.
    pub flags: u8,
    /// The port of the event, host byte order: bound port for [`KIND_BOUND`] and [`KIND_RELEASED`].
    pub port: u16,
    /// The port the program asked for, host byte order (0 when not known).
    pub requested_port: u16,
    /// Local address: IPv4 in the first 4 bytes, or IPv6 (network byte order).
    pub addr: [u8; 16],
    /// The task's comm, NUL-padded.
    pub comm: [u8; COMM_LEN],
    /// The kernel session of the binding process (0: none).
    pub session: u32,
    pub _pad: u32,
}

impl BindEvent {
    pub const SIZE: usize = core::mem::size_of::<BindEvent>();

    /// An all-zero record, for the eBPF side to fill in.
    pub const fn zeroed() -> Self {
        BindEvent {
            timestamp_ns: 0,
            cookie: 0,
            tgid: 0,
            uid: 0,
            kind: 0,
            family: 0,
            protocol: 0,
            flags: 0,
            port: 0,
            requested_port: 0,
            addr: [0; 16],
            comm: [0; COMM_LEN],
            session: 0,
            _pad: 0,
        }
    }

    /// Read a record from ring-buffer bytes; `None` when the length is wrong.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != Self::SIZE {
            return None;
        }
        // SAFETY: the length matches, BindEvent is plain old data (every bit pattern is valid),
        // and read_unaligned does not require the slice to be aligned.
        Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<BindEvent>()) })
    }

    /// The comm up to its first NUL.
    pub fn comm_bytes(&self) -> &[u8] {
        let end = self.comm.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
        &self.comm[..end]
    }
}

/// Value of the kernel side's `BOUND` map (key: socket cookie): what post_bind saw, so that
/// sock_release, which may not read the port, can report it. The daemon also fills it in for
/// sockets bound before it attached, so their release is reported too.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BoundRecord {
    /// Host byte order.
    pub port: u16,
    pub family: u8,
    pub protocol: u8,
    pub _pad: u32,
    /// As in [`BindEvent::addr`].
    pub addr: [u8; 16],
}

// SAFETY: BoundRecord is repr(C) plain data with explicit padding; any bit pattern is valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for BoundRecord {}

/// Slots of the kernel side's `PORTS` map: how many sockets the programs saw bound per
/// (protocol, port), kept in step synchronously by post_bind and sock_release.
pub const PORT_SLOTS: u32 = 2 * 65_536;

/// The `PORTS` slot of a port: TCP first, then UDP.
pub const fn port_slot(protocol: u8, port: u16) -> u32 {
    if protocol == IPPROTO_UDP {
        65_536 + port as u32
    } else {
        port as u32
    }
}

/// Names of the kernel side's maps (the whole contract, with sizes, is [`crate::maps::MAPS`]).
/// `CONFIG[0]`: the daemon's network namespace cookie; binds in other namespaces (containers) do
/// not touch the host's ports and are ignored. 0: no filter.
pub const CONFIG_MAP: &str = "CONFIG";
pub const CONFIG_NETNS_COOKIE: u32 = 0;
pub const PORTS_MAP: &str = "PORTS";
pub const EVENTS_MAP: &str = "EVENTS";
/// Size of the `EVENTS` ring buffer (a power of two, as the kernel requires): ~13,000 records,
/// some 300 ms of the bench's 20,000 binds a second with the reader stalled. The ring's pages are
/// all resident in the daemon (the data area is mapped twice, for records that wrap): 4 MiB made
/// 8 MiB of the daemon's 25 MB idle RSS, 1 MiB makes 2 MiB. What overflows is counted and resynced.
pub const EVENTS_RING_BYTES: u32 = 1 << 20;
/// Records a full `EVENTS` ring holds at least: each takes the kernel's 8-byte header plus the
/// record, rounded up to 8 bytes.
pub const EVENTS_RING_RECORDS: usize =
    EVENTS_RING_BYTES as usize / (8 + BindEvent::SIZE.next_multiple_of(8));
pub const DROPPED_MAP: &str = "DROPPED";
pub const BOUND_MAP: &str = "BOUND";

/// Program names (the functions' names in the object) and what they attach to.
pub const PROGRAMS_SOCK_ADDR: [&str; 2] = ["styxy_bind4", "styxy_bind6"];
/// The map the bind programs keep the asked port in, by socket cookie, until post_bind.
pub const REQUESTED_MAP: &str = "REQUESTED";
pub const PROGRAMS_SOCK: [&str; 3] = ["styxy_post_bind4", "styxy_post_bind6", "styxy_sock_release"];

// The layout is part of the ABI with the kernel programs: fail the build if it drifts.
const _: () = assert!(BindEvent::SIZE == 72);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_through_bytes() {
        let mut event = BindEvent::zeroed();
        event.kind = KIND_BOUND;
        event.port = 6006;
        event.tgid = 4121;
        event.comm[..4].copy_from_slice(b"node");
        // SAFETY: BindEvent is repr(C) plain data; viewing it as bytes is sound.
        let bytes = unsafe {
            core::slice::from_raw_parts((&event as *const BindEvent).cast::<u8>(), BindEvent::SIZE)
        };
        assert_eq!(BindEvent::from_bytes(bytes), Some(event));
        assert_eq!(event.comm_bytes(), b"node");
        assert_eq!(BindEvent::from_bytes(&bytes[1..]), None);
    }
}
