//! Who is in which session: membership checked against the calling task itself, and kept in
//! step with the sessions' processes by the fork, exec and exit tracepoints.

use aya_ebpf::helpers::{
    bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel,
};
use aya_ebpf::macros::tracepoint;
use aya_ebpf::programs::TracePointContext;
use aya_log_ebpf::warn;
use styxy_common::session::Member;

use crate::current_tgid;
use crate::globals::{
    CRED_EUID_OFFSET, EXEC_OLD_PID_OFFSET, EXEC_PID_OFFSET, EXIT_GROUP_DEAD_OFFSET,
    FORK_CHILD_PID_OFFSET, TASK_CRED_OFFSET, TASK_GROUP_LEADER_OFFSET, TASK_START_TIME_OFFSET,
};
use crate::maps::SESSIONS;

/// A kernel word at `base + offset` (0 when it cannot be read).
#[inline(always)]
pub(crate) fn kernel_u64(base: u64, offset: u32) -> Option<u64> {
    // SAFETY: the helper checks the read and fails, never faults, on a bad address.
    unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const u64) }.ok()
}

/// The membership entry of the calling process (`tgid`), if it holds for this process: its
/// group leader started no later than the entry was written. A process that reuses the pid of a
/// member that left its entry behind (however it did) started later, and is not a member.
#[inline(always)]
pub(crate) fn member_of_current(tgid: u32) -> Option<Member> {
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
pub(crate) fn current_euid() -> Option<u32> {
    // SAFETY: the helper has no preconditions; the value is only read through probe reads.
    let task = unsafe { bpf_get_current_task() };
    let cred = kernel_u64(task, TASK_CRED_OFFSET.load())?;
    // SAFETY: as in kernel_u64.
    unsafe { bpf_probe_read_kernel((cred + u64::from(CRED_EUID_OFFSET.load())) as *const u32) }.ok()
}

/// The membership of the calling process (`tgid`) when its session steers it: the membership
/// holds and the process runs as the session's owner (any uid for root's sessions).
#[inline(always)]
pub(crate) fn steering_member(tgid: u32) -> Option<Member> {
    let member = member_of_current(tgid)?;
    if member.owner != 0 && !member.steers(current_euid()?) {
        return None;
    }
    Some(member)
}

/// Writes what the calling process turned off for itself (`flags`, from its environment, told
/// by the shim's probe) into its own entry.
#[inline(always)]
pub(crate) fn set_own_flags(tgid: u32, flags: u32) {
    if let Some(entry) = SESSIONS.get_ptr_mut(tgid) {
        // SAFETY: a map value slot of this task's own entry; a u32 store (a racing update of the
        // same entry by the daemon writes the whole value, flags included).
        unsafe { (*entry).flags = flags };
    }
}

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
