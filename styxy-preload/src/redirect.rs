//! The session's view, applied to this process's traffic: a loopback `connect()`, `sendto()` or
//! `sendmsg()` to a port its session was moved off goes to the port the moved server is bound to,
//! and `getpeername()`, `recvfrom()` and `recvmsg()` report the asked port back, so the program
//! sees what it expects.
//!
//! Everything else goes straight through, untouched, with errno as the real call left it: other
//! addresses, ports in no view, processes with no session (`STYXY_INSTANCE`), `STYXY_VIEW=off`
//! (which the kernel is told too, where it steers the process: see `enforcer`),
//! and every call while no live daemon publishes a table. The common case costs a few compares and
//! one atomic load of the table's bit for the port.

use core::ffi::{c_int, c_void, CStr};
use core::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use libc::{msghdr, sockaddr, socklen_t, ssize_t};
use styxy_common::env;
use styxy_common::net::Protocol;
use styxy_common::table::Table;

use crate::bind::socket_protocol;
use crate::sys::{env_str, errno, set_errno, set_port_of};

type ConnectFn = unsafe extern "C" fn(c_int, *const sockaddr, socklen_t) -> c_int;
type SendtoFn =
    unsafe extern "C" fn(c_int, *const c_void, usize, c_int, *const sockaddr, socklen_t) -> ssize_t;
type SendmsgFn = unsafe extern "C" fn(c_int, *const msghdr, c_int) -> ssize_t;
type GetpeernameFn = unsafe extern "C" fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int;
type RecvfromFn = unsafe extern "C" fn(
    c_int,
    *mut c_void,
    usize,
    c_int,
    *mut sockaddr,
    *mut socklen_t,
) -> ssize_t;
type RecvmsgFn = unsafe extern "C" fn(c_int, *mut msghdr, c_int) -> ssize_t;

/// The next definition of `name` (libc's), looked up once.
fn next(slot: &AtomicPtr<c_void>, name: &CStr) -> *mut c_void {
    let mut ptr = slot.load(Ordering::Acquire);
    if ptr.is_null() {
        // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name has no other preconditions.
        ptr = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
        slot.store(ptr, Ordering::Release);
    }
    ptr
}

macro_rules! real {
    ($slot:ident, $name:literal, $ty:ty) => {{
        static $slot: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
        let ptr = next(&$slot, $name);
        // SAFETY: the next definition of this libc function has this signature.
        (!ptr.is_null()).then(|| unsafe { core::mem::transmute::<*mut c_void, $ty>(ptr) })
    }};
}

/// A destination address with its port replaced, ready to hand to the real call.
struct Rewritten {
    address: libc::sockaddr_storage,
    len: socklen_t,
    asked: u16,
    bound: u16,
}

impl Rewritten {
    fn as_ptr(&self) -> *const sockaddr {
        (&raw const self.address).cast::<sockaddr>()
    }
}

/// The family, port and loopback-ness of an AF_INET/AF_INET6 address.
///
/// # Safety
/// `addr` is null or points to `len` readable bytes.
unsafe fn inet_port(addr: *const sockaddr, len: socklen_t) -> Option<(u16, bool)> {
    if addr.is_null() || (len as usize) < core::mem::size_of::<libc::sa_family_t>() {
        return None;
    }
    // SAFETY: the family field is readable (checked above).
    let family = unsafe { core::ptr::addr_of!((*addr).sa_family).read_unaligned() };
    match c_int::from(family) {
        libc::AF_INET if len as usize >= core::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: len covers a whole sockaddr_in.
            let sin = unsafe { addr.cast::<libc::sockaddr_in>().read_unaligned() };
            let first = sin.sin_addr.s_addr.to_ne_bytes()[0];
            Some((u16::from_be(sin.sin_port), first == 127))
        }
        libc::AF_INET6 if len as usize >= core::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: len covers a whole sockaddr_in6.
            let sin6 = unsafe { addr.cast::<libc::sockaddr_in6>().read_unaligned() };
            let a = sin6.sin6_addr.s6_addr;
            let v6_loopback = a == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
            let v4_mapped_loopback = a[..10] == [0; 10] && a[10..13] == [0xff, 0xff, 127];
            Some((
                u16::from_be(sin6.sin6_port),
                v6_loopback || v4_mapped_loopback,
            ))
        }
        _ => None,
    }
}

/// This process's user: a view applies only to the processes of the user whose server moved.
fn own_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The session's id, if the process has one.
fn session() -> Option<&'static [u8]> {
    env_str(env::INSTANCE.c_name).filter(|id| !id.is_empty())
}

/// `STYXY_VIEW=off`: this process's traffic follows no view.
fn view_off() -> bool {
    env_str(env::VIEW.c_name) == Some(b"off")
}

/// The table, the socket's protocol and the session, once the table's bit for `port` says some
/// view may apply (`bits` picks VIEWED or TARGETED); `None` for the common case.
fn candidate(
    fd: c_int,
    port: u16,
    bits: fn(&Table<'static>, Protocol, u16) -> bool,
) -> Option<(Table<'static>, Protocol, &'static [u8])> {
    let table = crate::table::current()?;
    if !bits(&table, Protocol::Tcp, port) && !bits(&table, Protocol::Udp, port) {
        return None;
    }
    let saved = errno();
    let protocol = socket_protocol(fd).and_then(Protocol::from_ipproto);
    set_errno(saved);
    let protocol = protocol.filter(|p| bits(&table, *p, port))?;
    let session = session()?;
    // The kernel applies the view itself to the processes it steers (and nobody in another
    // network namespace): never twice. Asking it also tells it what this process's environment
    // turns off, so a process with the view off is asked about too: the kernel then leaves its
    // traffic alone, as the shim does.
    let enforcer = crate::enforcer::for_this_process(&table);
    if view_off() || enforcer != crate::enforcer::Enforcer::Shim {
        return None;
    }
    Some((table, protocol, session))
}

/// `addr` with its port replaced by the session's bound port, when the view has one for it.
///
/// # Safety
/// `addr` is null or points to `len` readable bytes.
unsafe fn rewrite(fd: c_int, addr: *const sockaddr, len: socklen_t) -> Option<Rewritten> {
    // SAFETY: forwarded from our caller.
    let (asked, loopback) = unsafe { inet_port(addr, len) }?;
    if !loopback || asked == 0 {
        return None;
    }
    let (table, protocol, session) = candidate(fd, asked, Table::is_viewed)?;
    let bound = table.redirect(session, own_uid(), protocol, asked)?;
    // SAFETY: sockaddr_storage is plain data; all zeroes is valid.
    let mut address: libc::sockaddr_storage = unsafe { core::mem::zeroed() };
    let n = (len as usize).min(core::mem::size_of::<libc::sockaddr_storage>());
    // SAFETY: n bytes are readable from addr and writable in address; no overlap.
    unsafe {
        core::ptr::copy_nonoverlapping(addr.cast::<u8>(), (&raw mut address).cast::<u8>(), n)
    };
    set_port((&raw mut address).cast::<sockaddr>(), bound);
    Some(Rewritten {
        address,
        len: n as socklen_t,
        asked,
        bound,
    })
}

/// Writes `port` into an AF_INET or AF_INET6 address known to be whole.
fn set_port(addr: *mut sockaddr, port: u16) {
    // SAFETY: callers pass an address whose family and length inet_port accepted, so the port
    // field (at the same offset in both) is within it.
    unsafe { set_port_of(addr, port) }
}

/// A source or peer address a view redirected to: its port becomes the asked one.
///
/// # Safety
/// `addr` is null or points to `*len` readable and writable bytes (`len` null or valid).
unsafe fn translate_back(fd: c_int, addr: *mut sockaddr, len: *const socklen_t) {
    if addr.is_null() || len.is_null() {
        return;
    }
    // SAFETY: len is valid (checked non-null; caller's contract).
    let len = unsafe { *len };
    // SAFETY: addr holds len bytes.
    let Some((bound, loopback)) = (unsafe { inet_port(addr, len) }) else {
        return;
    };
    if !loopback {
        return;
    }
    let Some((table, protocol, session)) = candidate(fd, bound, Table::is_targeted) else {
        return;
    };
    if let Some(asked) = table.asked_for(session, own_uid(), protocol, bound) {
        set_port(addr, asked);
    }
}

// ---- which connected sockets were redirected (for getpeername) ----

/// `(fd + 1) << 32 | asked << 16 | bound` of recently redirected connections; 0 is empty. A slot
/// is reused when full; an fd reused for another socket is harmless: the peer's port must still
/// be the recorded bound port for the translation to apply.
static PEERS: [AtomicU64; 64] = [const { AtomicU64::new(0) }; 64];
static NEXT_PEER: AtomicUsize = AtomicUsize::new(0);

fn remember_peer(fd: c_int, asked: u16, bound: u16) {
    let Ok(fd) = u32::try_from(fd) else {
        return;
    };
    let key = u64::from(fd) + 1;
    let value = key << 32 | u64::from(asked) << 16 | u64::from(bound);
    let slot = PEERS
        .iter()
        .find(|s| s.load(Ordering::Relaxed) >> 32 == key)
        .or_else(|| PEERS.iter().find(|s| s.load(Ordering::Relaxed) == 0))
        .unwrap_or_else(|| &PEERS[NEXT_PEER.fetch_add(1, Ordering::Relaxed) % PEERS.len()]);
    slot.store(value, Ordering::Relaxed);
}

fn redirected_peer(fd: c_int) -> Option<(u16, u16)> {
    let key = u64::from(u32::try_from(fd).ok()?) + 1;
    PEERS.iter().find_map(|s| {
        let value = s.load(Ordering::Relaxed);
        (value >> 32 == key).then_some(((value >> 16) as u16, value as u16))
    })
}

// ---- the interposed calls ----

/// The interposed `connect()`.
///
/// # Safety
/// Same contract as `connect(2)`.
#[no_mangle]
pub unsafe extern "C" fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    let Some(real) = real!(REAL_CONNECT, c"connect", ConnectFn) else {
        set_errno(libc::ENOSYS);
        return -1;
    };
    let entry = errno();
    // SAFETY: forwarded from our caller's contract.
    if let Some(to) = unsafe { rewrite(fd, addr, len) } {
        set_errno(entry);
        // SAFETY: `to` is a whole address of the caller's family.
        let rc = unsafe { real(fd, to.as_ptr(), to.len) };
        if rc == 0 || errno() == libc::EINPROGRESS {
            let kept = errno();
            remember_peer(fd, to.asked, to.bound);
            set_errno(kept);
        }
        return rc;
    }
    set_errno(entry);
    // SAFETY: forwarded unchanged.
    unsafe { real(fd, addr, len) }
}

/// The interposed `sendto()`.
///
/// # Safety
/// Same contract as `sendto(2)`.
#[no_mangle]
pub unsafe extern "C" fn sendto(
    fd: c_int,
    buf: *const c_void,
    n: usize,
    flags: c_int,
    addr: *const sockaddr,
    len: socklen_t,
) -> ssize_t {
    let Some(real) = real!(REAL_SENDTO, c"sendto", SendtoFn) else {
        set_errno(libc::ENOSYS);
        return -1;
    };
    if !addr.is_null() {
        let entry = errno();
        // SAFETY: forwarded from our caller's contract.
        if let Some(to) = unsafe { rewrite(fd, addr, len) } {
            set_errno(entry);
            // SAFETY: as the caller's, with a whole address of its family.
            return unsafe { real(fd, buf, n, flags, to.as_ptr(), to.len) };
        }
        set_errno(entry);
    }
    // SAFETY: forwarded unchanged.
    unsafe { real(fd, buf, n, flags, addr, len) }
}

/// The interposed `sendmsg()`.
///
/// # Safety
/// Same contract as `sendmsg(2)`.
#[no_mangle]
pub unsafe extern "C" fn sendmsg(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t {
    let Some(real) = real!(REAL_SENDMSG, c"sendmsg", SendmsgFn) else {
        set_errno(libc::ENOSYS);
        return -1;
    };
    if !msg.is_null() {
        let entry = errno();
        // SAFETY: msg points to a valid msghdr (caller's contract).
        let mut copy = unsafe { msg.read() };
        // SAFETY: msg_name is null or holds msg_namelen bytes (caller's contract).
        let rewritten = unsafe { rewrite(fd, copy.msg_name.cast::<sockaddr>(), copy.msg_namelen) };
        if let Some(to) = rewritten {
            copy.msg_name = to.as_ptr().cast_mut().cast::<c_void>();
            copy.msg_namelen = to.len;
            set_errno(entry);
            // SAFETY: the caller's message, with a whole address of its family as its name.
            return unsafe { real(fd, &copy, flags) };
        }
        set_errno(entry);
    }
    // SAFETY: forwarded unchanged.
    unsafe { real(fd, msg, flags) }
}

/// The interposed `getpeername()`.
///
/// # Safety
/// Same contract as `getpeername(2)`.
#[no_mangle]
pub unsafe extern "C" fn getpeername(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    let Some(real) = real!(REAL_GETPEERNAME, c"getpeername", GetpeernameFn) else {
        set_errno(libc::ENOSYS);
        return -1;
    };
    // SAFETY: forwarded unchanged.
    let rc = unsafe { real(fd, addr, len) };
    if rc == 0 && !addr.is_null() && !len.is_null() {
        if let Some((asked, bound)) = redirected_peer(fd) {
            // SAFETY: the real call filled addr with *len bytes.
            let peer = unsafe { inet_port(addr, *len) };
            if peer == Some((bound, true)) {
                set_port(addr, asked);
            }
        }
    }
    rc
}

/// The interposed `recvfrom()`.
///
/// # Safety
/// Same contract as `recvfrom(2)`.
#[no_mangle]
pub unsafe extern "C" fn recvfrom(
    fd: c_int,
    buf: *mut c_void,
    n: usize,
    flags: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
) -> ssize_t {
    let Some(real) = real!(REAL_RECVFROM, c"recvfrom", RecvfromFn) else {
        set_errno(libc::ENOSYS);
        return -1;
    };
    // SAFETY: forwarded unchanged.
    let got = unsafe { real(fd, buf, n, flags, addr, len) };
    if got >= 0 {
        let kept = errno();
        // SAFETY: the real call filled addr with *len bytes (or left them null).
        unsafe { translate_back(fd, addr, len) };
        set_errno(kept);
    }
    got
}

/// The interposed `recvmsg()`.
///
/// # Safety
/// Same contract as `recvmsg(2)`.
#[no_mangle]
pub unsafe extern "C" fn recvmsg(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t {
    let Some(real) = real!(REAL_RECVMSG, c"recvmsg", RecvmsgFn) else {
        set_errno(libc::ENOSYS);
        return -1;
    };
    // SAFETY: forwarded unchanged.
    let got = unsafe { real(fd, msg, flags) };
    if got >= 0 && !msg.is_null() {
        let kept = errno();
        // SAFETY: msg is a valid msghdr whose name the real call filled (msg_namelen bytes).
        unsafe {
            translate_back(
                fd,
                (*msg).msg_name.cast::<sockaddr>(),
                &raw const (*msg).msg_namelen,
            )
        };
        set_errno(kept);
    }
    got
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: [u8; 4], port: u16) -> libc::sockaddr_in {
        // SAFETY: plain data; all zeroes is valid.
        let mut sin: libc::sockaddr_in = unsafe { core::mem::zeroed() };
        sin.sin_family = libc::AF_INET as libc::sa_family_t;
        sin.sin_port = port.to_be();
        sin.sin_addr.s_addr = u32::from_ne_bytes(a);
        sin
    }

    fn v6(a: [u8; 16], port: u16) -> libc::sockaddr_in6 {
        // SAFETY: plain data; all zeroes is valid.
        let mut sin6: libc::sockaddr_in6 = unsafe { core::mem::zeroed() };
        sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        sin6.sin6_port = port.to_be();
        sin6.sin6_addr.s6_addr = a;
        sin6
    }

    fn port_of<T>(addr: &T) -> Option<(u16, bool)> {
        // SAFETY: addr is a whole sockaddr of its size.
        unsafe {
            inet_port(
                (addr as *const T).cast(),
                core::mem::size_of::<T>() as socklen_t,
            )
        }
    }

    #[test]
    fn loopback_is_127_slash_8_and_v6_loopback_and_v4_mapped_127() {
        assert_eq!(port_of(&v4([127, 0, 0, 1], 8000)), Some((8000, true)));
        assert_eq!(port_of(&v4([127, 9, 8, 7], 80)), Some((80, true)));
        assert_eq!(port_of(&v4([10, 0, 0, 1], 8000)), Some((8000, false)));
        let mut one = [0u8; 16];
        one[15] = 1;
        assert_eq!(port_of(&v6(one, 8000)), Some((8000, true)));
        let mut mapped = [0u8; 16];
        mapped[10..].copy_from_slice(&[0xff, 0xff, 127, 0, 0, 1]);
        assert_eq!(port_of(&v6(mapped, 8000)), Some((8000, true)));
        mapped[12] = 10;
        assert_eq!(port_of(&v6(mapped, 8000)), Some((8000, false)));
        let sin = v4([127, 0, 0, 1], 8000);
        // SAFETY: a short length is rejected before anything past it is read.
        let short = unsafe { inet_port((&raw const sin).cast(), 4) };
        assert_eq!(short, None);
    }

    #[test]
    fn set_port_writes_network_order_into_either_family() {
        let mut sin = v4([127, 0, 0, 1], 8000);
        set_port((&raw mut sin).cast(), 8001);
        assert_eq!(u16::from_be(sin.sin_port), 8001);
        let mut sin6 = v6([0; 16], 8000);
        set_port((&raw mut sin6).cast(), 65535);
        assert_eq!(u16::from_be(sin6.sin6_port), 65535);
    }

    #[test]
    fn peers_remember_the_latest_redirect_per_fd() {
        remember_peer(7, 8000, 8001);
        remember_peer(7, 9000, 9001);
        assert_eq!(redirected_peer(7), Some((9000, 9001)));
        assert_eq!(redirected_peer(8), None);
        for fd in 100..300 {
            remember_peer(fd, 1, 2);
        }
        assert_eq!(
            redirected_peer(299),
            Some((1, 2)),
            "the newest survives a full table"
        );
    }
}
