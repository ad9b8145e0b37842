//! Default locations that every Styxy component must agree on (daemon, CLI, shim client).

use std::path::{Path, PathBuf};

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

/// The system daemon's socket (the systemd unit's, and the default as root).
pub const SYSTEM_SOCKET: &str = "/run/styxy/styxy.sock";

/// Where a daemon listens by default: [`SYSTEM_SOCKET`] as root, `$XDG_RUNTIME_DIR/styxy/styxy.sock`
/// otherwise (`/tmp/styxy-UID/styxy/styxy.sock` when `XDG_RUNTIME_DIR` is unset).
pub fn default_socket() -> PathBuf {
    if is_root() {
        return PathBuf::from(SYSTEM_SOCKET);
    }
    let base = env_dir("XDG_RUNTIME_DIR").unwrap_or_else(|| {
        // SAFETY: getuid has no preconditions and cannot fail.
        PathBuf::from(format!("/tmp/styxy-{}", unsafe { libc::getuid() }))
    });
    base.join("styxy").join("styxy.sock")
}

/// Where a client (the CLI, the shim) looks for the daemon when not told: the user's own daemon
/// ([`default_socket`]) if its socket exists, else the system daemon's if that exists, else the
/// user's path (which then names what is missing in the error).
pub fn find_socket() -> PathBuf {
    pick_socket(default_socket(), Path::new(SYSTEM_SOCKET))
}

fn pick_socket(own: PathBuf, system: &Path) -> PathBuf {
    if !own.exists() && system.exists() {
        return system.to_path_buf();
    }
    own
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_find_the_system_daemon_when_the_user_runs_none() {
        let dir = std::env::temp_dir().join(format!("styxy-paths-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let own = dir.join("own.sock");
        let system = dir.join("system.sock");
        assert_eq!(
            pick_socket(own.clone(), &system),
            own,
            "neither: the user's path"
        );
        std::fs::write(&system, "").expect("file");
        assert_eq!(
            pick_socket(own.clone(), &system),
            system,
            "only the system daemon"
        );
        std::fs::write(&own, "").expect("file");
        assert_eq!(
            pick_socket(own.clone(), &system),
            own,
            "the user's own daemon first"
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
