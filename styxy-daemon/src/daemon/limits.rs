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
