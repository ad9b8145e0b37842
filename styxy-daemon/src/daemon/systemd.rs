//! systemd's readiness protocol (`Type=notify`): `READY=1` once serving, `STOPPING=1` on the way out.

use std::path::PathBuf;

/// Sends `state` (e.g. `READY=1`) to systemd's notification socket, when running under systemd;
/// abstract socket names (`@…`) included. Outside systemd (no `NOTIFY_SOCKET`) it does nothing.
pub(super) fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = PathBuf::from(path);
    let result = std::os::unix::net::UnixDatagram::unbound().and_then(|s| {
        if let Some(abstract_name) = path.as_os_str().as_encoded_bytes().strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?;
            s.send_to_addr(state.as_bytes(), &addr)
        } else {
            s.send_to(state.as_bytes(), &path)
        }
    });
    if let Err(e) = result {
        tracing::warn!(socket = %path.display(), cause = %e, "notifying systemd");
    }
}

/// The sockets systemd passed this process (socket activation: `LISTEN_PID`, `LISTEN_FDS`,
/// `LISTEN_FDNAMES`, descriptors from 3 on), each with its `FileDescriptorName=`; none when it
/// passed none, or passed them to another process. Taken once: the descriptors become this
/// process's own (close-on-exec, so no child inherits them).
pub(super) fn take_listen_fds() -> Vec<(String, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;
    static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if TAKEN.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return Vec::new();
    }
    let for_me = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<i32>().ok())
        .unwrap_or(0);
    if !for_me || count <= 0 {
        return Vec::new();
    }
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    let mut names = names.split(':');
    let mut taken = Vec::new();
    for fd in 3..3 + count.min(64) {
        let name = names.next().unwrap_or("unknown").to_string();
        // SAFETY: fcntl on a descriptor number has no memory preconditions; a number that is
        // not open fails with EBADF, and is skipped.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags < 0 {
            continue;
        }
        // SAFETY: as above.
        unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
        // SAFETY: systemd passed `fd` to this process for it to own (LISTEN_PID is ours), and
        // nothing else in the process has taken it: this is the only place that reads them.
        taken.push((name, unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }));
    }
    taken
}
