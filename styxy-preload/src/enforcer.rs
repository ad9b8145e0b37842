//! Which enforcer applies the session to this process: the kernel's programs or the shim. Never
//! both — a redirect applied twice (the shim's 8350 → 8351, then the kernel's 8351 → 8352) reaches
//! another server, and a bind moved twice lands where nobody said. And neither in another network
//! namespace than the daemon's: its ports and loopback are another machine's, which the table
//! does not describe.
//!
//! Where the daemon runs with eBPF at the cgroup root, the kernel steers every process of a
//! placed session it may steer (see `styxy_common::session::Member`), static binaries included;
//! the shim then stands aside, but for one thing the kernel cannot do: a bind the kernel left on a
//! taken port (a port in no service range, an empty spare pool) fails with `EADDRINUSE`, and the
//! shim asks the daemon and moves it, as for any process (the kernel left that socket alone, so
//! it is still one enforcer per socket).
//!
//! The kernel question is a UDP `connect()` of a throwaway socket to a reserved loopback address
//! (no packet is sent), which the kernel's `connect4` program redirects for the processes it
//! steers (see `styxy_common::session::PROBE_PORT`), then a `getpeername()`; the question's port
//! also tells the kernel what this process's environment turns off (`STYXY_VIEW=off`,
//! `STYXY_DISABLE=1`), so the kernel leaves alone what the shim would. Asked once per
//! process and again at most once a second (the programs detach when no session is live and attach for the next, and a
//! daemon restart may change the answer), and only on the paths where the table says a session
//! may apply — a free port's bind and an unviewed connect never ask. The namespace is a `stat` of
//! `/proc/self/ns/net` held against the one the daemon publishes in the table, asked with it.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use styxy_common::env;
use styxy_common::session::{
    probe_port, MEMBER_MOVES_OFF, MEMBER_VIEW_OFF, PROBE_ADDR_V4, PROBE_ANSWER_PORT,
};
use styxy_common::table::Table;

use crate::moves::own_pid;
use crate::sys::{env_flag, env_str, errno, set_errno};

/// Who applies the session's moves and view to this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Enforcer {
    /// The shim: a process the kernel does not steer, in the daemon's network namespace.
    Shim,
    /// The kernel's programs: the shim stands aside.
    Kernel,
    /// Nobody: the process is in another network namespace.
    Nobody,
}

const ENFORCER_SHIM: u32 = 0;
const ENFORCER_KERNEL: u32 = 1;
const ENFORCER_NOBODY: u32 = 2;

/// The pid the cached answer is for (a forked child asks again: its parent's answer may not be
/// its own, though it usually is).
static ANSWER_PID: AtomicU32 = AtomicU32::new(0);
/// Coarse monotonic ms after which the answer is asked again.
static ANSWER_UNTIL_MS: AtomicU64 = AtomicU64::new(0);
/// The cached answer, an `ENFORCER_*`.
static ANSWER: AtomicU32 = AtomicU32::new(ENFORCER_SHIM);
const ASK_EVERY_MS: u64 = 1000;

/// Who enforces the session for this process, given the live table. Leaves errno as it found it.
pub(crate) fn for_this_process(table: &Table<'_>) -> Enforcer {
    let pid = own_pid();
    let now = crate::table::coarse_ms();
    let answer = if ANSWER_PID.load(Ordering::Acquire) == pid
        && now < ANSWER_UNTIL_MS.load(Ordering::Relaxed)
    {
        ANSWER.load(Ordering::Relaxed)
    } else {
        let saved = errno();
        let answer = if !in_daemons_netns(table) {
            ENFORCER_NOBODY
        } else if ask_the_kernel() {
            ENFORCER_KERNEL
        } else {
            ENFORCER_SHIM
        };
        set_errno(saved);
        ANSWER.store(answer, Ordering::Relaxed);
        ANSWER_UNTIL_MS.store(now + ASK_EVERY_MS, Ordering::Relaxed);
        ANSWER_PID.store(pid, Ordering::Release);
        answer
    };
    match answer {
        ENFORCER_KERNEL => Enforcer::Kernel,
        ENFORCER_NOBODY => Enforcer::Nobody,
        _ => Enforcer::Shim,
    }
}

/// Whether this process is in the network namespace of the table's daemon (yes when the daemon
/// does not say which it is in, or the namespace cannot be read).
fn in_daemons_netns(table: &Table<'_>) -> bool {
    let daemons = table.netns();
    if daemons == 0 {
        return true;
    }
    // SAFETY: stat is plain data; stat() writes it for a NUL-terminated path.
    let mut stat: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::stat(c"/proc/self/ns/net".as_ptr(), &mut stat) } != 0 {
        return true;
    }
    stat.st_ino == daemons
}

/// What this process's environment turns off, as the kernel's member flags: `STYXY_VIEW=off`
/// and `STYXY_DISABLE=1` mean for the kernel's moves and redirects what they mean for the shim's.
fn turned_off() -> u32 {
    let view = if env_str(env::VIEW.c_name) == Some(b"off") {
        MEMBER_VIEW_OFF
    } else {
        0
    };
    let moves = if env_flag(env::DISABLE.c_name) {
        MEMBER_MOVES_OFF
    } else {
        0
    };
    view | moves
}

/// The kernel's answer: whether its programs steer this process (told, in the question, what
/// its environment turns off). System calls made directly,
/// not through libc's `connect`/`getpeername`: those are this library's own wrappers.
fn ask_the_kernel() -> bool {
    // SAFETY: a throwaway socket, connected (UDP: no packet leaves), asked its peer, then closed;
    // every pointer is to a local of the right size.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return false;
        }
        let mut probe: libc::sockaddr_in = core::mem::zeroed();
        probe.sin_family = libc::AF_INET as libc::sa_family_t;
        probe.sin_port = probe_port(turned_off()).to_be();
        probe.sin_addr.s_addr = u32::from_ne_bytes(PROBE_ADDR_V4);
        let len = core::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let connected = libc::syscall(libc::SYS_connect, fd, &raw const probe, len) == 0;
        let mut peer: libc::sockaddr_in = core::mem::zeroed();
        let mut peer_len = len;
        let answered = connected
            && libc::syscall(libc::SYS_getpeername, fd, &raw mut peer, &raw mut peer_len) == 0;
        libc::close(fd);
        answered && peer_len == len && u16::from_be(peer.sin_port) == PROBE_ANSWER_PORT
    }
}
