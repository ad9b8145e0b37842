//! The interposed `listen()`: the one place a bind the shim let through can still lose its port.
//!
//! TCP servers set SO_REUSEADDR, and Linux lets two such sockets bind one port as long as
//! neither listens yet. Two sessions starting a server on one free port at the same moment both
//! bind it (each saw it free); whichever listens second gets EADDRINUSE from `listen()`, long
//! after the bind the shim watches, and the server dies at start. Here that refusal is caught:
//! the socket is rebuilt — a new one with the same family, type, protocol, file flags and every
//! option that reads back different from a fresh socket's — bound through the shim's own bind
//! (so it moves as any conflicting bind of this session moves, notice included), made to listen,
//! and put in place of the old one under the same descriptor number (`dup3`).
//!
//! The rebuild is exact or not made: an option that cannot be set to the value read, a socket
//! filter, O_ASYNC, or any failure on the way leaves the host with the refusal it would have had
//! without the shim. A `listen()` that succeeds costs one comparison.

use core::ffi::{c_int, c_void};
use core::sync::atomic::{AtomicPtr, Ordering};

use libc::{sockaddr, socklen_t};
use styxy_common::env;
use styxy_common::net::{AF_INET, AF_INET6, IPPROTO_TCP};

use crate::bind::{real_bind, shares_its_port, socket_protocol, Bind, BindTarget};
use crate::reentry::ReentryGuard;
use crate::sys::{env_flag, errno, getsockopt_int, port_of, set_errno, set_port_of};

type ListenFn = unsafe extern "C" fn(c_int, c_int) -> c_int;

/// The interposed `listen()`.
///
/// # Safety
/// Same contract as `listen(2)` (none beyond a descriptor number).
#[no_mangle]
pub unsafe extern "C" fn listen(fd: c_int, backlog: c_int) -> c_int {
    let Some(real) = real_listen() else {
        set_errno(libc::ENOSYS);
        return -1;
    };
    let entry_errno = errno();
    // SAFETY: forwarded from our caller.
    let rc = unsafe { real(fd, backlog) };
    if rc == 0 || errno() != libc::EADDRINUSE {
        return rc;
    }
    if relisten(real, fd, backlog) {
        set_errno(entry_errno);
        0
    } else {
        set_errno(libc::EADDRINUSE);
        -1
    }
}

static REAL_LISTEN: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());

fn real_listen() -> Option<ListenFn> {
    let mut ptr = REAL_LISTEN.load(Ordering::Acquire);
    if ptr.is_null() {
        // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name has no other preconditions.
        ptr = unsafe { libc::dlsym(libc::RTLD_NEXT, c"listen".as_ptr()) };
        if ptr.is_null() {
            return None;
        }
        REAL_LISTEN.store(ptr, Ordering::Release);
    }
    // SAFETY: the next `listen` in the lookup order has the listen(2) signature.
    Some(unsafe { core::mem::transmute::<*mut c_void, ListenFn>(ptr) })
}

/// `listen(fd)` was refused with EADDRINUSE: rebuild the socket on the port this session's
/// enforcer gives and listen there. True when `fd` now listens (the rebuilt socket in its place).
fn relisten(real: ListenFn, fd: c_int, backlog: c_int) -> bool {
    let Some(_guard) = ReentryGuard::enter() else {
        return false;
    };
    if env_flag(env::DISABLE.c_name) || socket_protocol(fd) != Some(IPPROTO_TCP) {
        return false;
    }
    // SO_REUSEPORT: sharing was meant, and the refusal is the answer (another user's group).
    if shares_its_port(fd, IPPROTO_TCP) {
        return false;
    }
    let Some(mut address) = Address::bound(fd) else {
        return false;
    };
    // A socket the shim moved before asks again for the port its program asked.
    let asked = crate::moves::asked_for(address.port());
    address.set_port(asked);
    let Some(rebuilt) = Rebuilt::like(fd, address.family) else {
        return false;
    };
    let Some(bind) = real_bind() else {
        return false;
    };
    let bound = Bind {
        real: bind,
        fd: rebuilt.0,
        addr: address.as_ptr(),
        len: address.len,
        target: BindTarget {
            family: address.family,
            port: asked,
        },
        entry_errno: errno(),
    }
    .managed();
    // SAFETY: the rebuilt socket is ours and bound (or the call fails harmlessly).
    if bound.rc != 0 || unsafe { real(rebuilt.0, backlog) } != 0 {
        return false;
    }
    rebuilt.replace(fd)
}

/// The address a socket is bound to, its port replaceable.
struct Address {
    storage: libc::sockaddr_storage,
    len: socklen_t,
    family: u8,
}

impl Address {
    /// The local address of `fd` when it is an AF_INET/AF_INET6 address with a port.
    fn bound(fd: c_int) -> Option<Address> {
        // SAFETY: sockaddr_storage is plain data; all zeroes is valid.
        let mut storage: libc::sockaddr_storage = unsafe { core::mem::zeroed() };
        let mut len = core::mem::size_of::<libc::sockaddr_storage>() as socklen_t;
        // SAFETY: valid pointers for the call; getsockname writes at most `len` bytes.
        let rc = unsafe { libc::getsockname(fd, (&raw mut storage).cast::<sockaddr>(), &mut len) };
        let family = match c_int::from(storage.ss_family) {
            libc::AF_INET if len as usize >= core::mem::size_of::<libc::sockaddr_in>() => AF_INET,
            libc::AF_INET6 if len as usize >= core::mem::size_of::<libc::sockaddr_in6>() => {
                AF_INET6
            }
            _ => return None,
        };
        let address = Address {
            storage,
            len,
            family,
        };
        (rc == 0 && address.port() != 0).then_some(address)
    }

    fn port(&self) -> u16 {
        // SAFETY: the storage is a whole sockaddr_storage.
        unsafe { port_of(self.as_ptr()) }
    }

    fn set_port(&mut self, port: u16) {
        // SAFETY: as in `port`.
        unsafe { set_port_of((&raw mut self.storage).cast::<sockaddr>(), port) }
    }

    fn as_ptr(&self) -> *const sockaddr {
        (&raw const self.storage).cast::<sockaddr>()
    }
}

/// A new socket made like another, closed on drop unless it replaced it.
struct Rebuilt(c_int);

impl Rebuilt {
    /// A socket like `old` (an AF_INET/AF_INET6 stream socket of `family`): same protocol, file
    /// status flags and options; `None` when any of that cannot be made exactly.
    fn like(old: c_int, family: u8) -> Option<Rebuilt> {
        let protocol = getsockopt_int(old, libc::SOL_SOCKET, libc::SO_PROTOCOL)?;
        // SAFETY: fcntl on a descriptor number; F_GETFL takes no argument.
        let status = unsafe { libc::fcntl(old, libc::F_GETFL) };
        if status < 0 || status & libc::O_ASYNC != 0 || has_a_filter(old) {
            return None;
        }
        let domain = if family == AF_INET6 {
            libc::AF_INET6
        } else {
            libc::AF_INET
        };
        // SAFETY: plain system call; the result is checked.
        let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, protocol) };
        if fd < 0 {
            return None;
        }
        let rebuilt = Rebuilt(fd);
        // SAFETY: as above; the new socket is ours.
        let flags_set = status & libc::O_NONBLOCK == 0
            || unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) } == 0;
        (flags_set && copy_options(old, fd, family)).then_some(rebuilt)
    }

    /// Puts this socket in place of `fd` (its close-on-exec flag kept): the old socket is
    /// closed by it. False, and `fd` untouched, when that fails.
    fn replace(self, fd: c_int) -> bool {
        // SAFETY: fcntl on a descriptor number; F_GETFD takes no argument.
        let descriptor_flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if descriptor_flags < 0 {
            return false;
        }
        let cloexec = if descriptor_flags & libc::FD_CLOEXEC != 0 {
            libc::O_CLOEXEC
        } else {
            0
        };
        // SAFETY: both are open descriptors; dup3 atomically closes fd's old description.
        unsafe { libc::dup3(self.0, fd, cloexec) == fd }
    }
}

impl Drop for Rebuilt {
    fn drop(&mut self) {
        // SAFETY: the descriptor is this struct's own (after a `replace`, its duplicate at `fd`
        // lives on, and this one goes).
        unsafe { libc::close(self.0) };
    }
}

/// A socket option and how to give back what it reads.
struct SocketOption {
    level: c_int,
    name: c_int,
    /// Reading it gives twice what was set (SO_RCVBUF, SO_SNDBUF: the kernel's bookkeeping).
    reads_doubled: bool,
}

const fn option(level: c_int, name: c_int) -> SocketOption {
    SocketOption {
        level,
        name,
        reads_doubled: false,
    }
}

/// Integer options a server sets before it listens (or that a listening socket passes on to
/// the connections it accepts), for both families.
const SOCKET_OPTIONS: &[SocketOption] = &[
    option(libc::SOL_SOCKET, libc::SO_REUSEADDR),
    option(libc::SOL_SOCKET, libc::SO_KEEPALIVE),
    SocketOption {
        reads_doubled: true,
        ..option(libc::SOL_SOCKET, libc::SO_RCVBUF)
    },
    SocketOption {
        reads_doubled: true,
        ..option(libc::SOL_SOCKET, libc::SO_SNDBUF)
    },
    option(libc::SOL_SOCKET, libc::SO_OOBINLINE),
    option(libc::SOL_SOCKET, libc::SO_PRIORITY),
    option(libc::SOL_SOCKET, libc::SO_RCVLOWAT),
    option(libc::SOL_SOCKET, libc::SO_MARK),
    option(libc::SOL_SOCKET, libc::SO_DONTROUTE),
    option(libc::SOL_SOCKET, libc::SO_TIMESTAMP),
    option(libc::SOL_SOCKET, libc::SO_PASSCRED),
    option(libc::SOL_SOCKET, libc::SO_BUSY_POLL),
    option(libc::SOL_SOCKET, libc::SO_INCOMING_CPU),
    option(libc::SOL_SOCKET, libc::SO_ZEROCOPY),
    option(libc::IPPROTO_TCP, libc::TCP_NODELAY),
    option(libc::IPPROTO_TCP, libc::TCP_MAXSEG),
    option(libc::IPPROTO_TCP, libc::TCP_CORK),
    option(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
    option(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
    option(libc::IPPROTO_TCP, libc::TCP_KEEPCNT),
    option(libc::IPPROTO_TCP, libc::TCP_SYNCNT),
    option(libc::IPPROTO_TCP, libc::TCP_LINGER2),
    option(libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT),
    option(libc::IPPROTO_TCP, libc::TCP_WINDOW_CLAMP),
    option(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
    option(libc::IPPROTO_TCP, libc::TCP_FASTOPEN),
    option(libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT),
    option(libc::IPPROTO_TCP, libc::TCP_THIN_LINEAR_TIMEOUTS),
    option(libc::IPPROTO_IP, libc::IP_TOS),
    option(libc::IPPROTO_IP, libc::IP_TTL),
    option(libc::IPPROTO_IP, libc::IP_FREEBIND),
    option(libc::IPPROTO_IP, libc::IP_TRANSPARENT),
];

/// Integer options of IPv6 sockets only.
const IPV6_OPTIONS: &[SocketOption] = &[
    option(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY),
    option(libc::IPPROTO_IPV6, libc::IPV6_TCLASS),
    option(libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS),
    option(libc::IPPROTO_IPV6, libc::IPV6_FREEBIND),
    option(libc::IPPROTO_IPV6, libc::IPV6_TRANSPARENT),
];

/// Byte-valued options: SO_LINGER, the timeouts `accept()` honours, the device and the
/// congestion control. Room for the largest (a congestion control's name, 16 bytes).
const BYTE_OPTIONS: &[(c_int, c_int)] = &[
    (libc::SOL_SOCKET, libc::SO_LINGER),
    (libc::SOL_SOCKET, libc::SO_RCVTIMEO),
    (libc::SOL_SOCKET, libc::SO_SNDTIMEO),
    (libc::SOL_SOCKET, libc::SO_BINDTODEVICE),
    (libc::IPPROTO_TCP, libc::TCP_CONGESTION),
];
const BYTE_OPTION_ROOM: usize = 16;

/// Gives `new` every option of `old` that differs from a fresh socket's, and checks each reads
/// back as on `old`. False at the first that cannot be made equal.
fn copy_options(old: c_int, new: c_int, family: u8) -> bool {
    let ipv6 = if family == AF_INET6 {
        IPV6_OPTIONS
    } else {
        &[]
    };
    let integers = SOCKET_OPTIONS.iter().chain(ipv6).all(|o| {
        let (was, is) = (
            getsockopt_int(old, o.level, o.name),
            getsockopt_int(new, o.level, o.name),
        );
        match (was, is) {
            (None, None) => true,
            (Some(was), Some(is)) if was == is => true,
            (Some(was), Some(_)) => {
                let value = if o.reads_doubled { was / 2 } else { was };
                write(new, o.level, o.name, &value.to_ne_bytes())
                    && getsockopt_int(new, o.level, o.name) == Some(was)
            }
            _ => false,
        }
    });
    integers
        && BYTE_OPTIONS.iter().all(|&(level, name)| {
            match (read_bytes(old, level, name), read_bytes(new, level, name)) {
                (None, None) => true,
                (Some(was), Some(is)) if was == is => true,
                (Some(was), Some(_)) => {
                    write(new, level, name, was.as_bytes())
                        && read_bytes(new, level, name).is_some_and(|is| is == was)
                }
                _ => false,
            }
        })
}

/// Whether a classic BPF filter is attached (asked with room for none, SO_GET_FILTER gives
/// its length), or the question fails: such a socket is not rebuilt.
fn has_a_filter(fd: c_int) -> bool {
    let mut len: socklen_t = 0;
    // SAFETY: with a zero length nothing is written to the (null) buffer.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_GET_FILTER,
            core::ptr::null_mut(),
            &mut len,
        )
    };
    rc != 0 || len != 0
}

/// An option's bytes as read, up to `BYTE_OPTION_ROOM`.
#[derive(PartialEq, Eq)]
struct OptionBytes {
    bytes: [u8; BYTE_OPTION_ROOM],
    len: usize,
}

impl OptionBytes {
    fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or_default()
    }
}

fn read_bytes(fd: c_int, level: c_int, name: c_int) -> Option<OptionBytes> {
    let mut read = OptionBytes {
        bytes: [0; BYTE_OPTION_ROOM],
        len: 0,
    };
    let mut len = BYTE_OPTION_ROOM as socklen_t;
    // SAFETY: the buffer holds `len` writable bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            read.bytes.as_mut_ptr().cast::<c_void>(),
            &mut len,
        )
    };
    read.len = (len as usize).min(BYTE_OPTION_ROOM);
    (rc == 0).then_some(read)
}

fn write(fd: c_int, level: c_int, name: c_int, value: &[u8]) -> bool {
    // SAFETY: value is readable for its length.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            value.as_ptr().cast::<c_void>(),
            value.len() as socklen_t,
        ) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(domain: c_int) -> c_int {
        // SAFETY: plain system call.
        let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0, "a socket");
        fd
    }

    fn set(fd: c_int, level: c_int, name: c_int, value: c_int) {
        assert!(
            write(fd, level, name, &value.to_ne_bytes()),
            "set {level}/{name}"
        );
    }

    #[test]
    fn a_rebuilt_socket_has_the_options_and_flags_of_the_old() {
        let old = tcp(libc::AF_INET6);
        set(old, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
        set(old, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
        set(old, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 17);
        set(old, libc::SOL_SOCKET, libc::SO_RCVBUF, 100_000);
        set(old, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1);
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 3,
        };
        // SAFETY: a valid linger struct for its size.
        let bytes = unsafe {
            core::slice::from_raw_parts(
                (&raw const linger).cast::<u8>(),
                core::mem::size_of::<libc::linger>(),
            )
        };
        assert!(write(old, libc::SOL_SOCKET, libc::SO_LINGER, bytes));
        // SAFETY: fcntl on our own socket.
        let nonblocking = unsafe { libc::fcntl(old, libc::F_SETFL, libc::O_NONBLOCK) };
        assert_eq!(nonblocking, 0);

        let rebuilt = Rebuilt::like(old, AF_INET6).expect("rebuilt");
        for o in SOCKET_OPTIONS.iter().chain(IPV6_OPTIONS) {
            assert_eq!(
                getsockopt_int(rebuilt.0, o.level, o.name),
                getsockopt_int(old, o.level, o.name),
                "option {}/{}",
                o.level,
                o.name
            );
        }
        for &(level, name) in BYTE_OPTIONS {
            assert!(
                read_bytes(rebuilt.0, level, name) == read_bytes(old, level, name),
                "option {level}/{name}"
            );
        }
        // SAFETY: fcntl on our own socket.
        let status = unsafe { libc::fcntl(rebuilt.0, libc::F_GETFL) };
        assert_ne!(status & libc::O_NONBLOCK, 0, "non-blocking kept");
        // SAFETY: closing our own socket.
        unsafe { libc::close(old) };
    }

    #[test]
    fn a_socket_with_a_filter_is_not_rebuilt() {
        let old = tcp(libc::AF_INET);
        assert!(!has_a_filter(old), "a fresh socket has none");
        // One instruction: accept the whole packet.
        let mut accept_all = [libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: u32::MAX,
        }];
        let program = libc::sock_fprog {
            len: 1,
            filter: accept_all.as_mut_ptr(),
        };
        // SAFETY: a valid one-instruction program for the call.
        let attached = unsafe {
            libc::setsockopt(
                old,
                libc::SOL_SOCKET,
                libc::SO_ATTACH_FILTER,
                (&raw const program).cast::<c_void>(),
                core::mem::size_of::<libc::sock_fprog>() as socklen_t,
            )
        };
        assert_eq!(attached, 0);
        assert!(has_a_filter(old));
        assert!(Rebuilt::like(old, AF_INET).is_none());
        // SAFETY: closing our own socket.
        unsafe { libc::close(old) };
    }

    #[test]
    fn a_value_a_copy_cannot_reproduce_stops_the_rebuild() {
        // A receive buffer forced above net.core.rmem_max (CAP_NET_ADMIN) cannot be set again
        // with SO_RCVBUF: the rebuild must refuse rather than give the server a smaller one.
        let old = tcp(libc::AF_INET);
        let forced: c_int = 64 << 20;
        if !write(
            old,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &forced.to_ne_bytes(),
        ) {
            eprintln!("skipped: SO_RCVBUFFORCE needs CAP_NET_ADMIN");
            // SAFETY: closing our own socket.
            unsafe { libc::close(old) };
            return;
        }
        assert!(Rebuilt::like(old, AF_INET).is_none());
        // SAFETY: closing our own socket.
        unsafe { libc::close(old) };
    }

    #[test]
    fn replace_keeps_the_descriptor_number_and_its_close_on_exec_flag() {
        let old = tcp(libc::AF_INET);
        let rebuilt = Rebuilt::like(old, AF_INET).expect("rebuilt");
        set(rebuilt.0, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
        assert!(rebuilt.replace(old));
        assert_eq!(
            getsockopt_int(old, libc::IPPROTO_TCP, libc::TCP_NODELAY),
            Some(1)
        );
        // SAFETY: fcntl on our own socket.
        let flags = unsafe { libc::fcntl(old, libc::F_GETFD) };
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
        // SAFETY: closing our own socket.
        unsafe { libc::close(old) };
    }
}
