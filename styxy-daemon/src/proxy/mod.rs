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

/// Binds the proxy's listener; returns the address it got (port 0 asks for any) and the
/// server to run until `stop`. The server is one single-threaded runtime per core, each
/// accepting on its own copy of the listener, so a request lives on one thread from the client's
/// read to the upstream's answer (its client connection and its pooled upstream connection are
/// that thread's): on a shared work-stealing runtime the proxy added 46–54 µs at p50 over a
/// direct connection (`styxy-bench proxy`); see the README for what it adds this way.
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
    let listener = listener.into_std().context("taking the proxy's listener")?;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut finished = Vec::new();
    for n in 0..threads {
        let listener = listener
            .try_clone()
            .context("sharing the proxy's listener")?;
        let (options, engine, stop, slots) =
            (options.clone(), engine.clone(), stop.clone(), slots.clone());
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
                        let listener = TcpListener::from_std(listener)
                            .context("registering the proxy's listener")?;
                        serve(listener, options, engine, slots, stop).await
                    })
                })();
                let _ = done.send(outcome);
            })
            .context("starting a proxy thread")?;
        finished.push(result);
    }
    Ok((local, async move {
        for result in finished {
            result.await.context("a proxy thread ended")??;
        }
        Ok(())
    }))
}

/// One thread's accept loop.
async fn serve(
    listener: TcpListener,
    options: ProxyOptions,
    engine: Arc<Engine>,
    slots: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let upstream = forward::Upstream::new(options.host_header);
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
