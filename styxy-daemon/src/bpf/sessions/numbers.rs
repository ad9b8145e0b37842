//! Which kernel session number is which instance, kept in the state directory: the pinned maps
//! (see `bpf::pins`) hold the numbers, and a daemon that takes them over must know whose they
//! are — to keep each session's view and sticky ports in step with the broker, and to give the
//! next new session a number no live one has. Written (atomically, 0600) before a new number
//! reaches the kernel's maps; read only when the maps are reused.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// The file, in the state directory.
pub const NUMBERS_FILE: &str = "kernel-sessions.json";

/// One session as the file keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedSession {
    pub instance: String,
    pub number: u32,
    /// The uid that placed it first (it owns it).
    pub owner: u32,
    /// The project of the process it was placed with, for its sticky ports.
    pub project: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct File {
    sessions: Vec<SavedSession>,
}

/// Writes `sessions` to `path`.
pub fn save(path: &Path, sessions: Vec<SavedSession>) -> Result<()> {
    let text = serde_json::to_vec(&File { sessions }).context("encoding the session numbers")?;
    crate::store::write_private(path, &text)
}

/// What `path` holds; nothing when it is missing, and a warning (nothing) when it cannot be read:
/// the sessions it named then start over in the kernel as after a reboot.
pub fn load(path: &Path) -> Vec<SavedSession> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::warn!(file = %path.display(), cause = %e, "the kernel session numbers cannot be read");
            return Vec::new();
        }
    };
    match serde_json::from_slice::<File>(&text) {
        Ok(file) => {
            // One number per instance and one instance per number, or none of them is trusted.
            let mut numbers = HashSet::new();
            let mut instances = HashSet::new();
            let consistent = file.sessions.iter().all(|s| {
                numbers.insert(s.number) && instances.insert(s.instance.as_str()) && s.number != 0
            });
            if consistent {
                file.sessions
            } else {
                tracing::warn!(file = %path.display(), "the kernel session numbers repeat: ignored");
                Vec::new()
            }
        }
        Err(e) => {
            tracing::warn!(file = %path.display(), cause = %e, "the kernel session numbers are damaged: ignored");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(instance: &str, number: u32) -> SavedSession {
        SavedSession {
            instance: instance.into(),
            number,
            owner: 1000,
            project: Some("/work/app".into()),
        }
    }

    #[test]
    fn what_is_saved_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(NUMBERS_FILE);
        assert_eq!(load(&path), Vec::new(), "no file: nothing");
        let sessions = vec![session("feat-a", 1), session("feat-b", 3)];
        save(&path, sessions.clone()).unwrap();
        assert_eq!(load(&path), sessions);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_damaged_or_inconsistent_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(NUMBERS_FILE);
        std::fs::write(&path, b"{\"sessions\": [").unwrap();
        assert_eq!(load(&path), Vec::new());
        save(&path, vec![session("a", 1), session("b", 1)]).unwrap();
        assert_eq!(load(&path), Vec::new(), "one number, two instances");
        save(&path, vec![session("a", 1), session("a", 2)]).unwrap();
        assert_eq!(load(&path), Vec::new(), "one instance, two numbers");
        save(&path, vec![session("a", 0)]).unwrap();
        assert_eq!(load(&path), Vec::new(), "0 is no session");
    }
}
