//! Process limits the daemon needs raised.

/// Every process that asked the daemon keeps its connection open (the shim reuses it), and the
/// process cache holds a pidfd per recent asker: on a busy machine that is more than the usual
/// soft limit of 1,024 descriptors. Raise the soft limit to the hard one (best effort).
pub(super) fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one plain struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            let wanted = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) != 0 {
                tracing::warn!(
                    soft_limit = limit.rlim_cur,
                    cause = %std::io::Error::last_os_error(),
                    "could not raise the open-file limit"
                );
            }
        }
    }
}

/// Gives memory the allocator holds free back to the system. glibc keeps what a burst freed in its
/// per-thread arenas (each server thread has one): after a flood of 4 MB requests the daemon stayed
/// at its peak (26 → 46 MB, `cargo xtask bench footprint`) until this ran. A no-op elsewhere.
pub(super) fn return_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions; it only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Keeps the allocator from holding on to what a burst used. glibc raises its mmap threshold
/// after a large block is freed (up to 32 MiB), so the 4 MB buffers of a request flood then come
/// from the arenas and stay there, fragmented: with the threshold fixed at 256 KiB they are
/// mapped and unmapped whole. Measured (`cargo xtask bench footprint`): 6 s after the flood
/// 19.9 MB with it, 28.9 MB without, against an 18.8-18.9 MB baseline. (Limiting the arenas to
/// two as well cost Allocate throughput in `bench broker`, and the threshold alone was enough.)
/// A no-op elsewhere.
pub(super) fn limit_allocator_hold() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters; a refused value is left as it was.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}
