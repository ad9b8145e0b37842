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
