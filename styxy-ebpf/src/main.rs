//! Styxy's kernel side: observers on a cgroup v2 directory that report every bind and release.
//!
//! - `cgroup/bind4|6` (sock_addr) sees the port a program asks for, before the kernel acts, and
//!   remembers it by socket cookie.
//! - `cgroup/post_bind4|6` (sock) sees the port actually bound (the ephemeral one for port 0) and
//!   pushes a [`BindEvent`] of kind `KIND_BOUND` into the `EVENTS` ring buffer.
//! - `cgroup/sock_release` (sock) pushes `KIND_RELEASED` for sockets a post_bind program saw (the
//!   kernel does not let this hook read the port, so it comes from the `BOUND` map).
//!
//! Every program returns 1 (allow): they observe and never deny a bind. A record that does not fit
//! in the ring buffer is counted in `DROPPED`; the daemon then resyncs from the socket tables.
//! Room is kept for the later in-kernel rewrite step: a bind program may write `user_port` for
//! managed cgroups, and the record has a `rewritten_port` field for that.
#![no_std]
#![no_main]
// BPF has a 64-bit atomic add, but core's atomics offer no read-modify-write on this target:
// the intrinsic emits the instruction directly. (Built with Debian's rustc and RUSTC_BOOTSTRAP.)
#![allow(internal_features)]
#![feature(core_intrinsics)]

use aya_ebpf::bindings::{bpf_sock, bpf_sock_addr};
use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_get_netns_cookie,
    bpf_get_socket_cookie, bpf_ktime_get_ns,
};
use aya_ebpf::macros::{cgroup_sock, cgroup_sock_addr, map};
use aya_ebpf::maps::{Array, LruHashMap, PerCpuArray, RingBuf};
use aya_ebpf::programs::{SockAddrContext, SockContext};
use styxy_common::event::{
    port_slot, BindEvent, BoundRecord, AF_INET, AF_INET6, CONFIG_NETNS_COOKIE, EVENTS_RING_BYTES,
    IPPROTO_TCP, IPPROTO_UDP, KIND_BOUND, KIND_RELEASED, PORT_SLOTS,
};

/// Allow the operation (cgroup sock and sock_addr programs).
const ALLOW: i32 = 1;

/// Bind and release records for the daemon.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

/// Records that did not fit in `EVENTS`, per CPU (index 0).
#[map]
static DROPPED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Settings the daemon writes after loading (see `styxy_common::event::CONFIG_MAP`).
#[map]
static CONFIG: Array<u64> = Array::with_max_entries(1, 0);

/// Whether the socket is in the daemon's network namespace (always true before it says which).
#[inline(always)]
fn in_daemons_netns(ctx: *mut core::ffi::c_void) -> bool {
    let wanted = CONFIG.get(CONFIG_NETNS_COOKIE).copied().unwrap_or(0);
    // SAFETY: the helper accepts sock and sock_addr contexts.
    wanted == 0 || unsafe { bpf_get_netns_cookie(ctx) } == wanted
}

/// Port asked for, by socket cookie, from bind4/6 until post_bind4/6 picks it up.
#[map]
static REQUESTED: LruHashMap<u64, u16> = LruHashMap::with_max_entries(16384, 0);

/// Sockets bound per (protocol, port) slot (see `port_slot`), counted up by post_bind and down by
/// sock_release for the sockets post_bind saw. Updated before `bind()` returns, so the daemon can
/// answer "is this port bound right now" with one lookup instead of a socket-table dump.
#[map]
static PORTS: Array<u64> = Array::with_max_entries(PORT_SLOTS, BPF_F_MMAPABLE);

/// The daemon maps `PORTS` into its memory and reads the counts without a syscall.
const BPF_F_MMAPABLE: u32 = aya_ebpf::bindings::BPF_F_MMAPABLE;

/// Atomically adds `delta` (wrapping) to a `PORTS` slot.
#[inline(always)]
fn count_port(protocol: u8, port: u16, delta: u64) {
    if let Some(slot) = PORTS.get_ptr_mut(port_slot(protocol, port)) {
        // SAFETY: the pointer is the map's value slot, valid and aligned for a u64; other CPUs
        // touch it only through atomic operations too.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                slot, delta,
            );
        }
    }
}

/// What post_bind saw, by socket cookie, so sock_release can report the port.
#[map]
static BOUND: LruHashMap<u64, BoundRecord> = LruHashMap::with_max_entries(65536, 0);

#[cgroup_sock_addr(bind4)]
pub fn styxy_bind4(ctx: SockAddrContext) -> i32 {
    remember_requested_port(ctx.sock_addr);
    ALLOW
}

#[cgroup_sock_addr(bind6)]
pub fn styxy_bind6(ctx: SockAddrContext) -> i32 {
    remember_requested_port(ctx.sock_addr);
    ALLOW
}

#[cgroup_sock(post_bind4)]
pub fn styxy_post_bind4(ctx: SockContext) -> i32 {
    on_bound(ctx.sock, AF_INET);
    ALLOW
}

#[cgroup_sock(post_bind6)]
pub fn styxy_post_bind6(ctx: SockContext) -> i32 {
    on_bound(ctx.sock, AF_INET6);
    ALLOW
}

#[cgroup_sock(sock_release)]
pub fn styxy_sock_release(ctx: SockContext) -> i32 {
    on_release(ctx.sock);
    ALLOW
}

fn transport(protocol: u32) -> Option<u8> {
    match protocol {
        p if p == u32::from(IPPROTO_TCP) => Some(IPPROTO_TCP),
        p if p == u32::from(IPPROTO_UDP) => Some(IPPROTO_UDP),
        _ => None,
    }
}

#[inline(always)]
fn remember_requested_port(sock_addr: *mut bpf_sock_addr) {
    // SAFETY: the kernel hands a valid context; these fields are readable in bind4/6.
    let (protocol, user_port) = unsafe { ((*sock_addr).protocol, (*sock_addr).user_port) };
    if transport(protocol).is_none() || !in_daemons_netns(sock_addr.cast()) {
        return;
    }
    // user_port holds the port in network byte order in its low 16 bits.
    let port = u16::from_be(user_port as u16);
    if port == 0 {
        return;
    }
    // SAFETY: the helper accepts a sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(sock_addr.cast()) };
    let _ = REQUESTED.insert(cookie, port, 0);
}

#[inline(always)]
fn on_bound(sock: *mut bpf_sock, family: u8) {
    // SAFETY: the kernel hands a valid context; these fields are readable in post_bind4/6.
    let (protocol, port) = unsafe { ((*sock).protocol, (*sock).src_port) };
    let Some(protocol) = transport(protocol) else {
        return;
    };
    if !in_daemons_netns(sock.cast()) {
        return; // another network namespace: its ports are not the host's
    }
    // The verifier wants every context read at a constant offset from the context pointer:
    // one volatile load per word keeps the compiler from turning these into a pointer walk.
    let mut addr = [0u8; 16];
    if family == AF_INET {
        // SAFETY: src_ip4 is readable in post_bind4; it is in network byte order already.
        let ip4 = unsafe { core::ptr::read_volatile(&raw const (*sock).src_ip4) };
        addr[..4].copy_from_slice(&ip4.to_ne_bytes());
    } else {
        // SAFETY: src_ip6 is readable in post_bind6, word by word.
        let words = unsafe {
            [
                core::ptr::read_volatile(&raw const (*sock).src_ip6[0]),
                core::ptr::read_volatile(&raw const (*sock).src_ip6[1]),
                core::ptr::read_volatile(&raw const (*sock).src_ip6[2]),
                core::ptr::read_volatile(&raw const (*sock).src_ip6[3]),
            ]
        };
        addr[0..4].copy_from_slice(&words[0].to_ne_bytes());
        addr[4..8].copy_from_slice(&words[1].to_ne_bytes());
        addr[8..12].copy_from_slice(&words[2].to_ne_bytes());
        addr[12..16].copy_from_slice(&words[3].to_ne_bytes());
    }
    // SAFETY: the helper accepts a sock context.
    let cookie = unsafe { bpf_get_socket_cookie(sock.cast()) };
    // SAFETY: the value is a plain u16 copied out before the entry is removed.
    let requested = unsafe { REQUESTED.get(cookie) }.copied().unwrap_or(0);
    let _ = REQUESTED.remove(cookie);
    let port = port as u16; // host byte order
    let bound = BoundRecord {
        port,
        family,
        protocol,
        _pad: 0,
        addr,
    };
    let _ = BOUND.insert(cookie, bound, 0);
    count_port(protocol, port, 1);
    emit(KIND_BOUND, cookie, &bound, requested);
}

fn on_release(sock: *mut bpf_sock) {
    // SAFETY: the helper accepts a sock context.
    let cookie = unsafe { bpf_get_socket_cookie(sock.cast()) };
    // SAFETY: the value is plain data copied out before the entry is removed.
    let Some(bound) = (unsafe { BOUND.get(cookie) }).copied() else {
        return; // never seen bound by us (a client socket, or bound before we attached)
    };
    let _ = BOUND.remove(cookie);
    count_port(bound.protocol, bound.port, u64::MAX); // - 1, wrapping
    emit(KIND_RELEASED, cookie, &bound, 0);
}

fn emit(kind: u8, cookie: u64, bound: &BoundRecord, requested: u16) {
    let Some(mut entry) = EVENTS.reserve::<BindEvent>(0) else {
        if let Some(count) = DROPPED.get_ptr_mut(0) {
            // SAFETY: a per-CPU slot: no other program touches it concurrently.
            unsafe { *count += 1 };
        }
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let mut event = BindEvent::zeroed();
    // SAFETY: helpers with no preconditions in these program types.
    event.timestamp_ns = unsafe { bpf_ktime_get_ns() };
    event.cookie = cookie;
    event.tgid = (pid_tgid >> 32) as u32;
    event.uid = bpf_get_current_uid_gid() as u32;
    event.kind = kind;
    event.family = bound.family;
    event.protocol = bound.protocol;
    event.port = bound.port;
    event.requested_port = requested;
    event.addr = bound.addr;
    if let Ok(comm) = bpf_get_current_comm() {
        event.comm = comm;
    }
    entry.write(event);
    entry.submit(0);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this; it exists to satisfy no_std.
    loop {}
}
