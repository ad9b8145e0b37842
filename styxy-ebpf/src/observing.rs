//! Observing every bind and release on the machine: post_bind4|6 and sock_release count each
//! port and push a record for the daemon into the `EVENTS` ring buffer.

use aya_ebpf::bindings::{bpf_sock, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP};
use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_get_socket_cookie,
    bpf_ktime_get_ns,
};
use aya_ebpf::macros::cgroup_sock;
use aya_ebpf::programs::SockContext;
use aya_log_ebpf::debug;
use styxy_common::event::{
    port_slot, BindEvent, BoundRecord, AF_INET, AF_INET6, KIND_BOUND, KIND_RELEASED, KIND_WAKE,
};
use styxy_common::session::{PortInfo, Requested, READER_SLEEPING};

use crate::globals::{EPHEMERAL_HIGH, EPHEMERAL_IN_NO_RANGE, EPHEMERAL_LOW};
use crate::maps::{
    count_port, take_requested, BOUND, DROPPED, EVENTS, LAST_BINDER, PORT_INFO, READER, UNREPORTED,
};
use crate::{current_tgid, in_daemons_netns, transport, ALLOW};

/// Whether a bound port is one the daemon learns of from the socket tables instead of a record
/// per bind: an ephemeral port outside every service range (where port-0 binds land: no decision
/// depends on them, and a record would tax every program on the machine).
#[inline(always)]
pub(crate) fn counted_only(port: u16) -> bool {
    let port32 = u32::from(port);
    port32 >= EPHEMERAL_LOW.load()
        && port32 <= EPHEMERAL_HIGH.load()
        && (EPHEMERAL_IN_NO_RANGE.load() != 0
            || PortInfo(PORT_INFO.get(port32).copied().unwrap_or(0))
                .range()
                .is_none())
}

#[cgroup_sock(post_bind4)]
pub fn styxy_post_bind4(ctx: SockContext) -> i32 {
    on_bound(&ctx, AF_INET);
    ALLOW
}

#[cgroup_sock(post_bind6)]
pub fn styxy_post_bind6(ctx: SockContext) -> i32 {
    on_bound(&ctx, AF_INET6);
    ALLOW
}

#[cgroup_sock(sock_release)]
pub fn styxy_sock_release(ctx: SockContext) -> i32 {
    on_release(ctx.sock);
    ALLOW
}

#[inline(always)]
pub(crate) fn on_bound(ctx: &SockContext, family: u8) {
    let sock = ctx.sock;
    // SAFETY: the kernel hands a valid context; these fields are readable in post_bind4/6.
    let (protocol, port) = unsafe { ((*sock).protocol, (*sock).src_port) };
    let Some(protocol) = transport(protocol) else {
        return;
    };
    let port = port as u16; // host byte order
    if counted_only(port) {
        if let Some(count) = UNREPORTED.get_ptr_mut(0) {
            // SAFETY: a per-CPU slot: no other program touches it concurrently.
            unsafe { *count += 1 };
        }
        return;
    }
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
    let requested = take_requested(cookie);
    let bound = BoundRecord {
        port,
        family,
        protocol,
        _pad: 0,
        addr,
    };
    let _ = BOUND.insert(cookie, bound, 0);
    count_port(protocol, port, 1);
    let tgid = current_tgid();
    if let Some(last) = LAST_BINDER.get_ptr_mut(port_slot(protocol, port)) {
        // SAFETY: a map value slot, valid and aligned for a u32.
        unsafe { *last = tgid };
    }
    debug!(ctx, "port {} bound by {}", port, tgid);
    emit(KIND_BOUND, cookie, &bound, requested);
}

pub(crate) fn on_release(sock: *mut bpf_sock) {
    // SAFETY: the helper accepts a sock context.
    let cookie = unsafe { bpf_get_socket_cookie(sock.cast()) };
    // A moved bind that failed (the spare port was taken after all): its entry goes too.
    let _ = take_requested(cookie);
    // SAFETY: the value is plain data copied out before the entry is removed.
    let Some(bound) = (unsafe { BOUND.get(cookie) }).copied() else {
        return; // never seen bound by us (a client socket, or bound before we attached)
    };
    let _ = BOUND.remove(cookie);
    count_port(bound.protocol, bound.port, u64::MAX); // - 1, wrapping
    emit(KIND_RELEASED, cookie, &bound, None);
}

/// Whether the daemon's reader sleeps, read with a full barrier (an atomic fetch-add of 0): a
/// record submitted before this read is seen by a reader that set the flag before its last look.
#[inline(always)]
pub(crate) fn reader_sleeps_now() -> bool {
    let Some(flag) = READER.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: a map value slot, valid and aligned for a u32; the daemon writes it atomically.
    let state = unsafe {
        core::intrinsics::atomic_xadd::<u32, u32, { core::intrinsics::AtomicOrdering::SeqCst }>(
            flag, 0,
        )
    };
    state == READER_SLEEPING
}

pub(crate) fn emit(kind: u8, cookie: u64, bound: &BoundRecord, requested: Option<Requested>) {
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
    if let Some(requested) = requested {
        event.requested_port = requested.asked;
        event.flags = requested.flags;
        event.session = requested.session;
    }
    event.addr = bound.addr;
    if let Ok(comm) = bpf_get_current_comm() {
        event.comm = comm;
    }
    entry.write(event);
    // A sleeping reader is woken (when the ring was empty, as usual); a draining one is not.
    let sleeping = READER.get(0).copied().unwrap_or(READER_SLEEPING) == READER_SLEEPING;
    if sleeping {
        entry.submit(0);
        return;
    }
    entry.submit(u64::from(BPF_RB_NO_WAKEUP));
    // The reader may have gone to sleep since: if so, a wake-up record, so this one is not left
    // waiting for the next bind.
    if reader_sleeps_now() {
        let mut wake = BindEvent::zeroed();
        wake.kind = KIND_WAKE;
        let _ = EVENTS.output::<BindEvent>(&wake, u64::from(BPF_RB_FORCE_WAKEUP));
    }
}
