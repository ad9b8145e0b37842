//! `styxy daemon`: loads the config and the saved state, starts an observer, serves gRPC on a Unix
//! socket and loopback TCP, and stops when its shutdown future completes — joining every task it
//! started before the store writes its last change. Read [`run`] top to bottom for the story.
//!
//! - `serve`: the gRPC router and its listeners (one runtime per core on the Unix socket);
//! - `observers`: which observer runs (eBPF or the socket tables), and its reader tasks;
//! - `admission`: how many connections each user, and everyone, may hold;
//! - `systemd`: `sd_notify` for `Type=notify`; `limits`: the open-file limit.

mod admission;
mod idle;
mod limits;
mod observers;
mod serve;
mod systemd;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::engine::{Endpoints, Engine, AUDIT_KEEP};
use crate::store::Store;
use crate::table::PublishedTable;
use styxy_broker::{Broker, LeaseSettings, ServiceRanges, UserLimits};

pub use crate::bpf::kernel_log::KernelLogLevel;

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
pub struct Options {
    /// The Unix socket to serve on.
    pub socket: PathBuf,
    /// Loopback TCP address to serve on; `None`: no TCP listener.
    pub listen: Option<SocketAddr>,
    /// Where leases, instances and the audit log are kept.
    pub state_dir: PathBuf,
    /// Service ranges in TOML; `None`: the built-in ranges.
    pub config: Option<PathBuf>,
    /// Where bind events come from.
    pub observer: ObserverChoice,
    /// How often the sockets-table observer reads the kernel's socket tables.
    pub scan_interval: Duration,
    /// Lets TCP callers (who cannot be identified) change state, as the daemon's user.
    pub tcp_allow_writes: bool,
    /// cgroup v2 directory the eBPF observer attaches to (default: the cgroup v2 root).
    pub cgroup: Option<PathBuf>,
    /// The eBPF object (default: looked up next to the binary and in the install prefix).
    pub ebpf_object: Option<PathBuf>,
    /// Loopback address to serve `/metrics` on (OpenMetrics text); `None`: no metrics endpoint.
    pub metrics: Option<SocketAddr>,
    /// Where the names' proxy serves http (`http://NAME.localhost`); `None`: it does not.
    pub proxy: Option<crate::proxy::ProxyEntry>,
    /// Where it serves https (`https://NAME.localhost`); `None`: it does not.
    pub proxy_tls: Option<crate::proxy::ProxyEntry>,
    /// The `Host` header the proxy gives the named servers.
    pub proxy_host_header: crate::proxy::HostHeader,
    /// How long a named server may take to start answering a request through the proxy.
    pub proxy_upstream_timeout: Duration,
    /// How long a proxy thread polls without sleeping after traffic (see `proxy::spin`).
    pub proxy_spin: Duration,
    /// Which of the kernel programs' own log lines go into the daemon's log.
    pub ebpf_log: KernelLogLevel,
    /// Whether the kernel refuses signals between sessions where BPF LSM allows it.
    pub kill_protection: bool,
    /// A connection that sends nothing for this long is closed (HTTP/2 pings at a third of it
    /// keep live clients' connections open).
    pub idle_timeout: Duration,
}

/// The names' proxy's listeners, http and https, as the options ask: bound here, or passed by
/// systemd; and why an entry asked for has no listener, when one has none (the daemon runs on
/// without it: the names are an addition, the port broker is not).
type ProxyListeners = (
    Vec<std::net::TcpListener>,
    Vec<std::net::TcpListener>,
    Option<String>,
);

fn proxy_listeners(opts: &Options) -> Result<ProxyListeners> {
    use crate::proxy::ProxyEntry;
    let from_systemd = [opts.proxy, opts.proxy_tls].contains(&Some(ProxyEntry::Systemd));
    let mut passed = if from_systemd {
        systemd::take_listen_fds()
    } else {
        Vec::new()
    };
    let mut missing = Vec::new();
    let mut listeners = |entry: Option<ProxyEntry>, flag: &str, name: &str, unit: &str| {
        Ok::<_, anyhow::Error>(match entry {
            None => Vec::new(),
            Some(ProxyEntry::Address(addr)) => vec![crate::proxy::bind_loopback(addr, flag)?],
            Some(ProxyEntry::Systemd) => {
                let found = crate::proxy::inherited_loopback(&mut passed, name);
                if found.is_empty() {
                    missing.push(format!(
                        "systemd passed no socket named {name} ({flag} systemd): \
                         `systemctl enable --now {unit}`, and see `systemctl status {unit}` \
                         (another server may hold its port)"
                    ));
                }
                found
            }
        })
    };
    let http = listeners(opts.proxy, "--proxy", "proxy-http", "styxy-http.socket")?;
    let https = listeners(
        opts.proxy_tls,
        "--proxy-tls",
        "proxy-https",
        "styxy-https.socket",
    )?;
    for (name, _) in &passed {
        tracing::warn!(
            name,
            "systemd passed a socket the daemon has no use for: closed"
        );
    }
    for why in &missing {
        tracing::warn!("the names' proxy: {why}");
    }
    let detail = (!missing.is_empty()).then(|| missing.join("; "));
    Ok((http, https, detail))
}

/// Runs the daemon until `shutdown` completes (the binary passes SIGINT/SIGTERM; a test, whatever
/// it likes), or until a server fails.
pub async fn run(opts: Options, shutdown: impl Future<Output = ()>) -> Result<()> {
    limits::raise_open_file_limit();
    limits::limit_allocator_hold();
    // 1. Service ranges and lease limits: built-in defaults, changed by the config file if any.
    let (ranges, user_limits) = load_config(opts.config.as_deref())?;

    // 2. Saved leases and instances; those whose process has died go at the first sweep. One
    //    daemon per state dir: the lock is held until this function returns.
    let _state_dir_lock = crate::store::lock_state_dir(&opts.state_dir)?;
    let (store, mut snapshot, audit) = Store::open(&opts.state_dir, AUDIT_KEEP)?;
    let damage = std::mem::take(&mut snapshot.damage);
    tracing::info!(
        state_dir = %opts.state_dir.display(),
        leases = snapshot.leases.len(),
        instances = snapshot.instances.len(),
        "state restored"
    );
    let mut broker = Broker::restore(
        ranges,
        LeaseSettings {
            user_limits,
            ..LeaseSettings::default()
        },
        snapshot.leases,
        snapshot.instances,
    );
    broker.issue_lease_ids_after(snapshot.lease_ids_issued);
    broker.restore_sticky(snapshot.sticky);
    let engine = Arc::new(Engine::new(broker, store.clone(), audit));
    engine.set_state_damage(damage);
    engine.expire().await?;

    // 3. An observer to keep the port table current, and what is bound already (read after an
    //    eBPF observer attaches, so that no bind in between is missed). Every task started from
    //    here on is in `tasks`, and joined before the store closes.
    let (stop_tx, stop) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let observer = observers::start(&opts, engine.clone(), &stop, &mut tasks)?;
    tracing::info!(kind = observer.kind, reason = %observer.reason, "observer started");
    engine.set_observer(observer);
    tasks.spawn(sweep_leases(engine.clone(), stop.clone()));
    tasks.spawn(crate::lingering::keep_current(engine.clone(), stop.clone()));

    // 4. The gRPC service on the Unix socket and on loopback TCP, with health and reflection.
    let listeners = serve::Listeners::bind(&opts).await?;
    // 5. The session table the shims map (taken ports, session views), next to the socket: made
    //    once the socket is ours, so a second daemon never replaces a running one's table.
    engine.publish_table(PublishedTable::create(&opts.socket)?);
    // The names' proxy, bound before anything is served, so `Status` says where from the first
    // answer on.
    let (http, https, proxy_detail) = proxy_listeners(&opts)?;
    let mut proxy = None;
    if !http.is_empty() || !https.is_empty() {
        let options = crate::proxy::ProxyOptions {
            http,
            https,
            ca_dir: opts.state_dir.clone(),
            host_header: opts.proxy_host_header,
            upstream_timeout: opts.proxy_upstream_timeout,
            spin: opts.proxy_spin,
        };
        proxy = Some(crate::proxy::listen(options, engine.clone(), stop.clone()).await?);
    }
    let bound = proxy
        .as_ref()
        .map(|(bound, _)| bound.clone())
        .unwrap_or_default();
    engine.set_endpoints(Endpoints {
        socket_path: Some(opts.socket.clone()),
        tcp_listen: listeners.tcp_address(),
        proxy_listen: bound.http.map(|a| a.to_string()),
        proxy_tls_listen: bound.https.map(|a| a.to_string()),
        local_ca: bound.ca,
        proxy_detail,
    });
    // The metrics endpoint is bound (or refused: not loopback) before anything is served, so a
    // daemon that cannot start never answers a first call and then exits.
    let metrics = match opts.metrics {
        Some(addr) => Some(serve::metrics(addr, engine.clone(), stop.clone()).await?),
        None => None,
    };
    let mut servers = serve::start(&opts, engine.clone(), listeners, &stop).await?;
    if let Some(metrics) = metrics {
        servers.spawn(metrics);
    }
    if let Some((_, proxy)) = proxy {
        servers.spawn(proxy);
    }
    // What starting used and freed (the eBPF object parsed, the maps filled, the state read)
    // goes back before the daemon idles, not at the first periodic trim 5 s on: idle 24.1 →
    // 21.4 MB resident with eBPF, its heap mapping 4.0 → 1.3 MB (read by hand 2 s after start,
    // as `cargo xtask bench footprint` reads it).
    limits::return_freed_memory();
    systemd::notify(&format!(
        "READY=1\nSTATUS=serving on {}; observer {}",
        opts.socket.display(),
        engine.status().observer.kind
    ));

    // 6. Until asked to stop, or a server failing.
    let failure = tokio::select! {
        () = shutdown => None,
        Some(result) = servers.join_next() => Some(result),
    };
    tracing::info!("shutting down");
    systemd::notify("STOPPING=1");
    let _ = stop_tx.send(true);
    while servers.join_next().await.is_some() {}
    while let Some(joined) = tasks.join_next().await {
        if let Err(e) = joined {
            tracing::error!(cause = %e, "a background task failed");
        }
    }
    // Live kernel sessions keep their pinned programs and maps for the next daemon; with none,
    // nothing of this daemon stays attached.
    match engine.live_kernel_sessions() {
        Some(live) if live > 0 => tracing::info!(
            sessions = live,
            "kernel sessions stay enforced while no daemon runs (pinned); the next daemon takes them over"
        ),
        _ => crate::bpf::pins::remove_left_behind(&opts.state_dir),
    }
    let _ = std::fs::remove_file(&opts.socket);
    engine.close_table();
    store.close().await?;
    match failure {
        Some(Ok(Err(e))) => Err(e).context("the gRPC server failed"),
        Some(Err(e)) => Err(e).context("the gRPC server task failed"),
        _ => Ok(()),
    }
}

/// The service ranges and the users' lease limits: built-in defaults, changed by the config file.
fn load_config(config: Option<&Path>) -> Result<(ServiceRanges, UserLimits)> {
    let Some(path) = config else {
        return Ok((ServiceRanges::default(), UserLimits::default()));
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    let ranges =
        ServiceRanges::from_toml(&text).with_context(|| format!("in config {}", path.display()))?;
    let limits =
        UserLimits::from_toml(&text).with_context(|| format!("in config {}", path.display()))?;
    tracing::info!(
        config = %path.display(),
        service_types = ranges.types().len(),
        leases_per_user = limits.leases_per_user,
        range_share_percent = limits.range_share_percent,
        "config loaded"
    );
    Ok((ranges, limits))
}

/// Ends lapsed leases and those of exited processes, and forgets exited processes, once a second;
/// every `TRIM_EVERY` seconds, gives memory freed since back to the system.
async fn sweep_leases(engine: Arc<Engine>, mut stop: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        if let Err(e) = engine.expire().await {
            tracing::warn!(cause = %format!("{e:#}"), "sweeping leases");
        }
        crate::procs::forget_exited();
        engine.detach_idle_session_programs();
        engine.collect_refused_signals();
        ticks += 1;
        if ticks.is_multiple_of(TRIM_EVERY) {
            limits::return_freed_memory();
        }
    }
}

/// Seconds between two [`limits::return_freed_memory`] calls.
const TRIM_EVERY: u64 = 5;
