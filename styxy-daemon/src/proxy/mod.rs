//! The names' reverse proxy: `http://storybook.feature-x.localhost/` reaches that session's
//! Storybook, wherever it is bound. It serves HTTP/1.1 and HTTP/2 (cleartext, prior knowledge)
//! on a loopback address (`styxy daemon --proxy ADDR`, or the sockets systemd passes), and HTTPS
//! with HTTP/2 and HTTP/1.1 by ALPN (`--proxy-tls ADDR`, certificates from a local authority:
//! see `tls`); routes by `Host` (or `:authority`) through the daemon's names
//! (`styxy_broker::names`), and forwards to the named server on loopback as HTTP/1.1 —
//! streaming bodies both ways (server-sent events included) and WebSockets (Vite's and Next's
//! HMR), upgraded over HTTP/1.1 or opened over HTTP/2 (RFC 8441, see `websocket_h2`). Built on
//! hyper; see `forward` for what a request becomes upstream, `pages` for the answers it gives
//! itself (an unknown name, a stopped or silent server), and `dashboard` for `styxy.localhost`,
//! the live page of every session and server.
//!
//! Bounds: at most [`MAX_CONNECTIONS`] client connections at once (more wait in the listen
//! backlog), request headers within [`MAX_HEADER_BYTES`] (larger: `431`), read within
//! [`HEADER_TIMEOUT`] (slower: the connection is closed).

mod dashboard;
mod forward;
mod pages;
mod pool;
mod spin;
mod tls;
mod websocket_h2;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::engine::Engine;

pub use forward::HostHeader;
pub use spin::polled;
pub use tls::LocalCa;

/// Client connections served at once.
pub const MAX_CONNECTIONS: usize = 4096;
/// The largest request head (request line and headers) accepted.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// How long a client may take to send a request's head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Where one of the proxy's entries (http, https) listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyEntry {
    /// A loopback address it binds itself.
    Address(SocketAddr),
    /// The sockets systemd passes it (socket activation), by `FileDescriptorName=`
    /// (`proxy-http`, `proxy-https`): systemd binds the privileged ports, and a port someone
    /// else holds fails that socket unit, not the daemon.
    Systemd,
}

/// How the proxy runs.
#[derive(Debug)]
pub struct ProxyOptions {
    /// The listeners for plain HTTP (loopback only); none: it serves no HTTP.
    pub http: Vec<std::net::TcpListener>,
    /// The listeners for HTTPS (loopback only); none: it serves no HTTPS.
    pub https: Vec<std::net::TcpListener>,
    /// Where the local certificate authority is kept (the state dir).
    pub ca_dir: PathBuf,
    /// The `Host` header upstream.
    pub host_header: HostHeader,
    /// How long a named server may take to start answering a request.
    pub upstream_timeout: Duration,
    /// How long a proxy thread polls without sleeping after traffic (see `spin`).
    pub spin: Duration,
}

/// What the proxy got: its addresses, and the authority behind its HTTPS.
#[derive(Clone, Debug, Default)]
pub struct Bound {
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub ca: Option<Arc<LocalCa>>,
}

/// Which of the proxy's listeners a connection came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// Binds the proxy's listeners; returns the addresses they got (port 0 asks for any) and the
/// server to run until `stop`. The server is one single-threaded runtime per core, each
/// accepting on its own copy of the listeners, so a request lives on one thread from the
/// client's read to the upstream's answer (its client connection and its kept-alive upstream
/// connection are that thread's: see `pool`), and a thread polls after traffic (`spin`): on a
/// shared work-stealing runtime the proxy added 46–54 µs at p50 over a direct connection
/// (`styxy-bench proxy`); see the README for what it adds this way.
pub async fn listen(
    options: ProxyOptions,
    engine: Arc<Engine>,
    stop: watch::Receiver<bool>,
) -> Result<(Bound, impl std::future::Future<Output = Result<()>>)> {
    let mut bound = Bound::default();
    let address =
        |listeners: &[std::net::TcpListener]| listeners.first().and_then(|l| l.local_addr().ok());
    bound.http = address(&options.http);
    bound.https = address(&options.https);
    let https = if options.https.is_empty() {
        Vec::new()
    } else {
        let ca = Arc::new(LocalCa::open_or_create(&options.ca_dir)?);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(ca.clone())?);
        bound.ca = Some(ca);
        options
            .https
            .into_iter()
            .map(|l| (l, Some(acceptor.clone())))
            .collect()
    };
    let listeners: Vec<(std::net::TcpListener, Option<tokio_rustls::TlsAcceptor>)> = options
        .http
        .into_iter()
        .map(|l| (l, None))
        .chain(https)
        .collect();
    for (listener, _) in &listeners {
        listener
            .set_nonblocking(true)
            .context("making the proxy's listener non-blocking")?;
    }
    let (host_header, upstream_timeout, spin) =
        (options.host_header, options.upstream_timeout, options.spin);
    tracing::info!(
        listening = ?listeners.iter().filter_map(|(l, _)| l.local_addr().ok()).collect::<Vec<_>>(),
        "serving the names' proxy"
    );
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut finished = Vec::new();
    for n in 0..threads {
        let listeners = listeners
            .iter()
            .map(|(l, tls)| l.try_clone().map(|l| (l, tls.clone())))
            .collect::<std::io::Result<Vec<_>>>()
            .context("sharing the proxy's listeners")?;
        let (engine, stop, slots) = (engine.clone(), stop.clone(), slots.clone());
        let (done, result) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("styxy-proxy-{n}"))
            .spawn(move || {
                let outcome = (|| -> Result<()> {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .context("starting a proxy runtime")?;
                    // The runtime, dropped right after, ends the connections' tasks.
                    runtime.block_on(async move {
                        let shared = Shared {
                            engine,
                            upstream: forward::Upstream::new(host_header, upstream_timeout),
                            builder: Arc::new(connection_builder()),
                            slots,
                        };
                        let mut loops = tokio::task::JoinSet::new();
                        // Ends with the runtime.
                        tokio::spawn(keep_a_timer_due());
                        tokio::spawn(spin::run(spin));
                        for (listener, tls) in listeners {
                            let listener = TcpListener::from_std(listener)
                                .context("registering the proxy's listener")?;
                            loops.spawn(serve(listener, tls, shared.clone(), stop.clone()));
                        }
                        while let Some(ended) = loops.join_next().await {
                            ended.context("a proxy accept loop panicked")??;
                        }
                        Ok(())
                    })
                })();
                let _ = done.send(outcome);
            })
            .context("starting a proxy thread")?;
        finished.push(result);
    }
    Ok((bound, async move {
        for result in finished {
            result.await.context("a proxy thread ended")??;
        }
        Ok(())
    }))
}

/// The period of [`keep_a_timer_due`]: shorter than every timeout the proxy sets per request or
/// connection by default ([`HEADER_TIMEOUT`], the upstream's connect timeout of 5 s, its head
/// timeout of `--proxy-upstream-timeout-secs`; one set below this tick wakes the driver again).
const TIMER_TICK: Duration = Duration::from_secs(4);

/// Keeps a timer due within [`TIMER_TICK`] on this thread's runtime, and on each tick closes
/// this thread's upstream connections that have been idle too long (`pool::sweep`). Tokio wakes
/// its own driver (a write to its eventfd) whenever a timer is set earlier than every timer it parked
/// with; hyper sets its header-read timer after each answer on a kept-alive connection, so
/// without a nearer timer each proxied request cost that write: 7.0 system calls per keep-alive
/// GET on a proxy thread (`strace -c` over 2,000 GETs), 6.0 with this. Costs one wake-up per
/// tick per proxy thread.
async fn keep_a_timer_due() {
    let mut tick = tokio::time::interval(TIMER_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        pool::sweep();
    }
}

/// A loopback listener for the proxy (`flag` names where the address came from).
pub fn bind_loopback(addr: SocketAddr, flag: &str) -> Result<std::net::TcpListener> {
    if !addr.ip().is_loopback() {
        bail!("{flag} {addr} is not a loopback address: the names' proxy serves this machine only");
    }
    std::net::TcpListener::bind(addr)
        .with_context(|| format!("listening on {addr} for the names' proxy ({flag} ADDR)"))
}

/// The sockets systemd passed under `name` that are TCP listeners on loopback; others are
/// closed, with a warning (the proxy serves this machine only).
pub fn inherited_loopback(
    passed: &mut Vec<(String, std::os::fd::OwnedFd)>,
    name: &str,
) -> Vec<std::net::TcpListener> {
    let (mine, others): (Vec<_>, Vec<_>) = passed.drain(..).partition(|(n, _)| n == name);
    *passed = others;
    mine.into_iter()
        .filter_map(|(_, fd)| {
            let listening = is_listening_stream(&fd);
            let listener = std::net::TcpListener::from(fd);
            match listener.local_addr() {
                Ok(addr) if addr.ip().is_loopback() && listening => Some(listener),
                Ok(addr) => {
                    tracing::warn!(%addr, name, "a socket systemd passed is not a listening TCP socket on loopback: closed");
                    None
                }
                Err(e) => {
                    tracing::warn!(name, cause = %e, "a socket systemd passed is not a TCP listener: closed");
                    None
                }
            }
        })
        .collect()
}

/// Whether `fd` is a stream socket that listens (`SO_ACCEPTCONN`).
fn is_listening_stream(fd: &std::os::fd::OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    let option = |name: libc::c_int| {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: value and len are valid for getsockopt to write an int into.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                name,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (rc == 0).then_some(value)
    };
    option(libc::SO_TYPE) == Some(libc::SOCK_STREAM) && option(libc::SO_ACCEPTCONN) == Some(1)
}

/// How the proxy speaks HTTP to its clients: HTTP/1.1 or HTTP/2 (by the connection's preface),
/// with the bounds above.
fn connection_builder() -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        // WebSockets over HTTP/2 (RFC 8441): see `websocket_h2`.
        .enable_connect_protocol();
    builder
}

/// What one thread's connections share.
#[derive(Clone)]
struct Shared {
    engine: Arc<Engine>,
    upstream: forward::Upstream,
    builder: Arc<hyper_util::server::conn::auto::Builder<TokioExecutor>>,
    slots: Arc<Semaphore>,
}

/// One thread's accept loop for one listener: plain HTTP, or HTTPS with `tls`.
async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Shared,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let scheme = if tls.is_some() {
        Scheme::Https
    } else {
        Scheme::Http
    };
    loop {
        let slot = tokio::select! {
            slot = shared.slots.clone().acquire_owned() => slot.context("the connection limit closed")?,
            _ = stop.wait_for(|stop| *stop) => return Ok(()),
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stop| *stop) => return Ok(()),
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, say: wait, and keep serving the connections there are.
                tracing::warn!(cause = %e, "the names' proxy could not accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let tls = tls.clone();
        // Two kinds of task, each as large as its own connection: one future for both would
        // give every plain connection room for a TLS session's state (a few KiB each, seen as
        // 1,000 idle connections costing 5.8 MB instead of 2).
        match tls {
            None => {
                tokio::spawn(async move {
                    serve_connection(TokioIo::new(stream), peer, scheme, &shared).await;
                    drop(slot);
                });
            }
            Some(acceptor) => {
                tokio::spawn(async move {
                    // The handshake is bounded like a request's head: a client that stalls in it
                    // loses its connection.
                    match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            serve_connection(TokioIo::new(stream), peer, scheme, &shared).await
                        }
                        Ok(Err(e)) => tracing::debug!(cause = %e, "a TLS handshake failed"),
                        Err(_) => tracing::debug!("a TLS handshake took too long"),
                    }
                    drop(slot);
                });
            }
        }
    }
}

/// Serves one client connection until it ends.
async fn serve_connection<I>(io: I, peer: SocketAddr, scheme: Scheme, shared: &Shared)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let engine = shared.engine.clone();
    let upstream = shared.upstream;
    let peer = Arc::new(forward::Peer::new(peer, scheme));
    let service = hyper::service::service_fn(move |request| {
        let engine = engine.clone();
        let peer = peer.clone();
        async move {
            Ok::<_, std::convert::Infallible>(
                forward::answer(request, &peer, &engine, &upstream).await,
            )
        }
    });
    let connection = shared.builder.serve_connection_with_upgrades(io, service);
    if let Err(e) = connection.await {
        tracing::debug!(cause = %e, "a proxy connection ended early");
    }
}
