//! Styxy's kernel side: programs on a cgroup v2 directory that report every bind and release, and
//! that move and redirect the binds and loopback traffic of kernel sessions.
//!
//! The programs are in modules by job — [`observing`], [`moving`], [`views`], [`membership`],
//! [`protecting`] —
//! over the maps of the kernel contract ([`maps`], checked against `styxy_common::maps`) and the
//! settings the daemon writes at load time ([`globals`]).
//!
//! Observing (every process):
//! - `cgroup/post_bind4|6` (sock) sees the port actually bound and pushes a [`BindEvent`] of kind
//!   `KIND_BOUND` into the `EVENTS` ring buffer; it counts the port in `PORTS`.
//! - `cgroup/sock_release` (sock) pushes `KIND_RELEASED` for sockets post_bind saw.
//!
//! Enforcing (processes of a kernel session only, see `styxy_common::session`):
//! - `cgroup/bind4|6` (sock_addr) runs for every bind but acts only for a session's process: an
//!   explicit-port bind whose port is taken moves to a spare port of the same range, and the asked
//!   port is remembered by socket cookie (`REQUESTED`) for post_bind's record;
//! - connect4|6 and sendmsg4|6 send loopback traffic for a moved port of the session's view to
//!   the bound port; getpeername4|6 and recvmsg4|6 show the asked port back for those sockets;
//! - the `sched_process_fork`, `sched_process_exit` and `sched_process_exec` tracepoints keep
//!   `SESSIONS` in step with the sessions' descendants;
//! - connect4 answers the shim's question "does the kernel steer me?" (see
//!   `styxy_common::session::PROBE_PORT`), so each process has exactly one enforcer, and takes
//!   what the asker's environment turns off (`STYXY_VIEW=off`, `STYXY_DISABLE=1`) into its entry.
//!
//! Protecting (where BPF LSM is active, while a kernel session is live):
//! - `lsm/task_kill` refuses a signal that would end or stop a process of one session when a
//!   process of another sends it, and records it in `REFUSALS` ([`protecting`]).
//!
//! Measuring (loaded by `styxy-bench proxy` only):
//! - a sockmap `stream_verdict` splices two sockets in the kernel ([`splicing`]).
//!
//! Membership is checked against the calling task itself (see `steering_member`): an entry
//! holds only for a process not newer than it (a reused pid is never a member, whatever was
//! left in the map), and a session steers only processes running as its owner (a setuid program
//! in a user's session is untouched; root's sessions steer every uid).
//!
//! Every cgroup program allows the operation: they never deny a bind or a connect. A record that does
//! not fit in the ring buffer is counted in `DROPPED`; the daemon then resyncs from the socket
//! tables. Records are submitted without waking the daemon's reader while it is draining (the
//! `READER` word), so a burst of binds costs it one wake-up, not one per record.
#![no_std]
#![no_main]
// BPF has atomic add, exchange and fetch-add, but core's atomics offer no read-modify-write on
// this target: the intrinsics emit the instructions directly. (Built with Debian's rustc and
// RUSTC_BOOTSTRAP, for BPF ISA v3.)
#![allow(internal_features)]
#![feature(core_intrinsics)]

use aya_ebpf::helpers::{bpf_get_current_pid_tgid, bpf_get_netns_cookie};
use styxy_common::event::{CONFIG_NETNS_COOKIE, IPPROTO_TCP, IPPROTO_UDP};

use crate::maps::CONFIG;

mod globals;
mod maps;
mod membership;
mod moving;
mod observing;
mod protecting;
mod splicing;
mod views;

/// Allow the operation (cgroup sock and sock_addr programs).
pub(crate) const ALLOW: i32 = 1;

/// Whether the socket is in the daemon's network namespace (always true before it says which).
#[inline(always)]
pub(crate) fn in_daemons_netns(ctx: *mut core::ffi::c_void) -> bool {
    let wanted = CONFIG.get(CONFIG_NETNS_COOKIE).copied().unwrap_or(0);
    // SAFETY: the helper accepts sock and sock_addr contexts.
    wanted == 0 || unsafe { bpf_get_netns_cookie(ctx) } == wanted
}

#[inline(always)]
pub(crate) fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

pub(crate) fn transport(protocol: u32) -> Option<u8> {
    match protocol {
        p if p == u32::from(IPPROTO_TCP) => Some(IPPROTO_TCP),
        p if p == u32::from(IPPROTO_UDP) => Some(IPPROTO_UDP),
        _ => None,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this; it exists to satisfy no_std.
    loop {}
}
