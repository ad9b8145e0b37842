//! The names' reverse proxy: `http://storybook.feature-x.localhost/` reaches that session's
//! Storybook, wherever it is bound. It serves HTTP/1.1 and HTTP/2 (cleartext, prior knowledge)
//! on a loopback address (`styxy daemon --proxy ADDR`), routes by `Host` (or `:authority`)
//! through the daemon's names (`styxy_broker::names`), and forwards to the named server on
//! loopback as HTTP/1.1 — streaming bodies both ways (server-sent events included) and
//! WebSocket upgrades (Vite's and Next's HMR). Built on hyper; see `forward` for what a request
//! becomes upstream and `pages` for the answers it gives itself (an unknown name, a stopped server).
//!
//! Bounds: at most [`MAX_CONNECTIONS`] client connections at once (more wait in the listen
//! backlog), request headers within [`MAX_HEADER_BYTES`] (larger: `431`), read within
//! [`HEADER_TIMEOUT`] (slower: the connection is closed).

mod forward;
mod pages;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::engine::Engine;

pub use forward::HostHeader;

/// Client connections served at once.
pub const MAX_CONNECTIONS: usize = 4096;
/// The largest request head (request line and headers) accepted.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// How long a client may take to send a request's head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How the proxy runs.
#[derive(Clone, Debug)]
pub struct ProxyOptions {
    /// Where it listens (loopback only).
    pub addr: SocketAddr,
    /// The `Host` header upstream.
    pub host_header: HostHeader,
}

/// Binds the proxy's listener; returns the server to run until `stop`, and the address it got
/// (port 0 asks for any).
pub async fn listen(
    options: ProxyOptions,
    engine: Arc<Engine>,
    stop: watch::Receiver<bool>,
) -> Result<(SocketAddr, impl std::future::Future<Output = Result<()>>)> {
    if !options.addr.ip().is_loopback() {
        bail!(
            "--proxy {} is not a loopback address: the names' proxy serves this machine only",
            options.addr
        );
    }
    let listener = TcpListener::bind(options.addr).await.with_context(|| {
        format!(
            "listening on {} for the names' proxy (--proxy ADDR)",
            options.addr
        )
    })?;
    let local = listener.local_addr()?;
    tracing::info!(address = %local, "serving the names' proxy");
    Ok((local, serve(listener, options, engine, stop)))
}

async fn serve(
    listener: TcpListener,
    options: ProxyOptions,
    engine: Arc<Engine>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let upstream = forward::Upstream::new(options.host_header);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    let builder = Arc::new(builder);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.context("the connection limit closed")?,
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
        let engine = engine.clone();
        let upstream = upstream.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let engine = engine.clone();
                let upstream = upstream.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(
                        forward::answer(request, peer, &engine, &upstream).await,
                    )
                }
            });
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                tracing::debug!(cause = %e, "a proxy connection ended early");
            }
            drop(slot);
        });
    }
}
