//! The session table file (`<socket>.table`, layout in `styxy_common::table`): the daemon's side.
//! It is created anew at each start (a fresh file renamed into place, never truncated while a
//! shim has it mapped), readable by every local user and writable by the daemon alone, updated
//! under the broker lock with every decision before that decision's answer leaves, and marked
//! stopped, then removed, on the way out.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

use anyhow::{Context, Result};
use memmap2::MmapMut;
use styxy_broker::{Broker, Effects, Notice};
use styxy_common::table::{Entry, Table, BYTES, FILE_SUFFIX, WORDS};

/// The daemon's writable mapping of its table.
pub struct PublishedTable {
    map: MmapMut,
    path: PathBuf,
}

/// Where the table of the daemon serving `socket` is.
pub fn path_for(socket: &Path) -> PathBuf {
    let mut path = socket.as_os_str().to_owned();
    path.push(FILE_SUFFIX);
    PathBuf::from(path)
}

impl PublishedTable {
    /// Creates the table next to `socket`: written to a temporary name (made here, never an
    /// existing file or link), sized once, then renamed over whatever table was there.
    pub fn create(socket: &Path) -> Result<PublishedTable> {
        let path = path_for(socket);
        let mut staged = path.clone().into_os_string();
        staged.push(".new");
        let staged = PathBuf::from(staged);
        match std::fs::remove_file(&staged) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", staged.display())),
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&staged)
            .with_context(|| format!("creating {}", staged.display()))?;
        file.set_len(BYTES as u64)
            .with_context(|| format!("sizing {}", staged.display()))?;
        // SAFETY: the file is ours, just made, and never truncated: the mapping stays valid.
        let map = unsafe { MmapMut::map_mut(&file) }
            .with_context(|| format!("mapping {}", staged.display()))?;
        let table = PublishedTable { map, path };
        // The namespace shims hold their own against (see `styxy_common::table`).
        let netns = std::fs::metadata("/proc/self/ns/net").map_or(0, |m| {
            use std::os::unix::fs::MetadataExt;
            m.ino()
        });
        table.table().init(std::process::id(), netns);
        std::fs::rename(&staged, &table.path)
            .with_context(|| format!("moving {} into place", table.path.display()))?;
        Ok(table)
    }

    fn table(&self) -> Table<'_> {
        // SAFETY: the mapping is page-aligned and BYTES long, so it holds WORDS aligned u64s; it
        // lives as long as `self`, and every access to it goes through these atomics.
        let words =
            unsafe { std::slice::from_raw_parts(self.map.as_ptr().cast::<AtomicU64>(), WORDS) };
        Table::new(words).unwrap_or_else(|| unreachable!("the mapping is exactly WORDS long"))
    }

    /// Publishes everything: every port's taken bit and every view entry (at start).
    pub fn publish_all(&self, broker: &Broker) {
        self.table().write(|w| {
            for port in 1..=u16::MAX {
                w.set_taken(port, broker.is_taken(port));
            }
            set_views(w, broker);
        });
    }

    /// Publishes what one decision changed: the taken bits of the ports it touched, and the
    /// views when a move's claim came or went.
    pub fn publish(&self, broker: &Broker, effects: &Effects) {
        let mut ports = Vec::new();
        let mut views_changed = false;
        for notice in &effects.notices {
            match notice {
                Notice::Bound(h) | Notice::Released(h) => {
                    ports.push(h.socket.port);
                    views_changed |= broker.changes_a_view(h);
                }
                Notice::Leased(l) | Notice::LeaseEnded(l) => {
                    ports.push(l.port);
                    views_changed |= l.asked().is_some();
                }
                Notice::Reassigned(_) => {}
            }
        }
        let table = self.table();
        // Nothing to change (a bind of a port a claim already marked): no write at all, so the
        // shims' cached copy of the table stays valid.
        if !views_changed
            && ports
                .iter()
                .all(|p| table.taken_is(*p, broker.is_taken(*p)))
        {
            return;
        }
        table.write(|w| {
            for port in ports {
                w.set_taken(port, broker.is_taken(port));
            }
            if views_changed {
                set_views(w, broker);
            }
        });
    }

    /// Tells the shims the daemon stopped, and removes the file (mappings of it stay valid).
    pub fn close(&self) {
        self.table().set_stopped();
        let _ = std::fs::remove_file(&self.path);
    }
}

fn set_views(writer: &styxy_common::table::Writer<'_>, broker: &Broker) {
    let views = broker.views();
    let left_out = writer.set_views(views.iter().map(|v| Entry {
        instance_id: v.instance_id.as_bytes(),
        uid: v.uid,
        protocol: v.protocol,
        asked: v.asked,
        bound: v.bound,
    }));
    if left_out > 0 {
        tracing::warn!(
            left_out,
            "session view entries did not fit the table: those sessions reach their moved ports by the bound port only"
        );
    }
}
