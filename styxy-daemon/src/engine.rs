//! The daemon's shared state and the I/O around each broker decision.
//!
//! Every request goes the same way: check the kernel for the ports at stake right then (a missed event
//! never yields a wrong answer), lock the broker, decide, queue the state changes to the store in the
//! broker's order, unlock, publish notices to `Watch` subscribers and the audit log, and (for changes a
//! caller relies on later) wait until they are on disk.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
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
    AllocateRequest, AuditRecord, BindDecision, BindRequest, BoundSocket, Broker, BrokerError,
    Caller, Effects, Lease, Notice, PortEvent, PortView, ProcessId, Protocol, Scope, SessionServer,
    Suggestion,
};

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
}

/// Which observer feeds the broker, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObserverStatus {
    pub kind: &'static str,
    pub reason: String,
}

/// Where the daemon listens and keeps its state, for `Status`.
#[derive(Clone, Debug, Default)]
pub struct Endpoints {
    pub socket_path: Option<PathBuf>,
    pub tcp_listen: Option<String>,
}

/// Everything requests share.
pub struct Engine {
    broker: Mutex<Broker>,
    store: Store,
    kernel: KernelTables,
    notices: broadcast::Sender<Notice>,
    /// Woken when a TCP socket is released (its port lingers until the next reading).
    tcp_released: tokio::sync::Notify,
    audit: Mutex<VecDeque<AuditRecord>>,
    observer: Mutex<ObserverStatus>,
    endpoints: Mutex<Endpoints>,
    started: Instant,
    dropped_events: AtomicU64,
    observed_events: AtomicU64,
    observer_delays: Mutex<DelayWindow>,
    /// The kernel's per-port counts, when an eBPF observer keeps them for the whole machine.
    port_counts: OnceLock<Box<dyn PortCounts>>,
    /// The session table the shims map, once published.
    table: OnceLock<PublishedTable>,
    /// `ResolveBind` calls answered: what the shim's fast path saves shows here.
    resolve_bind_calls: AtomicU64,
    metrics: Metrics,
    /// Damage found in the state dir at start, for `Status`.
    state_damage: Mutex<Vec<String>>,
    /// The kernel's session maps, when the eBPF programs enforce sessions.
    kernel_sessions: OnceLock<KernelSessions>,
    /// Why they do not, otherwise.
    kernel_sessions_missing: Mutex<String>,
    /// What each agent session was last told.
    session_reports: SessionReports,
}

/// A session's servers and what changed since it was last told, each server with who held the
/// port it asked for when it was moved (from the audit log), if known.
pub struct SessionReport {
    pub started: Vec<(SessionServer, Option<(u32, String)>)>,
    pub stopped: Vec<(SessionServer, Option<(u32, String)>)>,
    pub running: Vec<(SessionServer, Option<(u32, String)>)>,
}

/// Everything `ListPorts` answers.
pub struct PortList {
    pub holders: Vec<styxy_broker::Held>,
    pub leases: Vec<Lease>,
    pub views: Vec<styxy_broker::ViewEntry>,
    pub sticky: Vec<styxy_broker::StickyPort>,
}

/// A snapshot of counters for `Status`.
#[derive(Clone, Debug)]
pub struct StatusReport {
    pub observer: ObserverStatus,
    pub uptime_seconds: u64,
    pub bound_ports: usize,
    pub leases: usize,
    pub instances: usize,
    pub dropped_events: u64,
    pub observed_events: u64,
    pub resolve_bind_calls: u64,
    pub reassignments: u64,
    pub state_dir: PathBuf,
    pub endpoints: Endpoints,
    /// (p50, p99, samples) of the eBPF observer's kernel → broker delay, in µs.
    pub observer_delay: (u32, u32, u64),
    /// Sessions with a live process in the kernel (`None`: the kernel enforces none), and what
    /// that means or why there are none.
    pub kernel_sessions: (Option<usize>, String),
}

/// The last [`DelayWindow::CAPACITY`] observer delays, in µs.
#[derive(Debug, Default)]
pub struct DelayWindow {
    samples: Vec<u32>,
    next: usize,
    total: u64,
    /// The last summary, valid while `total` has not moved: an idle observer costs Status nothing.
    summarised: Option<(u32, u32, u64)>,
}

impl DelayWindow {
    pub const CAPACITY: usize = 65_536;

    pub fn record(&mut self, micros: impl IntoIterator<Item = u32>) {
        for m in micros {
            if self.samples.len() < Self::CAPACITY {
                self.samples.push(m);
            } else {
                self.samples[self.next] = m;
            }
            self.next = (self.next + 1) % Self::CAPACITY;
            self.total += 1;
        }
    }

    /// (p50, p99, samples recorded in all). Linear time (selection, not a sort), and only when
    /// samples came in since the last call.
    pub fn summary(&mut self) -> (u32, u32, u64) {
        if self.samples.is_empty() {
            return (0, 0, 0);
        }
        if let Some(cached) = self.summarised.filter(|c| c.2 == self.total) {
            return cached;
        }
        let mut scratch = self.samples.clone();
        let mut at = |p: f64| {
            let index = ((scratch.len() - 1) as f64 * p).round() as usize;
            *scratch.select_nth_unstable(index).1
        };
        let summary = (at(0.50), at(0.99), self.total);
        self.summarised = Some(summary);
        summary
    }
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
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn set_observer(&self, status: ObserverStatus) {
        *lock(&self.observer) = status;
    }

    pub fn set_endpoints(&self, endpoints: Endpoints) {
        *lock(&self.endpoints) = endpoints;
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Notice> {
        self.notices.subscribe()
    }

    /// Runs `decide` under the broker lock, queues its state changes in order, then publishes its notices.
    fn commit<T>(&self, decide: impl FnOnce(&mut Broker) -> (T, Effects)) -> (T, Ticket) {
        let (value, effects, ticket) = {
            let mut broker = lock(&self.broker);
            let (value, effects) = decide(&mut broker);
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

    fn commit_effects(&self, decide: impl FnOnce(&mut Broker) -> Effects) -> Ticket {
        self.commit(|b| ((), decide(b))).1
    }

    /// What damage the store found in the state dir at start (and dropped), for `Status`.
    pub fn set_state_damage(&self, damage: Vec<String>) {
        *lock(&self.state_damage) = damage;
    }

    /// The damage found at start.
    pub fn state_damage(&self) -> Vec<String> {
        lock(&self.state_damage).clone()
    }

    /// The daemon's metrics, to count into.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// What a metrics scrape gets, read now.
    pub fn render_metrics(&self) -> String {
        let observer = lock(&self.observer).kind;
        self.metrics.render(&lock(&self.broker), observer)
    }

    /// Publishes the session table from now on, starting with everything the broker knows.
    pub fn publish_table(&self, table: PublishedTable) {
        let broker = lock(&self.broker);
        table.publish_all(&broker);
        let _ = self.table.set(table);
    }

    /// Marks the session table stopped and removes it (on the way out).
    pub fn close_table(&self) {
        if let Some(table) = self.table.get() {
            table.close();
        }
    }

    /// The eBPF programs enforce kernel sessions from now on, starting with everything the broker knows.
    pub fn use_kernel_sessions(&self, sessions: KernelSessions) {
        let broker = lock(&self.broker);
        sessions.publish_all(&broker);
        // The sessions of the last run whose processes still run are theirs again.
        let (adopted, processes) = sessions.adopt(&broker);
        if adopted > 0 {
            tracing::info!(
                sessions = adopted,
                processes,
                "kernel sessions of the last run put back"
            );
        }
        let _ = self.kernel_sessions.set(sessions);
    }

    /// Says why the kernel manages no sessions (for `Status` and `styxy run`).
    pub fn set_kernel_sessions_missing(&self, why: String) {
        *lock(&self.kernel_sessions_missing) = why;
    }

    /// A reading of the ports TCP connections sit on, begun with
    /// [`Engine::begin_lingering_reading`], for the broker's lingering ports; the kernel's
    /// ephemeral ports outside every range (clients' connections) are left out. Published like
    /// any decision, so the kernel's spare ports leave them too.
    pub fn set_lingering(&self, ports: Vec<u16>) {
        let (low, high) = crate::bpf::ephemeral_ports();
        self.commit_effects(|b| {
            let wanted: Vec<u16> = ports
                .into_iter()
                .filter(|p| !(low..=high).contains(p) || b.ranges().type_of_port(*p).is_some())
                .collect();
            b.set_lingering(wanted);
            Effects::default()
        });
    }

    /// Completes after a TCP socket's release (one wake-up for any number of them).
    pub async fn tcp_released(&self) {
        self.tcp_released.notified().await;
    }

    /// A reading of the ports TCP connections sit on begins (see [`Engine::set_lingering`]).
    pub fn begin_lingering_reading(&self) {
        lock(&self.broker).begin_lingering_reading();
    }

    /// How many ports the broker holds lingering.
    pub fn lingering_count(&self) -> usize {
        lock(&self.broker).lingering_count()
    }

    /// The service ranges, in the broker's order (the kernel numbers them by it).
    pub fn range_bounds(&self) -> Vec<(u16, u16)> {
        lock(&self.broker)
            .ranges()
            .types()
            .iter()
            .map(|t| (t.start, t.end))
            .collect()
    }

    /// The instance of kernel session `number`.
    pub fn kernel_instance_of(&self, number: u32) -> Option<String> {
        self.kernel_sessions.get()?.instance_of(number)
    }

    /// (sessions with a live process in the kernel, and what that means or why there are none).
    fn kernel_session_status(&self) -> (Option<usize>, String) {
        match self.kernel_sessions.get() {
            Some(sessions) => (
                Some(sessions.live_sessions()),
                format!(
                    "the eBPF programs move and redirect the binds and loopback traffic of `styxy run` \
                     and agent sessions, static binaries included; {}",
                    if sessions.programs_attached() {
                        "the session programs are attached"
                    } else {
                        "the session programs are detached while no session is live (nothing but \
                         the bind observer runs on the machine's calls)"
                    }
                ),
            ),
            None => (None, lock(&self.kernel_sessions_missing).clone()),
        }
    }

    /// Once a second: the session programs detach when no kernel session has been live for a
    /// few seconds.
    pub fn detach_idle_session_programs(&self) {
        if let Some(sessions) = self.kernel_sessions.get() {
            sessions.detach_if_idle(&lock(&self.broker));
        }
    }

    /// Point checks answer "nothing bound" from the kernel's per-port counts from now on.
    pub fn use_port_counts(&self, counts: Box<dyn PortCounts>) {
        let _ = self.port_counts.set(counts);
    }

    /// True when the kernel's per-port counts say nothing is bound on `port` right now.
    fn kernel_counts_none(&self, port: u16, protocol: Option<Protocol>) -> bool {
        self.port_counts
            .get()
            .and_then(|counts| counts.bound(port, protocol))
            == Some(0)
    }

    /// True when the kernel's per-port counts exist and agree with the table on every port of
    /// `start..=end` (bound exactly where the table has a socket): a full reading would change
    /// nothing there. False without counts.
    fn table_matches_kernel_counts(&self, start: u16, end: u16) -> bool {
        let Some(counts) = self.port_counts.get() else {
            return false;
        };
        // Read the counts first: without the mapping each is a syscall, not for under the lock.
        let Some(bound) = (start..=end)
            .map(|port| counts.bound(port, None).map(|n| n > 0))
            .collect::<Option<Vec<bool>>>()
        else {
            return false;
        };
        let broker = lock(&self.broker);
        (start..=end)
            .zip(bound)
            .all(|(port, bound)| bound == broker.has_socket_on(port))
    }

    /// True when the kernel's per-port counts say as many sockets are bound on `port` as the
    /// table holds there: the observer has applied every bind and release of that port, so the
    /// table is what a reading would give. (Were a bind and a release both still in flight, the
    /// counts would agree with a stale holder: the port is bound either way, only the name shown
    /// could lag, by the observer's delay.) False without counts.
    fn table_current_for(&self, port: u16, protocol: Option<Protocol>) -> bool {
        let Some(kernel) = self.port_counts.get().and_then(|c| c.bound(port, protocol)) else {
            return false;
        };
        usize::try_from(kernel)
            .is_ok_and(|k| k == lock(&self.broker).socket_count_on(port, protocol))
    }

    /// Brings the table up to date for one port (or a range) from the kernel: its per-port counts
    /// when they say nothing is bound or agree with the table, else its socket tables.
    fn refresh(&self, scope: Scope) {
        let reading = match scope {
            // Nothing bound: the reading a dump would give, without the dump.
            Scope::Port { port, protocol } if self.kernel_counts_none(port, protocol) => {
                Ok(Vec::new())
            }
            Scope::Port { port, protocol } if self.table_current_for(port, protocol) => return,
            Scope::Port { port, protocol } => self.kernel.read(Some(port), protocol),
            _ => self.kernel.read(None, None),
        };
        match reading {
            Ok(reading) => {
                self.commit_effects(|b| b.reconcile(scope, reading, now_ms()));
            }
            Err(e) => tracing::warn!("reading the kernel's socket tables: {e}"),
        }
    }

    /// Whether the kernel shows anything bound on `port` right now (any protocol).
    fn kernel_shows_bound(&self, port: u16) -> bool {
        self.kernel_shows_bound_except(port, None, None)
    }

    /// Whether the kernel shows `port` bound right now (for `protocol`, or any) by anyone but
    /// `except` (a process that may bind its own port again, e.g. IPv6 next to IPv4); folds what
    /// it saw into the port table.
    fn kernel_shows_bound_except(
        &self,
        port: u16,
        protocol: Option<Protocol>,
        except: Option<(ProcessId, styxy_broker::Family)>,
    ) -> bool {
        if self.kernel_counts_none(port, protocol) {
            return false;
        }
        // The table may miss a socket bound a moment ago by the asker's own sibling thread (a
        // move it is asking about again, its bind having failed): for a move, always the kernel.
        if except.is_none() && self.table_current_for(port, protocol) {
            return lock(&self.broker).has_socket_of_other(port, protocol, except);
        }
        match self.kernel.read(Some(port), protocol) {
            Ok(reading) if reading.is_empty() => false,
            Ok(reading) => {
                let by_other = reading
                    .iter()
                    .any(|s| !styxy_broker::is_own_other_family(s, except));
                let scope = Scope::Port { port, protocol };
                self.commit_effects(|b| b.reconcile(scope, reading, now_ms()));
                by_other
            }
            Err(e) => {
                tracing::warn!("checking port {port} in the kernel: {e}");
                false
            }
        }
    }

    // ---- observers ---------------------------------------------------------------------------------

    /// Events from an observer.
    pub fn apply_events(&self, events: Vec<PortEvent>) {
        self.observed_events
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        let now = now_ms();
        self.commit_effects(|b| {
            let mut effects = Effects::default();
            for event in events {
                effects.extend(b.apply(event, now));
            }
            effects
        });
    }

    /// A full reading of the kernel's socket tables.
    pub fn resync(&self) -> std::io::Result<()> {
        self.resync_reading().map(drop)
    }

    /// [`Engine::resync`], returning what the kernel showed.
    pub fn resync_reading(&self) -> std::io::Result<Vec<BoundSocket>> {
        let reading = self.kernel.read(None, None)?;
        self.commit_effects(|b| b.reconcile(Scope::All, reading.clone(), now_ms()));
        self.metrics.resyncs.inc();
        Ok(reading)
    }

    /// Delays (µs) between the kernel seeing binds and the broker applying them.
    pub fn record_observer_delays(&self, micros: impl IntoIterator<Item = u32>) {
        lock(&self.observer_delays).record(micros);
    }

    pub fn count_dropped(&self, n: u64) {
        self.dropped_events.fetch_add(n, Ordering::Relaxed);
        self.metrics.lost_records.inc_by(n);
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

    /// Every socket, lease and session view entry, as one consistent reading.
    pub fn list(&self) -> PortList {
        let broker = lock(&self.broker);
        PortList {
            holders: broker.holders(),
            leases: broker.leases().cloned().collect(),
            views: broker.views(),
            sticky: broker.sticky_ports(),
        }
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
    ) -> Result<(String, Result<(), String>), EngineError> {
        let (id, ticket) = self.commit(|b| lift(b.register_instance(id, process, uid, now_ms())));
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

    /// Ends a session's leases and claims and forgets the instance (SessionEnd).
    pub async fn end_instance(&self, id: &str, uid: u32) -> Result<usize, EngineError> {
        let (ended, ticket) = self.commit(|b| lift(b.end_instance(id, uid)));
        let ended = ended?;
        self.session_reports.forget(id);
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

    /// The servers of session `instance` that `uid` may see (root: all) and what changed since
    /// the session was last told; unless `peek`, this becomes what it was last told. Another
    /// user's registered instance is refused.
    pub fn session_report(
        &self,
        instance: &str,
        uid: u32,
        peek: bool,
    ) -> Result<SessionReport, EngineError> {
        let running = {
            let broker = lock(&self.broker);
            if let Some(owner) = broker.instance_owner(instance) {
                if owner != uid && uid != 0 {
                    return Err(EngineError::Broker(BrokerError::InstanceTaken {
                        id: instance.to_string(),
                        owner_uid: owner,
                    }));
                }
            }
            broker.session_servers(instance, (uid != 0).then_some(uid))
        };
        let changes = self.session_reports.next(instance, &running, peek);
        let audit = lock(&self.audit);
        let with_holder =
            |servers: Vec<SessionServer>| -> Vec<(SessionServer, Option<(u32, String)>)> {
                servers
                    .into_iter()
                    .map(|s| {
                        let holder = s.asked.and_then(|asked| {
                            audit
                                .iter()
                                .rev()
                                .find(|r| {
                                    r.pid == s.pid
                                        && r.assigned_port == s.port
                                        && r.requested_port == asked
                                })
                                .and_then(|r| {
                                    Some((r.holder_pid?, r.holder_comm.clone().unwrap_or_default()))
                                })
                        });
                        (s, holder)
                    })
                    .collect()
            };
        Ok(SessionReport {
            started: with_holder(changes.started),
            stopped: with_holder(changes.stopped),
            running: with_holder(running),
        })
    }

    /// The shim's question. Not made to wait for the disk: a claim is short-lived and tied to a process that
    /// is about to bind; were the daemon to die first, the observer sees the bind after restart anyway.
    pub fn resolve_bind(&self, req: &BindRequest) -> Result<BindDecision, BrokerError> {
        self.resolve_bind_calls.fetch_add(1, Ordering::Relaxed);
        self.refresh(Scope::Port {
            port: req.port,
            protocol: Some(req.protocol),
        });
        // Asked again after a move to a lingering port: whether the asker's socket is there (its
        // other family) or the kernel refused the move decides, so the table must be current.
        let lingering_move = {
            let broker = lock(&self.broker);
            broker
                .earlier_move(req.asker.id, req.port)
                .filter(|port| broker.is_lingering(*port))
        };
        if let Some(port) = lingering_move {
            self.refresh(Scope::Port {
                port,
                protocol: Some(req.protocol),
            });
        }
        let mut range_read = false;
        for _ in 0..KERNEL_RETRIES {
            let (decision, _) = self.commit(|b| lift(b.resolve_bind(req, &ProcFs, now_ms())));
            let decision = decision?;
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

    async fn wait_durable(&self, ticket: Ticket) -> Result<(), EngineError> {
        self.store
            .durable(ticket)
            .await
            .map_err(|e| EngineError::Store(format!("{e:#}")))
    }

    pub fn audit(&self, since_ms: Option<u64>, limit: usize) -> Vec<AuditRecord> {
        let audit = lock(&self.audit);
        let matching: Vec<&AuditRecord> = audit
            .iter()
            .filter(|r| since_ms.is_none_or(|s| r.at_ms >= s))
            .collect();
        let skip = matching.len().saturating_sub(limit);
        matching.into_iter().skip(skip).cloned().collect()
    }

    pub fn status(&self) -> StatusReport {
        // Before the broker lock: a summary after new samples takes a pass over the window.
        let observer_delay = lock(&self.observer_delays).summary();
        let kernel_sessions = self.kernel_session_status();
        let broker = lock(&self.broker);
        StatusReport {
            kernel_sessions,
            observer: lock(&self.observer).clone(),
            uptime_seconds: self.started.elapsed().as_secs(),
            bound_ports: broker.bound_port_count(),
            leases: broker.lease_count(),
            instances: broker.instance_count(),
            dropped_events: self.dropped_events.load(Ordering::Relaxed),
            observed_events: self.observed_events.load(Ordering::Relaxed),
            resolve_bind_calls: self.resolve_bind_calls.load(Ordering::Relaxed),
            reassignments: broker.reassignments(),
            state_dir: self.store.dir().to_path_buf(),
            endpoints: lock(&self.endpoints).clone(),
            observer_delay,
        }
    }
}

/// A broker result whose effects are committed only on success.
fn lift<T>(result: Result<(T, Effects), BrokerError>) -> (Result<T, BrokerError>, Effects) {
    match result {
        Ok((value, effects)) => (Ok(value), effects),
        Err(e) => (Err(e), Effects::default()),
    }
}

/// Locks a mutex, recovering from poisoning: the data is plain and every update completes or is not made.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::DelayWindow;

    #[test]
    fn the_delay_window_keeps_the_newest_samples_and_counts_all() {
        let mut window = DelayWindow::default();
        assert_eq!(window.summary(), (0, 0, 0));
        window.record(1..=100);
        assert_eq!(window.summary(), (51, 99, 100));
        // Wrap around: the old, small samples give way to new, large ones.
        window.record(std::iter::repeat_n(1000, DelayWindow::CAPACITY));
        assert_eq!(
            window.summary(),
            (1000, 1000, 100 + DelayWindow::CAPACITY as u64)
        );
    }
}
