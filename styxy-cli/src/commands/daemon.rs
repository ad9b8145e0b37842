//! `styxy daemon`: the daemon's command line, turned into `styxy_daemon::Options`; it runs until
//! SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use styxy_common::paths;
use styxy_daemon::{HostHeader, KernelLogLevel, ObserverChoice, Options, ProxyEntry};

#[derive(Clone, Debug, clap::Args)]
pub(crate) struct Args {
    /// Loopback TCP address to serve on, or `none`.
    #[arg(long, default_value = paths::DEFAULT_TCP)]
    listen: String,
    /// Where leases, instances and the audit log are kept [default: /var/lib/styxy as root, else $XDG_STATE_HOME/styxy]
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Service ranges in TOML [default: /etc/styxy/config.toml as root, else $XDG_CONFIG_HOME/styxy/config.toml, if present]
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where bind events come from.
    #[arg(long, value_enum, default_value = "auto")]
    observer: ObserverChoice,
    /// How often the sockets-table observer reads the kernel's socket tables.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    scan_interval_ms: u64,
    /// Let TCP callers (who cannot be identified) make calls that change state, as the daemon's user.
    #[arg(long)]
    tcp_allow_writes: bool,
    /// cgroup v2 directory the eBPF observer attaches to [default: the cgroup v2 root, i.e. the whole machine]
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// The eBPF object [default: $STYXY_EBPF_OBJECT, next to this binary, or <prefix>/lib/styxy/styxy-ebpf.o]
    #[arg(long)]
    ebpf_object: Option<PathBuf>,
    /// Serve Prometheus metrics (OpenMetrics text) at http://ADDR/metrics, loopback only, e.g. 127.0.0.1:9877 [default: off]
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Serve every live server by its name (http://storybook.feature-x.localhost:PORT/) on this loopback address, e.g. 127.0.0.1:80, or on the sockets systemd passes named proxy-http (`systemd`: styxy-http.socket) [default: off]
    #[arg(long, value_name = "ADDR|systemd", value_parser = proxy_entry)]
    proxy: Option<ProxyEntry>,
    /// Serve the names over HTTPS too (https://storybook.feature-x.localhost:PORT/, HTTP/2 and HTTP/1.1) on this loopback address, e.g. 127.0.0.1:443, or on the sockets systemd passes named proxy-https (`systemd`: styxy-https.socket), with certificates from a local authority kept in the state dir (`styxy trust` makes browsers trust it) [default: off]
    #[arg(long, value_name = "ADDR|systemd", value_parser = proxy_entry)]
    proxy_tls: Option<ProxyEntry>,
    /// The Host header the proxy gives a named server: `keep` the name asked for, or `upstream` (127.0.0.1:PORT, for servers that check Host against a fixed list)
    #[arg(long, value_enum, default_value = "keep")]
    proxy_host: ProxyHost,
    /// How long a named server may take to start answering a request through the proxy (its body may stream for as long as it likes); slower: 504
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    proxy_upstream_timeout_secs: u64,
    /// How long a proxy thread keeps polling its connections after traffic instead of sleeping, in microseconds: the next request or WebSocket message is then picked up without a wake-up (a loopback hop's largest cost); 0: never spin. Idle, nothing spins
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    proxy_spin_us: u64,
    /// Which of the kernel programs' own log lines (moves, empty spare pools, full maps) go into this log.
    #[arg(long, value_enum, default_value = "warn")]
    ebpf_log: KernelLogLevel,
    /// Refuse, in the kernel, a signal that would end or stop a process of one session when a process of another session sends it (lsm/task_kill; needs BPF LSM, `bpf` in /sys/kernel/security/lsm)
    #[arg(long, value_enum, default_value = "on")]
    kill_protection: Switch,
    /// Close a connection that sends nothing for this many seconds (the daemon pings clients at a third of it, so live ones stay)
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(3..=86_400))]
    idle_timeout_secs: u64,
}

/// A feature turned on or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Switch {
    On,
    Off,
}

/// `--proxy` and `--proxy-tls`: a loopback address, or `systemd`.
fn proxy_entry(value: &str) -> Result<ProxyEntry, String> {
    if value == "systemd" {
        return Ok(ProxyEntry::Systemd);
    }
    let addr: SocketAddr = value
        .parse()
        .map_err(|_| format!("{value:?} is neither an address like 127.0.0.1:80 nor `systemd`"))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{addr} is not a loopback address: the names' proxy serves this machine only (127.0.0.1 or [::1])"
        ));
    }
    Ok(ProxyEntry::Address(addr))
}

/// `--proxy-host`: see [`HostHeader`].
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum ProxyHost {
    Keep,
    Upstream,
}

/// Runs the daemon until SIGINT or SIGTERM.
pub(crate) async fn run(args: Args, socket: Option<PathBuf>) -> Result<()> {
    crate::logging::init_daemon_logging();
    let listen = match args.listen.as_str() {
        "none" => None,
        addr => Some(addr.parse::<SocketAddr>().with_context(|| {
            format!("--listen {addr:?} is not an address like 127.0.0.1:9876 (or `none`)")
        })?),
    };
    if let Some(addr) = listen.filter(|a| !a.ip().is_loopback()) {
        tracing::warn!(%addr, "--listen is not a loopback address: the API is reachable from the network");
    }
    let default_config = paths::default_config();
    let config = args
        .config
        .or_else(|| default_config.exists().then_some(default_config));
    // The handlers are installed now, before the daemon tells systemd it is ready: a stop right
    // after the start is clean too.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("handling SIGTERM")?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("handling SIGINT")?;
    let shutdown = async move {
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
    };
    styxy_daemon::run(
        Options {
            socket: socket.unwrap_or_else(paths::default_socket),
            listen,
            state_dir: args.state_dir.unwrap_or_else(paths::default_state_dir),
            config,
            observer: args.observer,
            scan_interval: Duration::from_millis(args.scan_interval_ms),
            tcp_allow_writes: args.tcp_allow_writes,
            cgroup: args.cgroup,
            ebpf_object: args.ebpf_object,
            metrics: args.metrics,
            proxy: args.proxy,
            proxy_tls: args.proxy_tls,
            proxy_upstream_timeout: Duration::from_secs(args.proxy_upstream_timeout_secs),
            proxy_spin: Duration::from_micros(args.proxy_spin_us),
            proxy_host_header: match args.proxy_host {
                ProxyHost::Keep => HostHeader::Keep,
                ProxyHost::Upstream => HostHeader::Upstream,
            },
            ebpf_log: args.ebpf_log,
            kill_protection: args.kill_protection == Switch::On,
            idle_timeout: Duration::from_secs(args.idle_timeout_secs),
        },
        shutdown,
    )
    .await
}
