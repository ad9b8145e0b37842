//! Sessions never hurt each other, in the kernel: whether the `lsm/task_kill` program can run
//! on this machine (BPF LSM active, the daemon allowed to), and the signals it refused, read from
//! its ring buffer (see `styxy_common::protection`). The program is attached with the other
//! session programs (see `session_programs`), while a kernel session is live.

use std::path::Path;

use aya::maps::{MapData, RingBuf};
use styxy_common::protection::SignalRefusal;

/// Whether the kernel refuses signals between sessions, and why not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KillProtection {
    /// `lsm/task_kill` is loaded (attached while a session is live).
    Kernel,
    /// It is not: why, and what to do.
    Off(String),
}

impl KillProtection {
    pub fn is_kernel(&self) -> bool {
        matches!(self, KillProtection::Kernel)
    }

    /// One line for `styxy status`.
    pub fn describe(&self) -> String {
        match self {
            KillProtection::Kernel => "the kernel refuses (EPERM) a signal that would end or stop \
                a process of one session when a process of another sends it (lsm/task_kill)"
                .to_string(),
            KillProtection::Off(why) => format!(
                "off in the kernel: {why}; where the agents' PreToolUse guard is installed \
                 (styxy hook install), it denies their kill commands aimed at another session"
            ),
        }
    }
}

/// Where the kernel lists its active security modules.
const LSM_LIST: &str = "/sys/kernel/security/lsm";

/// `Ok` when BPF LSM is active; else why not. Mounts securityfs at `/sys/kernel/security` when
/// nothing is mounted there (as systemd does at boot; minimal systems may not).
pub fn bpf_lsm_active() -> Result<(), String> {
    if !Path::new(LSM_LIST).exists() {
        if let Err(e) = super::object::mount_kernel_fs(c"securityfs", c"/sys/kernel/security") {
            return Err(format!(
                "{LSM_LIST} is missing and securityfs could not be mounted at /sys/kernel/security \
                 ({e})"
            ));
        }
        tracing::info!("mounted securityfs at /sys/kernel/security (to read the active LSMs)");
    }
    let active =
        std::fs::read_to_string(LSM_LIST).map_err(|e| format!("reading {LSM_LIST}: {e}"))?;
    lsm_listed(&active)
}

/// Whether `bpf` is in the kernel's list of active LSMs (`lsm=` on its command line, or
/// `CONFIG_LSM`).
fn lsm_listed(active: &str) -> Result<(), String> {
    if active.trim().split(',').any(|name| name == "bpf") {
        return Ok(());
    }
    Err(format!(
        "BPF LSM is not active (the kernel's LSMs are `{}`; add `bpf` to `lsm=` on the kernel \
         command line, with CONFIG_BPF_LSM=y)",
        active.trim()
    ))
}

/// What a refused load of the LSM program means, when the kernel refused it with `EPERM`
/// although `bpf` is among its active LSMs: a root daemon with every capability gets that only
/// from a kernel that lets no BPF program attach to its functions (LSM programs run through the
/// same trampolines as `fentry` programs) — as on virtual machines whose kernel keeps its
/// function tracer to itself. Then no BPF LSM program can load, however it is written.
pub fn refusal_hint(error: &str) -> Option<&'static str> {
    error.contains("Operation not permitted").then_some(
        "the kernel refuses BPF LSM programs here although `bpf` is among its active LSMs: it \
         lets no BPF program attach to its functions (no BPF LSM program can load here)",
    )
}

/// The ring buffer of refused signals.
pub struct Refusals {
    ring: RingBuf<MapData>,
}

impl Refusals {
    pub fn new(ring: RingBuf<MapData>) -> Refusals {
        Refusals { ring }
    }

    /// Every refusal waiting (the daemon reads them once a second).
    pub fn drain(&mut self) -> Vec<SignalRefusal> {
        let mut refused = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() >= SignalRefusal::SIZE {
                // SAFETY: the kernel wrote a whole `SignalRefusal` (checked length); read
                // unaligned, as ring records are only 8-byte aligned by the kernel's header.
                refused.push(unsafe { item.as_ptr().cast::<SignalRefusal>().read_unaligned() });
            }
        }
        refused
    }
}

/// A comm as text.
pub fn comm_text(comm: &[u8]) -> String {
    let end = comm.iter().position(|b| *b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpf_must_be_among_the_active_lsms() {
        assert_eq!(lsm_listed("lockdown,capability,landlock,bpf"), Ok(()));
        assert_eq!(lsm_listed("bpf\n"), Ok(()));
        let off = lsm_listed("lockdown,capability,yama,apparmor").unwrap_err();
        assert!(off.contains("add `bpf` to `lsm=`"), "{off}");
        assert!(lsm_listed("bpfilter").is_err());
    }

    #[test]
    fn an_eperm_refusal_says_the_kernel_allows_no_lsm_program() {
        let hint =
            refusal_hint("the BPF_PROG_LOAD syscall returned Operation not permitted (os error 1)");
        assert!(hint.is_some_and(|h| h.contains("no BPF LSM program can load here")));
        assert_eq!(refusal_hint("Invalid argument (os error 22)"), None);
    }

    #[test]
    fn comms_end_at_their_first_nul() {
        assert_eq!(comm_text(b"python3\0\0\0\0\0\0\0\0\0"), "python3");
        assert_eq!(comm_text(b"sixteen-bytes-xx"), "sixteen-bytes-xx");
    }
}
