//! Sessions never hurt each other: `lsm/task_kill` refuses a signal that would end or stop a
//! process of one kernel session when it comes from a process of another (see
//! `styxy_common::protection`), and records the refusal in `REFUSALS` for the daemon.
//!
//! For a sender outside every session — the common case, every `kill` on the machine — the
//! program costs one `SESSIONS` lookup: the membership of the sender is checked first.

use aya_ebpf::bindings::BPF_RB_NO_WAKEUP;
use aya_ebpf::helpers::{bpf_get_current_comm, bpf_ktime_get_ns, bpf_probe_read_kernel};
use aya_ebpf::macros::lsm;
use aya_ebpf::programs::LsmContext;
use aya_log_ebpf::info;
use styxy_common::protection::{ends_or_stops, SignalRefusal, COMM_LEN};

use crate::current_tgid;
use crate::globals::{
    TASK_COMM_OFFSET, TASK_GROUP_LEADER_OFFSET, TASK_START_TIME_OFFSET, TASK_TGID_OFFSET,
};
use crate::maps::{REFUSALS, SESSIONS};
use crate::membership::{current_euid, kernel_u64, member_of_current};

/// What the hook returns to refuse: `-EPERM`.
const EPERM: i32 = 1;

/// `task_kill(struct task_struct *p, struct kernel_siginfo *info, int sig, const struct cred
/// *cred)`, and the verdict of the LSM programs before this one.
#[lsm(hook = "task_kill")]
pub fn styxy_task_kill(ctx: LsmContext) -> i32 {
    let before: i32 = ctx.arg(4);
    if before != 0 {
        return before;
    }
    let signal: i32 = ctx.arg(2);
    let Ok(signal) = u32::try_from(signal) else {
        return 0;
    };
    if !ends_or_stops(signal) {
        return 0;
    }
    let sender = current_tgid();
    let Some(from) = member_of_current(sender) else {
        return 0;
    };
    let task: u64 = ctx.arg(0);
    let Some(target) = session_of_task(task) else {
        return 0;
    };
    if target.1 == from.session {
        return 0;
    }
    record(&ctx, sender, from.session, target, signal, task);
    -EPERM
}

/// The process (tgid) of `task` and its kernel session, when it is in one: its entry holds for
/// its group leader (a reused pid is nobody's).
#[inline(always)]
fn session_of_task(task: u64) -> Option<(u32, u32)> {
    // SAFETY: the helper checks the read and fails, never faults, on a bad address.
    let tgid =
        unsafe { bpf_probe_read_kernel((task + u64::from(TASK_TGID_OFFSET.load())) as *const u32) }
            .ok()?;
    // SAFETY: plain data copied out of the map value.
    let member = unsafe { SESSIONS.get(tgid) }.copied()?;
    let leader = kernel_u64(task, TASK_GROUP_LEADER_OFFSET.load())?;
    let started = kernel_u64(leader, TASK_START_TIME_OFFSET.load())?;
    member.holds_for(started).then_some((tgid, member.session))
}

#[inline(always)]
fn record(
    ctx: &LsmContext,
    sender: u32,
    sender_session: u32,
    (target, target_session): (u32, u32),
    signal: u32,
    task: u64,
) {
    info!(
        ctx,
        "refused signal {} from pid {} (session {}) to pid {} (session {})",
        signal,
        sender,
        sender_session,
        target,
        target_session
    );
    let Some(mut entry) = REFUSALS.reserve::<SignalRefusal>(0) else {
        return;
    };
    let target_comm = {
        // SAFETY: as in session_of_task.
        unsafe {
            bpf_probe_read_kernel(
                (task + u64::from(TASK_COMM_OFFSET.load())) as *const [u8; COMM_LEN],
            )
        }
        .unwrap_or([0; COMM_LEN])
    };
    entry.write(SignalRefusal {
        // SAFETY: a helper with no preconditions.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        sender,
        sender_uid: current_euid().unwrap_or(u32::MAX),
        sender_session,
        target,
        target_session,
        signal,
        sender_comm: bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
        target_comm,
    });
    // Read once a second by the daemon: nobody waits for a wake-up.
    entry.submit(u64::from(BPF_RB_NO_WAKEUP));
}
