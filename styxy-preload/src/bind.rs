//! The interposed `bind()`: a free port is bound straight away; a taken one (or one the kernel
//! refused) goes to whoever enforces this process's session — the kernel's programs, or the
//! daemon through the client library — and moves with one notice.

use core::ffi::{c_int, c_void};
use core::sync::atomic::{AtomicPtr, Ordering};

use libc::{sockaddr, socklen_t};
use styxy_common::env;
use styxy_common::net::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP};
use styxy_common::shim::{BindAnswer, BindQuery, ACTION_REASSIGN};

use crate::client::{ask, who_holds, Reply};
use crate::failure::{recent_failure, remember_failure, Failure};
use crate::moves::{history, moved_before, moves_of, own_pid, record_move};
use crate::notice::{notices_on, notify};
use crate::reentry::ReentryGuard;
use crate::sys::{
    env_flag, env_str, errno, getenv, getsockopt_int, port_of, set_errno, set_port_of, timeout_ms,
    PORT_OFFSET,
};
use crate::{enforcer, table};

type BindFn = unsafe extern "C" fn(c_int, *const sockaddr, socklen_t) -> c_int;

/// How many more times to ask when the port the daemon gave was taken before we could bind it.
const MOVE_RETRIES: usize = 3;
/// When the port asked for turns out taken after all, the bind would fail: worth waiting this
/// long for an answer — unless the daemon timed out lately (a stopped or stalled daemon then costs
/// each bind the normal deadline at most, not this).
const SECOND_CHANCE_TIMEOUT_MS: u32 = 1000;

/// The interposed `bind()`.
///
/// # Safety
/// Same contract as `bind(2)`: `addr` points to `len` readable bytes (or is null, which the real
/// `bind` rejects).
#[no_mangle]
pub unsafe extern "C" fn bind(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    let Some(real) = real_bind() else {
        set_errno(libc::ENOSYS);
        return -1;
    };
    // SAFETY: forwarded from our caller's contract.
    unsafe { shim_bind(real, fd, addr, len) }
}

static REAL_BIND: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());

pub(crate) fn real_bind() -> Option<BindFn> {
    let mut ptr = REAL_BIND.load(Ordering::Acquire);
    if ptr.is_null() {
        // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name has no other preconditions.
        ptr = unsafe { libc::dlsym(libc::RTLD_NEXT, c"bind".as_ptr()) };
        if ptr.is_null() {
            return None;
        }
        REAL_BIND.store(ptr, Ordering::Release);
    }
    // SAFETY: the next `bind` in the lookup order has the bind(2) signature.
    Some(unsafe { core::mem::transmute::<*mut c_void, BindFn>(ptr) })
}

/// What the shim needs from the address being bound.
pub(crate) struct BindTarget {
    pub(crate) family: u8,
    pub(crate) port: u16,
}

/// The family and port of an AF_INET/AF_INET6 address with a non-zero port; `None` for anything else.
///
/// # Safety
/// `addr` is null or points to `len` readable bytes.
unsafe fn parse_target(addr: *const sockaddr, len: socklen_t) -> Option<BindTarget> {
    if addr.is_null() || (len as usize) < core::mem::size_of::<libc::sa_family_t>() {
        return None;
    }
    // SAFETY: at least the family field is readable (checked above); read_unaligned needs no alignment.
    let family = unsafe { core::ptr::addr_of!((*addr).sa_family).read_unaligned() };
    let (family, port) = match c_int::from(family) {
        libc::AF_INET if len as usize >= core::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: len covers a whole sockaddr_in.
            let sin = unsafe { addr.cast::<libc::sockaddr_in>().read_unaligned() };
            (AF_INET, u16::from_be(sin.sin_port))
        }
        libc::AF_INET6 if len as usize >= core::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: len covers a whole sockaddr_in6.
            let sin6 = unsafe { addr.cast::<libc::sockaddr_in6>().read_unaligned() };
            (AF_INET6, u16::from_be(sin6.sin6_port))
        }
        _ => return None,
    };
    (port != 0).then_some(BindTarget { family, port })
}

/// # Safety
/// Same contract as `bind(2)`.
pub(crate) unsafe fn shim_bind(
    real: BindFn,
    fd: c_int,
    addr: *const sockaddr,
    len: socklen_t,
) -> c_int {
    // SAFETY: forwarded from our caller's contract.
    let Some(target) = (unsafe { parse_target(addr, len) }) else {
        // SAFETY: forwarded.
        return unsafe { real(fd, addr, len) };
    };
    let Some(_guard) = ReentryGuard::enter() else {
        // SAFETY: forwarded.
        return unsafe { real(fd, addr, len) };
    };
    let bind = Bind {
        real,
        fd,
        addr,
        len,
        target,
        entry_errno: errno(),
    };
    let outcome = bind.managed();
    set_errno(outcome.errno);
    outcome.rc
}

/// What the host's `bind()` call returns: the result and the errno to leave behind.
#[derive(Clone, Copy)]
pub(crate) struct Outcome {
    pub(crate) rc: c_int,
    pub(crate) errno: c_int,
}

/// One interposed bind of an AF_INET/AF_INET6 address with a non-zero port.
pub(crate) struct Bind {
    pub(crate) real: BindFn,
    pub(crate) fd: c_int,
    pub(crate) addr: *const sockaddr,
    pub(crate) len: socklen_t,
    pub(crate) target: BindTarget,
    /// errno as the host had it: a successful bind leaves it unchanged.
    pub(crate) entry_errno: c_int,
}

impl Bind {
    /// Bind as asked, exactly as without the shim.
    fn as_asked(&self) -> Outcome {
        set_errno(self.entry_errno);
        // SAFETY: addr/len are the host's, forwarded unchanged.
        let rc = unsafe { (self.real)(self.fd, self.addr, self.len) };
        let errno = if rc == 0 { self.entry_errno } else { errno() };
        Outcome { rc, errno }
    }

    pub(crate) fn managed(&self) -> Outcome {
        // The session table shows the port free (or held by this process's own claim): bind it,
        // and look closer only if the kernel says it is taken after all (a bind the table could
        // not see yet). Every other check waits until then: for a free port each of them would
        // end in binding as asked anyway. A port this process moved before must follow that
        // move, so it is always asked about.
        let port = self.target.port;
        let table = table::current();
        if let Some(t) = table.filter(|t| {
            let (moved, kept) = history(port);
            !moved && (kept || !t.is_taken(port))
        }) {
            // The kernel may move it all the same (the table lags the kernel by the daemon's
            // reading of a bind made a moment ago): a process of a session it steers is told.
            if in_a_session() && enforcer::for_this_process(&t) == enforcer::Enforcer::Kernel {
                return self.as_the_kernel_steers();
            }
            let first = self.as_asked();
            if first.rc == 0 || first.errno != libc::EADDRINUSE {
                return first;
            }
            return self.ask_after_refusal(first);
        }
        // The port is taken: whoever enforces this process's session decides.
        match table.map(|t| enforcer::for_this_process(&t)) {
            Some(enforcer::Enforcer::Kernel) if env_flag(env::DISABLE.c_name) => {
                return self.as_asked()
            }
            Some(enforcer::Enforcer::Kernel) => return self.as_the_kernel_steers(),
            // Another network namespace: the host's ports say nothing about its own.
            Some(enforcer::Enforcer::Nobody) => return self.as_asked(),
            Some(enforcer::Enforcer::Shim) | None => {}
        }
        // Cheapest checks first: a daemon known to be down costs two loads and a clock read.
        if env_flag(env::DISABLE.c_name) {
            return self.as_asked();
        }
        let slow = match recent_failure() {
            Some(Failure::Down) => {
                return self.as_moved_before().unwrap_or_else(|| self.as_asked())
            }
            Some(Failure::Slow) => true,
            None => false,
        };
        let Some(protocol) = socket_protocol(self.fd) else {
            return self.as_asked();
        };
        if shares_its_port(self.fd, protocol) {
            // Intended sharing (a worker pool, an mDNS/SSDP listener): never moved.
            return self.as_asked();
        }
        let query = self.query(protocol);
        if !slow {
            match ask(&query) {
                Reply::Answer(answer) => {
                    return self
                        .follow(&query, answer)
                        .unwrap_or_else(|| self.as_asked())
                }
                Reply::Down => {
                    remember_failure(Failure::Down);
                    return self.as_moved_before().unwrap_or_else(|| self.as_asked());
                }
                Reply::Slow => remember_failure(Failure::Slow),
            }
        } else if moved_before(query.port) {
            // This process moved this port before (its IPv4 socket, say): its other sockets for
            // the port must follow it, not stay where they were asked, so ask (within the normal
            // deadline: the daemon timed out lately).
            if let Reply::Answer(answer) = ask(&query) {
                return self
                    .follow(&query, answer)
                    .unwrap_or_else(|| self.as_asked());
            }
        }
        // No answer in time for a port this process moved before: its other sockets for the
        // port follow that move all the same (IPv6 next to IPv4 must not stay on the asked port,
        // where the other family is often free), from what the process itself remembers.
        if let Some(outcome) = self.as_moved_before() {
            return outcome;
        }
        // The daemon is there but slow (a loaded machine): bind as asked, and only when that
        // fails because the port is taken, wait longer for an answer. A late move beats a
        // failed start.
        let first = self.as_asked();
        if first.rc == 0 || first.errno != libc::EADDRINUSE {
            return first;
        }
        self.ask_after_refusal(first)
    }

    /// A bind of a process the kernel steers: the kernel moves it (within its range, or to the
    /// port its session or project had) as it binds; the shim tells the move, once, and steps in
    /// only where the kernel left the bind on a taken port (its refusal).
    fn as_the_kernel_steers(&self) -> Outcome {
        let first = self.as_asked();
        if first.rc == 0 {
            self.tell_a_kernel_move();
            return first;
        }
        if first.errno != libc::EADDRINUSE {
            return first;
        }
        self.ask_after_refusal(first)
    }

    /// After a bind the kernel steered: if it landed elsewhere than asked, one notice (the IPv4
    /// and IPv6 binds of one server make one line), naming who holds the asked port as the
    /// daemon knows it — one read-only question, only for a move that makes a notice, and only
    /// when the daemon has not failed lately. The bind has succeeded by then; the host's call
    /// returns after the answer (within the shim's deadline, `STYXY_TIMEOUT_MS`).
    fn tell_a_kernel_move(&self) {
        let Some(bound) = bound_port(self.fd) else {
            return;
        };
        if bound != self.target.port && record_move(self.target.port, bound) && notices_on() {
            let mut answer = BindAnswer::empty();
            answer.action = ACTION_REASSIGN;
            answer.port = bound;
            if recent_failure().is_none() {
                if let Some(protocol) = socket_protocol(self.fd) {
                    who_holds(&self.query(protocol), &mut answer);
                }
            }
            notify(self.target.port, &answer);
        }
    }

    /// Without the daemon: bind the port this process moved this asked port to before, trying
    /// its moves in the order it made them. `None` when it moved none (or each is taken now, or
    /// the bind failed otherwise): then the bind goes as asked.
    fn as_moved_before(&self) -> Option<Outcome> {
        for port in moves_of(self.target.port) {
            match self.bind_on(port) {
                Ok(outcome) => return Some(outcome),
                Err(libc::EADDRINUSE) => continue,
                Err(_) => return None,
            }
        }
        None
    }

    /// Bind the host's address with its port replaced by `port`: the outcome when bound, else
    /// the errno the kernel gave.
    fn bind_on(&self, port: u16) -> Result<Outcome, c_int> {
        set_errno(self.entry_errno);
        // SAFETY: addr/len were validated by parse_target and are readable.
        let rc = unsafe { bind_moved(self.real, self.fd, self.addr, self.len, port) };
        if rc == 0 {
            Ok(Outcome {
                rc,
                errno: self.entry_errno,
            })
        } else {
            Err(errno())
        }
    }

    /// The kernel refused the bind as asked with EADDRINUSE (`first`): unless this bind is not
    /// ours to move, ask the daemon, with a longer deadline (the bind fails otherwise).
    fn ask_after_refusal(&self, first: Outcome) -> Outcome {
        if recent_failure() == Some(Failure::Down) || env_flag(env::DISABLE.c_name) {
            return first;
        }
        let Some(protocol) = socket_protocol(self.fd) else {
            return first;
        };
        if shares_its_port(self.fd, protocol) {
            return first;
        }
        let mut query = self.query(protocol);
        if recent_failure() != Some(Failure::Slow) {
            query.timeout_ms = SECOND_CHANCE_TIMEOUT_MS.max(query.timeout_ms);
        }
        match ask(&query) {
            Reply::Answer(answer) => self.follow(&query, answer).unwrap_or(first),
            Reply::Down => {
                remember_failure(Failure::Down);
                first
            }
            Reply::Slow => {
                remember_failure(Failure::Slow);
                first
            }
        }
    }

    /// The question for the daemon about this bind.
    fn query(&self, protocol: u8) -> BindQuery {
        BindQuery {
            pid: own_pid(),
            port: self.target.port,
            protocol,
            family: self.target.family,
            timeout_ms: timeout_ms(),
            socket_path: getenv(env::SOCKET.c_name),
            instance_id: getenv(env::INSTANCE.c_name),
        }
    }

    /// Act on the daemon's answer: `Some` when bound on a moved port; `None` when the bind should
    /// go as asked (KEEP, or every port given was snatched away before we could bind it).
    fn follow(&self, query: &BindQuery, mut answer: BindAnswer) -> Option<Outcome> {
        for attempt in 0..=MOVE_RETRIES {
            if attempt > 0 {
                match ask(query) {
                    Reply::Answer(next) => answer = next,
                    Reply::Down | Reply::Slow => return None,
                }
            }
            let port = answer.port;
            if answer.action != ACTION_REASSIGN || port == 0 || port == self.target.port {
                // Kept: the daemon's claim on the port is this process's own from now on.
                record_move(self.target.port, self.target.port);
                return None;
            }
            match self.bind_on(port) {
                Ok(outcome) => {
                    if record_move(self.target.port, port) {
                        notify(self.target.port, &answer);
                    }
                    return Some(outcome);
                }
                Err(libc::EADDRINUSE) => {}
                Err(_) => return None,
            }
        }
        None
    }
}

/// Whether this process names a session (`STYXY_INSTANCE`): only then may the kernel steer it.
pub(crate) fn in_a_session() -> bool {
    env_str(env::INSTANCE.c_name).is_some_and(|id| !id.is_empty())
}

/// The local port socket `fd` is bound to (errno left as found).
pub(crate) fn bound_port(fd: c_int) -> Option<u16> {
    let saved = errno();
    // SAFETY: sockaddr_storage is plain data; getsockname writes at most `len` bytes into it.
    let mut address: libc::sockaddr_storage = unsafe { core::mem::zeroed() };
    let mut len = core::mem::size_of::<libc::sockaddr_storage>() as socklen_t;
    // SAFETY: valid pointers for the call.
    let rc = unsafe { libc::getsockname(fd, (&raw mut address).cast::<sockaddr>(), &mut len) };
    set_errno(saved);
    if rc != 0 || (len as usize) < PORT_OFFSET + 2 {
        return None;
    }
    // SAFETY: len covers the port field, at the same offset for both families.
    Some(unsafe { port_of((&raw const address).cast::<sockaddr>()) })
}

/// Bind `addr` with its port replaced by `port`.
///
/// # Safety
/// `addr` points to `len` readable bytes holding an AF_INET or AF_INET6 address.
unsafe fn bind_moved(
    real: BindFn,
    fd: c_int,
    addr: *const sockaddr,
    len: socklen_t,
    port: u16,
) -> c_int {
    // SAFETY: sockaddr_storage is plain data; all zeroes is valid.
    let mut copy: libc::sockaddr_storage = unsafe { core::mem::zeroed() };
    let n = (len as usize).min(core::mem::size_of::<libc::sockaddr_storage>());
    // SAFETY: n bytes are readable from addr and writable in copy; the regions do not overlap.
    unsafe {
        core::ptr::copy_nonoverlapping(addr.cast::<u8>(), (&raw mut copy).cast::<u8>(), n);
    }
    // SAFETY: copy is a whole sockaddr_storage, far longer than PORT_OFFSET + 2.
    unsafe { set_port_of((&raw mut copy).cast::<sockaddr>(), port) };
    // SAFETY: copy holds len valid bytes of an address of the same family.
    unsafe { real(fd, (&raw const copy).cast::<sockaddr>(), len) }
}

/// TCP or UDP from the socket's type; `None` for raw, SCTP-style or unknown sockets.
pub(crate) fn socket_protocol(fd: c_int) -> Option<u8> {
    match getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE)? {
        libc::SOCK_STREAM => Some(IPPROTO_TCP),
        libc::SOCK_DGRAM => Some(IPPROTO_UDP),
        _ => None,
    }
}

/// Whether the socket is set up to share its port on purpose: SO_REUSEPORT (any protocol), or
/// SO_REUSEADDR on UDP, which is how multicast listeners (mDNS on 5353, SSDP on 1900) let several
/// processes bind one port. (SO_REUSEADDR on TCP only allows binding over TIME_WAIT; almost
/// every TCP server sets it, so it says nothing about sharing.)
pub(crate) fn shares_its_port(fd: c_int, protocol: u8) -> bool {
    let set = |option| getsockopt_int(fd, libc::SOL_SOCKET, option).is_some_and(|v| v != 0);
    set(libc::SO_REUSEPORT) || (protocol == IPPROTO_UDP && set(libc::SO_REUSEADDR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_inet_addresses_with_a_port_are_handled() {
        // SAFETY: zeroed sockaddr_in is valid.
        let mut sin: libc::sockaddr_in = unsafe { core::mem::zeroed() };
        sin.sin_family = libc::AF_INET as libc::sa_family_t;
        sin.sin_port = 8000u16.to_be();
        let len = core::mem::size_of::<libc::sockaddr_in>() as socklen_t;
        let ptr = (&raw const sin).cast::<sockaddr>();
        // SAFETY: ptr points to len readable bytes.
        let target = unsafe { parse_target(ptr, len) }.expect("AF_INET with a port");
        assert_eq!((target.family, target.port), (AF_INET, 8000));
        // SAFETY: as above; a shorter length is rejected before reading past it.
        assert!(unsafe { parse_target(ptr, len - 1) }.is_none());
        let any_port = libc::sockaddr_in { sin_port: 0, ..sin };
        let ptr = (&raw const any_port).cast::<sockaddr>();
        // SAFETY: as above.
        assert!(unsafe { parse_target(ptr, len) }.is_none());
        // SAFETY: null is rejected without reading.
        assert!(unsafe { parse_target(core::ptr::null(), len) }.is_none());
    }
}
