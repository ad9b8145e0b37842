//! The state dir and its files: the directory made the daemon's own, every file opened without
//! following links and readable by the daemon alone, damaged files set aside, JSON lines read, and
//! the snapshot replaced atomically.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;

use super::state::Snapshot;
use super::SNAPSHOT;

/// How every state file is opened: readable by the daemon's user alone when created (0600), and
/// never through a symbolic link (`O_NOFOLLOW`): a link planted in the state dir makes the open
/// fail instead of making the daemon write (as root, perhaps) to wherever it points.
pub(super) fn state_file_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    options
}

/// What to say when a state file cannot be opened (a planted link among the causes).
pub(super) fn refused_file(path: &Path) -> String {
    format!(
        "opening {} (a state file must be a plain file of the daemon's own; if it is a symbolic \
         link or someone else's, remove it)",
        path.display()
    )
}

/// Moves a damaged state file aside (`NAME.damaged-<unix ms>`), kept for whoever wants to look;
/// returns where it went.
pub(super) fn set_aside(path: &Path) -> Result<PathBuf> {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".damaged-{ms}"));
    let aside = PathBuf::from(aside);
    fs::rename(path, &aside)
        .with_context(|| format!("moving the damaged {} aside", path.display()))?;
    Ok(aside)
}

/// Reads a whole state file without following a link; `None` when there is none.
pub(super) fn read_state_file(path: &Path) -> Result<Option<Vec<u8>>> {
    let mut file = match state_file_options().read(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| refused_file(path)),
    };
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(bytes))
}

/// Makes the state dir the daemon's own: created 0700 when missing; refused when it belongs to
/// another user or others may write to it (they could plant files or links there); made 0700
/// when it is the daemon's own but readable by others (every holder's command line is in it).
pub(super) fn prepare_state_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating state dir {}", dir.display()))?;
    let meta = fs::metadata(dir).with_context(|| format!("reading state dir {}", dir.display()))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        anyhow::bail!(
            "state dir {} belongs to uid {}, not to the daemon's uid {me}: give the daemon a dir of its \
             own (--state-dir DIR), or `chown {me} {}`",
            dir.display(),
            meta.uid(),
            dir.display()
        );
    }
    if meta.mode() & 0o022 != 0 {
        anyhow::bail!(
            "state dir {} may be written by others (mode {:o}): they could plant files in it; \
             `chmod 700 {}`, or give the daemon another dir with --state-dir DIR",
            dir.display(),
            meta.mode() & 0o7777,
            dir.display()
        );
    }
    if meta.mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making state dir {} private (0700)", dir.display()))?;
    }
    Ok(())
}

/// Reads a JSON-lines file; a missing file is empty, and an unparsable line (a torn write) is skipped.
/// The data ends at the first zero byte (the journal is filled with zeros ahead of its writes).
pub(super) fn read_json_lines<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>> {
    let Some(bytes) = read_state_file(path)? else {
        return Ok(Vec::new());
    };
    let data = bytes.split(|b| *b == 0).next().unwrap_or_default();
    let mut out = Vec::new();
    for line in data.split(|b| *b == b'\n') {
        match serde_json::from_slice(line) {
            Ok(v) => out.push(v),
            Err(e) if !line.trim_ascii().is_empty() => {
                tracing::warn!("skipping an unreadable line of {}: {e}", path.display())
            }
            Err(_) => {}
        }
    }
    Ok(out)
}

/// Replaces `state.json` atomically: write a temp file, fsync it, rename it over, fsync the directory.
pub(super) fn write_snapshot(dir: &Path, snapshot: &Snapshot) -> Result<()> {
    let tmp = dir.join(format!("{SNAPSHOT}.tmp"));
    // Serialized whole first: written straight to the file, every JSON token would be a write(2),
    // and a snapshot of 10,000 leases took a second of the writer's time (every waiter stalled).
    let mut text = serde_json::to_vec_pretty(snapshot).context("serializing the state snapshot")?;
    text.push(b'\n');
    // A fresh file (O_EXCL): whatever was left under this name, a link included, is removed
    // first (removing a link never touches its target).
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", tmp.display())),
    }
    let mut file = state_file_options()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .with_context(|| refused_file(&tmp))?;
    file.write_all(&text)
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.sync_all().context("fsync of the state snapshot")?;
    fs::rename(&tmp, dir.join(SNAPSHOT)).context("renaming the state snapshot into place")?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .context("fsync of the state dir")?;
    Ok(())
}

/// Writes a file readable by the daemon's user alone (0600), atomically: a temporary file,
/// fsynced, renamed over.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".new");
    let temporary = PathBuf::from(temporary);
    let _ = fs::remove_file(&temporary);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&temporary)
        .with_context(|| format!("creating {}", temporary.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", temporary.display()))?;
    fs::rename(&temporary, path).with_context(|| format!("writing {}", path.display()))?;
    if let Some(dir) = path.parent() {
        if let Ok(dir) = fs::File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}
