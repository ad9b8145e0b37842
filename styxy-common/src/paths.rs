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
/// ([`default_socket`]) if its socket exists and nobody else could have put it there (see
/// [`untrusted_because`]), else the system daemon's if that exists, else the user's path (which
/// then names what is missing in the error).
#[cfg(feature = "std")]
pub fn find_socket() -> PathBuf {
    find_socket_checked().0
}

/// [`find_socket`], and why the user's own socket was passed over when it exists but another
/// user could have planted it (`/tmp/styxy-UID` made by someone else, say): a client says so.
#[cfg(feature = "std")]
pub fn find_socket_checked() -> (PathBuf, Option<String>) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    pick_socket(default_socket(), Path::new(SYSTEM_SOCKET), uid)
}

#[cfg(feature = "std")]
fn pick_socket(own: PathBuf, system: &Path, uid: u32) -> (PathBuf, Option<String>) {
    let exists = std::fs::symlink_metadata(&own).is_ok();
    let distrust = exists.then(|| untrusted_because(&own, uid)).flatten();
    if let Some(reason) = distrust {
        let warning = format!(
            "ignoring {}: {reason}; using the system daemon's socket {}",
            own.display(),
            system.display()
        );
        return (system.to_path_buf(), Some(warning));
    }
    if !exists && system.exists() {
        return (system.to_path_buf(), None);
    }
    (own, None)
}

/// Why `path` cannot be trusted by user `uid`, if it cannot: it, or a directory above it, is
/// owned by another user (root aside), or a directory above it may be written by others (a
/// root-owned sticky one such as `/tmp` aside: others cannot replace what is in it). A socket or
/// table there may have been planted by someone else, who would then see or steer this user's
/// traffic.
#[cfg(feature = "std")]
pub fn untrusted_because(path: &Path, uid: u32) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) => return Some(format!("{}: {e}", path.display())),
    };
    if meta.file_type().is_symlink() {
        return Some(format!("{} is a symbolic link", path.display()));
    }
    if meta.uid() != uid && meta.uid() != 0 {
        return Some(format!("{} belongs to uid {}", path.display(), meta.uid()));
    }
    for dir in path
        .ancestors()
        .skip(1)
        .filter(|d| !d.as_os_str().is_empty())
    {
        let meta = match std::fs::metadata(dir) {
            Ok(meta) => meta,
            Err(e) => return Some(format!("{}: {e}", dir.display())),
        };
        if meta.uid() != uid && meta.uid() != 0 {
            return Some(format!("{} belongs to uid {}", dir.display(), meta.uid()));
        }
        let others_write = meta.mode() & 0o022 != 0;
        let sticky_root = meta.mode() & 0o1000 != 0 && meta.uid() == 0;
        if others_write && !sticky_root {
            return Some(format!("{} may be written by other users", dir.display()));
        }
    }
    None
}

/// The system daemon's state directory (the systemd unit's `StateDirectory=`).
pub const SYSTEM_STATE_DIR: &str = "/var/lib/styxy";

/// [`SYSTEM_STATE_DIR`] as root, `$XDG_STATE_HOME/styxy` (or `~/.local/state/styxy`) otherwise.
#[cfg(feature = "std")]
pub fn default_state_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from(SYSTEM_STATE_DIR);
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
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        assert_eq!(
            pick_socket(own.clone(), &system, me),
            (own.clone(), None),
            "neither: the user's path"
        );
        std::fs::write(&system, "").expect("file");
        assert_eq!(
            pick_socket(own.clone(), &system, me),
            (system.clone(), None),
            "only the system daemon"
        );
        std::fs::write(&own, "").expect("file");
        assert_eq!(
            pick_socket(own.clone(), &system, me),
            (own.clone(), None),
            "the user's own daemon first"
        );
        // Another user's socket at the user's path (as root: made another's; otherwise: seen by
        // another user) is passed over, with the reason.
        let (owner, viewer) = if me == 0 {
            std::os::unix::fs::chown(&own, Some(12_345), None).expect("chown");
            (12_345, 0)
        } else {
            (me, me + 1)
        };
        let (picked, warning) = pick_socket(own.clone(), &system, viewer);
        assert_eq!(picked, system);
        let warning = warning.expect("a warning");
        assert!(
            warning.contains(&format!("belongs to uid {owner}")),
            "{warning}"
        );
    }

    #[test]
    fn paths_others_could_plant_are_not_trusted() {
        use std::os::unix::fs::PermissionsExt;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("styxy.sock");
        std::fs::write(&file, "").expect("file");
        assert_eq!(untrusted_because(&file, me), None);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod");
        let reason = untrusted_because(&file, me).expect("a world-writable directory");
        assert!(reason.contains("may be written by other users"), "{reason}");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&file, &link).expect("symlink");
        assert!(untrusted_because(&link, me).is_some(), "a symbolic link");
        assert!(untrusted_because(&dir.path().join("missing"), me).is_some());
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
