//! The trust stores `styxy trust` adds the daemon's local certificate authority to, and
//! `styxy untrust` removes it from: the system's (`system`: what curl, Python, Go, OpenSSL and
//! GnuTLS read) and the NSS databases Chromium and Firefox read (`nss`). Each store is changed
//! only for exactly this authority, named by its fingerprint, so removing it leaves the store
//! as it was.

pub mod nss;
pub mod system;

use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// The authority, as the daemon gives it.
#[derive(Clone, Debug)]
pub struct Authority {
    pub certificate_pem: String,
    /// SHA-256 of the certificate, lower-case hex.
    pub fingerprint: String,
}

impl Authority {
    /// What names it in every store: `styxy-local-ca-<first 16 hex digits>`.
    pub fn short_name(&self) -> String {
        format!(
            "styxy-local-ca-{}",
            self.fingerprint.get(..16).unwrap_or(&self.fingerprint)
        )
    }
}

/// What one store did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Outcome {
    /// The store, for people: "system store", "Chromium (NSS)", "Firefox profile default".
    pub store: String,
    /// Its file or database.
    pub path: PathBuf,
    pub result: Change,
}

/// What happened to one store.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "detail")]
pub enum Change {
    /// The authority was added (trust) or removed (untrust).
    Changed,
    /// It was already as asked.
    AlreadyDone,
    /// The store was left alone, with why and the fix.
    Skipped(String),
    /// Changing it failed, with why.
    Failed(String),
}

/// Whose stores: the user the command runs as, or, for `sudo styxy trust`, the user who ran
/// sudo (their browsers' databases are in their home, and files made there must be theirs).
#[derive(Clone, Debug)]
pub struct StoreOwner {
    pub home: PathBuf,
    pub uid: u32,
    pub gid: u32,
}

impl StoreOwner {
    /// The invoking user: `SUDO_USER`'s when root runs under sudo, else this process's.
    pub fn invoking() -> Option<StoreOwner> {
        // SAFETY: getuid has no preconditions and cannot fail.
        let uid = unsafe { libc::getuid() };
        if uid == 0 {
            if let Some(user) = std::env::var_os("SUDO_USER") {
                if let Some(owner) = user.to_str().and_then(user_by_name) {
                    return Some(owner);
                }
            }
        }
        let home = std::env::var_os("HOME").map(PathBuf::from)?;
        // SAFETY: getgid has no preconditions and cannot fail.
        let gid = unsafe { libc::getgid() };
        Some(StoreOwner { home, uid, gid })
    }
}

/// A user's home and ids from the password database.
fn user_by_name(name: &str) -> Option<StoreOwner> {
    let name = std::ffi::CString::new(name).ok()?;
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: an all-zero passwd is a valid value for getpwnam_r to fill in.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; the buffer's length is passed with it, and
    // the strings written into `entry` point into `buffer`, which outlives their reads below.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut entry,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() || entry.pw_dir.is_null() {
        return None;
    }
    // SAFETY: getpwnam_r succeeded, so pw_dir is a NUL-terminated string inside `buffer`.
    let home = unsafe { std::ffi::CStr::from_ptr(entry.pw_dir) };
    Some(StoreOwner {
        home: PathBuf::from(std::ffi::OsStr::from_bytes(home.to_bytes())),
        uid: entry.pw_uid,
        gid: entry.pw_gid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_store_names_the_authority_by_its_fingerprint() {
        let authority = Authority {
            certificate_pem: String::new(),
            fingerprint: "0123456789abcdef0123456789abcdef".into(),
        };
        assert_eq!(authority.short_name(), "styxy-local-ca-0123456789abcdef");
    }

    #[test]
    fn root_finds_its_own_home() {
        let root = user_by_name("root").expect("root is in the password database");
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(root.home.is_absolute());
        assert!(user_by_name("no-such-user-styxy").is_none());
    }
}
