//! Persistence of leases and instances, and the audit log, in the state dir.
//!
//! - `state.json`: a snapshot of every lease and instance, replaced atomically (temp file, fsync, rename).
//! - `journal.jsonl`: the changes made since that snapshot, one checksummed line each (see
//!   [`journal`]: damage is found and reported, never read past or guessed), written and fsynced before
//!   the caller is answered. The file is filled with zeros ahead of the writes ([`JOURNAL_CHUNK`] at a
//!   time), so a write overwrites zeros in place and its fsync has only data to flush, not the file's
//!   new size too; the journal ends at its first zero byte. Writes from concurrent callers are grouped into one fsync (group commit), so
//!   durability costs one fsync per batch, not per lease. When the journal grows it is folded into a new
//!   snapshot. A torn last line (power loss mid-write) is dropped on replay. A damaged journal or snapshot
//!   is moved aside (`….damaged-<ms>`), what it held up to the damage is kept, and what was dropped is
//!   said in the log and in `Status`; the daemon starts. Changes nobody waits for
//!   (the shim's short claims, table reconciliations) linger up to [`LINGER`] so that a run of binds
//!   costs one write and one fsync, not one each; anyone waiting for durability cuts that short.
//! - `audit.jsonl`: every reassigned bind, one JSON line each; past [`AUDIT_ROTATE_BYTES`] it is
//!   renamed to `audit.jsonl.1` (replacing the one before) and a new one is started.
//!
//! Rooms: [`state`] (what is kept, and the snapshot), [`journal`] (records and the file),
//! [`audit`], [`dir`] (the state dir and its files), [`writer`] (the thread that writes); this
//! file is the handle callers hold and the group commit between them and the writer.
//!
//! After `kill -9` and restart, every answered change is there, and none twice (changes are keyed by id).

mod audit;
mod dir;
mod journal;
mod lock;
mod state;
mod writer;

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use anyhow::{Context, Result};
use tokio::sync::watch;

use styxy_broker::{AuditRecord, StateChange};

use audit::AuditLog;
pub use dir::write_private;
use dir::{prepare_state_dir, read_json_lines, read_state_file, set_aside, write_snapshot};
use journal::Journal;
pub use lock::lock_state_dir;
pub use state::Snapshot;
use state::{lease_number, State};
use writer::{append_json_line, Writer};

const SNAPSHOT: &str = "state.json";
const JOURNAL: &str = "journal.jsonl";
const AUDIT: &str = "audit.jsonl";
const AUDIT_ROTATED: &str = "audit.jsonl.1";
/// Size at which the audit log is rotated: with one rotated generation, at most twice this on disk.
pub const AUDIT_ROTATE_BYTES: u64 = 8 << 20;
/// How long the writer gathers changes that nobody is waiting for before writing them.
const LINGER: std::time::Duration = std::time::Duration::from_millis(5);
/// How far ahead of its end the journal is filled with zeros.
const JOURNAL_CHUNK: u64 = 1 << 20;
/// Journal lines after which the writer folds the journal into a fresh snapshot.
const COMPACT_AFTER: usize = 10_000;

#[derive(Default)]
struct Pending {
    journal: Vec<u8>,
    changes: Vec<StateChange>,
    audit: Vec<u8>,
    seq: u64,
    closing: bool,
    /// Someone waits for what is pending: write it now.
    urgent: bool,
    /// The writer sleeps on `wake` (for work, or lingering). Waking it costs a futex call each
    /// time, so callers do it only then: a writer that is writing looks again when done.
    writer_waiting: bool,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.journal.is_empty() && self.audit.is_empty()
    }
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    durable: watch::Sender<u64>,
    /// Why the writer cannot write right now (a full disk, say); `None` while it can.
    failing: watch::Sender<Option<String>>,
}

impl Shared {
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

thread_local! {
    /// On a thread that runs its own single-threaded runtime: the durable mark of one store as
    /// relayed on this thread (see [`Store::relay_durable_here`]), keyed by the store's address.
    static RELAYED_DURABLE: RefCell<Option<(usize, watch::Receiver<u64>)>> = const { RefCell::new(None) };
}

/// A handle to the writer thread. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
    dir: PathBuf,
}

/// A place in the order of writes; [`Store::durable`] waits until it is on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(u64);

impl Store {
    /// Opens (creating) the state dir, reads the snapshot and replays the journal, folds them into a fresh
    /// snapshot and starts the writer thread. Returns the state as it was, and the recent audit entries.
    pub fn open(dir: &Path, audit_keep: usize) -> Result<(Store, Snapshot, Vec<AuditRecord>)> {
        Store::open_with(dir, audit_keep, AUDIT_ROTATE_BYTES)
    }

    /// [`Store::open`] with the audit log rotated at `audit_rotate_bytes`.
    pub fn open_with(
        dir: &Path,
        audit_keep: usize,
        audit_rotate_bytes: u64,
    ) -> Result<(Store, Snapshot, Vec<AuditRecord>)> {
        prepare_state_dir(dir)?;
        let mut state = State::default();
        let mut damage = Vec::new();
        let snapshot_path = dir.join(SNAPSHOT);
        if let Some(bytes) = read_state_file(&snapshot_path)? {
            match serde_json::from_slice::<Snapshot>(&bytes) {
                Ok(snap) => {
                    state.lease_ids_issued = snap
                        .leases
                        .iter()
                        .map(|l| lease_number(&l.id))
                        .fold(snap.lease_ids_issued, u64::max);
                    state.leases = snap.leases.into_iter().map(|l| (l.id.clone(), l)).collect();
                    state.instances = snap
                        .instances
                        .into_iter()
                        .map(|i| (i.id.clone(), i))
                        .collect();
                    state.sticky = snap
                        .sticky
                        .into_iter()
                        .map(|e| (e.key.clone(), e))
                        .collect();
                }
                Err(e) => {
                    let kept = set_aside(&snapshot_path)?;
                    damage.push(format!(
                        "{} is not a state snapshot ({e}): moved to {}; leases and instances it held are \
                         not restored (the journal's changes since are)",
                        snapshot_path.display(),
                        kept.display()
                    ));
                }
            }
        }
        let journal_path = dir.join(JOURNAL);
        let replayed = journal::replay(&read_state_file(&journal_path)?.unwrap_or_default());
        for change in replayed.changes {
            state.apply(change);
        }
        if replayed.torn_tail {
            tracing::info!(
                "the journal's last record was cut short by a crash (never acknowledged): dropped"
            );
        }
        if let Some(found) = replayed.damage {
            let kept = set_aside(&journal_path)?;
            damage.push(format!(
                "{} is damaged at record {} (byte {}: {}): kept the {} record(s) before it, dropped {}; \
                 the damaged file is kept as {}",
                journal_path.display(),
                found.record,
                found.offset,
                found.reason,
                found.kept,
                found.dropped,
                kept.display()
            ));
        }
        damage.extend(state.drop_double_bookings());
        for report in &damage {
            tracing::error!("{report}");
        }
        write_snapshot(dir, &state.snapshot())?;
        let journal = Journal::create(dir)?;
        let mut audit = read_json_lines::<AuditRecord>(&dir.join(AUDIT_ROTATED))?;
        audit.extend(read_json_lines::<AuditRecord>(&dir.join(AUDIT))?);
        let drop_count = audit.len().saturating_sub(audit_keep);
        audit.drain(..drop_count);
        let audit_log = AuditLog::open(dir, audit_rotate_bytes)?;

        let (durable, _) = watch::channel(0);
        let (failing, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            durable,
            failing,
        });
        let mut snapshot = state.snapshot();
        snapshot.damage = damage;
        let writer = Writer {
            shared: shared.clone(),
            dir: dir.to_path_buf(),
            journal,
            audit: audit_log,
            state,
        };
        std::thread::Builder::new()
            .name("styxy-store".into())
            .spawn(move || writer.run())
            .context("starting the store writer thread")?;
        Ok((
            Store {
                shared,
                dir: dir.to_path_buf(),
            },
            snapshot,
            audit,
        ))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Queues changes and audit records, in call order. Call it under the same lock that made the changes,
    /// so the journal's order is the broker's order.
    pub fn enqueue(&self, changes: &[StateChange], audit: &[AuditRecord]) -> Ticket {
        let mut pending = self.shared.pending();
        if changes.is_empty() && audit.is_empty() {
            // Nothing to write: durable once what is already queued is (no writer wake-up).
            return Ticket(pending.seq);
        }
        // A writer with something pending lingers on purpose; one that is writing looks again when done.
        let writer_asleep = pending.writer_waiting && pending.is_empty();
        for change in changes {
            journal::append_record(&mut pending.journal, change);
        }
        for record in audit {
            append_json_line(&mut pending.audit, record);
        }
        pending.changes.extend_from_slice(changes);
        pending.seq += 1;
        let ticket = Ticket(pending.seq);
        if writer_asleep {
            self.shared.wake.notify_one();
        }
        ticket
    }

    /// Waits until everything queued up to `ticket` is on disk.
    pub async fn durable(&self, ticket: Ticket) -> Result<()> {
        let mut rx = self
            .relayed_receiver()
            .unwrap_or_else(|| self.shared.durable.subscribe());
        if *self.shared.durable.borrow() < ticket.0 {
            let mut pending = self.shared.pending();
            pending.urgent = true;
            if pending.writer_waiting {
                self.shared.wake.notify_one();
            }
        }
        let mut failing = self.shared.failing.subscribe();
        tokio::select! {
            // Durable first: a change on disk is never reported as failed.
            biased;
            done = rx.wait_for(|done| *done >= ticket.0) => {
                done.map(|_| ()).context("the store writer stopped")
            }
            failure = failing.wait_for(Option::is_some) => {
                let cause = failure
                    .ok()
                    .and_then(|f| f.clone())
                    .unwrap_or_else(|| "the store writer stopped".into());
                anyhow::bail!(
                    "the state dir {} cannot be written ({cause}): this change is not on disk; \
                     the daemon keeps trying (free some space)",
                    self.dir.display()
                )
            }
        }
    }

    /// Makes the durable mark reach this thread's waiters through one task: run the returned future
    /// on this thread's single-threaded runtime, which must outlive every `durable` call made here.
    ///
    /// Without it the writer wakes every waiting task itself, and each wake-up of a task from
    /// outside its runtime writes that runtime's eventfd: about two syscalls per Allocate under
    /// load. With it the writer wakes one relay task per thread, which wakes the waiters from
    /// inside the runtime (no syscall).
    pub fn relay_durable_here(&self) -> impl std::future::Future<Output = ()> + 'static {
        let mut global = self.shared.durable.subscribe();
        let (local, receiver) = watch::channel(*global.borrow_and_update());
        RELAYED_DURABLE.with(|relayed| *relayed.borrow_mut() = Some((self.key(), receiver)));
        async move {
            while global.changed().await.is_ok() {
                let mark = *global.borrow_and_update();
                local.send_replace(mark);
            }
        }
    }

    /// This thread's relayed durable mark for this store, if [`Store::relay_durable_here`] set one up.
    fn relayed_receiver(&self) -> Option<watch::Receiver<u64>> {
        RELAYED_DURABLE.with(|relayed| {
            relayed
                .borrow()
                .as_ref()
                .filter(|(key, receiver)| *key == self.key() && receiver.has_changed().is_ok())
                .map(|(_, receiver)| receiver.clone())
        })
    }

    fn key(&self) -> usize {
        Arc::as_ptr(&self.shared) as usize
    }

    /// Flushes what is queued, writes a final snapshot and stops the writer.
    pub async fn close(&self) -> Result<()> {
        let ticket = {
            let mut pending = self.shared.pending();
            pending.closing = true;
            pending.seq += 1;
            self.shared.wake.notify_one();
            Ticket(pending.seq)
        };
        // Never hangs: a state dir that cannot be written is an error now, not a wait.
        self.durable(ticket)
            .await
            .context("the last state could not be saved on the way out")
    }
}

#[cfg(test)]
mod tests;
