//! The daemon's clocks: wall-clock milliseconds (the only time the broker sees, handed in), and
//! the kernel's monotonic and boot clocks in nanoseconds (those of `bpf_ktime_get_ns` and of a
//! task's `start_time`).

use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock time in Unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `CLOCK_MONOTONIC` in ns: the clock of `bpf_ktime_get_ns` and of a task's `start_time`.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// `CLOCK_BOOTTIME` in ns: the monotonic clock plus the time spent suspended (the clock of
/// `/proc/PID/stat` start times).
pub fn boottime_ns() -> u64 {
    clock_ns(libc::CLOCK_BOOTTIME)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec; CLOCK_MONOTONIC and CLOCK_BOOTTIME always exist.
    unsafe { libc::clock_gettime(clock, &mut now) };
    (now.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(now.tv_nsec as u64)
}
