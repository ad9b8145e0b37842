//! The programs' settings, written by the daemon at load time (`styxy_common::session::GLOBAL_*`
//! and the ephemeral range): the offsets they read the kernel's records and tasks with, whether
//! sessions are enforced, and which ports are ephemeral.

use aya_ebpf::Global;

/// Set by the daemon at load time (see `styxy_common::session::GLOBAL_*`).
#[no_mangle]
pub(crate) static FORK_CHILD_PID_OFFSET: Global<u32> = Global::new(0);
#[no_mangle]
pub(crate) static EXIT_GROUP_DEAD_OFFSET: Global<u32> = Global::new(0);
#[no_mangle]
pub(crate) static EXEC_PID_OFFSET: Global<u32> = Global::new(0);
#[no_mangle]
pub(crate) static EXEC_OLD_PID_OFFSET: Global<u32> = Global::new(0);
#[no_mangle]
pub(crate) static ENFORCE: Global<u32> = Global::new(0);
/// Where the running kernel keeps the task fields membership is checked with (from its BTF).
#[no_mangle]
pub(crate) static TASK_GROUP_LEADER_OFFSET: Global<u32> = Global::new(0);
#[no_mangle]
pub(crate) static TASK_START_TIME_OFFSET: Global<u32> = Global::new(0);
#[no_mangle]
pub(crate) static TASK_CRED_OFFSET: Global<u32> = Global::new(0);
#[no_mangle]
pub(crate) static TASK_TGID_OFFSET: Global<u32> = Global::new(0);
#[no_mangle]
pub(crate) static TASK_COMM_OFFSET: Global<u32> = Global::new(0);
#[no_mangle]
pub(crate) static CRED_EUID_OFFSET: Global<u32> = Global::new(0);
/// The kernel's ephemeral ports (`ip_local_port_range`), where port-0 binds land.
#[no_mangle]
pub(crate) static EPHEMERAL_LOW: Global<u32> = Global::new(32_768);
#[no_mangle]
pub(crate) static EPHEMERAL_HIGH: Global<u32> = Global::new(60_999);
/// 1 when no service range reaches into the ephemeral ports (the usual case): then a port-0
/// bind's port needs no look into `PORT_INFO` — a cache miss in a 512 KiB array, measured at
/// about 100 ns of the ~170 ns post_bind took per port-0 bind (`bpftool prog show` with
/// `kernel.bpf_stats_enabled`).
#[no_mangle]
pub(crate) static EPHEMERAL_IN_NO_RANGE: Global<u32> = Global::new(0);
