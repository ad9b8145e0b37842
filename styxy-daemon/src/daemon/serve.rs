//! Serving `styxy.v1` (with health and reflection): the listeners, and one single-threaded runtime
//! per core on the Unix socket.

use super::idle::IdleTimeout;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_stream::StreamExt;
use tonic::transport::server::Router;
use tonic::transport::Server;

use super::admission::{Admission, Slot};
use super::Options;
use crate::engine::Engine;
use crate::rpc::BrokerService;
use crate::store::Store;
use styxy_proto::v1::port_broker_server::PortBrokerServer;

/// The sockets the daemon serves on, bound before anything is served.
pub(super) struct Listeners {
    unix: UnixListener,
    tcp: Option<TcpListener>,
}

impl Listeners {
    /// Binds the Unix socket (see [`bind_unix_socket`]) and, when asked, the TCP address.
    pub(super) async fn bind(opts: &Options) -> Result<Listeners> {
        let unix = bind_unix_socket(&opts.socket)?;
        let tcp = match opts.listen {
            Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| {
                format!("listening on {addr} (use --listen ADDR or --listen none)")
            })?),
            None => None,
        };
        Ok(Listeners { unix, tcp })
    }

    /// The TCP address actually bound (a port 0 in `--listen` resolved).
    pub(super) fn tcp_address(&self) -> Option<String> {
        self.tcp
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a: SocketAddr| a.to_string())
    }
}

/// How long requests under way may take to finish once the daemon is asked to stop. Connections
/// are not waited for: a shim keeps its connection open for the life of its process (it reads the
/// server's GOAWAY only at its next call), so a graceful drain would last until every shimmed
/// process idled out (60–80 s seen), longer than systemd's stop timeout.
pub(super) const STOP_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// `serve` until `stop` turns true and then for [`STOP_GRACE`] at most: a server still draining
/// then is dropped, and with it (and its runtime) the connections it holds.
async fn until_stopped(
    serve: impl std::future::Future<Output = Result<()>>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    tokio::select! {
        result = serve => result,
        _ = async {
            let _ = stop.wait_for(|stop| *stop).await;
            tokio::time::sleep(STOP_GRACE).await;
        } => Ok(()),
    }
}

/// Starts serving on `listeners` until `stop` turns true; each server's result comes out of the
/// returned set.
pub(super) async fn start(
    opts: &Options,
    engine: Arc<Engine>,
    listeners: Listeners,
    stop: &watch::Receiver<bool>,
) -> Result<JoinSet<Result<()>>> {
    let router = router(&engine, opts).await?;
    // Said before the first connection can be served, so the log never lags what clients see.
    tracing::info!(socket = %opts.socket.display(), "listening on the Unix socket");
    if let Some(tcp) = &listeners.tcp {
        tracing::info!(address = %tcp.local_addr()?, "listening on TCP");
    }
    let mut servers = JoinSet::new();
    let admission = Admission::new(engine.metrics().refused_connections.clone());
    for (n, finished) in serve_unix_per_core(
        &router,
        engine.store(),
        &admission,
        listeners.unix,
        opts.idle_timeout,
        stop,
    )?
    .into_iter()
    .enumerate()
    {
        servers.spawn(async move {
            finished
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("Unix-socket server thread {n} panicked")))
        });
    }
    if let Some(tcp) = listeners.tcp {
        let mut stop = stop.clone();
        let grace = stop.clone();
        let idle = opts.idle_timeout;
        let connections = TcpListenerStream::new(tcp)
            .map(move |accepted| accepted.map(|stream| IdleTimeout::new(stream, idle)));
        servers.spawn(async move {
            let serve = async move {
                router
                    .serve_with_incoming_shutdown(connections, async move {
                        let _ = stop.wait_for(|stop| *stop).await;
                    })
                    .await
                    .context("TCP server")
            };
            until_stopped(serve, grace).await
        });
    }
    Ok(servers)
}

/// Serves `GET /metrics` (OpenMetrics text, what Prometheus scrapes) on `addr`, which must be
/// loopback: the figures name service types and sessions, nothing for the network. Returns the
/// server to run until `stop`.
pub(super) async fn metrics(
    addr: SocketAddr,
    engine: Arc<Engine>,
    mut stop: watch::Receiver<bool>,
) -> Result<impl std::future::Future<Output = Result<()>>> {
    if !addr.ip().is_loopback() {
        bail!(
            "--metrics {addr} is not a loopback address: the metrics endpoint serves loopback only"
        );
    }
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr} for metrics (use --metrics ADDR)"))?;
    tracing::info!(address = %listener.local_addr()?, "serving metrics at /metrics");
    Ok(async move {
        loop {
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => accepted.context("accepting a metrics scrape")?,
                _ = stop.wait_for(|stop| *stop) => return Ok(()),
            };
            let engine = engine.clone();
            tokio::spawn(async move {
                let answer = hyper::service::service_fn(move |request| {
                    let engine = engine.clone();
                    async move { Ok::<_, std::convert::Infallible>(metrics_answer(&request, &engine)) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), answer);
                if let Err(e) = connection.await {
                    tracing::debug!(cause = %e, "a metrics scrape ended early");
                }
            });
        }
    })
}

/// The answer to one request of the metrics endpoint.
fn metrics_answer(
    request: &hyper::Request<hyper::body::Incoming>,
    engine: &Engine,
) -> hyper::Response<http_body_util::Full<hyper::body::Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&hyper::Method::GET, "/metrics") => (
            hyper::StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            engine.render_metrics(),
        ),
        _ => (
            hyper::StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "Styxy serves GET /metrics here\n".to_string(),
        ),
    };
    let mut response = hyper::Response::new(http_body_util::Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

/// The largest `styxy.v1` request accepted: the largest valid one (an Allocate with a 128-byte
/// session id) is well under 1 KiB; tonic's default of 4 MiB let any local process make the
/// daemon decode and answer megabytes per call.
const MAX_REQUEST_BYTES: usize = 16 * 1024;

/// The `styxy.v1` service with gRPC health and server reflection (v1 and v1alpha).
async fn router(engine: &Arc<Engine>, opts: &Options) -> Result<Router> {
    let service = BrokerService::new(
        engine.clone(),
        opts.tcp_allow_writes,
        opts.socket.display().to_string(),
    );
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<PortBrokerServer<BrokerService>>()
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(styxy_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .context("building the reflection service")?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .context("building the reflection service")?;
    // Pings at a third of the idle time: a live client's answers keep its connection (see `idle`).
    let ping = opts.idle_timeout / 3;
    Ok(Server::builder()
        .http2_keepalive_interval(Some(ping))
        .http2_keepalive_timeout(Some(ping))
        .add_service(PortBrokerServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha))
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

/// Serves the Unix socket from one single-threaded runtime per core, each accepting on its own
/// copy of the listening socket, so a connection's requests live on one thread from read to answer
/// instead of hopping between work-stealing workers (32-client Allocate gained about a third over
/// a shared multi-threaded runtime; `cargo xtask bench broker` measures it). Each thread relays the
/// store's durable mark to its own waiters (one wake-up from the store writer per thread, not one
/// per waiting call). Returns one receiver per thread for its result.
fn serve_unix_per_core(
    router: &Router,
    store: &Store,
    admission: &Arc<Admission>,
    uds: UnixListener,
    idle: std::time::Duration,
    stop: &watch::Receiver<bool>,
) -> Result<Vec<tokio::sync::oneshot::Receiver<Result<()>>>> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let listener = uds.into_std().context("taking the Unix listener")?;
    let mut finished = Vec::new();
    for n in 0..threads {
        let listener = listener.try_clone().context("sharing the Unix listener")?;
        let router = router.clone();
        let store = store.clone();
        let admission = admission.clone();
        let mut stop = stop.clone();
        let grace = stop.clone();
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
                        // Over a cap, a connection is dropped (closed) as it is accepted.
                        let connections =
                            UnixListenerStream::new(listener).filter_map(move |accepted| {
                                match accepted {
                                    Ok(stream) => admission.admit(&stream).map(|slot| {
                                        Ok(OneWriteUnixStream(IdleTimeout::new(stream, idle), slot))
                                    }),
                                    Err(e) => Some(Err(e)),
                                }
                            });
                        let serve = async move {
                            router
                                .serve_with_incoming_shutdown(connections, async move {
                                    let _ = stop.wait_for(|stop| *stop).await;
                                })
                                .await
                                .context("Unix-socket server")
                        };
                        // The runtime, dropped right after, ends the connections' tasks.
                        until_stopped(serve, grace).await
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
/// HEADERS + DATA, then the trailers (a moved bind's answer, seen with strace). The client, which
/// needs the trailers for the status, then woke twice. Without them h2 copies payloads of up to
/// 1 KiB into its buffer, and every such answer leaves in one write with its trailers.
///
/// It also holds the connection's [`Slot`]: closing the connection gives the place back.
struct OneWriteUnixStream(
    IdleTimeout<tokio::net::UnixStream>,
    #[allow(dead_code)] Slot,
);

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
        self.0.get_ref().connect_info()
    }
}
