//! One daemon per state directory: an exclusive `flock` on `daemon.lock` in it, held for the
//! daemon's life (the kernel lets go when the process ends, `kill -9` included). A second daemon
//! given the same directory — whose journal, session numbers and pinned kernel programs it would
//! share — stops at once and names the first.

use std::fs;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{bail, Context, Result};

const LOCK_FILE: &str = "daemon.lock";

/// The lock, held while this lives.
#[derive(Debug)]
pub struct StateDirLock {
    _file: fs::File,
}

/// Takes the lock of `dir` (made and checked as the store does), or says which daemon has it.
pub fn lock_state_dir(dir: &Path) -> Result<StateDirLock> {
    super::dir::prepare_state_dir(dir)?;
    let path = dir.join(LOCK_FILE);
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() {
                String::new()
            } else {
                format!(" (pid {holder})")
            };
            bail!(
                "another daemon uses the state dir {}{who}: stop it first, or give this one a \
                 dir of its own (--state-dir DIR)",
                dir.display()
            );
        }
        return Err(error).with_context(|| format!("locking {}", path.display()));
    }
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(StateDirLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_one_dir_is_refused_with_the_holder_and_freed_with_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = lock_state_dir(&state).unwrap();
        let refused = lock_state_dir(&state).unwrap_err().to_string();
        assert!(
            refused.contains("another daemon uses the state dir")
                && refused.contains(&format!("(pid {})", std::process::id())),
            "{refused}"
        );
        drop(first);
        lock_state_dir(&state).expect("free once the first is gone");
    }
}
