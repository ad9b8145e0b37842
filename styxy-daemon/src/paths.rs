//! Where things live by default: as root, system paths; otherwise the user's XDG directories.

use std::path::PathBuf;

pub use styxy_common::paths::{default_socket, find_socket};

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

/// Where an installed or built Styxy file (`name`) may be, in order: `$env_var` when set, next to
/// the running binary (a cargo build), the cargo target directory above it, `<prefix>/lib/styxy/`
/// for a binary in `<prefix>/bin/`, then `/usr/local` and `/usr`.
pub fn artifact_candidates(env_var: &str, name: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if let Some(path) = env_dir(env_var) {
        found.push(path);
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(std::path::Path::to_path_buf))
    {
        found.push(dir.join(name));
        if let Some(parent) = dir.parent() {
            found.push(parent.join(name));
            found.push(parent.join("lib/styxy").join(name));
        }
    }
    for prefix in ["/usr/local", "/usr"] {
        found.push(PathBuf::from(prefix).join("lib/styxy").join(name));
    }
    found
}
