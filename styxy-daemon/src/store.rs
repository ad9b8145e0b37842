//! Persistence of leases and instances, and the audit log, in the state dir.
//!
//! - `state.json`: a snapshot of every lease and instance, replaced atomically (temp file, fsync, rename).
//! - `journal.jsonl`: the changes made since that snapshot, one checksummed line each (see
//!   `crate::journal`: damage is found and reported, never read past or guessed), written and fsynced before
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
//! After `kill -9` and restart, every answered change is there, and none twice (changes are keyed by id).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::journal;
use styxy_broker::{AuditRecord, Instance, Lease, StateChange, StickyKey, StickyPort};

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

/// What the state dir held at start.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Snapshot {
    pub leases: Vec<Lease>,
    pub instances: Vec<Instance>,
    /// Sticky ports: the port each identity got last (absent in snapshots of older daemons).
    #[serde(default)]
    pub sticky: Vec<StickyPort>,
    /// The highest `N` of any `lease-N` ever issued, released ones included: a restarted daemon
    /// issues ids after it, so an id a script kept never names someone else's lease.
    #[serde(default)]
    pub lease_ids_issued: u64,
    /// What damage was found reading the state dir, and what was dropped for it (not saved).
    #[serde(skip)]
    pub damage: Vec<String>,
}

/// Leases and instances by id, the way the journal's changes address them.
#[derive(Debug, Default)]
struct State {
    leases: BTreeMap<String, Lease>,
    instances: BTreeMap<String, Instance>,
    sticky: BTreeMap<StickyKey, StickyPort>,
    lease_ids_issued: u64,
}

/// `N` of a `lease-N` id (0 for any other id).
fn lease_number(id: &str) -> u64 {
    id.strip_prefix("lease-")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

impl State {
    fn apply(&mut self, change: StateChange) {
        match change {
            StateChange::PutLease { lease } => {
                self.lease_ids_issued = self.lease_ids_issued.max(lease_number(&lease.id));
                self.leases.insert(lease.id.clone(), lease);
            }
            StateChange::RemoveLease { id } => {
                self.leases.remove(&id);
            }
            StateChange::PutInstance { instance } => {
                self.instances.insert(instance.id.clone(), instance);
            }
            StateChange::RemoveInstance { id } => {
                self.instances.remove(&id);
            }
            StateChange::PutSticky { sticky } => {
                self.sticky.insert(sticky.key.clone(), sticky);
            }
            StateChange::RemoveSticky { key } => {
                self.sticky.remove(&key);
            }
        }
    }

    /// Checks what was loaded against the broker's invariant: one lease per port. Of leases that
    /// share a port, the first issued stays; the others are dropped, each reported.
    fn drop_double_bookings(&mut self) -> Vec<String> {
        let mut by_port: BTreeMap<u16, Vec<(u64, String)>> = BTreeMap::new();
        for lease in self.leases.values() {
            by_port
                .entry(lease.port)
                .or_default()
                .push((lease_number(&lease.id), lease.id.clone()));
        }
        let mut reports = Vec::new();
        for (port, mut ids) in by_port.into_iter().filter(|(_, ids)| ids.len() > 1) {
            ids.sort();
            let kept = ids.remove(0).1;
            for (_, id) in ids {
                self.leases.remove(&id);
                reports.push(format!(
                    "{id} held port {port}, which {kept} holds too: dropped (a port has one lease)"
                ));
            }
        }
        reports
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            leases: self.leases.values().cloned().collect(),
            instances: self.instances.values().cloned().collect(),
            sticky: self.sticky.values().cloned().collect(),
            lease_ids_issued: self.lease_ids_issued,
            damage: Vec::new(),
        }
    }
}

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
        let audit_file = open_audit(dir)?;
        let audit_bytes = audit_file.metadata().map_or(0, |m| m.len());

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
            audit: audit_file,
            audit_bytes,
            audit_rotate_bytes,
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

struct Writer {
    shared: Arc<Shared>,
    dir: PathBuf,
    journal: Journal,
    audit: File,
    audit_bytes: u64,
    audit_rotate_bytes: u64,
    state: State,
}

fn open_audit(dir: &Path) -> Result<File> {
    state_file_options()
        .create(true)
        .append(true)
        .open(dir.join(AUDIT))
        .with_context(|| refused_file(&dir.join(AUDIT)))
}

/// How every state file is opened: readable by the daemon's user alone when created (0600), and
/// never through a symbolic link (`O_NOFOLLOW`): a link planted in the state dir makes the open
/// fail instead of making the daemon write (as root, perhaps) to wherever it points.
fn state_file_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    options
}

/// What to say when a state file cannot be opened (a planted link among the causes).
fn refused_file(path: &Path) -> String {
    format!(
        "opening {} (a state file must be a plain file of the daemon's own; if it is a symbolic \
         link or someone else's, remove it)",
        path.display()
    )
}

/// Moves a damaged state file aside (`NAME.damaged-<unix ms>`), kept for whoever wants to look;
/// returns where it went.
fn set_aside(path: &Path) -> Result<PathBuf> {
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
fn read_state_file(path: &Path) -> Result<Option<Vec<u8>>> {
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
fn prepare_state_dir(dir: &Path) -> Result<()> {
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

impl Writer {
    fn run(mut self) {
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
            self.audit
                .write_all(&batch.audit)
                .context("appending to the audit log")?;
            self.audit.sync_data().context("fsync of the audit log")?;
            self.audit_bytes += batch.audit.len() as u64;
            if self.audit_bytes >= self.audit_rotate_bytes {
                fs::rename(self.dir.join(AUDIT), self.dir.join(AUDIT_ROTATED))
                    .context("rotating the audit log")?;
                self.audit = open_audit(&self.dir)?;
                self.audit_bytes = 0;
            }
        }
        if batch.closing || self.journal.lines >= COMPACT_AFTER {
            write_snapshot(&self.dir, &self.state.snapshot())?;
            self.journal = Journal::create(&self.dir)?;
        }
        Ok(())
    }
}

/// The journal file: where its data ends, and how far it is filled with zeros.
struct Journal {
    file: File,
    end: u64,
    zeroed: u64,
    lines: usize,
}

impl Journal {
    /// Starts an empty journal (truncating the one there), its first chunk zeroed and on disk.
    fn create(dir: &Path) -> Result<Journal> {
        let path = dir.join(JOURNAL);
        let file = state_file_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .with_context(|| refused_file(&path))?;
        let mut journal = Journal {
            file,
            end: 0,
            zeroed: 0,
            lines: 0,
        };
        journal.zero(0, JOURNAL_CHUNK)?;
        journal
            .file
            .sync_all()
            .context("fsync of the new journal")?;
        Ok(journal)
    }

    /// Writes `bytes` (whole lines) at the end and fsyncs them. Safe to repeat after a failure:
    /// the end moves only once the data is on disk.
    fn append(&mut self, bytes: &[u8], lines: usize) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let end = self.end + bytes.len() as u64;
        self.file
            .write_all_at(bytes, self.end)
            .context("writing to the journal")?;
        // Zeros ahead again (this fsync then carries the new size too, once per chunk).
        if end > self.zeroed {
            self.zero(end, end.next_multiple_of(JOURNAL_CHUNK))?;
        }
        self.file.sync_data().context("fsync of the journal")?;
        self.end = end;
        self.lines += lines;
        Ok(())
    }

    /// Fills `from..limit` of the file with zeros.
    fn zero(&mut self, from: u64, limit: u64) -> Result<()> {
        use std::os::unix::fs::FileExt;
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        let mut at = from;
        while at < limit {
            let len = (limit - at).min(ZEROS.len() as u64) as usize;
            self.file
                .write_all_at(&ZEROS[..len], at)
                .context("filling the journal with zeros")?;
            at += len as u64;
        }
        self.zeroed = limit;
        Ok(())
    }
}

struct Batch {
    journal: Vec<u8>,
    changes: Vec<StateChange>,
    audit: Vec<u8>,
    seq: u64,
    closing: bool,
}

fn append_json_line<T: Serialize>(buf: &mut Vec<u8>, value: &T) {
    // Serializing these plain structs to a Vec cannot fail.
    if serde_json::to_writer(&mut *buf, value).is_ok() {
        buf.push(b'\n');
    }
}

/// Reads a JSON-lines file; a missing file is empty, and an unparsable line (a torn write) is skipped.
/// The data ends at the first zero byte (the journal is filled with zeros ahead of its writes).
fn read_json_lines<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>> {
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
fn write_snapshot(dir: &Path, snapshot: &Snapshot) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use styxy_broker::{ProcessId, Protocol};

    fn lease(id: &str, port: u16) -> Lease {
        Lease {
            id: id.into(),
            port,
            service_type: "dev".into(),
            owner_uid: 1000,
            process: Some(ProcessId {
                pid: 1,
                start_time: 2,
            }),
            instance_id: None,
            created_ms: 1,
            expires_ms: None,
            claim: false,
            requested_port: None,
            protocol: None,
        }
    }

    fn audit(port: u16) -> AuditRecord {
        AuditRecord {
            at_ms: 1,
            pid: 2,
            comm: "node".into(),
            uid: 1000,
            requested_port: port,
            assigned_port: port + 1,
            protocol: Protocol::Tcp,
            service_type: "dev".into(),
            holder_pid: None,
            holder_comm: None,
            instance_id: None,
        }
    }

    #[tokio::test]
    async fn changes_nobody_waits_for_still_reach_the_disk() {
        let dir_guard = tempfile::tempdir().unwrap();
        let dir = dir_guard.path().to_path_buf();
        let (store, _, _) = Store::open(&dir, 100).unwrap();
        // One waited-for write first, so the writer is idle, asleep, when the others come.
        let t = store.enqueue(
            &[StateChange::PutLease {
                lease: lease("lease-0", 2999),
            }],
            &[],
        );
        store.durable(t).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        // Two in a row: the second finds the writer awake (lingering) and does not wake it.
        for (id, port) in [("claim-1", 3000), ("claim-2", 3001)] {
            store.enqueue(
                &[StateChange::PutLease {
                    lease: lease(id, port),
                }],
                &[audit(port)],
            );
        }
        let written = |file: &str, wanted: &str| {
            fs::read_to_string(dir.join(file)).is_ok_and(|text| text.contains(wanted))
        };
        // Generous: the point is that they arrive without anyone asking, not how fast.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !(written(JOURNAL, "claim-2") && written(AUDIT, "3002")) {
            assert!(
                std::time::Instant::now() < deadline,
                "lingering changes were never written"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(written(JOURNAL, "claim-1"));
    }

    #[tokio::test]
    async fn changes_survive_reopen_and_a_torn_line_is_skipped() {
        let dir_guard = tempfile::tempdir().unwrap();
        let dir = dir_guard.path().to_path_buf();
        let (store, snap, _) = Store::open(&dir, 100).unwrap();
        assert!(snap.leases.is_empty());
        store.enqueue(
            &[StateChange::PutLease {
                lease: lease("lease-1", 3000),
            }],
            &[],
        );
        store.enqueue(
            &[StateChange::PutLease {
                lease: lease("lease-2", 3001),
            }],
            &[audit(3000)],
        );
        let t = store.enqueue(
            &[StateChange::RemoveLease {
                id: "lease-1".into(),
            }],
            &[],
        );
        store.durable(t).await.unwrap();
        // As after kill -9: no close, a torn line at the end of the journal (where its zeros begin).
        let journal = OpenOptions::new()
            .write(true)
            .open(dir.join(JOURNAL))
            .unwrap();
        let end = fs::read(dir.join(JOURNAL))
            .unwrap()
            .iter()
            .position(|b| *b == 0)
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&journal, b"{\"op\":\"put_le", end as u64)
            .unwrap();

        let (store2, snap, audit_back) = Store::open(&dir, 100).unwrap();
        assert_eq!(snap.leases, vec![lease("lease-2", 3001)]);
        assert_eq!(audit_back, vec![audit(3000)]);
        store2.close().await.unwrap();
        let (_, snap, _) = Store::open(&dir, 100).unwrap();
        assert_eq!(snap.leases.len(), 1);
    }

    #[tokio::test]
    async fn the_audit_log_rotates_and_the_newest_entries_come_back() {
        let dir_guard = tempfile::tempdir().unwrap();
        let dir = dir_guard.path().to_path_buf();
        // Records are about 180 bytes: a rotation every third one, checked after each write.
        let (store, _, _) = Store::open_with(&dir, 100, 400).unwrap();
        for port in 3000..3010 {
            let ticket = store.enqueue(&[], &[audit(port)]);
            store.durable(ticket).await.unwrap();
        }
        store.close().await.unwrap();
        let current = fs::metadata(dir.join(AUDIT)).unwrap().len();
        let rotated = fs::metadata(dir.join(AUDIT_ROTATED)).unwrap().len();
        assert!(
            current < 400 && rotated < 600,
            "bounded: {current} + {rotated}"
        );
        let (_, _, back) = Store::open_with(&dir, 100, 400).unwrap();
        let ports: Vec<u16> = back.iter().map(|r| r.requested_port).collect();
        assert_eq!(ports.last(), Some(&3009), "{ports:?}");
        assert!(ports.windows(2).all(|w| w[0] < w[1]), "in order: {ports:?}");
    }

    #[tokio::test]
    async fn a_journal_longer_than_its_zeroed_chunks_comes_back_whole() {
        let dir_guard = tempfile::tempdir().unwrap();
        let dir = dir_guard.path().to_path_buf();
        let (store, _, _) = Store::open(&dir, 100).unwrap();
        // Batches of growing size, one larger than a chunk: over 3 MiB of journal in all.
        let mut next = 0u32;
        for batch in [1, 7, 300, 9000, 2] {
            let changes: Vec<StateChange> = (next..next + batch)
                .map(|n| StateChange::PutLease {
                    // One port each: a port has one lease (the load checks it).
                    lease: lease(&format!("lease-{n:0>200}"), 3000 + n as u16),
                })
                .collect();
            next += batch;
            store.durable(store.enqueue(&changes, &[])).await.unwrap();
        }
        let on_disk = fs::metadata(dir.join(JOURNAL)).unwrap().len();
        assert!(on_disk > 3 * JOURNAL_CHUNK, "{on_disk}");
        // As after kill -9: no close.
        let (_, snap, _) = Store::open(&dir, 100).unwrap();
        assert_eq!(snap.leases.len(), next as usize);
    }

    #[test]
    fn waits_end_through_a_threads_relay_and_without_it_once_it_is_gone() {
        let dir_guard = tempfile::tempdir().unwrap();
        let dir = dir_guard.path().to_path_buf();
        let (store, _, _) = Store::open(&dir, 100).unwrap();
        let put = |store: &Store, id: String, port: u16| {
            store.enqueue(
                &[StateChange::PutLease {
                    lease: lease(&id, port),
                }],
                &[],
            )
        };
        let single_threaded = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        let patience = std::time::Duration::from_secs(10);
        single_threaded().block_on(async {
            tokio::spawn(store.relay_durable_here());
            assert!(store.relayed_receiver().is_some());
            // Many waiters at once, as under load: each must be woken by the relay.
            let waiters: Vec<_> = (0..20u16)
                .map(|n| {
                    let store = store.clone();
                    tokio::spawn(async move {
                        let ticket = put(&store, format!("lease-{n}"), 3000 + n);
                        store.durable(ticket).await
                    })
                })
                .collect();
            for waiter in waiters {
                let waited = tokio::time::timeout(patience, waiter).await;
                assert!(
                    matches!(waited, Ok(Ok(Ok(())))),
                    "a wait through the relay did not end: {waited:?}"
                );
            }
        });
        // That runtime, and its relay, are gone: waits on this thread go straight to the writer.
        assert!(store.relayed_receiver().is_none());
        single_threaded().block_on(async {
            let ticket = put(&store, "lease-after".into(), 3100);
            let waited = tokio::time::timeout(patience, store.durable(ticket)).await;
            assert!(matches!(waited, Ok(Ok(()))), "{waited:?}");
        });
        let journal = fs::read_to_string(dir.join(JOURNAL)).unwrap();
        assert!(journal.contains("lease-19") && journal.contains("lease-after"));
    }

    #[test]
    fn released_lease_ids_are_remembered_across_restarts_and_compactions() {
        let dir_guard = tempfile::tempdir().unwrap();
        let dir = dir_guard.path().to_path_buf();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (store, snapshot, _) = Store::open(&dir, 10).unwrap();
            assert_eq!(snapshot.lease_ids_issued, 0);
            let ticket = store.enqueue(
                &[
                    StateChange::PutLease {
                        lease: lease("lease-7", 3000),
                    },
                    StateChange::RemoveLease {
                        id: "lease-7".into(),
                    },
                ],
                &[],
            );
            store.durable(ticket).await.unwrap();
            store.close().await.unwrap();
        });
        // Opened twice: the first folds the journal into the snapshot, the second reads that.
        for _ in 0..2 {
            let (store, snapshot, _) = Store::open(&dir, 10).unwrap();
            assert!(snapshot.leases.is_empty());
            assert_eq!(
                snapshot.lease_ids_issued, 7,
                "lease-7 is gone, its id is not free"
            );
            runtime.block_on(store.close()).unwrap();
        }
    }

    #[test]
    fn a_corrupt_snapshot_is_moved_aside_reported_and_the_daemon_starts() {
        let dir_guard = tempfile::tempdir().unwrap();
        let dir = dir_guard.path().to_path_buf();
        fs::write(dir.join(SNAPSHOT), "not json").unwrap();
        let (_, snap, _) = Store::open(&dir, 10).expect("starts");
        assert!(snap.leases.is_empty());
        assert_eq!(snap.damage.len(), 1, "{:?}", snap.damage);
        assert!(
            snap.damage[0].contains("state.json is not a state snapshot"),
            "{:?}",
            snap.damage
        );
        let aside: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("state.json.damaged-"))
            .collect();
        assert_eq!(aside.len(), 1, "the damaged snapshot is kept aside");
        assert_eq!(fs::read_to_string(dir.join(&aside[0])).unwrap(), "not json");
    }

    #[test]
    fn a_damaged_journal_keeps_what_came_before_and_says_what_was_dropped() {
        let dir_guard = tempfile::tempdir().unwrap();
        let dir = dir_guard.path().to_path_buf();
        let mut bytes = Vec::new();
        for n in 0..5u16 {
            crate::journal::append_record(
                &mut bytes,
                &StateChange::PutLease {
                    lease: lease(&format!("lease-{n}"), 3000 + n),
                },
            );
        }
        // One flipped byte in the third record.
        let third = bytes
            .split(|b| *b == b'\n')
            .take(2)
            .map(|l| l.len() + 1)
            .sum::<usize>();
        bytes[third + 30] ^= 0x20;
        fs::write(dir.join(JOURNAL), &bytes).unwrap();
        let (_, snap, _) = Store::open(&dir, 10).expect("starts");
        let ids: Vec<&str> = snap.leases.iter().map(|l| l.id.as_str()).collect();
        assert_eq!(ids, ["lease-0", "lease-1"]);
        assert_eq!(snap.damage.len(), 1);
        assert!(
            snap.damage[0].contains("damaged at record 3")
                && snap.damage[0].contains("kept the 2 record(s) before it, dropped 3"),
            "{:?}",
            snap.damage
        );
        // The fresh journal replaced it; the damaged one is kept aside.
        assert!(fs::read_dir(&dir).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("journal.jsonl.damaged-")));
    }

    #[test]
    fn two_leases_on_one_port_are_cut_to_the_first_and_reported() {
        let dir_guard = tempfile::tempdir().unwrap();
        let dir = dir_guard.path().to_path_buf();
        let snapshot = Snapshot {
            leases: vec![
                lease("lease-4", 3000),
                lease("lease-2", 3000),
                lease("lease-3", 3001),
            ],
            instances: vec![],
            sticky: vec![],
            lease_ids_issued: 4,
            damage: vec![],
        };
        fs::write(dir.join(SNAPSHOT), serde_json::to_vec(&snapshot).unwrap()).unwrap();
        let (_, snap, _) = Store::open(&dir, 10).unwrap();
        let ids: Vec<&str> = snap.leases.iter().map(|l| l.id.as_str()).collect();
        assert_eq!(ids, ["lease-2", "lease-3"], "the first issued stays");
        assert_eq!(snap.damage.len(), 1);
        assert!(snap.damage[0].contains("lease-4 held port 3000, which lease-2 holds too"));
    }
}
