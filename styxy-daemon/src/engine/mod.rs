//! The daemon's shared state and the I/O around each broker decision.
//!
//! Every request goes the same way: check the kernel for the ports at stake right then (a missed event
//! never yields a wrong answer), lock the broker, decide, queue the state changes to the store in the
//! broker's order, unlock, publish notices to `Watch` subscribers and the audit log, and (for changes a
//! caller relies on later) wait until they are on disk.
//!
//! This file holds the [`Engine`] and the requests' decisions; its rooms: `freshness` (the kernel's
//! counts and socket-table readings before a decision, observers' events), `kernel` (kernel
//! sessions, the published table, lingering ports), `reports` (`ListPorts`, session reports,
//! `ListAudit`), `status` (`Status` and what it counts).

mod focus;
mod freshness;
mod kernel;
mod protection;
mod reports;
mod status;
mod stopping;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use crate::clock::now_ms;

use tokio::sync::broadcast;

use crate::bpf::sessions::KernelSessions;
use crate::metrics::Metrics;
use crate::observe::{KernelTables, PortCounts};
use crate::procs::ProcFs;
use crate::session_reports::SessionReports;
use crate::store::{Store, Ticket};
use crate::table::PublishedTable;
use styxy_broker::{
    AllocateRequest, AuditRecord, BindDecision, BindRequest, Broker, BrokerError, Caller, Effects,
    Lease, Notice, PortView, ProcessId, Protocol, Scope, Suggestion,
};

pub use reports::AskedHolder;
pub use status::{DelayWindow, Endpoints, ObserverStatus};
pub use stopping::{StopRequest, Stopped, DEFAULT_GRACE};

/// How many reassignments the daemon keeps in memory for `ListAudit`.
pub const AUDIT_KEEP: usize = 10_000;
/// How many times a decision is retried when the kernel shows the chosen port taken after all.
const KERNEL_RETRIES: usize = 16;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("the state store could not write to disk: {0}")]
    Store(String),
    #[error(
        "every candidate port in the {0} range was taken in the kernel as it was picked; try again"
    )]
    Contended(String),
    /// What the request needs is not there (the kernel programs, for a focus).
    #[error("{0}")]
    Unavailable(String),
    /// The caller may not do this (another session's server, for a stop).
    #[error("{0}")]
    Refused(String),
    /// What the request names does not exist.
    #[error("{0}")]
    NotFound(String),
}

/// Everything requests share.
pub struct Engine {
    pub(super) broker: Mutex<Broker>,
    pub(super) store: Store,
    pub(super) kernel: KernelTables,
    pub(super) notices: broadcast::Sender<Notice>,
    /// Woken when a TCP socket is released (its port lingers until the next reading).
    pub(super) tcp_released: tokio::sync::Notify,
    pub(super) audit: Mutex<VecDeque<AuditRecord>>,
    pub(super) observer: Mutex<ObserverStatus>,
    pub(super) endpoints: Mutex<Endpoints>,
    pub(super) started: Instant,
    pub(super) dropped_events: AtomicU64,
    pub(super) observed_events: AtomicU64,
    pub(super) observer_delays: Mutex<DelayWindow>,
    /// The kernel's per-port counts, when an eBPF observer keeps them for the whole machine.
    pub(super) port_counts: OnceLock<Box<dyn PortCounts>>,
    /// The session table the shims map, once published.
    pub(super) table: OnceLock<PublishedTable>,
    /// `ResolveBind` calls answered: what the shim's fast path saves shows here.
    pub(super) resolve_bind_calls: AtomicU64,
    pub(super) metrics: Metrics,
    /// Damage found in the state dir at start, for `Status`.
    pub(super) state_damage: Mutex<Vec<String>>,
    /// The kernel's session maps, when the eBPF programs enforce sessions.
    pub(super) kernel_sessions: OnceLock<KernelSessions>,
    /// Why they do not, otherwise.
    pub(super) kernel_sessions_missing: Mutex<String>,
    /// What each agent session was last told.
    pub(super) session_reports: SessionReports,
    /// Bumped by every broker commit: the names below are current while it has not moved.
    pub(super) generation: AtomicU64,
    /// The names of every live server, and the generation they were read at.
    pub(super) names: Mutex<(u64, Arc<styxy_broker::Names>)>,
    /// The kernel's ephemeral ports (where helper ports are, which get no names).
    pub(super) ephemeral: std::ops::RangeInclusive<u16>,
    /// Bumped by every commit that changes the persistent state (sessions registered and ended,
    /// a focus set, leases): what the dashboard's live page follows besides the notices.
    pub(super) state_changed: tokio::sync::watch::Sender<u64>,
    /// Signals the kernel refused between sessions, waiting for their sessions' reports.
    pub(super) refused_signals: Mutex<protection::RefusedSignals>,
}

impl Engine {
    pub fn new(broker: Broker, store: Store, audit: Vec<AuditRecord>) -> Self {
        let (notices, _) = broadcast::channel(4096);
        Engine {
            broker: Mutex::new(broker),
            store,
            kernel: KernelTables::new(),
            notices,
            tcp_released: tokio::sync::Notify::new(),
            audit: Mutex::new(audit.into()),
            observer: Mutex::new(ObserverStatus {
                kind: "none",
                reason: "starting".into(),
            }),
            endpoints: Mutex::new(Endpoints::default()),
            started: Instant::now(),
            dropped_events: AtomicU64::new(0),
            observed_events: AtomicU64::new(0),
            observer_delays: Mutex::new(DelayWindow::default()),
            port_counts: OnceLock::new(),
            table: OnceLock::new(),
            resolve_bind_calls: AtomicU64::new(0),
            metrics: Metrics::default(),
            state_damage: Mutex::new(Vec::new()),
            kernel_sessions: OnceLock::new(),
            kernel_sessions_missing: Mutex::new("no eBPF observer".into()),
            session_reports: SessionReports::default(),
            generation: AtomicU64::new(1),
            names: Mutex::new((0, Arc::default())),
            ephemeral: styxy_common::net::ephemeral_ports(),
            refused_signals: Mutex::new(protection::RefusedSignals::default()),
            state_changed: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Session `instance`'s name for its servers' names (and the one it wanted, if taken).
    pub fn session_name(&self, instance: &str) -> Option<styxy_broker::SessionName> {
        lock(&self.broker)
            .session_names()
            .into_iter()
            .find(|s| s.instance_id == instance)
    }

    /// Every live server's names (see `styxy_broker::names`), read again only after the broker
    /// changed.
    pub fn names(&self) -> Arc<styxy_broker::Names> {
        let generation = self.generation.load(Ordering::Acquire);
        {
            let cached = lock(&self.names);
            if cached.0 == generation {
                return cached.1.clone();
            }
        }
        let names = Arc::new(lock(&self.broker).names(&self.ephemeral, std::process::id()));
        *lock(&self.names) = (generation, names.clone());
        names
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Notice> {
        self.notices.subscribe()
    }

    /// Changes each time a commit changes the persistent state (a session registered or ended, a
    /// focus switched, a lease): with [`Engine::subscribe`], all a live view needs to follow.
    pub fn watch_state(&self) -> tokio::sync::watch::Receiver<u64> {
        self.state_changed.subscribe()
    }

    /// Runs `decide` under the broker lock, queues its state changes in order, then publishes its notices.
    pub(super) fn commit<T>(
        &self,
        decide: impl FnOnce(&mut Broker) -> (T, Effects),
    ) -> (T, Ticket) {
        let (value, effects, ticket) = {
            let mut broker = lock(&self.broker);
            let (value, effects) = decide(&mut broker);
            self.generation.fetch_add(1, Ordering::AcqRel);
            // Published before the answer leaves: a shim that binds next sees the claim.
            if let Some(table) = self.table.get() {
                table.publish(&broker, &effects);
            }
            if let Some(kernel) = self.kernel_sessions.get() {
                kernel.publish(&broker, &effects);
            }
            let audit: Vec<AuditRecord> = effects
                .notices
                .iter()
                .filter_map(|n| match n {
                    Notice::Reassigned(record) => Some(record.clone()),
                    _ => None,
                })
                .collect();
            let ticket = self.store.enqueue(&effects.changes, &audit);
            (value, effects, ticket)
        };
        if !effects.changes.is_empty() {
            self.state_changed
                .send_modify(|generation| *generation += 1);
        }
        if effects
            .notices
            .iter()
            .any(|n| matches!(n, Notice::Released(h) if h.socket.protocol == Protocol::Tcp))
        {
            self.tcp_released.notify_one();
        }
        for notice in effects.notices {
            match &notice {
                Notice::Bound(_) => {
                    self.metrics.binds_seen.inc();
                }
                Notice::Reassigned(_) => {
                    self.metrics.moves.inc();
                }
                _ => {}
            }
            if let Notice::Reassigned(record) = &notice {
                let mut audit = lock(&self.audit);
                if audit.len() >= AUDIT_KEEP {
                    audit.pop_front();
                }
                audit.push_back(record.clone());
            }
            // No subscribers is fine.
            let _ = self.notices.send(notice);
        }
        (value, ticket)
    }

    pub(super) fn commit_effects(&self, decide: impl FnOnce(&mut Broker) -> Effects) -> Ticket {
        self.commit(|b| ((), decide(b))).1
    }

    /// Ends lapsed and orphaned leases and instances.
    pub async fn expire(&self) -> anyhow::Result<()> {
        // Liveness checks read /proc: keep them off the async workers' critical path.
        let ticket =
            tokio::task::block_in_place(|| self.commit_effects(|b| b.expire(now_ms(), &ProcFs)));
        self.store.durable(ticket).await
    }

    // ---- requests ----------------------------------------------------------------------------------

    pub fn suggest(&self, service_type: &str, count: usize) -> Result<Suggestion, BrokerError> {
        let range = lock(&self.broker).ranges().get(service_type)?.clone();
        if !self.table_matches_kernel_counts(range.start, range.end) {
            self.refresh(Scope::Range {
                start: range.start,
                end: range.end,
            });
        }
        lock(&self.broker).suggest(service_type, count)
    }

    pub fn observe(&self, port: u16, protocol: Option<Protocol>) -> PortView {
        self.refresh(Scope::Port { port, protocol });
        lock(&self.broker).observe(port, protocol)
    }

    /// The service type whose range a port is in (where a moved bind of it goes).
    pub fn range_type_of(&self, port: u16) -> String {
        lock(&self.broker).ranges().move_range(port).service_type
    }

    pub async fn allocate(&self, req: AllocateRequest) -> Result<Lease, EngineError> {
        for _ in 0..KERNEL_RETRIES {
            let (result, ticket) = self.commit(|b| lift(b.allocate(req.clone(), now_ms())));
            let lease = result?;
            if self.kernel_shows_bound(lease.port) {
                // Bound since the last reading: the table knows now; take the lease back and pick again.
                self.commit_effects(|b| b.withdraw_lease(&lease.id));
                continue;
            }
            if let Err(e) = self.wait_durable(ticket).await {
                // Not on disk (a full disk, say): the caller is told so, and the lease it was not
                // given is taken back (both are written once the disk takes them).
                self.commit_effects(|b| b.withdraw_lease(&lease.id));
                return Err(e);
            }
            return Ok(lease);
        }
        Err(EngineError::Contended(req.service_type))
    }

    pub async fn release_id(&self, id: &str, caller: Caller) -> Result<Lease, EngineError> {
        let (result, ticket) = self.commit(|b| lift(b.release_id(id, caller)));
        let lease = result?;
        self.wait_durable(ticket).await?;
        Ok(lease)
    }

    pub async fn release_port(&self, port: u16, caller: Caller) -> Result<Lease, EngineError> {
        let (result, ticket) = self.commit(|b| lift(b.release_port(port, caller)));
        let lease = result?;
        self.wait_durable(ticket).await?;
        Ok(lease)
    }

    pub async fn register_instance(
        &self,
        id: Option<String>,
        process: ProcessId,
        uid: u32,
        label: styxy_broker::InstanceLabel,
    ) -> Result<(String, Result<(), String>), EngineError> {
        let (id, ticket) =
            self.commit(|b| lift(b.register_named_instance(id, process, uid, label, now_ms())));
        let id = id?;
        self.wait_durable(ticket).await?;
        let placed = match self.kernel_sessions.get() {
            Some(sessions) => {
                let broker = lock(&self.broker);
                sessions
                    .place(&id, uid, process, &broker)
                    .map(|_| ())
                    .map_err(|e| format!("{e:#}"))
            }
            None => Err(lock(&self.kernel_sessions_missing).clone()),
        };
        Ok((id, placed))
    }

    /// Forgets sticky ports of `uid` (root: anyone's) by project and/or port (both `None`: all).
    pub async fn forget(
        &self,
        uid: u32,
        project: Option<String>,
        port: Option<u16>,
    ) -> Result<Vec<styxy_broker::StickyPort>, EngineError> {
        let (forgotten, ticket) =
            self.commit(|b| lift(Ok(b.forget_sticky(uid, project.as_deref(), port))));
        let forgotten = forgotten?;
        self.wait_durable(ticket).await?;
        Ok(forgotten)
    }

    /// Ends a session's leases and claims and forgets the instance (SessionEnd). Its focus ends
    /// with it: the connections its focusers' processes still have to its servers are closed.
    pub async fn end_instance(&self, id: &str, uid: u32) -> Result<usize, EngineError> {
        let (ended, ticket) = self.commit(|b| {
            // Who focused it, and where its view sent them, before it ends.
            let focused: Vec<(u32, Vec<styxy_broker::Retarget>)> = b
                .instances()
                .filter(|i| i.id == id)
                .flat_map(|i| i.focused_by.clone())
                .map(|focuser| (focuser, styxy_broker::retargets(&b.view_of(id), &[])))
                .collect();
            let (result, effects) = lift(b.end_instance(id, uid));
            (result.map(|ended| (ended, focused)), effects)
        });
        let (ended, focused) = ended?;
        self.session_reports.forget(id);
        for (focuser, retargets) in focused {
            self.close_retargeted(focuser, &retargets).await;
        }
        self.wait_durable(ticket).await?;
        Ok(ended)
    }

    /// The session of process `pid`: the instance registered for it or its nearest registered
    /// ancestor, else `STYXY_INSTANCE` in its environment.
    pub fn instance_of_pid(&self, pid: u32) -> Option<String> {
        let process = crate::procs::process_id(pid)?;
        let ancestors = styxy_broker::ProcessView::ancestors(&ProcFs, pid);
        lock(&self.broker)
            .instance_of_process(process, &ancestors)
            .or_else(|| crate::procs::process_info(pid)?.instance_id)
    }

    /// The shim's question. Not made to wait for the disk: a claim is short-lived and tied to a process that
    /// is about to bind; were the daemon to die first, the observer sees the bind after restart anyway.
    pub fn resolve_bind(&self, req: &BindRequest) -> Result<BindDecision, BrokerError> {
        self.resolve_bind_calls.fetch_add(1, Ordering::Relaxed);
        self.refresh(Scope::Port {
            port: req.port,
            protocol: Some(req.protocol),
        });
        // One broker lock decides (the refresh above took one to check the table): the lingering
        // check below is made inside it, and only when it finds something is the lock let go.
        let mut lingering_checked = false;
        let mut range_read = false;
        for _ in 0..KERNEL_RETRIES {
            // Ok: the broker's decision; Err(port): read the kernel for that port first.
            let (step, _) = self.commit(|b| -> (Result<_, u16>, Effects) {
                // Asked again after a move to a lingering port: whether the asker's socket is
                // there (its other family) or the kernel refused the move decides, so the table
                // must be current for that port before the decision.
                let lingering = (!lingering_checked)
                    .then(|| {
                        b.earlier_move(req.asker.id, req.port)
                            .filter(|port| b.is_lingering(*port))
                    })
                    .flatten();
                match lingering {
                    Some(port) => (Err(port), Effects::default()),
                    None => {
                        let (decision, effects) = lift(b.resolve_bind(req, &ProcFs, now_ms()));
                        (Ok(decision), effects)
                    }
                }
            });
            lingering_checked = true;
            let decision = match step {
                Err(port) => {
                    self.refresh(Scope::Port {
                        port,
                        protocol: Some(req.protocol),
                    });
                    continue;
                }
                Ok(decision) => decision?,
            };
            match decision {
                BindDecision::Reassign { port, .. }
                    // Only the asker's protocol matters: TCP and UDP ports are separate.
                    if self.kernel_shows_bound_except(port, Some(req.protocol), Some((req.asker.id, req.family))) =>
                {
                    let claim = lock(&self.broker).observe(port, None).lease;
                    if let Some(claim) = claim.filter(|l| l.process == Some(req.asker.id)) {
                        self.commit_effects(|b| b.withdraw_lease(&claim.id));
                    }
                    // The table was behind the kernel (many binds at once, sibling threads): one
                    // reading of the whole range, rather than a port at a time.
                    if !range_read {
                        range_read = true;
                        let range = lock(&self.broker).ranges().move_range(req.port);
                        self.refresh(Scope::Range {
                            start: range.start,
                            end: range.end,
                        });
                    }
                }
                decision => return Ok(decision),
            }
        }
        // Every candidate turned out taken: keep the asked port and let the kernel answer.
        Ok(BindDecision::Keep { port: req.port })
    }

    pub(super) async fn wait_durable(&self, ticket: Ticket) -> Result<(), EngineError> {
        self.store
            .durable(ticket)
            .await
            .map_err(|e| EngineError::Store(format!("{e:#}")))
    }
}

/// A broker result whose effects are committed only on success.
pub(super) fn lift<T>(
    result: Result<(T, Effects), BrokerError>,
) -> (Result<T, BrokerError>, Effects) {
    match result {
        Ok((value, effects)) => (Ok(value), effects),
        Err(e) => (Err(e), Effects::default()),
    }
}

/// Locks a mutex, recovering from poisoning: the data is plain and every update completes or is not made.
pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
