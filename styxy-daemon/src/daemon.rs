//! `styxy daemon`: loads the config and the saved state, starts an observer, serves gRPC on a Unix socket
//! and loopback TCP, and shuts down cleanly on SIGINT/SIGTERM (saving its state last).

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_stream::StreamExt;
use tonic::transport::Server;

use crate::broker::{Broker, LeaseSettings, ServiceRanges};
use crate::engine::{Endpoints, Engine, ObserverStatus, AUDIT_KEEP};
use crate::observe::ebpf;
use crate::rpc::BrokerService;
use crate::store::Store;
use styxy_proto::v1::port_broker_server::PortBrokerServer;

/// Which observer to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ObserverChoice {
    /// eBPF when it can be used, else the socket tables (and say why).
    Auto,
    /// eBPF, or fail.
    Ebpf,
    /// The kernel's socket tables, read at an interval.
    Sockets,
}

/// Everything `styxy daemon` is told on its command line.
#[derive(Clone, Debug)]
pub struct DaemonOptions {
    pub socket: PathBuf,
    /// `None`: no TCP listener.
    pub listen: Option<SocketAddr>,
    pub state_dir: PathBuf,
    pub config: Option<PathBuf>,
    pub observer: ObserverChoice,
    pub scan_interval: Duration,
    pub tcp_allow_writes: bool,
    /// cgroup v2 directory the eBPF observer attaches to (default: the cgroup v2 root).
    pub cgroup: Option<PathBuf>,
    /// The eBPF object (default: looked up next to the binary and in the install prefix).
    pub ebpf_object: Option<PathBuf>,
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(opts: DaemonOptions) -> Result<()> {
    raise_open_file_limit();
    // 1. Service ranges: built-in defaults, changed by the config file if there is one.
    let ranges = load_ranges(opts.config.as_deref())?;

    // 2. Saved leases and instances; those whose process has died go at the first sweep.
    let (store, snapshot, audit) = Store::open(&opts.state_dir, AUDIT_KEEP)?;
    tracing::info!(
        "state dir {}: {} lease(s), {} instance(s) restored",
        opts.state_dir.display(),
        snapshot.leases.len(),
        snapshot.instances.len()
    );
    let broker = Broker::restore(
        ranges,
        LeaseSettings::default(),
        snapshot.leases,
        snapshot.instances,
    );
    let engine = Arc::new(Engine::new(broker, store.clone(), audit));
    engine.expire().await?;

    // 3. An observer to keep the port table current, and what is bound already (read after an
    //    eBPF observer attaches, so that no bind in between is missed).
    let (shutdown_tx, shutdown) = watch::channel(false);
    let observer = start_observer(&opts, engine.clone(), shutdown.clone())?;
    tracing::info!("observer: {} ({})", observer.kind, observer.reason);
    engine.set_observer(observer);
    tokio::spawn(sweep_leases(engine.clone(), shutdown.clone()));

    // 4. The gRPC service on the Unix socket and on loopback TCP, with health and reflection.
    let uds = bind_unix_socket(&opts.socket)?;
    let tcp = match opts.listen {
        Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| {
            format!("listening on {addr} (use --listen ADDR or --listen none)")
        })?),
        None => None,
    };
    engine.set_endpoints(Endpoints {
        socket_path: Some(opts.socket.clone()),
        tcp_listen: tcp
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.to_string()),
    });
    let service = BrokerService::new(
        engine.clone(),
        opts.tcp_allow_writes,
        opts.socket.display().to_string(),
    );
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<PortBrokerServer<BrokerService>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(styxy_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(styxy_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("building the reflection service")?;
    let router = Server::builder()
        .add_service(PortBrokerServer::new(service))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);

    let mut servers = tokio::task::JoinSet::new();
    for (n, finished) in serve_unix_per_core(&router, engine.store(), uds, &shutdown)?
        .into_iter()
        .enumerate()
    {
        servers.spawn(async move {
            finished
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("Unix-socket server thread {n} panicked")))
        });
    }
    if let Some(tcp) = tcp {
        tracing::info!("listening on {}", tcp.local_addr()?);
        let mut tcp_shutdown = shutdown.clone();
        servers.spawn(async move {
            router
                .serve_with_incoming_shutdown(TcpListenerStream::new(tcp), async move {
                    let _ = tcp_shutdown.wait_for(|stop| *stop).await;
                })
                .await
                .context("TCP server")
        });
    }
    tracing::info!("listening on {}", opts.socket.display());
    // Handle SIGTERM before telling systemd we are ready: a stop right after start is clean too.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let observer = engine.status().observer;
    notify_systemd(&format!(
        "READY=1\nSTATUS=serving on {}; observer {}",
        opts.socket.display(),
        observer.kind
    ));

    // 5. Until a signal, or a server failing.
    let failure = tokio::select! {
        _ = tokio::signal::ctrl_c() => None,
        _ = sigterm.recv() => None,
        Some(result) = servers.join_next() => Some(result),
    };
    tracing::info!("shutting down");
    notify_systemd("STOPPING=1");
    let _ = shutdown_tx.send(true);
    while servers.join_next().await.is_some() {}
    let _ = std::fs::remove_file(&opts.socket);
    store.close().await?;
    match failure {
        Some(Ok(Err(e))) => Err(e).context("the gRPC server failed"),
        Some(Err(e)) => Err(e).context("the gRPC server task failed"),
        _ => Ok(()),
    }
}

fn load_ranges(config: Option<&Path>) -> Result<ServiceRanges> {
    let Some(path) = config else {
        return Ok(ServiceRanges::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    let ranges =
        ServiceRanges::from_toml(&text).with_context(|| format!("in config {}", path.display()))?;
    tracing::info!(
        "config {}: {} service types",
        path.display(),
        ranges.types().len()
    );
    Ok(ranges)
}

/// Binds the Unix socket, replacing a stale socket file but never a live daemon's, and lets every local
/// user connect (each caller is identified by SO_PEERCRED, so access is decided per call).
fn bind_unix_socket(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another Styxy daemon is already listening on {}; stop it first or pass --socket PATH",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .with_context(|| format!("setting permissions of {}", path.display()))?;
    Ok(listener)
}

/// Every process that asked the daemon keeps its connection open (the shim reuses it), and the
/// process cache holds a pidfd per recent asker: on a busy machine that is more than the usual
/// soft limit of 1,024 descriptors. Raise the soft limit to the hard one (best effort).
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one plain struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            let wanted = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) != 0 {
                tracing::warn!(
                    "could not raise the open-file limit from {}: {}",
                    limit.rlim_cur,
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

/// Serves the Unix socket from one single-threaded runtime per core, each accepting on its own
/// copy of the listening socket, so a connection's requests live on one thread from read to answer
/// instead of hopping between work-stealing workers. Measured with `cargo xtask bench` on a 2-core
/// machine: Allocate with 32 clients went from about 5,300/s to 6,800–9,200/s; single-client
/// latency did not change. Each thread relays the store's durable mark to its own waiters (one
/// wake-up from the store writer per thread, not one per waiting call). Returns one receiver per
/// thread for its result.
fn serve_unix_per_core(
    router: &tonic::transport::server::Router,
    store: &Store,
    uds: UnixListener,
    shutdown: &watch::Receiver<bool>,
) -> Result<Vec<tokio::sync::oneshot::Receiver<Result<()>>>> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let listener = uds.into_std().context("taking the Unix listener")?;
    let mut finished = Vec::new();
    for n in 0..threads {
        let listener = listener.try_clone().context("sharing the Unix listener")?;
        let router = router.clone();
        let store = store.clone();
        let mut stop = shutdown.clone();
        let (done, result) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("styxy-uds-{n}"))
            .spawn(move || {
                let outcome = (|| -> Result<()> {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .context("starting a server runtime")?;
                    runtime.block_on(async move {
                        tokio::spawn(store.relay_durable_here());
                        let listener = UnixListener::from_std(listener)
                            .context("registering the Unix listener")?;
                        let connections = UnixListenerStream::new(listener)
                            .map(|accepted| accepted.map(OneWriteUnixStream));
                        router
                            .serve_with_incoming_shutdown(connections, async move {
                                let _ = stop.wait_for(|stop| *stop).await;
                            })
                            .await
                            .context("Unix-socket server")
                    })
                })();
                let _ = done.send(outcome);
            })
            .context("starting a server thread")?;
        finished.push(result);
    }
    Ok(finished)
}

/// A Unix-socket connection that tells h2 it has no vectored writes.
///
/// With vectored writes h2 sends a DATA payload over 256 bytes as a buffer of its own and must
/// flush it before it can queue the next frame, so a unary answer of that size left in two writes:
/// HEADERS + DATA, then the trailers (strace: 280 + 10 bytes for a moved bind). The client, which
/// needs the trailers for the status, then woke twice. Without them h2 copies payloads of up to
/// 1 KiB into its buffer, and every such answer leaves in one write with its trailers.
struct OneWriteUnixStream(tokio::net::UnixStream);

impl tokio::io::AsyncRead for OneWriteUnixStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for OneWriteUnixStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

impl tonic::transport::server::Connected for OneWriteUnixStream {
    type ConnectInfo = tonic::transport::server::UdsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.connect_info()
    }
}

/// How often the eBPF observer's port table is checked against a full socket-table reading.
const EBPF_SAFETY_RESYNC: Duration = Duration::from_secs(60);

/// Starts the chosen observer, takes the first reading of the socket tables, and says which
/// observer runs and why.
fn start_observer(
    opts: &DaemonOptions,
    engine: Arc<Engine>,
    shutdown: watch::Receiver<bool>,
) -> Result<ObserverStatus> {
    let ebpf = match opts.observer {
        ObserverChoice::Sockets => None,
        ObserverChoice::Auto | ObserverChoice::Ebpf => Some(attach_ebpf(opts)),
    };
    let ebpf_error = match ebpf {
        Some(Ok((mut attached, whole_machine))) => {
            let reading = tokio::task::block_in_place(|| engine.resync_reading())
                .context("reading the kernel's socket tables")?;
            let seeded = attached.seed_bound(&reading);
            // The kernel's per-port counts stand for the socket tables only when the programs
            // see every bind, i.e. at the root of the cgroup tree.
            let point_checks = match attached.take_port_counts() {
                Some(counts) if whole_machine => {
                    let how = if counts.is_mapped() {
                        "point checks read the kernel's per-port counts, mapped into memory"
                    } else {
                        "point checks read the kernel's per-port counts"
                    };
                    engine.use_port_counts(Box::new(counts));
                    how
                }
                _ => "point checks read the socket tables (a cgroup below the root sees only its own binds)",
            };
            let status = ObserverStatus {
                kind: "ebpf",
                reason: format!(
                    "attached to cgroup {}; {seeded} socket(s) bound before it were read from the socket tables; \
                     {point_checks}; a full reading every {} s as a safety net",
                    attached.cgroup.display(),
                    EBPF_SAFETY_RESYNC.as_secs()
                ),
            };
            spawn_ebpf_reader(engine.clone(), attached, shutdown.clone())?;
            // A safety net for what no hook reports (a TCP socket that starts listening over
            // `UNLISTED_TCP_GRACE_MS` after its bind, dropped by a reading meanwhile; a lost
            // record the counter has not shown yet): a full reading now and then.
            tokio::spawn(scan_socket_tables(engine, EBPF_SAFETY_RESYNC, shutdown));
            return Ok(status);
        }
        Some(Err(e)) if opts.observer == ObserverChoice::Ebpf => {
            return Err(e.context("--observer ebpf"));
        }
        Some(Err(e)) => Some(format!("eBPF unavailable: {e:#}")),
        None => None,
    };
    tokio::task::block_in_place(|| engine.resync())
        .context("reading the kernel's socket tables")?;
    tokio::spawn(scan_socket_tables(engine, opts.scan_interval, shutdown));
    let reason = ebpf_error.unwrap_or_else(|| "chosen with --observer sockets".to_string());
    Ok(ObserverStatus {
        kind: "sockets-table",
        reason: format!(
            "{reason}; reading socket tables every {} ms",
            opts.scan_interval.as_millis()
        ),
    })
}

/// The attached programs, and whether they sit at the root of the cgroup tree (and so see every
/// bind on the machine).
fn attach_ebpf(opts: &DaemonOptions) -> Result<(ebpf::Attached, bool)> {
    let object = ebpf::find_object(opts.ebpf_object.as_deref())?;
    let root = ebpf::cgroup2_root();
    let cgroup = match (&opts.cgroup, &root) {
        (Some(path), _) => path.clone(),
        (None, Ok(root)) => root.clone(),
        (None, Err(e)) => bail!("{e:#}"),
    };
    let at_root = match (
        root.map(std::fs::canonicalize),
        std::fs::canonicalize(&cgroup),
    ) {
        (Ok(Ok(root)), Ok(cgroup)) => root == cgroup,
        _ => false,
    };
    Ok((ebpf::attach(&object, &cgroup)?, at_root))
}

/// Runs the eBPF reader on a thread of its own, scheduled `SCHED_BATCH`, and returns once it
/// watches the ring buffer.
///
/// Why a batch thread: when the reader has caught up, each record wakes it, from inside the
/// `bind()` of whatever program binds; a normal thread then preempted that program on its own
/// CPU (binds took ~14 µs instead of ~2.4 µs here whenever the reader was idle). A batch thread
/// never preempts on wake-up: it runs on an idle CPU, or at the next tick. Unlike a high nice
/// value or `SCHED_IDLE` it keeps its full share of the CPU, so a busy machine cannot starve it.
fn spawn_ebpf_reader(
    engine: Arc<Engine>,
    attached: ebpf::Attached,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let (watching, started) = std::sync::mpsc::channel::<Result<()>>();
    std::thread::Builder::new()
        .name("styxy-ebpf".into())
        .spawn(move || {
            schedule_this_thread_as_batch();
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = watching.send(Err(anyhow::anyhow!("starting its runtime: {e}")));
                    return;
                }
            };
            runtime.block_on(async move {
                // SAFETY: the descriptor is the ring buffer's map fd, owned by `attached`, which
                // the AsyncFd owns in turn: it stays open and the same for the AsyncFd's life.
                match unsafe { AsyncFd::register_with_interest(attached, Interest::READABLE) } {
                    Ok(events) => {
                        let _ = watching.send(Ok(()));
                        read_ebpf_events(engine, events, shutdown).await;
                    }
                    Err(e) => {
                        let _ = watching.send(Err(anyhow::anyhow!("watching it: {e}")));
                    }
                }
            });
        })
        .context("starting the eBPF ring buffer reader")?;
    tokio::task::block_in_place(|| started.recv())
        .context("the eBPF ring buffer reader ended at start")?
        .context("the eBPF ring buffer reader")
}

/// Puts the calling thread in the `SCHED_BATCH` class (see [`spawn_ebpf_reader`]); where that
/// is refused it stays as it was, which costs latency, not correctness.
fn schedule_this_thread_as_batch() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param for SCHED_BATCH.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
        tracing::debug!(
            "SCHED_BATCH for the eBPF reader refused: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The eBPF observer's reader: wakes when the ring buffer has records (no polling), feeds them to
/// the broker, and resyncs from the socket tables when the kernel side had to drop some.
async fn read_ebpf_events(
    engine: Arc<Engine>,
    mut events: AsyncFd<ebpf::Attached>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut owners = ebpf::OwnerCache::default();
    loop {
        let mut guard = tokio::select! {
            ready = events.readable_mut() => match ready {
                Ok(guard) => guard,
                Err(e) => {
                    tracing::error!("eBPF ring buffer: {e}; no more bind events");
                    return;
                }
            },
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let attached = guard.get_inner_mut();
        let (batch, seen_at) = attached.drain(&mut owners);
        let lost = attached.newly_dropped();
        guard.clear_ready();
        if !batch.is_empty() {
            engine.apply_events(batch);
        }
        let applied_at = ebpf::monotonic_ns();
        engine.record_observer_delays(
            seen_at
                .iter()
                .map(|t| (applied_at.saturating_sub(*t) / 1000).min(u64::from(u32::MAX)) as u32),
        );
        if lost > 0 {
            tracing::warn!(
                "{lost} eBPF record(s) lost (ring buffer full): resyncing from the socket tables"
            );
            if let Err(e) = engine.resync() {
                tracing::warn!("resync after lost records: {e}");
            }
            // Counted once the table is repaired: whoever sees the loss in Status sees the fix.
            engine.count_dropped(lost);
        }
    }
}

/// The sockets-table observer: a full sock_diag reading at each interval, reconciled into the broker.
async fn scan_socket_tables(
    engine: Arc<Engine>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    // The first reading was taken at start: the first tick is one interval away.
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let engine = engine.clone();
        match tokio::task::spawn_blocking(move || engine.resync()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("reading the socket tables: {e}"),
            Err(e) => tracing::error!("socket-table reader failed: {e}"),
        }
    }
}

/// Ends lapsed leases and those of exited processes, once a second.
async fn sweep_leases(engine: Arc<Engine>, mut shutdown: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        if let Err(e) = engine.expire().await {
            tracing::warn!("sweeping leases: {e:#}");
        }
    }
}

/// Sends `state` (e.g. `READY=1`) to systemd's notification socket, when running under systemd
/// (`Type=notify`); abstract socket names (`@…`) included.
fn notify_systemd(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = PathBuf::from(path);
    let result = std::os::unix::net::UnixDatagram::unbound().and_then(|s| {
        if let Some(abstract_name) = path.as_os_str().as_encoded_bytes().strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?;
            s.send_to_addr(state.as_bytes(), &addr)
        } else {
            s.send_to(state.as_bytes(), &path)
        }
    });
    if let Err(e) = result {
        tracing::warn!("notifying systemd at {}: {e}", path.display());
    }
}
