//! Styxy's kernel side: programs on a cgroup v2 directory that report every bind and release, and
//! that move and redirect the binds and loopback traffic of kernel sessions.
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
//!   `styxy_common::session::PROBE_PORT`), so each process has exactly one enforcer.
//!
//! Membership is checked against the calling task itself (see `steering_session`): an entry
//! holds only for a process not newer than it (a reused pid is never a member, whatever was
//! left in the map), and a session steers only processes running as its owner (a setuid program
//! in a user's session is untouched; root's sessions steer every uid).
//!
//! Every program allows the operation: they never deny a bind or a connect. A record that does
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

use aya_ebpf::bindings::{bpf_sock, bpf_sock_addr, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP};
use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task, bpf_get_current_uid_gid,
    bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_getsockopt, bpf_ktime_get_ns,
    bpf_probe_read_kernel,
};
use aya_ebpf::macros::{cgroup_sock, cgroup_sock_addr, map, tracepoint};
use aya_ebpf::maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf};
use aya_ebpf::programs::{SockAddrContext, SockContext, TracePointContext};
use aya_ebpf::Global;
use aya_log_ebpf::{debug, info, warn};
use styxy_common::event::{
    port_slot, BindEvent, BoundRecord, AF_INET, AF_INET6, CONFIG_NETNS_COOKIE, EVENTS_RING_BYTES,
    FLAG_REWRITTEN, IPPROTO_TCP, IPPROTO_UDP, KIND_BOUND, KIND_RELEASED, KIND_WAKE, PORT_SLOTS,
};
use styxy_common::maps::{BOUND_MAX, PORT_INFO_LEN, REQUESTED_MAX};
use styxy_common::session::{
    Member, MoveKey, PortInfo, Requested, ReverseKey, StickyKey, ViewKey, MOVES_MAX, PROBE_ADDR_V4,
    PROBE_ANSWER_PORT, PROBE_PORT, READER_SLEEPING, REVERSE_MAX, SESSIONS_MAX, SPARES_LEN,
    SPARE_SLOTS, STICKY_LINGERING, STICKY_MAX, VIEWS_MAX,
};

/// Allow the operation (cgroup sock and sock_addr programs).
const ALLOW: i32 = 1;
const SOL_SOCKET: i32 = 1;
const SO_REUSEADDR: i32 = 2;
const SO_REUSEPORT: i32 = 15;
/// The kernel's `BPF_F_MMAPABLE`: the daemon maps these arrays into its memory.
const BPF_F_MMAPABLE: u32 = aya_ebpf::bindings::BPF_F_MMAPABLE;
const _: () = assert!(BPF_F_MMAPABLE == styxy_common::maps::BPF_F_MMAPABLE);

/// Set by the daemon at load time (see `styxy_common::session::GLOBAL_*`).
#[no_mangle]
static FORK_CHILD_PID_OFFSET: Global<u32> = Global::new(0);
#[no_mangle]
static EXIT_GROUP_DEAD_OFFSET: Global<u32> = Global::new(0);
#[no_mangle]
static EXEC_PID_OFFSET: Global<u32> = Global::new(0);
#[no_mangle]
static EXEC_OLD_PID_OFFSET: Global<u32> = Global::new(0);
#[no_mangle]
static ENFORCE: Global<u32> = Global::new(0);
/// Where the running kernel keeps the task fields membership is checked with (from its BTF).
#[no_mangle]
static TASK_GROUP_LEADER_OFFSET: Global<u32> = Global::new(0);
#[no_mangle]
static TASK_START_TIME_OFFSET: Global<u32> = Global::new(0);
#[no_mangle]
static TASK_CRED_OFFSET: Global<u32> = Global::new(0);
#[no_mangle]
static CRED_EUID_OFFSET: Global<u32> = Global::new(0);
/// The kernel's ephemeral ports (`ip_local_port_range`), where port-0 binds land.
#[no_mangle]
static EPHEMERAL_LOW: Global<u32> = Global::new(32_768);
#[no_mangle]
static EPHEMERAL_HIGH: Global<u32> = Global::new(60_999);
/// 1 when no service range reaches into the ephemeral ports (the usual case): then a port-0
/// bind's port needs no look into `PORT_INFO` — a cache miss in a 512 KiB array, measured at
/// about 100 ns of the ~170 ns post_bind took per port-0 bind (`bpftool prog show` with
/// `kernel.bpf_stats_enabled`).
#[no_mangle]
static EPHEMERAL_IN_NO_RANGE: Global<u32> = Global::new(0);

/// Whether a bound port is one the daemon learns of from the socket tables instead of a record
/// per bind: an ephemeral port outside every service range (where port-0 binds land: no decision
/// depends on them, and a record would tax every program on the machine).
#[inline(always)]
fn counted_only(port: u16) -> bool {
    let port32 = u32::from(port);
    port32 >= EPHEMERAL_LOW.load()
        && port32 <= EPHEMERAL_HIGH.load()
        && (EPHEMERAL_IN_NO_RANGE.load() != 0
            || PortInfo(PORT_INFO.get(port32).copied().unwrap_or(0))
                .range()
                .is_none())
}

/// Bind and release records for the daemon.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

/// Records that did not fit in `EVENTS`, per CPU (index 0).
#[map]
static DROPPED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Binds of ephemeral ports outside every service range (see `counted_only`), per CPU (index
/// 0): not reported one by one; the daemon reads the socket tables when this moves.
#[map]
static UNREPORTED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Settings the daemon writes after loading (see `styxy_common::event::CONFIG_MAP`).
#[map]
static CONFIG: Array<u64> = Array::with_max_entries(1, 0);

/// `READER[0]`: whether the daemon's reader sleeps (see `styxy_common::session`).
#[map]
static READER: Array<u32> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// What bind4/6 saw of a bind it moved, by socket cookie, until post_bind4/6 picks it up (or
/// sock_release, when the moved bind failed).
#[map]
static REQUESTED: LruHashMap<u64, Requested> = LruHashMap::with_max_entries(REQUESTED_MAX, 0);

/// `REWRITES[0]`: how many `REQUESTED` entries may be waiting. While none, post_bind and
/// sock_release skip the lookup: every other bind on the machine pays nothing for moves. (An
/// entry the LRU evicts leaves it counted: those lookups then simply find nothing.)
#[map]
static REWRITES: Array<u64> = Array::with_max_entries(1, 0);

/// Adds `delta` (wrapping) to `REWRITES[0]`.
#[inline(always)]
fn count_rewrites(delta: u64) {
    if let Some(slot) = REWRITES.get_ptr_mut(0) {
        // SAFETY: a map value slot, valid and aligned for a u64; every CPU adds atomically.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                slot, delta,
            );
        }
    }
}

/// The `REQUESTED` entry of socket `cookie`, removed, if bind4/6 moved that socket's bind.
#[inline(always)]
fn take_requested(cookie: u64) -> Option<Requested> {
    if REWRITES.get(0).copied().unwrap_or(0) == 0 {
        return None;
    }
    // SAFETY: plain data copied out before the entry is removed.
    let requested = unsafe { REQUESTED.get(cookie) }.copied()?;
    if REQUESTED.remove(cookie).is_ok() {
        count_rewrites(u64::MAX); // - 1, wrapping
    }
    Some(requested)
}

/// Sockets bound per (protocol, port) slot (see `port_slot`), counted up by post_bind and down by
/// sock_release; the daemon adds the sockets bound before it attached. Updated before `bind()`
/// returns, so "is this port bound right now" is one lookup, here and in the daemon.
#[map]
static PORTS: Array<u64> = Array::with_max_entries(PORT_SLOTS, BPF_F_MMAPABLE);

/// The process that bound each slot last: a process binding a port it holds itself (IPv4 next
/// to IPv6) is not in conflict with itself.
#[map]
static LAST_BINDER: Array<u32> = Array::with_max_entries(PORT_SLOTS, 0);

/// What post_bind saw, by socket cookie, so sock_release can report the port.
#[map]
static BOUND: LruHashMap<u64, BoundRecord> = LruHashMap::with_max_entries(BOUND_MAX, 0);

/// Task id → membership, for every process and thread of a kernel session.
#[map]
static SESSIONS: HashMap<u32, Member> = HashMap::with_max_entries(SESSIONS_MAX, 0);

/// Per port: who holds a lease or claim on it, and its service range (daemon-written).
#[map]
static PORT_INFO: Array<u64> = Array::with_max_entries(PORT_INFO_LEN, BPF_F_MMAPABLE);

/// Free ports per range, taken by the bind programs and refilled by the daemon.
#[map]
static SPARES: Array<u32> = Array::with_max_entries(SPARES_LEN, BPF_F_MMAPABLE);

/// A process's earlier moves, so its other binds of the same port go to the same new port.
#[map]
static MOVES: LruHashMap<MoveKey, u32> = LruHashMap::with_max_entries(MOVES_MAX, 0);

/// The sessions' views: (session, protocol, asked port) → bound port.
#[map]
static VIEWS: HashMap<ViewKey, u32> = HashMap::with_max_entries(VIEWS_MAX, 0);

/// (session, asked port) → the port the session's project got before (see `StickyKey`).
#[map]
static STICKY: HashMap<StickyKey, u32> = HashMap::with_max_entries(STICKY_MAX, 0);

/// (socket, real port) → asked port, for the sockets connect/sendmsg redirected.
#[map]
static REVERSE: LruHashMap<ReverseKey, u32> = LruHashMap::with_max_entries(REVERSE_MAX, 0);

/// Whether the socket is in the daemon's network namespace (always true before it says which).
#[inline(always)]
fn in_daemons_netns(ctx: *mut core::ffi::c_void) -> bool {
    let wanted = CONFIG.get(CONFIG_NETNS_COOKIE).copied().unwrap_or(0);
    // SAFETY: the helper accepts sock and sock_addr contexts.
    wanted == 0 || unsafe { bpf_get_netns_cookie(ctx) } == wanted
}

/// Atomically adds `delta` (wrapping) to a `PORTS` slot.
#[inline(always)]
fn count_port(protocol: u8, port: u16, delta: u64) {
    if let Some(slot) = PORTS.get_ptr_mut(port_slot(protocol, port)) {
        // SAFETY: the pointer is the map's value slot, valid and aligned for a u64; other CPUs
        // and the daemon touch it only through atomic operations too.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                slot, delta,
            );
        }
    }
}

#[inline(always)]
fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// A kernel word at `base + offset` (0 when it cannot be read).
#[inline(always)]
fn kernel_u64(base: u64, offset: u32) -> Option<u64> {
    // SAFETY: the helper checks the read and fails, never faults, on a bad address.
    unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const u64) }.ok()
}

/// The membership entry of the calling process (`tgid`), if it holds for this process: its
/// group leader started no later than the entry was written. A process that reuses the pid of a
/// member that left its entry behind (however it did) started later, and is not a member.
#[inline(always)]
fn member_of_current(tgid: u32) -> Option<Member> {
    // SAFETY: plain data copied out of the map value.
    let member = unsafe { SESSIONS.get(tgid) }.copied()?;
    // SAFETY: the helper has no preconditions; the value is only read through probe reads.
    let task = unsafe { bpf_get_current_task() };
    let leader = kernel_u64(task, TASK_GROUP_LEADER_OFFSET.load())?;
    let started = kernel_u64(leader, TASK_START_TIME_OFFSET.load())?;
    member.holds_for(started).then_some(member)
}

/// The calling task's effective uid.
#[inline(always)]
fn current_euid() -> Option<u32> {
    // SAFETY: the helper has no preconditions; the value is only read through probe reads.
    let task = unsafe { bpf_get_current_task() };
    let cred = kernel_u64(task, TASK_CRED_OFFSET.load())?;
    // SAFETY: as in kernel_u64.
    unsafe { bpf_probe_read_kernel((cred + u64::from(CRED_EUID_OFFSET.load())) as *const u32) }.ok()
}

/// The session that steers the calling process (`tgid`): its membership holds and it runs as
/// the session's owner (any uid for root's sessions).
#[inline(always)]
fn steering_session(tgid: u32) -> Option<u32> {
    let member = member_of_current(tgid)?;
    if member.owner != 0 && !member.steers(current_euid()?) {
        return None;
    }
    Some(member.session)
}

fn transport(protocol: u32) -> Option<u8> {
    match protocol {
        p if p == u32::from(IPPROTO_TCP) => Some(IPPROTO_TCP),
        p if p == u32::from(IPPROTO_UDP) => Some(IPPROTO_UDP),
        _ => None,
    }
}

// ---- sessions follow fork and exit ---------------------------------------------------------

#[tracepoint]
pub fn styxy_sched_process_fork(ctx: TracePointContext) -> u32 {
    // A member's child joins its session, whatever uid it runs as (the owner check applies
    // where the session steers, not to who belongs).
    let Some(parent) = member_of_current(current_tgid()) else {
        return 0;
    };
    // SAFETY: the offset comes from the tracepoint's own format; the helper checks the read.
    let Ok(child) = (unsafe { ctx.read_at::<u32>(FORK_CHILD_PID_OFFSET.load() as usize) }) else {
        return 0;
    };
    // The child started before this tracepoint fires: stamped now, the entry holds for it and
    // for no later process that gets its pid.
    let member = Member {
        // SAFETY: a helper with no preconditions.
        stamp_ns: unsafe { bpf_ktime_get_ns() },
        ..parent
    };
    if SESSIONS.insert(child, member, 0).is_err() {
        warn!(
            &ctx,
            "session {}: SESSIONS is full, task {} is not in it", member.session, child
        );
    }
    0
}

/// A thread that calls `exec` takes its process's pid; its own task id leaves without an exit
/// of its own (`old_pid` is that id).
#[tracepoint]
pub fn styxy_sched_process_exec(ctx: TracePointContext) -> u32 {
    // SAFETY: the offsets come from the tracepoint's own format; the helper checks the reads.
    let ids = unsafe {
        (
            ctx.read_at::<u32>(EXEC_PID_OFFSET.load() as usize),
            ctx.read_at::<u32>(EXEC_OLD_PID_OFFSET.load() as usize),
        )
    };
    if let (Ok(pid), Ok(old_pid)) = ids {
        if pid != old_pid {
            let _ = SESSIONS.remove(old_pid);
        }
    }
    0
}

#[tracepoint]
pub fn styxy_sched_process_exit(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tid, tgid) = (pid_tgid as u32, (pid_tgid >> 32) as u32);
    if tid != tgid {
        let _ = SESSIONS.remove(tid);
    }
    // SAFETY: the offset comes from the tracepoint's own format; the helper checks the read.
    let group_dead = unsafe { ctx.read_at::<u8>(EXIT_GROUP_DEAD_OFFSET.load() as usize) };
    if group_dead.unwrap_or(1) != 0 {
        let _ = SESSIONS.remove(tgid);
    }
    0
}

// ---- bind -----------------------------------------------------------------------------------

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

/// Whether `port` is taken for a process `tgid` of `session`: a socket of another process is
/// bound on it, or a lease or claim of anyone but this session holds it.
#[inline(always)]
fn taken(protocol: u8, port: u16, tgid: u32, session: u32) -> bool {
    let slot = port_slot(protocol, port);
    let bound = PORTS.get(slot).copied().unwrap_or(0);
    if bound != 0 && !(bound == 1 && LAST_BINDER.get(slot).copied() == Some(tgid)) {
        return true;
    }
    let reserved_by = PortInfo(PORT_INFO.get(u32::from(port)).copied().unwrap_or(0)).reserved_by();
    reserved_by != 0 && reserved_by != session
}

/// A SOL_SOCKET option of the socket: `None` when the kernel would not say.
#[inline(always)]
fn socket_option(sock_addr: *mut bpf_sock_addr, option: i32) -> Option<i32> {
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
fn reuseport(sock_addr: *mut bpf_sock_addr) -> bool {
    // Unknown counts as shared: never move what may be a pool.
    socket_option(sock_addr, SO_REUSEPORT) != Some(0)
}

/// The sticky port of the session's project for `asked`, when the caller may bind it now: free,
/// and, if old connections linger there, only for a socket with SO_REUSEADDR (which binds over
/// TIME_WAIT; any other would fail there, and the program cannot try again).
#[inline(always)]
fn sticky_port(
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
    if port == 0 || port == asked || taken(protocol, port, tgid, session) {
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
fn take_spare(range: u32, protocol: u8, asked: u16, tgid: u32, session: u32) -> Option<u16> {
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
fn take_slot(index: u32, protocol: u8, asked: u16, tgid: u32, session: u32) -> Option<u16> {
    let slot = SPARES.get_ptr_mut(index)?;
    // SAFETY: the pointer is a map value slot, valid and aligned for a u32; every other writer
    // (other CPUs, the daemon through its mapping) uses atomic operations too.
    let port = unsafe {
        core::intrinsics::atomic_xchg::<u32, { core::intrinsics::AtomicOrdering::SeqCst }>(slot, 0)
    } as u16;
    (port != 0 && port != asked && !taken(protocol, port, tgid, session)).then_some(port)
}

#[inline(always)]
fn on_bind(ctx: &SockAddrContext) {
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
    let Some(session) = steering_session(tgid) else {
        debug!(ctx, "bind of port {} by {}: in no session", asked, tgid);
        return;
    };
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
fn move_for_session(
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
        if !taken(protocol, earlier as u16, tgid, session) {
            return Some(earlier as u16);
        }
    }
    if !taken(protocol, asked, tgid, session) || reuseport(ctx.sock_addr) {
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
fn on_bound(ctx: &SockContext, family: u8) {
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

fn on_release(sock: *mut bpf_sock) {
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
fn reader_sleeps_now() -> bool {
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

fn emit(kind: u8, cookie: u64, bound: &BoundRecord, requested: Option<Requested>) {
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

// ---- the session view -------------------------------------------------------------------------

/// Whether an IPv4 address (network byte order, as in the context) is loopback (127.0.0.0/8).
#[inline(always)]
fn loopback4(ip: u32) -> bool {
    u32::from_be(ip) >> 24 == 127
}

/// Whether an IPv6 address (four network-order words) is `::1` or IPv4-mapped loopback.
#[inline(always)]
fn loopback6(words: [u32; 4]) -> bool {
    words[0] == 0
        && words[1] == 0
        && ((words[2] == 0 && u32::from_be(words[3]) == 1)
            || (u32::from_be(words[2]) == 0xffff && loopback4(words[3])))
}

#[inline(always)]
fn dest_is_loopback(sock_addr: *mut bpf_sock_addr, v6: bool) -> bool {
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
/// the bound port, and the socket remembers it for the way back.
#[inline(always)]
fn redirect(ctx: &SockAddrContext, v6: bool) {
    if ENFORCE.load() == 0 {
        return;
    }
    let Some(session) = steering_session(current_tgid()) else {
        return;
    };
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
    // The shim asking whether the kernel steers it (it does: this process is a member it steers).
    if asked == PROBE_PORT && !v6 && protocol == IPPROTO_UDP && is_probe_address(sock_addr) {
        // SAFETY: user_port is writable in connect4 and sendmsg4; network byte order.
        unsafe { (*sock_addr).user_port = u32::from(PROBE_ANSWER_PORT.to_be()) };
        return;
    }
    let key = ViewKey {
        session,
        asked,
        protocol,
        _pad: 0,
    };
    // SAFETY: a plain u32 copied out of the map value.
    let Some(bound) = (unsafe { VIEWS.get(key) }).copied() else {
        return;
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

/// Whether an IPv4 destination is the shim's probe address (see `PROBE_ADDR_V4`).
#[inline(always)]
fn is_probe_address(sock_addr: *mut bpf_sock_addr) -> bool {
    // SAFETY: user_ip4 is readable in the v4 hooks; network byte order, as the array is.
    let ip = unsafe { core::ptr::read_volatile(&raw const (*sock_addr).user_ip4) };
    ip == u32::from_ne_bytes(PROBE_ADDR_V4)
}

/// getpeername4|6 and recvmsg4|6: a redirected socket sees the asked port as its peer's.
#[inline(always)]
fn translate_back(ctx: &SockAddrContext) {
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this; it exists to satisfy no_std.
    loop {}
}
