//! Where a daemon's kernel programs and maps stay pinned in bpffs while no daemon runs, so that a
//! restart (a crash, `kill -9`, an upgrade, SIGTERM with sessions live) finds its kernel sessions
//! as they were: `/sys/fs/bpf/styxy/<the state directory, escaped>/<object digest>/`. One
//! directory per state directory, because each daemon (the installed one, a user's, a test's)
//! owns its own programs; its name is the state directory's path, escaped as systemd escapes
//! paths (`/var/lib/styxy` → `var-lib-styxy`) but with every `.` escaped (bpffs refuses any name
//! with a dot, EPERM), so that anyone can see whose pins they are and a daemon can remove those
//! of a state directory that no longer exists.
//!
//! The daemon makes and reuses them (`styxy-daemon/src/bpf/pins.rs`); `styxy uninstall` and the
//! tests remove them with [`remove_pins_of`].

use std::path::{Path, PathBuf};

/// Where every daemon's pins live (bpffs is mounted at `/sys/fs/bpf`).
pub const BPFFS: &str = "/sys/fs/bpf";
/// The directory of Styxy's pins in bpffs.
pub const PINS_ROOT: &str = "/sys/fs/bpf/styxy";

/// The pin directory of the daemon whose state directory is `state_dir` (absolute).
pub fn pin_dir_of(state_dir: &Path) -> PathBuf {
    Path::new(PINS_ROOT).join(escape_path(state_dir))
}

/// Removes every pin of the daemon of `state_dir` (its programs detach, its maps go once
/// nothing holds them). Whether there were any.
pub fn remove_pins_of(state_dir: &Path) -> std::io::Result<bool> {
    let dir = pin_dir_of(state_dir);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// `path` as one file name bpffs accepts, as `systemd-escape --path` writes it but for dots: the
/// slashes at either end dropped, the others `-`, and every byte other than ASCII letters,
/// digits, `:` and `_` written `\xNN` (systemd keeps a `.` not in front; bpffs refuses a name
/// that contains one). `/` alone is `-`.
pub fn escape_path(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    let trimmed = trim_slashes(bytes);
    if trimmed.is_empty() {
        return "-".to_string();
    }
    let mut out = String::with_capacity(trimmed.len());
    for &b in trimmed {
        match b {
            b'/' => out.push('-'),
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b':' | b'_' => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out
}

/// The path [`escape_path`] made `name` from; `None` when `name` is not such a name.
pub fn unescape_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    if name == "-" {
        return Some(PathBuf::from("/"));
    }
    let bytes = name.as_bytes();
    let mut out = vec![b'/'];
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'-' => out.push(b'/'),
            b'\\' => {
                let hex = name.get(i + 2..i + 4)?;
                if bytes.get(i + 1) != Some(&b'x') {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b => out.push(b),
        }
        i += 1;
    }
    Some(PathBuf::from(std::ffi::OsString::from_vec(out)))
}

fn trim_slashes(mut bytes: &[u8]) -> &[u8] {
    while let [b'/', rest @ ..] = bytes {
        bytes = rest;
    }
    while let [rest @ .., b'/'] = bytes {
        bytes = rest;
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::Strategy;

    #[test]
    fn paths_are_escaped_as_systemd_escapes_them_but_for_dots() {
        // `systemd-escape --path /var/lib/styxy` and friends; dots escaped everywhere.
        assert_eq!(escape_path(Path::new("/var/lib/styxy")), "var-lib-styxy");
        assert_eq!(escape_path(Path::new("/")), "-");
        assert_eq!(escape_path(Path::new("/.hidden")), "\\x2ehidden");
        assert_eq!(
            escape_path(Path::new("/tmp/.tmpAb-9/state")),
            "tmp-\\x2etmpAb\\x2d9-state"
        );
        assert_eq!(
            escape_path(Path::new("/home/a b/.local/state/styxy/")),
            "home-a\\x20b-\\x2elocal-state-styxy"
        );
    }

    proptest::proptest! {
        /// Any absolute path (components of any bytes but NUL and `/`) comes back from its name,
        /// and the name is one file name.
        #[test]
        fn every_escaped_path_comes_back(
            components in proptest::collection::vec(
                proptest::collection::vec(
                    (1u8..=255).prop_filter("no slash", |b| *b != b'/'),
                    1..12,
                ),
                1..6,
            )
        ) {
            use std::os::unix::ffi::OsStringExt;
            let mut bytes = Vec::new();
            for component in components {
                bytes.push(b'/');
                bytes.extend(component);
            }
            let path = PathBuf::from(std::ffi::OsString::from_vec(bytes));
            let name = escape_path(&path);
            proptest::prop_assert!(!name.contains('/') && !name.contains('.'), "{}", name);
            proptest::prop_assert_eq!(unescape_path(&name), Some(path));
        }
    }

    #[test]
    fn names_that_are_no_escaped_path_are_refused() {
        assert_eq!(unescape_path("a\\y41"), None);
        assert_eq!(unescape_path("a\\x4"), None);
        assert_eq!(unescape_path("a\\xzz"), None);
    }
}
