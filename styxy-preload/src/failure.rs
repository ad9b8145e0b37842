//! Fail-open memory: after the daemon failed to answer, binds pass straight through for a while.

use core::sync::atomic::{AtomicU64, Ordering};

/// After the daemon failed to answer, binds pass straight through for this long.
const FAIL_OPEN_MEMORY_MS: u64 = 1000;
/// Why the last ask got no answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
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

pub(crate) fn remember_failure(failure: Failure) {
    let stamp = ((monotonic_ms() + 1) << 1) | u64::from(failure == Failure::Slow);
    LAST_FAILURE.store(stamp, Ordering::Relaxed);
}

/// The failure of the last `FAIL_OPEN_MEMORY_MS`, if any.
pub(crate) fn recent_failure() -> Option<Failure> {
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
