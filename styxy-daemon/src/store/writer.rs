//! The store's writer thread: it gathers what callers queue (lingering briefly when nobody
//! waits), writes the journal and the audit log, fsyncs, and tells waiters the batch is durable;
//! it folds the journal into a fresh snapshot when the journal has grown, and retries a write the
//! disk refused until it is taken.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use serde::Serialize;
use styxy_broker::StateChange;

use super::audit::AuditLog;
use super::dir::write_snapshot;
use super::journal::Journal;
use super::state::State;
use super::{Shared, COMPACT_AFTER, LINGER};

pub(super) struct Writer {
    pub(super) shared: Arc<Shared>,
    pub(super) dir: PathBuf,
    pub(super) journal: Journal,
    pub(super) audit: AuditLog,
    pub(super) state: State,
}

impl Writer {
    pub(super) fn run(mut self) {
        loop {
            let batch = {
                let mut pending = self.shared.pending();
                while pending.is_empty()
                    && !pending.closing
                    && pending.seq == *self.shared.durable.borrow()
                {
                    pending.writer_waiting = true;
                    pending = self
                        .shared
                        .wake
                        .wait(pending)
                        .unwrap_or_else(|e| e.into_inner());
                    pending.writer_waiting = false;
                }
                let linger_until = std::time::Instant::now() + LINGER;
                while !pending.urgent && !pending.closing {
                    let left = linger_until.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    pending.writer_waiting = true;
                    pending = self
                        .shared
                        .wake
                        .wait_timeout(pending, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                    pending.writer_waiting = false;
                }
                pending.urgent = false;
                Batch {
                    journal: std::mem::take(&mut pending.journal),
                    changes: std::mem::take(&mut pending.changes),
                    audit: std::mem::take(&mut pending.audit),
                    seq: pending.seq,
                    closing: pending.closing,
                }
            };
            // Callers are never told "durable" for a write that failed: retry until the disk takes
            // it. Meanwhile those who wait are told at once that it cannot be written.
            while let Err(e) = self.write(&batch) {
                let cause = format!("{e:#}");
                if self.shared.failing.borrow().as_deref() != Some(cause.as_str()) {
                    tracing::error!(
                        "writing state to {}: {cause}; retrying every 500 ms",
                        self.dir.display()
                    );
                    self.shared.failing.send_replace(Some(cause));
                }
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
            if self.shared.failing.borrow().is_some() {
                tracing::info!("writing state to {} again", self.dir.display());
                self.shared.failing.send_replace(None);
            }
            self.shared.durable.send_replace(batch.seq);
            if batch.closing {
                return;
            }
        }
    }

    /// Writes one batch. Safe to repeat after a failure: changes are keyed by id.
    fn write(&mut self, batch: &Batch) -> Result<()> {
        if !batch.journal.is_empty() {
            self.journal.append(&batch.journal, batch.changes.len())?;
        }
        for change in &batch.changes {
            self.state.apply(change.clone());
        }
        if !batch.audit.is_empty() {
            self.audit.append(&batch.audit)?;
        }
        if batch.closing || self.journal.lines >= COMPACT_AFTER {
            write_snapshot(&self.dir, &self.state.snapshot())?;
            self.journal = Journal::create(&self.dir)?;
        }
        Ok(())
    }
}

pub(super) struct Batch {
    pub(super) journal: Vec<u8>,
    pub(super) changes: Vec<StateChange>,
    pub(super) audit: Vec<u8>,
    pub(super) seq: u64,
    pub(super) closing: bool,
}

pub(super) fn append_json_line<T: Serialize>(buf: &mut Vec<u8>, value: &T) {
    // Serializing these plain structs to a Vec cannot fail.
    if serde_json::to_writer(&mut *buf, value).is_ok() {
        buf.push(b'\n');
    }
}
