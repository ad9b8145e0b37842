//! Sessions never hurt each other: the kernel side of the kill protection. Where BPF LSM is
//! active, the `lsm/task_kill` program refuses (`EPERM`) a signal that would end or stop a
//! process of one kernel session when it comes from a process of another, whatever their uids;
//! each refusal is recorded in the `REFUSALS` ring buffer for the daemon (audit log, and the
//! sender's agent is told).
//!
//! Only signals a process sends are checked (the kernel calls the hook from `kill`, `tgkill`,
//! `pidfd_send_signal`…; a signal the kernel raises itself — `SIGPIPE`, `SIGCHLD`, a
//! parent-death signal — never reaches it). Processes outside every session, root's shell
//! included, may signal any session's process as before: the protection is between sessions.

/// The ring buffer of refused signals.
pub const REFUSALS_MAP: &str = "REFUSALS";
/// Its size in bytes (a power of two, a multiple of the page size): ~1,000 records, read once a
/// second by the daemon; a burst beyond it loses records, never a refusal.
pub const REFUSALS_RING_BYTES: u32 = 64 * 1024;

/// The program, and the LSM hook it attaches to.
pub const PROGRAM_TASK_KILL: &str = "styxy_task_kill";
pub const TASK_KILL_HOOK: &str = "task_kill";

/// Byte offsets of `task_struct.tgid` and `task_struct.comm` in the running kernel (from its
/// BTF), set at load time like `session::GLOBAL_TASK_*`.
pub const GLOBAL_TASK_TGID_OFFSET: &str = "TASK_TGID_OFFSET";
pub const GLOBAL_TASK_COMM_OFFSET: &str = "TASK_COMM_OFFSET";

/// Length of a task's comm.
pub const COMM_LEN: usize = 16;

/// One refused signal, as the kernel program records it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignalRefusal {
    /// `bpf_ktime_get_ns()` when it was refused.
    pub timestamp_ns: u64,
    /// The sending process (tgid), its effective uid and kernel session.
    pub sender: u32,
    pub sender_uid: u32,
    pub sender_session: u32,
    /// The process the signal was for (tgid) and its kernel session.
    pub target: u32,
    pub target_session: u32,
    /// The signal number.
    pub signal: u32,
    /// The sender's and the target's comm, NUL-padded.
    pub sender_comm: [u8; COMM_LEN],
    pub target_comm: [u8; COMM_LEN],
}

impl SignalRefusal {
    pub const SIZE: usize = core::mem::size_of::<SignalRefusal>();
}

#[cfg(feature = "user")]
// SAFETY: plain old data: integers and byte arrays, no padding (checked below).
unsafe impl aya::Pod for SignalRefusal {}

const _: () = assert!(SignalRefusal::SIZE == 8 + 6 * 4 + 2 * COMM_LEN);
const _: () = assert!(REFUSALS_RING_BYTES as usize > 8 + SignalRefusal::SIZE);

/// The signals the protection refuses between sessions: every signal that ends or stops a
/// process by default — all but 0 (the existence check), `SIGCHLD`, `SIGCONT`, `SIGURG` and
/// `SIGWINCH`. `SIGUSR1`, `SIGHUP` and the like count: a server that does not handle them ends.
pub const fn ends_or_stops(signal: u32) -> bool {
    const SIGCHLD: u32 = 17;
    const SIGCONT: u32 = 18;
    const SIGURG: u32 = 23;
    const SIGWINCH: u32 = 28;
    const SIGRTMAX: u32 = 64;
    !matches!(signal, 0 | SIGCHLD | SIGCONT | SIGURG | SIGWINCH) && signal <= SIGRTMAX
}

/// A signal's name (`SIGTERM`); `None` for a real-time or unknown one.
pub fn signal_name(signal: u32) -> Option<&'static str> {
    const NAMES: [&str; 32] = [
        "0",
        "SIGHUP",
        "SIGINT",
        "SIGQUIT",
        "SIGILL",
        "SIGTRAP",
        "SIGABRT",
        "SIGBUS",
        "SIGFPE",
        "SIGKILL",
        "SIGUSR1",
        "SIGSEGV",
        "SIGUSR2",
        "SIGPIPE",
        "SIGALRM",
        "SIGTERM",
        "SIGSTKFLT",
        "SIGCHLD",
        "SIGCONT",
        "SIGSTOP",
        "SIGTSTP",
        "SIGTTIN",
        "SIGTTOU",
        "SIGURG",
        "SIGXCPU",
        "SIGXFSZ",
        "SIGVTALRM",
        "SIGPROF",
        "SIGWINCH",
        "SIGIO",
        "SIGPWR",
        "SIGSYS",
    ];
    NAMES.get(signal as usize).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signals_that_end_or_stop_a_process_are_refused_and_no_other() {
        for signal in [1, 2, 3, 6, 9, 10, 12, 13, 14, 15, 19, 20, 34, 64] {
            assert!(ends_or_stops(signal), "{signal}");
        }
        for signal in [0, 17, 18, 23, 28, 65, 1000] {
            assert!(!ends_or_stops(signal), "{signal}");
        }
    }

    #[test]
    fn signals_are_named_as_kill_names_them() {
        assert_eq!(signal_name(15), Some("SIGTERM"));
        assert_eq!(signal_name(9), Some("SIGKILL"));
        assert_eq!(signal_name(31), Some("SIGSYS"));
        assert_eq!(signal_name(40), None);
    }
}
