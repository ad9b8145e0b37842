//! Default locations that every Styxy component must agree on (daemon, CLI, shim client).

use std::path::PathBuf;

/// Environment variable naming the daemon's Unix socket.
pub const SOCKET_ENV: &str = "STYXY_SOCKET";

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn env_dir(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// `/run/styxy/styxy.sock` as root, `$XDG_RUNTIME_DIR/styxy/styxy.sock` otherwise
/// (`/tmp/styxy-UID/styxy/styxy.sock` when `XDG_RUNTIME_DIR` is unset).
pub fn default_socket() -> PathBuf {
    if is_root() {
        return PathBuf::from("/run/styxy/styxy.sock");
    }
    let base = env_dir("XDG_RUNTIME_DIR").unwrap_or_else(|| {
        // SAFETY: getuid has no preconditions and cannot fail.
        PathBuf::from(format!("/tmp/styxy-{}", unsafe { libc::getuid() }))
    });
    base.join("styxy").join("styxy.sock")
}

/// The socket to use: `$STYXY_SOCKET` when set and non-empty, else [`default_socket`].
pub fn socket_from_env() -> PathBuf {
    env_dir(SOCKET_ENV).unwrap_or_else(default_socket)
}
