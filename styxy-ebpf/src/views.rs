//! The session view: loopback traffic of a session's process to a port it was moved off goes to
//! the moved server, and getpeername and recvmsg show the asked port back; connect4 also answers
//! the shim's question whether the kernel steers the process. The focus lends a session's view
//! to its user's processes outside the sessions (`FOCUS`).

use aya_ebpf::bindings::bpf_sock_addr;
use aya_ebpf::helpers::bpf_get_socket_cookie;
use aya_ebpf::macros::cgroup_sock_addr;
use aya_ebpf::programs::SockAddrContext;
use aya_log_ebpf::{debug, warn};
use styxy_common::event::{port_slot, IPPROTO_UDP};
use styxy_common::session::{
    probe_flags, ReverseKey, ViewKey, FOCUSING_COUNT, FOCUSING_DAEMON, PROBE_ADDR_V4,
    PROBE_ANSWER_PORT,
};

use crate::globals::ENFORCE;
use crate::maps::{FOCUS, FOCUSING, LAST_BINDER, PORTS, REVERSE, SESSIONS, VIEWS};
use crate::membership::{current_euid, set_own_flags, steering_member};
use crate::{current_tgid, in_daemons_netns, transport, ALLOW};

/// Whether an IPv4 address (network byte order, as in the context) is loopback (127.0.0.0/8).
#[inline(always)]
pub(crate) fn loopback4(ip: u32) -> bool {
    u32::from_be(ip) >> 24 == 127
}

/// Whether an IPv6 address (four network-order words) is `::1` or IPv4-mapped loopback.
#[inline(always)]
pub(crate) fn loopback6(words: [u32; 4]) -> bool {
    words[0] == 0
        && words[1] == 0
        && ((words[2] == 0 && u32::from_be(words[3]) == 1)
            || (u32::from_be(words[2]) == 0xffff && loopback4(words[3])))
}

#[inline(always)]
pub(crate) fn dest_is_loopback(sock_addr: *mut bpf_sock_addr, v6: bool) -> bool {
    if v6 {
        // SAFETY: user_ip6 is readable in the v6 hooks, word by word at constant offsets.
        let words = unsafe {
            [
                core::ptr::read_volatile(&raw const (*sock_addr).user_ip6[0]),
                core::ptr::read_volatile(&raw const (*sock_addr).user_ip6[1]),
                core::ptr::read_volatile(&raw const (*sock_addr).user_ip6[2]),
                core::ptr::read_volatile(&raw const (*sock_addr).user_ip6[3]),
            ]
        };
        loopback6(words)
    } else {
        // SAFETY: user_ip4 is readable in the v4 hooks.
        loopback4(unsafe { core::ptr::read_volatile(&raw const (*sock_addr).user_ip4) })
    }
}

/// connect4|6 and sendmsg4|6: loopback traffic of a session to an asked port of its view goes to
/// the bound port, and the socket remembers it for the way back. Traffic outside the sessions
/// (and a session's, for a port its own session neither maps nor serves) follows the focus of
/// its user, when that user focuses a session.
#[inline(always)]
pub(crate) fn redirect(ctx: &SockAddrContext, v6: bool) {
    if ENFORCE.load() == 0 {
        return;
    }
    let sock_addr = ctx.sock_addr;
    // SAFETY: the kernel hands a valid context; these fields are readable in these hooks.
    let (protocol, user_port) = unsafe { ((*sock_addr).protocol, (*sock_addr).user_port) };
    let Some(protocol) = transport(protocol) else {
        return;
    };
    let asked = u16::from_be(user_port as u16);
    if asked == 0 || !dest_is_loopback(sock_addr, v6) {
        return;
    }
    let tgid = current_tgid();
    let (session, bound) = match steering_member(tgid) {
        Some(member) => {
            // The shim asking whether the kernel steers it (it does: this process is a member
            // it steers), and telling what its environment turns off.
            if let Some(flags) = probe_flags(asked) {
                if !v6 && protocol == IPPROTO_UDP && is_probe_address(sock_addr) {
                    set_own_flags(tgid, flags);
                    // SAFETY: user_port is writable in connect4 and sendmsg4; network byte order.
                    unsafe { (*sock_addr).user_port = u32::from(PROBE_ANSWER_PORT.to_be()) };
                    return;
                }
            }
            if !member.views() {
                // STYXY_VIEW=off: the real ports, as the shim leaves them.
                return;
            }
            let key = ViewKey {
                session: member.session,
                asked,
                protocol,
                _pad: 0,
            };
            // SAFETY: a plain u32 copied out of the map value.
            match unsafe { VIEWS.get(key) }.copied() {
                Some(bound) => (member.session, bound),
                None => {
                    if !focusing() || serves_itself(member.session, protocol, asked) {
                        return;
                    }
                    let Some(focused) = focused(protocol, asked) else {
                        return;
                    };
                    focused
                }
            }
        }
        None => {
            // The probe of a process the kernel does not steer goes where it was sent.
            if !focusing() || (probe_flags(asked).is_some() && !v6 && is_probe_address(sock_addr)) {
                return;
            }
            let Some(focused) = focused(protocol, asked) else {
                return;
            };
            focused
        }
    };
    // In another network namespace, loopback is another machine's: the view is the host's.
    if !in_daemons_netns(sock_addr.cast()) {
        return;
    }
    let bound = bound as u16;
    // SAFETY: user_port is writable in connect4|6 and sendmsg4|6; network byte order.
    unsafe { (*sock_addr).user_port = u32::from(bound.to_be()) };
    // SAFETY: the helper accepts a sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(sock_addr.cast()) };
    let reverse = ReverseKey {
        cookie,
        bound,
        protocol,
        _pad: [0; 5],
    };
    if REVERSE.insert(reverse, u32::from(asked), 0).is_err() {
        warn!(ctx, "session {}: REVERSE is full", session);
    }
    debug!(
        ctx,
        "session {}: traffic to port {} sent to {}", session, asked, bound
    );
}

/// Whether any user focuses a session (one array read).
#[inline(always)]
fn focusing() -> bool {
    FOCUSING.get(FOCUSING_COUNT).copied().unwrap_or(0) != 0
}

/// Where the focus of the calling task's user sends `(protocol, asked)`: the focused session and
/// the port its view maps `asked` to, if it maps it.
#[inline(always)]
fn focused(protocol: u8, asked: u16) -> Option<(u32, u32)> {
    if FOCUSING.get(FOCUSING_DAEMON).copied() == Some(current_tgid()) {
        return None;
    }
    let euid = current_euid()?;
    // SAFETY: plain u32s copied out of the map values.
    let session = unsafe { FOCUS.get(euid) }.copied()?;
    let key = ViewKey {
        session,
        asked,
        protocol,
        _pad: 0,
    };
    // SAFETY: as above.
    let bound = unsafe { VIEWS.get(key) }.copied()?;
    Some((session, bound))
}

/// Whether the port is bound right now by a process of `session` (its own server, not moved):
/// the session's clients keep reaching it, whatever the focus.
#[inline(always)]
fn serves_itself(session: u32, protocol: u8, port: u16) -> bool {
    let slot = port_slot(protocol, port);
    if PORTS.get(slot).copied().unwrap_or(0) == 0 {
        return false;
    }
    let Some(binder) = LAST_BINDER.get(slot).copied() else {
        return false;
    };
    // SAFETY: plain data copied out of the map value.
    unsafe { SESSIONS.get(binder) }.is_some_and(|m| m.session == session)
}

/// Whether an IPv4 destination is the shim's probe address (see `PROBE_ADDR_V4`).
#[inline(always)]
pub(crate) fn is_probe_address(sock_addr: *mut bpf_sock_addr) -> bool {
    // SAFETY: user_ip4 is readable in the v4 hooks; network byte order, as the array is.
    let ip = unsafe { core::ptr::read_volatile(&raw const (*sock_addr).user_ip4) };
    ip == u32::from_ne_bytes(PROBE_ADDR_V4)
}

/// getpeername4|6 and recvmsg4|6: a redirected socket sees the asked port as its peer's.
#[inline(always)]
pub(crate) fn translate_back(ctx: &SockAddrContext) {
    if ENFORCE.load() == 0 {
        return;
    }
    let sock_addr = ctx.sock_addr;
    // SAFETY: the kernel hands a valid context; these fields are readable in these hooks.
    let (protocol, user_port) = unsafe { ((*sock_addr).protocol, (*sock_addr).user_port) };
    let Some(protocol) = transport(protocol) else {
        return;
    };
    // SAFETY: the helper accepts a sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(sock_addr.cast()) };
    let key = ReverseKey {
        cookie,
        bound: u16::from_be(user_port as u16),
        protocol,
        _pad: [0; 5],
    };
    // SAFETY: a plain u32 copied out of the map value.
    if let Some(asked) = unsafe { REVERSE.get(key) }.copied() {
        // SAFETY: user_port is writable in getpeername4|6 and recvmsg4|6; network byte order.
        unsafe { (*sock_addr).user_port = u32::from((asked as u16).to_be()) };
    }
}

#[cgroup_sock_addr(connect4)]
pub fn styxy_connect4(ctx: SockAddrContext) -> i32 {
    redirect(&ctx, false);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn styxy_connect6(ctx: SockAddrContext) -> i32 {
    redirect(&ctx, true);
    ALLOW
}

#[cgroup_sock_addr(sendmsg4)]
pub fn styxy_sendmsg4(ctx: SockAddrContext) -> i32 {
    redirect(&ctx, false);
    ALLOW
}

#[cgroup_sock_addr(sendmsg6)]
pub fn styxy_sendmsg6(ctx: SockAddrContext) -> i32 {
    redirect(&ctx, true);
    ALLOW
}

#[cgroup_sock_addr(recvmsg4)]
pub fn styxy_recvmsg4(ctx: SockAddrContext) -> i32 {
    translate_back(&ctx);
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn styxy_recvmsg6(ctx: SockAddrContext) -> i32 {
    translate_back(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn styxy_getpeername4(ctx: SockAddrContext) -> i32 {
    translate_back(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn styxy_getpeername6(ctx: SockAddrContext) -> i32 {
    translate_back(&ctx);
    ALLOW
}
