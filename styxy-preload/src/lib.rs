//! `libstyxy_preload.so`: an `LD_PRELOAD` shim around `bind()`, and the session's view.
//!
//! For an AF_INET/AF_INET6 TCP or UDP bind of a non-zero port (not set up to share it: SO_REUSEPORT,
//! or SO_REUSEADDR on UDP), it looks the port up in the session table the daemon publishes
//! ([`table`]): a port nobody holds is bound straight away, with no call to the daemon. For a port
//! the table shows taken, or one the kernel refused with EADDRINUSE, it asks the daemon
//! (`ResolveBind`, tight deadline). KEEP → bind as asked; REASSIGN → bind the port the daemon
//! picked and print one `✓ STYXY:` line. Everything else, and every bind while the daemon is
//! unreachable, goes straight to the real `bind()` (fail-open).
//!
//! [`listen`] catches the one refusal a free bind can still meet (two SO_REUSEADDR sockets bound
//! to one port before either listened) and moves the server instead of letting it fail.
//!
//! [`redirect`] applies the session's view to loopback traffic: inside the session, a port it was
//! moved off reaches the moved server.
//!
//! This library is loaded into every process of an agent's session, so it stays tiny: `no_std`,
//! no allocation, libc alone (not even libgcc_s: it is built with panic = "abort"). The gRPC client
//! (its own small HTTP/2 framing, prost, an HPACK decoder) is `libstyxy_shim_client.so`,
//! `dlopen()`ed by the first bind that needs the daemon, and catches its own panics.
//!
//! Rules kept here: no panic, ever — a release build that contains a reachable panic does not link
//! (see [`on_panic`]); `errno` is what the real `bind()` left; re-entry is guarded; and all shared
//! state is atomics so a `fork()` cannot leave a lock held.
#![cfg_attr(not(test), no_std)]

mod enforcer;
mod listen;
mod redirect;
mod table;

use core::ffi::{c_char, c_int, c_void, CStr};
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use libc::{sockaddr, socklen_t};
use styxy_common::env;
use styxy_common::net::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP};
use styxy_common::shim::{
    AbiVersionFn, BindAnswer, BindQuery, ResolveBindFn, ABI_VERSION, ABI_VERSION_SYMBOL,
    ACTION_REASSIGN, CLIENT_LIBRARY, RESOLVE_BIND_SYMBOL, RESOLVE_OK, RESOLVE_TIMEOUT,
};

/// The panic handler of a library that must never panic.
///
/// In a release build it calls a function that exists nowhere, and the library is linked with
/// `-z defs` (build.rs): if the optimiser cannot prove every panic unreachable, the build fails to
/// link, naming this symbol. A debug build keeps its panic paths (overflow and bounds checks), so
/// there a panic aborts.
#[cfg(not(test))]
#[panic_handler]
fn on_panic(_: &core::panic::PanicInfo) -> ! {
    #[cfg(not(debug_assertions))]
    {
        extern "C" {
            fn styxy_preload_release_build_has_a_reachable_panic() -> !;
        }
        // SAFETY: never linked; see above.
        unsafe { styxy_preload_release_build_has_a_reachable_panic() }
    }
    #[cfg(debug_assertions)]
    // SAFETY: abort has no preconditions.
    unsafe {
        libc::abort()
    }
}

type BindFn = unsafe extern "C" fn(c_int, *const sockaddr, socklen_t) -> c_int;

/// Default deadline for one `ResolveBind`, connect included (`STYXY_TIMEOUT_MS` overrides).
const DEFAULT_TIMEOUT_MS: u32 = 50;
/// After the daemon failed to answer, binds pass straight through for this long.
const FAIL_OPEN_MEMORY_MS: u64 = 1000;
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
    Some(unsafe { core::mem::transmute::<*mut c_void, BindFn>(ptr) })
}

/// Marks the threads that are inside the shim, so a bind made on the way (by anything we call)
/// goes straight through instead of recursing. A pthread key (no std thread-locals here); stored
/// as key + 1, 0 until created.
static IN_SHIM_KEY: AtomicUsize = AtomicUsize::new(0);

fn in_shim_key() -> Option<libc::pthread_key_t> {
    let stored = IN_SHIM_KEY.load(Ordering::Acquire);
    if stored != 0 {
        return libc::pthread_key_t::try_from(stored - 1).ok();
    }
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: key is valid for writes; no destructor.
    if unsafe { libc::pthread_key_create(&mut key, None) } != 0 {
        return None;
    }
    let ours = key as usize + 1;
    match IN_SHIM_KEY.compare_exchange(0, ours, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => Some(key),
        Err(theirs) => {
            // Another thread created one first: use theirs.
            // SAFETY: key was created above and never handed out.
            unsafe { libc::pthread_key_delete(key) };
            libc::pthread_key_t::try_from(theirs - 1).ok()
        }
    }
}

struct ReentryGuard(libc::pthread_key_t);

impl ReentryGuard {
    /// `None` when this thread is already inside the shim (or no key could be had).
    fn enter() -> Option<ReentryGuard> {
        let key = in_shim_key()?;
        // SAFETY: key is a live key of this process.
        if !unsafe { libc::pthread_getspecific(key) }.is_null() {
            return None;
        }
        // Any non-null value marks the thread; this one points at the key's own static.
        let mark = (&raw const IN_SHIM_KEY).cast::<c_void>();
        // SAFETY: as above; the value is never dereferenced.
        (unsafe { libc::pthread_setspecific(key, mark) } == 0).then_some(ReentryGuard(key))
    }
}

impl Drop for ReentryGuard {
    fn drop(&mut self) {
        // SAFETY: the key is live; clearing this thread's value.
        unsafe { libc::pthread_setspecific(self.0, core::ptr::null()) };
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
        let failure = recent_failure();
        if env_flag(env::DISABLE.c_name) {
            return self.as_asked();
        }
        if failure == Some(Failure::Down) {
            return self.as_moved_before().unwrap_or_else(|| self.as_asked());
        }
        let Some(protocol) = socket_protocol(self.fd) else {
            return self.as_asked();
        };
        if shares_its_port(self.fd, protocol) {
            // Intended sharing (a worker pool, an mDNS/SSDP listener): never moved.
            return self.as_asked();
        }
        let query = self.query(protocol);
        match failure {
            Some(Failure::Down) => {
                return self.as_moved_before().unwrap_or_else(|| self.as_asked())
            }
            // This process moved this port before (its IPv4 socket, say): its other sockets for
            // the port must follow it, not stay where they were asked, so ask (within the normal
            // deadline: the daemon timed out lately).
            Some(Failure::Slow) if moved_before(query.port) => {
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
                    return self.as_moved_before().unwrap_or_else(|| self.as_asked());
                }
                Reply::Slow => remember_failure(Failure::Slow),
            },
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
    /// and IPv6 binds of one server make one line).
    fn tell_a_kernel_move(&self) {
        let Some(bound) = bound_port(self.fd) else {
            return;
        };
        if bound != self.target.port && record_move(self.target.port, bound) {
            let mut answer = BindAnswer::empty();
            answer.action = ACTION_REASSIGN;
            answer.port = bound;
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

/// The local port socket `fd` is bound to (errno left as found).
fn bound_port(fd: c_int) -> Option<u16> {
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
    let port = unsafe {
        (&raw const address)
            .cast::<u8>()
            .add(PORT_OFFSET)
            .cast::<[u8; 2]>()
            .read_unaligned()
    };
    Some(u16::from_be_bytes(port))
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
    // SAFETY: n ≥ sizeof(sockaddr_in) > PORT_OFFSET + 2, within copy.
    unsafe {
        (&raw mut copy)
            .cast::<u8>()
            .add(PORT_OFFSET)
            .cast::<[u8; 2]>()
            .write_unaligned(port.to_be_bytes());
    }
    // SAFETY: copy holds len valid bytes of an address of the same family.
    unsafe { real(fd, (&raw const copy).cast::<sockaddr>(), len) }
}

/// Where the port is in both sockaddr_in and sockaddr_in6: the two bytes right after the family.
pub(crate) const PORT_OFFSET: usize = core::mem::offset_of!(libc::sockaddr_in, sin_port);
const _: () = assert!(PORT_OFFSET == core::mem::offset_of!(libc::sockaddr_in6, sin6_port));

/// TCP or UDP from the socket's type; `None` for raw, SCTP-style or unknown sockets.
pub(crate) fn socket_protocol(fd: c_int) -> Option<u8> {
    match getsockopt_int(fd, libc::SO_TYPE)? {
        libc::SOCK_STREAM => Some(IPPROTO_TCP),
        libc::SOCK_DGRAM => Some(IPPROTO_UDP),
        _ => None,
    }
}

/// Whether the socket is set up to share its port on purpose: SO_REUSEPORT (any protocol), or
/// SO_REUSEADDR on UDP, which is how multicast listeners (mDNS on 5353, SSDP on 1900) let several
/// processes bind one port. (SO_REUSEADDR on TCP only allows binding over TIME_WAIT; almost
/// every TCP server sets it, so it says nothing about sharing.)
fn shares_its_port(fd: c_int, protocol: u8) -> bool {
    let set = |option| getsockopt_int(fd, option).is_some_and(|v| v != 0);
    set(libc::SO_REUSEPORT) || (protocol == IPPROTO_UDP && set(libc::SO_REUSEADDR))
}

fn getsockopt_int(fd: c_int, option: c_int) -> Option<c_int> {
    let mut value: c_int = 0;
    let mut len = core::mem::size_of::<c_int>() as socklen_t;
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

static RESOLVE: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
static CLIENT_UNAVAILABLE: AtomicBool = AtomicBool::new(false);

fn client() -> Option<ResolveBindFn> {
    let ptr = RESOLVE.load(Ordering::Acquire);
    if !ptr.is_null() {
        // SAFETY: only ever set to the client library's resolve function, checked below.
        return Some(unsafe { core::mem::transmute::<*mut c_void, ResolveBindFn>(ptr) });
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
    // never closed (RTLD_NODELETE): the function pointer kept below must stay valid.
    // SAFETY: path is NUL-terminated (client_library_path checks).
    let handle = unsafe {
        libc::dlopen(
            path.as_bytes().as_ptr().cast::<c_char>(),
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
    let version = unsafe { core::mem::transmute::<*mut c_void, AbiVersionFn>(version) };
    // SAFETY: it takes no arguments and has no preconditions.
    if unsafe { version() } != ABI_VERSION {
        return None;
    }
    RESOLVE.store(resolve, Ordering::Release);
    // SAFETY: the symbol is the resolve function of a library with our ABI version.
    Some(unsafe { core::mem::transmute::<*mut c_void, ResolveBindFn>(resolve) })
}

/// Room for a path, its NUL included (PATH_MAX).
const PATH_ROOM: usize = libc::PATH_MAX as usize;

/// `$STYXY_CLIENT_LIB`, else `libstyxy_shim_client.so` in the directory this library was loaded
/// from; NUL-terminated. `None` when the path does not fit in PATH_MAX.
fn client_library_path() -> Option<StackBuf<PATH_ROOM>> {
    let mut path = StackBuf::new();
    if let Some(overridden) = env_str(env::CLIENT_LIB.c_name) {
        return (path.push(overridden) && path.push(b"\0")).then_some(path);
    }
    // SAFETY: Dl_info is plain data; dladdr fills it for an address inside a loaded object.
    let mut info: libc::Dl_info = unsafe { core::mem::zeroed() };
    // SAFETY: any address is accepted; `bind` is inside this library.
    let found = unsafe { libc::dladdr(bind as *const c_void, &mut info) };
    if found == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dladdr sets dli_fname to a NUL-terminated path.
    let ours = unsafe { CStr::from_ptr(info.dli_fname) }.to_bytes();
    // Loaded by a bare name (no slash): let dlopen search for the client the same way.
    let directory = match ours.iter().rposition(|&b| b == b'/') {
        Some(slash) => ours.get(..=slash).unwrap_or_default(),
        None => &[],
    };
    let fits = path.push(directory) && path.push(CLIENT_LIBRARY.as_bytes()) && path.push(b"\0");
    fits.then_some(path)
}

/// Bytes gathered on the stack, up to `N`: the shim allocates nothing.
struct StackBuf<const N: usize> {
    bytes: [u8; N],
    len: usize,
}

impl<const N: usize> StackBuf<N> {
    const fn new() -> Self {
        StackBuf {
            bytes: [0; N],
            len: 0,
        }
    }

    /// Appends what fits of `more`; false when it did not fit whole.
    fn push(&mut self, more: &[u8]) -> bool {
        let room = self.bytes.get_mut(self.len..).unwrap_or_default();
        let n = more.len().min(room.len());
        if let (Some(to), Some(from)) = (room.get_mut(..n), more.get(..n)) {
            to.copy_from_slice(from);
            self.len += n;
        }
        n == more.len()
    }

    /// Appends `value` in decimal.
    fn push_decimal(&mut self, mut value: u32) -> bool {
        let mut digits = [0u8; 10];
        let mut used = 0;
        for slot in digits.iter_mut().rev() {
            *slot = b'0' + (value % 10) as u8;
            value /= 10;
            used += 1;
            if value == 0 {
                break;
            }
        }
        let first = digits.len().saturating_sub(used);
        self.push(digits.get(first..).unwrap_or_default())
    }

    fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or_default()
    }
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
    let mut ts: libc::timespec = unsafe { core::mem::zeroed() };
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
/// `(requested << 16) | new` of each move this process made (whether announced or not), and
/// `(port << 16) | port` of each port the daemon let it keep.
static MOVES: [AtomicU32; 32] = [const { AtomicU32::new(0) }; 32];

/// This process's pid, cached: every bind asks (a `getpid` system call costs a bind on this kind
/// of VM a measurable part of its time). A `fork()` child forgets it through a `pthread_atfork`
/// handler; a child made by a raw `clone` without one keeps its parent's until it `exec`s, which
/// only makes it look at its parent's move records (a bind then asks the daemon, as any other).
pub(crate) fn own_pid() -> u32 {
    static PID: AtomicU32 = AtomicU32::new(0);
    static FORK_HANDLER: AtomicBool = AtomicBool::new(false);
    extern "C" fn forget_in_child() {
        PID.store(0, Ordering::Relaxed);
    }
    let cached = PID.load(Ordering::Relaxed);
    if cached != 0 {
        return cached;
    }
    if !FORK_HANDLER.swap(true, Ordering::AcqRel) {
        // SAFETY: registers a handler that only stores to an atomic; no other preconditions.
        unsafe { libc::pthread_atfork(None, None, Some(forget_in_child)) };
    }
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() } as u32;
    PID.store(pid, Ordering::Relaxed);
    pid
}

/// Records that this process moved `requested` to `new`; true the first time (IPv4 and IPv6 binds
/// of one server make a single line).
fn record_move(requested: u16, new: u16) -> bool {
    let pid = own_pid();
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

/// Whether this process has moved `requested` before (to another port).
fn moved_before(requested: u16) -> bool {
    history(requested).0
}

/// The ports this process moved `requested` to, in the order it made the moves.
fn moves_of(requested: u16) -> impl Iterator<Item = u16> {
    let mine = MOVES_PID.load(Ordering::Acquire) == own_pid();
    MOVES.iter().filter_map(move |slot| {
        let key = slot.load(Ordering::Acquire);
        let (asked, bound) = ((key >> 16) as u16, key as u16);
        (mine && key != 0 && asked == requested && bound != requested).then_some(bound)
    })
}

/// The port this process's program asked for when it was moved to `bound` (`bound` itself when
/// no move of this process led there).
fn asked_for(bound: u16) -> u16 {
    let mine = MOVES_PID.load(Ordering::Acquire) == own_pid();
    MOVES
        .iter()
        .map(|slot| slot.load(Ordering::Acquire))
        .find(|&key| mine && key != 0 && key as u16 == bound && (key >> 16) as u16 != bound)
        .map_or(bound, |key| (key >> 16) as u16)
}

/// Whether this process moved `port` before (to another port), and whether the daemon let it
/// keep `port` before (a move "to itself" in `MOVES`): one look, no system call.
fn history(port: u16) -> (bool, bool) {
    let owner = MOVES_PID.load(Ordering::Acquire);
    if owner == 0 || owner != own_pid() {
        // Nothing recorded, or recorded by the parent this process was forked from.
        return (false, false);
    }
    MOVES.iter().fold((false, false), |(moved, kept), slot| {
        let key = slot.load(Ordering::Acquire);
        let (asked, bound) = ((key >> 16) as u16, key as u16);
        let mine = key != 0 && asked == port;
        (
            moved || (mine && bound != port),
            kept || (mine && bound == port),
        )
    })
}

/// Whether this process names a session (`STYXY_INSTANCE`): only then may the kernel steer it.
fn in_a_session() -> bool {
    env_str(env::INSTANCE.c_name).is_some_and(|id| !id.is_empty())
}

fn notify(requested: u16, answer: &BindAnswer) {
    let fd = match env_str(env::NOTIFY.c_name) {
        Some(b"off") | Some(b"none") | Some(b"0") => return,
        Some(b"stdout") => libc::STDOUT_FILENO,
        _ => libc::STDERR_FILENO,
    };
    if !may_take_the_notice(fd) {
        return;
    }
    let line = notice_line(requested, answer);
    without_sigpipe(|| {
        let mut rest = line.as_bytes();
        while !rest.is_empty() {
            // SAFETY: rest is a valid readable buffer of rest.len() bytes.
            let n = unsafe { libc::write(fd, rest.as_ptr().cast::<c_void>(), rest.len()) };
            if n > 0 {
                rest = rest.get(n.unsigned_abs()..).unwrap_or_default();
            } else if n < 0 && errno() == libc::EINTR {
                continue;
            } else {
                break;
            }
        }
    });
}

/// Whether the notice may go to `fd`: a terminal, a pipe or a file that can take it right now.
/// Never a socket — a host that closed 0–2 may have its own connection there, or it may be the
/// shim's own connection to the daemon — nor anything else, nor a full pipe or a stopped
/// terminal (the write would block the host), nor a pipe nobody reads.
fn may_take_the_notice(fd: c_int) -> bool {
    // SAFETY: stat is plain data; fstat writes it (or fails on a closed fd).
    let mut stat: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: stat is valid for writes.
    if unsafe { libc::fstat(fd, &mut stat) } != 0 {
        return false;
    }
    let kind = stat.st_mode & libc::S_IFMT;
    if kind == libc::S_IFREG {
        return true;
    }
    if kind != libc::S_IFCHR && kind != libc::S_IFIFO {
        return false;
    }
    let mut ready = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd; a zero timeout never blocks.
    let n = unsafe { libc::poll(&mut ready, 1, 0) };
    n == 1
        && ready.revents & libc::POLLOUT != 0
        && ready.revents & (libc::POLLERR | libc::POLLHUP) == 0
}

/// Runs `write` with SIGPIPE blocked on this thread, and takes back a SIGPIPE that `write`
/// raised (a reader gone between the check and the write), so the host never sees one of ours;
/// a SIGPIPE that was pending before is left for the host.
fn without_sigpipe(write: impl FnOnce()) {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let mut pipe: libc::sigset_t = unsafe { core::mem::zeroed() };
    // SAFETY: as above.
    let mut saved: libc::sigset_t = unsafe { core::mem::zeroed() };
    // SAFETY: as above.
    let mut pending: libc::sigset_t = unsafe { core::mem::zeroed() };
    // SAFETY: valid sigset_t pointers; these calls only read and write them and this thread's mask.
    let blocked = unsafe {
        libc::sigemptyset(&mut pipe);
        libc::sigaddset(&mut pipe, libc::SIGPIPE);
        libc::sigemptyset(&mut pending);
        libc::pthread_sigmask(libc::SIG_BLOCK, &pipe, &mut saved) == 0
    };
    if !blocked {
        // Cannot block it: leave the notice out rather than risk the host's life.
        return;
    }
    // SAFETY: pending is a valid sigset_t.
    let was_pending = unsafe {
        libc::sigpending(&mut pending) == 0 && libc::sigismember(&pending, libc::SIGPIPE) == 1
    };
    write();
    if !was_pending {
        let none = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: takes a pending SIGPIPE of this thread or process, if any, without waiting.
        unsafe { libc::sigtimedwait(&pipe, core::ptr::null_mut(), &none) };
    }
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &saved, core::ptr::null_mut()) };
}

/// Room for the notice: its words, three numbers and a holder name of at most 63 bytes.
const NOTICE_ROOM: usize = 192;

/// `✓ STYXY: Auto-assigned port NEW (ASKED in use by HOLDER, pid PID)` and a newline.
fn notice_line(requested: u16, answer: &BindAnswer) -> StackBuf<NOTICE_ROOM> {
    let mut line = StackBuf::new();
    line.push("✓ STYXY: Auto-assigned port ".as_bytes());
    line.push_decimal(answer.port.into());
    line.push(b" (");
    line.push_decimal(requested.into());
    line.push(b" in use by ");
    let mut name = answer
        .holder_name
        .iter()
        .take_while(|&&b| b != 0)
        .peekable();
    if name.peek().is_none() {
        line.push(b"another process");
    }
    for &byte in name {
        // The name comes from another process's command line: no control characters on a terminal.
        let shown = if byte < 0x20 || byte == 0x7f {
            b'?'
        } else {
            byte
        };
        line.push(&[shown]);
    }
    if answer.holder_pid != 0 {
        line.push(b", pid ");
        line.push_decimal(answer.holder_pid);
    }
    line.push(b")\n");
    line
}

// ---- small helpers over libc ----

pub(crate) fn errno() -> c_int {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() }
}

pub(crate) fn set_errno(value: c_int) {
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = value }
}

/// libc's getenv: lock-free, so it is safe to call in a child after `fork()`.
fn getenv(name: &CStr) -> *const c_char {
    // SAFETY: name is NUL-terminated.
    unsafe { libc::getenv(name.as_ptr()) }
}

pub(crate) fn env_str(name: &CStr) -> Option<&'static [u8]> {
    let value = getenv(name);
    // SAFETY: getenv returns null or a NUL-terminated string that lives as long as the environment.
    (!value.is_null()).then(|| unsafe { CStr::from_ptr(value) }.to_bytes())
}

fn env_flag(name: &CStr) -> bool {
    matches!(env_str(name), Some(b"1") | Some(b"true") | Some(b"yes"))
}

fn timeout_ms() -> u32 {
    env_str(env::TIMEOUT_MS.c_name)
        .and_then(parse_decimal)
        .map(|v| v.clamp(1, 10_000))
        .unwrap_or(DEFAULT_TIMEOUT_MS)
}

/// A decimal number, surrounding whitespace allowed; `None` for anything else or an overflow.
fn parse_decimal(text: &[u8]) -> Option<u32> {
    let digits = text.trim_ascii();
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u32, |value, &digit| {
        if !digit.is_ascii_digit() {
            return None;
        }
        value.checked_mul(10)?.checked_add(u32::from(digit - b'0'))
    })
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

    fn notice(requested: u16, answer: &BindAnswer) -> String {
        String::from_utf8(notice_line(requested, answer).as_bytes().to_vec()).expect("UTF-8")
    }

    #[test]
    fn notice_names_both_ports_and_the_holder() {
        assert_eq!(
            notice(6006, &answer(6007, 4121, "storybook")),
            "✓ STYXY: Auto-assigned port 6007 (6006 in use by storybook, pid 4121)\n"
        );
        assert_eq!(
            notice(8000, &answer(8001, 0, "")),
            "✓ STYXY: Auto-assigned port 8001 (8000 in use by another process)\n"
        );
        assert_eq!(
            notice(1, &answer(65535, u32::MAX, "a\x1b[2Jb")),
            "✓ STYXY: Auto-assigned port 65535 (1 in use by a?[2Jb, pid 4294967295)\n"
        );
    }

    #[test]
    fn the_longest_notice_fits() {
        let name = "é".repeat(40);
        let line = notice(65535, &answer(65535, u32::MAX, &name));
        assert!(line.ends_with(", pid 4294967295)\n"), "{line}");
    }

    #[test]
    fn stack_buffers_keep_what_fits() {
        let mut buf = StackBuf::<4>::new();
        assert!(buf.push(b"ab"));
        assert!(!buf.push(b"cde"));
        assert_eq!(buf.as_bytes(), b"abcd");
        assert!(!buf.push(b"f"));
        assert!(buf.push(b""));
        let mut digits = StackBuf::<10>::new();
        assert!(digits.push_decimal(0));
        assert_eq!(digits.as_bytes(), b"0");
        let mut digits = StackBuf::<10>::new();
        assert!(digits.push_decimal(u32::MAX));
        assert_eq!(digits.as_bytes(), b"4294967295");
    }

    #[test]
    fn timeouts_are_plain_decimal_numbers() {
        assert_eq!(parse_decimal(b"50"), Some(50));
        assert_eq!(parse_decimal(b" 7\n"), Some(7));
        assert_eq!(parse_decimal(b"4294967295"), Some(u32::MAX));
        assert_eq!(parse_decimal(b"4294967296"), None);
        assert_eq!(parse_decimal(b""), None);
        assert_eq!(parse_decimal(b"-5"), None);
        assert_eq!(parse_decimal(b"5ms"), None);
    }

    #[test]
    fn only_this_thread_is_marked_inside_the_shim() {
        let guard = ReentryGuard::enter().expect("first entry");
        assert!(ReentryGuard::enter().is_none(), "re-entry must be refused");
        std::thread::spawn(|| assert!(ReentryGuard::enter().is_some(), "other threads enter"))
            .join()
            .expect("thread");
        drop(guard);
        assert!(ReentryGuard::enter().is_some(), "entry again once left");
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
