//! Moving a session's binds: an explicit-port bind whose port is taken goes to the port its
//! project had (sticky), or a spare port of its range; the asked port is remembered for
//! post_bind's record.

use aya_ebpf::bindings::bpf_sock_addr;
use aya_ebpf::helpers::{bpf_get_socket_cookie, bpf_getsockopt};
use aya_ebpf::macros::cgroup_sock_addr;
use aya_ebpf::programs::SockAddrContext;
use aya_log_ebpf::{debug, info, warn};
use styxy_common::event::{port_slot, FLAG_REWRITTEN};
use styxy_common::session::{
    MoveKey, PortInfo, Requested, StickyKey, SPARE_SLOTS, STICKY_LINGERING,
};

use crate::globals::ENFORCE;
use crate::maps::{
    count_rewrites, LAST_BINDER, MOVES, PORTS, PORT_INFO, REQUESTED, SPARES, STICKY,
};
use crate::membership::steering_member;
use crate::{current_tgid, in_daemons_netns, transport, ALLOW};

const SOL_SOCKET: i32 = 1;
const SO_REUSEADDR: i32 = 2;
const SO_REUSEPORT: i32 = 15;

#[cgroup_sock_addr(bind4)]
pub fn styxy_bind4(ctx: SockAddrContext) -> i32 {
    on_bind(&ctx);
    ALLOW
}

#[cgroup_sock_addr(bind6)]
pub fn styxy_bind6(ctx: SockAddrContext) -> i32 {
    on_bind(&ctx);
    ALLOW
}

/// Whether `port` is taken for a bind asking `asked` by a process `tgid` of `session`: a socket
/// of another process is bound on it, or a lease or claim of anyone but this session holds it,
/// or the session holds it for the next server of another asked port (see
/// [`PortInfo::reserved_against`]).
///
/// "Who holds this port" is decided in three places, which must agree: here (at bind time, from
/// the kernel's own counts and the daemon's `PORT_INFO`), in the daemon's spare-port refill
/// (`styxy-daemon/src/bpf/sessions/publish.rs`, `refill_spares`: a spare must be free by the broker, the
/// kernel's counts and lingering connections, since this program cannot try another), and in the
/// broker (`holder_of` and `pick_for_move`, for the shim's moves). A port the broker calls taken
/// is written into `PORT_INFO` as reserved, so what the broker knows reaches this check.
#[inline(always)]
pub(crate) fn taken(protocol: u8, port: u16, asked: u16, tgid: u32, session: u32) -> bool {
    let slot = port_slot(protocol, port);
    let bound = PORTS.get(slot).copied().unwrap_or(0);
    if bound != 0 && !(bound == 1 && LAST_BINDER.get(slot).copied() == Some(tgid)) {
        return true;
    }
    PortInfo(PORT_INFO.get(u32::from(port)).copied().unwrap_or(0)).reserved_against(session, asked)
}

/// A SOL_SOCKET option of the socket: `None` when the kernel would not say.
#[inline(always)]
pub(crate) fn socket_option(sock_addr: *mut bpf_sock_addr, option: i32) -> Option<i32> {
    let mut value: i32 = 0;
    // SAFETY: the helper writes at most `size_of::<i32>()` bytes into `value`.
    let rc = unsafe {
        bpf_getsockopt(
            sock_addr.cast(),
            SOL_SOCKET,
            option,
            (&raw mut value).cast(),
            core::mem::size_of::<i32>() as i32,
        )
    };
    (rc == 0).then_some(value)
}

/// Whether the socket has SO_REUSEPORT set (intended sharing: never moved).
#[inline(always)]
pub(crate) fn reuseport(sock_addr: *mut bpf_sock_addr) -> bool {
    // Unknown counts as shared: never move what may be a pool.
    socket_option(sock_addr, SO_REUSEPORT) != Some(0)
}

/// The sticky port of the session's project for `asked`, when the caller may bind it now: free,
/// and, if old connections linger there, only for a socket with SO_REUSEADDR (which binds over
/// TIME_WAIT; any other would fail there, and the program cannot try again).
#[inline(always)]
pub(crate) fn sticky_port(
    sock_addr: *mut bpf_sock_addr,
    protocol: u8,
    asked: u16,
    tgid: u32,
    session: u32,
) -> Option<u16> {
    let key = StickyKey {
        session,
        asked,
        _pad: 0,
    };
    // SAFETY: a plain u32 copied out of the map value.
    let value = unsafe { STICKY.get(key) }.copied()?;
    let port = value as u16;
    if port == 0 || port == asked || taken(protocol, port, asked, tgid, session) {
        return None;
    }
    if value & STICKY_LINGERING != 0 && socket_option(sock_addr, SO_REUSEADDR).unwrap_or(0) == 0 {
        return None;
    }
    Some(port)
}

/// Takes a spare port of range `range` that is free for the caller: the first one after `asked`
/// (wrapping around to the lowest), as the broker picks for the shim.
#[inline(always)]
pub(crate) fn take_spare(
    range: u32,
    protocol: u8,
    asked: u16,
    tgid: u32,
    session: u32,
) -> Option<u16> {
    let base = range * SPARE_SLOTS;
    // The preferred slot, by a plain look at every slot ((port after asked first, else lowest)).
    let mut best = (u32::MAX, SPARE_SLOTS);
    for i in 0..SPARE_SLOTS {
        let port = SPARES.get(base + i).copied().unwrap_or(0);
        if port == 0 {
            continue;
        }
        // Ports after `asked` rank before those at or below it; within each, lower first.
        let rank = if port > u32::from(asked) {
            port
        } else {
            port + 65_536
        };
        if rank < best.0 {
            best = (rank, i);
        }
    }
    if best.1 < SPARE_SLOTS {
        if let Some(port) = take_slot(base + best.1, protocol, asked, tgid, session) {
            return Some(port);
        }
    }
    // Another CPU took it meanwhile: any other spare.
    for i in 0..SPARE_SLOTS {
        if let Some(port) = take_slot(base + i, protocol, asked, tgid, session) {
            return Some(port);
        }
    }
    None
}

/// Takes the port in spare slot `index` (leaving 0) when it is usable for the caller.
#[inline(always)]
pub(crate) fn take_slot(
    index: u32,
    protocol: u8,
    asked: u16,
    tgid: u32,
    session: u32,
) -> Option<u16> {
    let slot = SPARES.get_ptr_mut(index)?;
    // SAFETY: the pointer is a map value slot, valid and aligned for a u32; every other writer
    // (other CPUs, the daemon through its mapping) uses atomic operations too.
    let port = unsafe {
        core::intrinsics::atomic_xchg::<u32, { core::intrinsics::AtomicOrdering::SeqCst }>(slot, 0)
    } as u16;
    (port != 0 && port != asked && !taken(protocol, port, asked, tgid, session)).then_some(port)
}

#[inline(always)]
pub(crate) fn on_bind(ctx: &SockAddrContext) {
    let sock_addr = ctx.sock_addr;
    // SAFETY: the kernel hands a valid context; these fields are readable in bind4/6.
    let (protocol, user_port) = unsafe { ((*sock_addr).protocol, (*sock_addr).user_port) };
    let Some(protocol) = transport(protocol) else {
        return;
    };
    // user_port holds the port in network byte order in its low 16 bits.
    let asked = u16::from_be(user_port as u16);
    if asked == 0 || ENFORCE.load() == 0 {
        return;
    }
    let tgid = current_tgid();
    let Some(member) = steering_member(tgid) else {
        debug!(ctx, "bind of port {} by {}: in no session", asked, tgid);
        return;
    };
    let session = member.session;
    if !member.moves() {
        // STYXY_DISABLE=1: its binds are its own business, as the shim leaves them.
        return;
    }
    if !in_daemons_netns(sock_addr.cast()) {
        return;
    }
    let Some(port) = move_for_session(ctx, protocol, asked, tgid, session) else {
        return;
    };
    // SAFETY: user_port is writable in bind4/6; network byte order.
    unsafe { (*sock_addr).user_port = u32::from(port.to_be()) };
    // SAFETY: the helper accepts a sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(sock_addr.cast()) };
    let requested = Requested {
        asked,
        flags: FLAG_REWRITTEN,
        _pad: 0,
        session,
    };
    if REQUESTED.insert(cookie, requested, 0).is_ok() {
        count_rewrites(1);
    }
}

/// Where a bind of `asked` by a process of `session` goes instead, if it moves.
#[inline(always)]
pub(crate) fn move_for_session(
    ctx: &SockAddrContext,
    protocol: u8,
    asked: u16,
    tgid: u32,
    session: u32,
) -> Option<u16> {
    let key = MoveKey {
        tgid,
        asked,
        protocol,
        _pad: 0,
    };
    // SAFETY: a plain u32 copied out of the map value.
    if let Some(earlier) = unsafe { MOVES.get(key) }.copied() {
        // Its other family's bind went there, or an earlier process with this pid's did: reused
        // only while no one else holds it.
        if !taken(protocol, earlier as u16, asked, tgid, session) {
            return Some(earlier as u16);
        }
    }
    if !taken(protocol, asked, asked, tgid, session) || reuseport(ctx.sock_addr) {
        return None;
    }
    let info = PortInfo(PORT_INFO.get(u32::from(asked)).copied().unwrap_or(0));
    let Some(range) = info.range() else {
        warn!(
            ctx,
            "session {}: port {} is taken and in no service range: not moved", session, asked
        );
        return None;
    };
    let Some(port) = sticky_port(ctx.sock_addr, protocol, asked, tgid, session)
        .or_else(|| take_spare(range, protocol, asked, tgid, session))
    else {
        warn!(
            ctx,
            "session {}: no spare port left in the range of {}: not moved", session, asked
        );
        return None;
    };
    if MOVES.insert(key, u32::from(port), 0).is_err() {
        warn!(ctx, "session {}: MOVES is full", session);
    }
    info!(
        ctx,
        "session {}: bind of port {} by {} moved to {}", session, asked, tgid, port
    );
    Some(port)
}
