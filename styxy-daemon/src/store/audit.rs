//! The audit log: every reassigned bind, one JSON line each, fsynced with its batch; past the
//! rotation size it is renamed to `audit.jsonl.1` (replacing the one before) and a new one is
//! started, so at most twice that size is on disk.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::dir::{refused_file, state_file_options};
use super::{AUDIT, AUDIT_ROTATED};

/// The open audit log and how much it holds.
pub(super) struct AuditLog {
    dir: PathBuf,
    file: File,
    bytes: u64,
    rotate_bytes: u64,
}

impl AuditLog {
    /// Opens (creating) the log in `dir`, to be rotated at `rotate_bytes`.
    pub(super) fn open(dir: &Path, rotate_bytes: u64) -> Result<AuditLog> {
        let file = open_audit(dir)?;
        let bytes = file.metadata().map_or(0, |m| m.len());
        Ok(AuditLog {
            dir: dir.to_path_buf(),
            file,
            bytes,
            rotate_bytes,
        })
    }

    /// Appends whole lines and fsyncs them; rotates when the log has grown past its size.
    pub(super) fn append(&mut self, lines: &[u8]) -> Result<()> {
        self.file
            .write_all(lines)
            .context("appending to the audit log")?;
        self.file.sync_data().context("fsync of the audit log")?;
        self.bytes += lines.len() as u64;
        if self.bytes >= self.rotate_bytes {
            fs::rename(self.dir.join(AUDIT), self.dir.join(AUDIT_ROTATED))
                .context("rotating the audit log")?;
            self.file = open_audit(&self.dir)?;
            self.bytes = 0;
        }
        Ok(())
    }
}

fn open_audit(dir: &Path) -> Result<File> {
    state_file_options()
        .create(true)
        .append(true)
        .open(dir.join(AUDIT))
        .with_context(|| refused_file(&dir.join(AUDIT)))
}
