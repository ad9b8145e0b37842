//! Default locations that every Styxy component must agree on (daemon, CLI, shim client), and where
//! an installed or built Styxy file is looked for.

#[cfg(feature = "std")]
use std::path::{Path, PathBuf};

#[cfg(feature = "std")]
use crate::env;

/// The system daemon's socket (the systemd unit's, and the default as root).
pub const SYSTEM_SOCKET: &str = "/run/styxy/styxy.sock";
/// TCP address the daemon listens on by default (loopback only).
pub const DEFAULT_TCP: &str = "127.0.0.1:9876";
/// File name of the bind() shim.
pub const PRELOAD_LIBRARY: &str = "libstyxy_preload.so";
/// File name of the eBPF object.
pub const EBPF_OBJECT: &str = "styxy-ebpf.o";

/// The project a directory belongs to: its git worktree root (the nearest directory holding
/// `.git`, a directory or a worktree's file), else the directory itself; `None` for `/` (every
/// system service would share it) or a path that is not UTF-8. Sticky ports are remembered by it:
/// the daemon asks it of a process's working directory, `styxy forget --here` of the shell's, so
/// both must get the same answer.
#[cfg(feature = "std")]
pub fn project_of_dir(dir: &Path) -> Option<String> {
    dir.parent()?;
    let root = dir
        .ancestors()
        .take(64)
        .find(|d| std::fs::symlink_metadata(d.join(".git")).is_ok())
        .filter(|d| d.parent().is_some())
        .unwrap_or(dir);
    root.to_str().map(str::to_owned)
}

/// Whether this process runs as root (effective uid 0).
#[cfg(feature = "std")]
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A directory named by an environment variable, when it is set and not empty.
#[cfg(feature = "std")]
fn env_dir(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

#[cfg(feature = "std")]
fn home() -> PathBuf {
    env_dir("HOME").unwrap_or_else(|| PathBuf::from("/tmp"))
}

/// Where a daemon listens by default: [`SYSTEM_SOCKET`] as root, `$XDG_RUNTIME_DIR/styxy/styxy.sock`
/// otherwise (`/tmp/styxy-UID/styxy/styxy.sock` when `XDG_RUNTIME_DIR` is unset).
#[cfg(feature = "std")]
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
#[cfg(feature = "std")]
pub fn find_socket() -> PathBuf {
    pick_socket(default_socket(), Path::new(SYSTEM_SOCKET))
}

#[cfg(feature = "std")]
fn pick_socket(own: PathBuf, system: &Path) -> PathBuf {
    if !own.exists() && system.exists() {
        return system.to_path_buf();
    }
    own
}

/// `/var/lib/styxy` as root, `$XDG_STATE_HOME/styxy` (or `~/.local/state/styxy`) otherwise.
#[cfg(feature = "std")]
pub fn default_state_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/styxy");
    }
    env_dir("XDG_STATE_HOME")
        .unwrap_or_else(|| home().join(".local/state"))
        .join("styxy")
}

/// `/etc/styxy/config.toml` as root, `$XDG_CONFIG_HOME/styxy/config.toml` otherwise; used when it exists.
#[cfg(feature = "std")]
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
#[cfg(feature = "std")]
pub fn artifact_candidates(env_var: env::Var, name: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if let Some(path) = env_dir(env_var.name) {
        found.push(path);
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
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

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;

    #[test]
    fn clients_find_the_system_daemon_when_the_user_runs_none() {
        let dir = tempfile::tempdir().expect("temp dir");
        let own = dir.path().join("own.sock");
        let system = dir.path().join("system.sock");
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
    }

    #[test]
    fn the_project_is_the_worktree_root_else_the_directory() {
        let temp = tempfile::tempdir().expect("tempdir");
        let repo = temp.path().join("repo");
        std::fs::create_dir_all(repo.join("a/b")).expect("dirs");
        std::fs::create_dir_all(repo.join(".git")).expect(".git");
        let worktree = temp.path().join("wt");
        std::fs::create_dir_all(worktree.join("src")).expect("dirs");
        std::fs::write(worktree.join(".git"), "gitdir: ../repo/.git/worktrees/wt\n")
            .expect(".git file");
        let plain = temp.path().join("plain");
        std::fs::create_dir_all(&plain).expect("dir");
        let s = |p: &Path| p.to_str().map(str::to_owned);
        assert_eq!(project_of_dir(&repo.join("a/b")), s(&repo));
        assert_eq!(project_of_dir(&worktree.join("src")), s(&worktree));
        assert_eq!(project_of_dir(&plain), s(&plain));
        assert_eq!(project_of_dir(Path::new("/")), None);
    }
}
