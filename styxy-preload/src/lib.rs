//! `libstyxy_preload.so`: an `LD_PRELOAD` shim around `bind()`.
//!
//! For an AF_INET/AF_INET6 TCP or UDP bind of a non-zero port (not set up to share it: SO_REUSEPORT,
//! or SO_REUSEADDR on UDP), it asks the Styxy daemon whether the
//! port is free for this process (`ResolveBind`, tight deadline). KEEP → bind as asked; REASSIGN →
//! bind the port the daemon picked and print one `✓ STYXY:` line. Everything else, and every bind
//! while the daemon is unreachable, goes straight to the real `bind()` (fail-open).
//!
//! This library is loaded into every process of an agent's session, so it stays tiny: libc only.
//! The gRPC client (its own small HTTP/2 framing, prost, an HPACK decoder) is
//! `libstyxy_shim_client.so`, `dlopen()`ed by the first bind that needs the daemon. Rules kept here: no panic crosses the FFI boundary, `errno` is what the real
//! `bind()` left, re-entry is guarded, and all state is atomics so a `fork()` cannot leave a lock held.

use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};

use libc::{sockaddr, socklen_t};
use styxy_common::shim::{
    AbiVersionFn, BindAnswer, BindQuery, ResolveBindFn, ABI_VERSION, ABI_VERSION_SYMBOL,
    ACTION_REASSIGN, CLIENT_LIBRARY, FAMILY_INET, FAMILY_INET6, PROTO_TCP, PROTO_UDP,
    RESOLVE_BIND_SYMBOL, RESOLVE_OK, RESOLVE_TIMEOUT,
};

type BindFn = unsafe extern "C" fn(c_int, *const sockaddr, socklen_t) -> c_int;

/// Default deadline for one `ResolveBind`, connect included (`STYXY_TIMEOUT_MS` overrides).
const DEFAULT_TIMEOUT_MS: u32 = 50;
/// After the daemon failed to answer, binds pass straight through for this long.
const FAIL_OPEN_MEMORY_MS: u64 = 1000;
/// How many more times to ask when the port the daemon gave was taken before we could bind it.
const MOVE_RETRIES: usize = 3;
/// When the daemon was too slow and the port asked for turns out taken, the bind would fail:
/// worth waiting this long for a second answer.
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
    match std::panic::catch_unwind(|| unsafe { shim_bind(real, fd, addr, len) }) {
        Ok(rc) => rc,
        // Nothing in shim_bind can panic after a real bind succeeded, so binding as asked is right.
        // SAFETY: forwarded from our caller's contract.
        Err(_) => unsafe { real(fd, addr, len) },
    }
}

static REAL_BIND: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());

fn real_bind() -> Option<BindFn> {
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
    Some(unsafe { std::mem::transmute::<*mut c_void, BindFn>(ptr) })
}

thread_local! {
    /// Set while this thread is inside the shim, so a bind made on the way (by anything we call)
    /// goes straight through instead of recursing.
    static IN_SHIM: Cell<bool> = const { Cell::new(false) };
}

struct ReentryGuard;

impl ReentryGuard {
    fn enter() -> Option<ReentryGuard> {
        IN_SHIM
            .try_with(|flag| (!flag.replace(true)).then_some(ReentryGuard))
            .ok()
            .flatten()
    }
}

impl Drop for ReentryGuard {
    fn drop(&mut self) {
        let _ = IN_SHIM.try_with(|flag| flag.set(false));
    }
}

/// What the shim needs from the address being bound.
struct BindTarget {
    family: u8,
    port: u16,
}

/// The family and port of an AF_INET/AF_INET6 address with a non-zero port; `None` for anything else.
///
/// # Safety
/// `addr` is null or points to `len` readable bytes.
unsafe fn parse_target(addr: *const sockaddr, len: socklen_t) -> Option<BindTarget> {
    if addr.is_null() || (len as usize) < std::mem::size_of::<libc::sa_family_t>() {
        return None;
    }
    // SAFETY: at least the family field is readable (checked above); read_unaligned needs no alignment.
    let family = unsafe { std::ptr::addr_of!((*addr).sa_family).read_unaligned() };
    let (family, port) = match c_int::from(family) {
        libc::AF_INET if len as usize >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: len covers a whole sockaddr_in.
            let sin = unsafe { addr.cast::<libc::sockaddr_in>().read_unaligned() };
            (FAMILY_INET, u16::from_be(sin.sin_port))
        }
        libc::AF_INET6 if len as usize >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: len covers a whole sockaddr_in6.
            let sin6 = unsafe { addr.cast::<libc::sockaddr_in6>().read_unaligned() };
            (FAMILY_INET6, u16::from_be(sin6.sin6_port))
        }
        _ => return None,
    };
    (port != 0).then_some(BindTarget { family, port })
}

/// # Safety
/// Same contract as `bind(2)`.
unsafe fn shim_bind(real: BindFn, fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
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
struct Outcome {
    rc: c_int,
    errno: c_int,
}

/// One interposed bind of an AF_INET/AF_INET6 address with a non-zero port.
struct Bind {
    real: BindFn,
    fd: c_int,
    addr: *const sockaddr,
    len: socklen_t,
    target: BindTarget,
    /// errno as the host had it: a successful bind leaves it unchanged.
    entry_errno: c_int,
}

/// What asking the daemon gave.
enum Reply {
    Answer(BindAnswer),
    /// No daemon (or it refused to answer): bind as asked, and do not ask again for a while.
    Down,
    /// The daemon is there but did not answer within the deadline.
    Slow,
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

    fn managed(&self) -> Outcome {
        // Cheapest checks first: a daemon known to be down costs two loads and a clock read.
        let failure = recent_failure();
        if failure == Some(Failure::Down) || env_flag(c"STYXY_DISABLE") {
            return self.as_asked();
        }
        let Some(protocol) = socket_protocol(self.fd) else {
            return self.as_asked();
        };
        if shares_its_port(self.fd, protocol) {
            // Intended sharing (a worker pool, an mDNS/SSDP listener): never moved.
            return self.as_asked();
        }
        let mut query = BindQuery {
            // SAFETY: getpid has no preconditions.
            pid: unsafe { libc::getpid() } as u32,
            port: self.target.port,
            protocol,
            family: self.target.family,
            timeout_ms: timeout_ms(),
            socket_path: getenv(c"STYXY_SOCKET"),
            instance_id: getenv(c"STYXY_INSTANCE"),
        };
        match failure {
            Some(Failure::Down) => return self.as_asked(),
            // This process moved this port before (its IPv4 socket, say): its other sockets for
            // the port must follow it, not stay where they were asked, so wait for the answer.
            Some(Failure::Slow) if moved_before(query.port) => {
                query.timeout_ms = SECOND_CHANCE_TIMEOUT_MS.max(query.timeout_ms);
                if let Reply::Answer(answer) = ask(&query) {
                    return self
                        .follow(&query, answer)
                        .unwrap_or_else(|| self.as_asked());
                }
            }
            Some(Failure::Slow) => {}
            None => match ask(&query) {
                Reply::Answer(answer) => {
                    return self
                        .follow(&query, answer)
                        .unwrap_or_else(|| self.as_asked())
                }
                Reply::Down => {
                    remember_failure(Failure::Down);
                    return self.as_asked();
                }
                Reply::Slow => remember_failure(Failure::Slow),
            },
        }
        // The daemon is there but slow (a loaded machine): bind as asked, and only when that fails
        // because the port is taken, wait longer for an answer. A late move beats a failed start.
        let first = self.as_asked();
        if first.rc == 0 || first.errno != libc::EADDRINUSE {
            return first;
        }
        query.timeout_ms = SECOND_CHANCE_TIMEOUT_MS.max(query.timeout_ms);
        match ask(&query) {
            Reply::Answer(answer) => self.follow(&query, answer).unwrap_or(first),
            Reply::Down | Reply::Slow => first,
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
                return None;
            }
            set_errno(self.entry_errno);
            // SAFETY: addr/len were validated by parse_target and are readable.
            let rc = unsafe { bind_moved(self.real, self.fd, self.addr, self.len, port) };
            if rc == 0 {
                if record_move(self.target.port, port) {
                    notify(self.target.port, &answer);
                }
                return Some(Outcome {
                    rc,
                    errno: self.entry_errno,
                });
            }
            if errno() != libc::EADDRINUSE {
                return None;
            }
        }
        None
    }
}

/// One `ResolveBind` through the client library.
fn ask(query: &BindQuery) -> Reply {
    let Some(resolve) = client() else {
        return Reply::Down;
    };
    let mut answer = BindAnswer::empty();
    // SAFETY: both pointers are valid for the call; the client library does not keep them.
    match unsafe { resolve(query, &mut answer) } {
        RESOLVE_OK => Reply::Answer(answer),
        RESOLVE_TIMEOUT => Reply::Slow,
        _ => Reply::Down,
    }
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
    let mut copy: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let n = (len as usize).min(std::mem::size_of::<libc::sockaddr_storage>());
    // SAFETY: n bytes are readable from addr and writable in copy; the regions do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(addr.cast::<u8>(), (&raw mut copy).cast::<u8>(), n);
    }
    // sin_port and sin6_port are both the two bytes right after the family.
    let port_offset = std::mem::offset_of!(libc::sockaddr_in, sin_port);
    debug_assert_eq!(
        port_offset,
        std::mem::offset_of!(libc::sockaddr_in6, sin6_port)
    );
    // SAFETY: n ≥ sizeof(sockaddr_in) > port_offset + 2, within copy.
    unsafe {
        (&raw mut copy)
            .cast::<u8>()
            .add(port_offset)
            .cast::<[u8; 2]>()
            .write_unaligned(port.to_be_bytes());
    }
    // SAFETY: copy holds len valid bytes of an address of the same family.
    unsafe { real(fd, (&raw const copy).cast::<sockaddr>(), len) }
}

/// TCP or UDP from the socket's type; `None` for raw, SCTP-style or unknown sockets.
fn socket_protocol(fd: c_int) -> Option<u8> {
    match getsockopt_int(fd, libc::SO_TYPE)? {
        libc::SOCK_STREAM => Some(PROTO_TCP),
        libc::SOCK_DGRAM => Some(PROTO_UDP),
        _ => None,
    }
}

/// Whether the socket is set up to share its port on purpose: SO_REUSEPORT (any protocol), or
/// SO_REUSEADDR on UDP, which is how multicast listeners (mDNS on 5353, SSDP on 1900) let several
/// processes bind one port. (SO_REUSEADDR on TCP only allows binding over TIME_WAIT; almost
/// every TCP server sets it, so it says nothing about sharing.)
fn shares_its_port(fd: c_int, protocol: u8) -> bool {
    let set = |option| getsockopt_int(fd, option).is_some_and(|v| v != 0);
    set(libc::SO_REUSEPORT) || (protocol == PROTO_UDP && set(libc::SO_REUSEADDR))
}

fn getsockopt_int(fd: c_int, option: c_int) -> Option<c_int> {
    let mut value: c_int = 0;
    let mut len = std::mem::size_of::<c_int>() as socklen_t;
    // SAFETY: value and len are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&raw mut value).cast::<c_void>(),
            &mut len,
        )
    };
    (rc == 0).then_some(value)
}

// ---- the client library, loaded on first need ----

static RESOLVE: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static CLIENT_UNAVAILABLE: AtomicBool = AtomicBool::new(false);

fn client() -> Option<ResolveBindFn> {
    let ptr = RESOLVE.load(Ordering::Acquire);
    if !ptr.is_null() {
        // SAFETY: only ever set to the client library's resolve function, checked below.
        return Some(unsafe { std::mem::transmute::<*mut c_void, ResolveBindFn>(ptr) });
    }
    if CLIENT_UNAVAILABLE.load(Ordering::Relaxed) {
        return None;
    }
    let loaded = load_client();
    if loaded.is_none() {
        CLIENT_UNAVAILABLE.store(true, Ordering::Relaxed);
    }
    loaded
}

fn load_client() -> Option<ResolveBindFn> {
    let path = client_library_path()?;
    // dlopen is thread-safe and returns the same handle to concurrent callers. The library is
    // never closed (RTLD_NODELETE): its runtime thread may still be running.
    // SAFETY: path is NUL-terminated.
    let handle = unsafe {
        libc::dlopen(
            path.as_ptr(),
            libc::RTLD_NOW | libc::RTLD_LOCAL | libc::RTLD_NODELETE,
        )
    };
    if handle.is_null() {
        return None;
    }
    // SAFETY: handle is a live library handle and the names are NUL-terminated.
    let (version, resolve) = unsafe {
        (
            libc::dlsym(handle, ABI_VERSION_SYMBOL.as_ptr()),
            libc::dlsym(handle, RESOLVE_BIND_SYMBOL.as_ptr()),
        )
    };
    if version.is_null() || resolve.is_null() {
        return None;
    }
    // SAFETY: the symbol is the client library's version function (checked by name).
    let version = unsafe { std::mem::transmute::<*mut c_void, AbiVersionFn>(version) };
    // SAFETY: it takes no arguments and has no preconditions.
    if unsafe { version() } != ABI_VERSION {
        return None;
    }
    RESOLVE.store(resolve, Ordering::Release);
    // SAFETY: the symbol is the resolve function of a library with our ABI version.
    Some(unsafe { std::mem::transmute::<*mut c_void, ResolveBindFn>(resolve) })
}

/// `$STYXY_CLIENT_LIB`, else `libstyxy_shim_client.so` in the directory this library was loaded from.
fn client_library_path() -> Option<CString> {
    let overridden = getenv(c"STYXY_CLIENT_LIB");
    if !overridden.is_null() {
        // SAFETY: getenv returns a NUL-terminated string.
        return Some(unsafe { CStr::from_ptr(overridden) }.to_owned());
    }
    // SAFETY: Dl_info is plain data; dladdr fills it for an address inside a loaded object.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: any address is accepted; `bind` is inside this library.
    let found = unsafe { libc::dladdr(bind as *const c_void, &mut info) };
    if found == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dladdr sets dli_fname to a NUL-terminated path.
    let ours = unsafe { CStr::from_ptr(info.dli_fname) };
    let ours = Path::new(std::ffi::OsStr::from_bytes(ours.to_bytes()));
    let client = ours.parent()?.join(CLIENT_LIBRARY);
    CString::new(client.as_os_str().as_bytes()).ok()
}

// ---- fail-open memory ----

/// Why the last ask got no answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    Down,
    Slow,
}

/// `(monotonic ms + 1) << 1 | slow` of the last failure to get an answer (0: none).
static LAST_FAILURE: AtomicU64 = AtomicU64::new(0);

fn monotonic_ms() -> u64 {
    // SAFETY: timespec is plain data; clock_gettime writes it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: CLOCK_MONOTONIC is always available; ts is valid for writes.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000
}

fn remember_failure(failure: Failure) {
    let stamp = ((monotonic_ms() + 1) << 1) | u64::from(failure == Failure::Slow);
    LAST_FAILURE.store(stamp, Ordering::Relaxed);
}

/// The failure of the last `FAIL_OPEN_MEMORY_MS`, if any.
fn recent_failure() -> Option<Failure> {
    let stamp = LAST_FAILURE.load(Ordering::Relaxed);
    if stamp == 0 || monotonic_ms() >= (stamp >> 1) - 1 + FAIL_OPEN_MEMORY_MS {
        return None;
    }
    Some(if stamp & 1 == 1 {
        Failure::Slow
    } else {
        Failure::Down
    })
}

// ---- this process's moves, and the notice ----

/// Pid that owns the entries of `MOVES` (a forked child starts a fresh list).
static MOVES_PID: AtomicU32 = AtomicU32::new(0);
/// `(requested << 16) | new` of each move this process made (whether announced or not).
static MOVES: [AtomicU32; 32] = [const { AtomicU32::new(0) }; 32];

/// Records that this process moved `requested` to `new`; true the first time (IPv4 and IPv6 binds
/// of one server make a single line).
fn record_move(requested: u16, new: u16) -> bool {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() } as u32;
    if MOVES_PID.swap(pid, Ordering::AcqRel) != pid {
        for slot in &MOVES {
            slot.store(0, Ordering::Relaxed);
        }
    }
    let key = (u32::from(requested) << 16) | u32::from(new);
    for slot in &MOVES {
        match slot.compare_exchange(0, key, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return true,
            Err(existing) if existing == key => return false,
            Err(_) => continue,
        }
    }
    true
}

/// Whether this process has moved `requested` before (to any port).
fn moved_before(requested: u16) -> bool {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() } as u32;
    MOVES_PID.load(Ordering::Acquire) == pid
        && MOVES.iter().any(|slot| {
            let key = slot.load(Ordering::Acquire);
            key != 0 && (key >> 16) as u16 == requested
        })
}

fn notify(requested: u16, answer: &BindAnswer) {
    let fd = match env_str(c"STYXY_NOTIFY") {
        Some(b"off") | Some(b"none") | Some(b"0") => return,
        Some(b"stdout") => libc::STDOUT_FILENO,
        _ => libc::STDERR_FILENO,
    };
    let line = notice_line(requested, answer);
    let mut rest = line.as_bytes();
    while !rest.is_empty() {
        // SAFETY: rest is a valid readable buffer of rest.len() bytes.
        let n = unsafe { libc::write(fd, rest.as_ptr().cast::<c_void>(), rest.len()) };
        if n > 0 {
            rest = &rest[n as usize..];
        } else if n < 0 && errno() == libc::EINTR {
            continue;
        } else {
            break;
        }
    }
}

fn notice_line(requested: u16, answer: &BindAnswer) -> String {
    let name = String::from_utf8_lossy(answer.holder_name_bytes());
    let name = if name.is_empty() {
        "another process".into()
    } else {
        name
    };
    let new = answer.port;
    if answer.holder_pid != 0 {
        format!(
            "✓ STYXY: Auto-assigned port {new} ({requested} in use by {name}, pid {})\n",
            answer.holder_pid
        )
    } else {
        format!("✓ STYXY: Auto-assigned port {new} ({requested} in use by {name})\n")
    }
}

// ---- small helpers over libc ----

fn errno() -> c_int {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() }
}

fn set_errno(value: c_int) {
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = value }
}

/// libc's getenv: lock-free, so it is safe to call in a child after `fork()`.
fn getenv(name: &CStr) -> *const c_char {
    // SAFETY: name is NUL-terminated.
    unsafe { libc::getenv(name.as_ptr()) }
}

fn env_str(name: &CStr) -> Option<&'static [u8]> {
    let value = getenv(name);
    // SAFETY: getenv returns null or a NUL-terminated string that lives as long as the environment.
    (!value.is_null()).then(|| unsafe { CStr::from_ptr(value) }.to_bytes())
}

fn env_flag(name: &CStr) -> bool {
    matches!(env_str(name), Some(b"1") | Some(b"true") | Some(b"yes"))
}

fn timeout_ms() -> u32 {
    env_str(c"STYXY_TIMEOUT_MS")
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.trim().parse::<u32>().ok())
        .map(|v| v.clamp(1, 10_000))
        .unwrap_or(DEFAULT_TIMEOUT_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(port: u16, pid: u32, name: &str) -> BindAnswer {
        let mut a = BindAnswer::empty();
        a.action = ACTION_REASSIGN;
        a.port = port;
        a.holder_pid = pid;
        a.set_holder_name(name);
        a
    }

    #[test]
    fn notice_names_both_ports_and_the_holder() {
        assert_eq!(
            notice_line(6006, &answer(6007, 4121, "storybook")),
            "✓ STYXY: Auto-assigned port 6007 (6006 in use by storybook, pid 4121)\n"
        );
        assert_eq!(
            notice_line(8000, &answer(8001, 0, "")),
            "✓ STYXY: Auto-assigned port 8001 (8000 in use by another process)\n"
        );
    }

    #[test]
    fn a_move_is_announced_once_per_process_and_remembered() {
        assert!(!moved_before(7001));
        assert!(record_move(7001, 7002));
        assert!(!record_move(7001, 7002));
        assert!(record_move(7001, 7003));
        assert!(moved_before(7001));
        assert!(!moved_before(7002));
    }

    #[test]
    fn only_inet_addresses_with_a_port_are_handled() {
        // SAFETY: zeroed sockaddr_in is valid.
        let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        sin.sin_family = libc::AF_INET as libc::sa_family_t;
        sin.sin_port = 8000u16.to_be();
        let len = std::mem::size_of::<libc::sockaddr_in>() as socklen_t;
        let ptr = (&raw const sin).cast::<sockaddr>();
        // SAFETY: ptr points to len readable bytes.
        let target = unsafe { parse_target(ptr, len) }.expect("AF_INET with a port");
        assert_eq!((target.family, target.port), (FAMILY_INET, 8000));
        // SAFETY: as above; a shorter length is rejected before reading past it.
        assert!(unsafe { parse_target(ptr, len - 1) }.is_none());
        let any_port = libc::sockaddr_in { sin_port: 0, ..sin };
        let ptr = (&raw const any_port).cast::<sockaddr>();
        // SAFETY: as above.
        assert!(unsafe { parse_target(ptr, len) }.is_none());
        // SAFETY: null is rejected without reading.
        assert!(unsafe { parse_target(std::ptr::null(), len) }.is_none());
    }
}
