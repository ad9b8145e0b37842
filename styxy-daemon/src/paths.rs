//! Where things live by default: as root, system paths; otherwise the user's XDG directories.

use std::path::PathBuf;

pub use styxy_common::paths::default_socket;

/// TCP address the daemon listens on by default (loopback only).
pub const DEFAULT_TCP: &str = "127.0.0.1:9876";

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn env_dir(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn home() -> PathBuf {
    env_dir("HOME").unwrap_or_else(|| PathBuf::from("/tmp"))
}

/// `/var/lib/styxy` as root, `$XDG_STATE_HOME/styxy` (or `~/.local/state/styxy`) otherwise.
pub fn default_state_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/styxy");
    }
    env_dir("XDG_STATE_HOME")
        .unwrap_or_else(|| home().join(".local/state"))
        .join("styxy")
}

/// `/etc/styxy/config.toml` as root, `$XDG_CONFIG_HOME/styxy/config.toml` otherwise; used when it exists.
pub fn default_config() -> PathBuf {
    if is_root() {
        return PathBuf::from("/etc/styxy/config.toml");
    }
    env_dir("XDG_CONFIG_HOME")
        .unwrap_or_else(|| home().join(".config"))
        .join("styxy/config.toml")
}
