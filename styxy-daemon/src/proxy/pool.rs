//! The proxy's HTTP/1.1 connections to named servers, kept alive between requests. Each proxy
//! thread keeps its own idle ones (a connection's task runs on the thread that opened it, and
//! so does every request that uses it), found by address in a short list: no lock, no hashing.
//! A connection goes back to its thread's list when its answer's body has ended, and is taken
//! again only when hyper says it is ready for another request; one the server closed meanwhile
//! is skipped, and a request that could not be written on it goes on another (the race with a
//! server closing an idle connection: Node closes them after 5 s).
//!
//! Replaces hyper-util's pooled client, whose checkout and return — hashing the authority
//! three times, and one task spawned per request to wait for the connection to be ready again
//! — cost about 7,000 of the proxy's 47,000 instructions per keep-alive GET (callgrind over
//! 2,000 GETs through a release daemon); see the README for the latency with each.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

/// How long an idle connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The most idle connections one thread keeps (to all servers together); beyond, the oldest
/// is closed.
pub const MAX_IDLE: usize = 64;
/// How long connecting to a named server may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a request got no answer from its server.
pub type SendError = Box<dyn std::error::Error + Send + Sync>;

/// An idle connection of this thread's.
struct Idle {
    target: SocketAddr,
    sender: SendRequest<Incoming>,
    since: Instant,
}

thread_local! {
    /// This thread's idle connections, the most recently used last.
    static IDLE: RefCell<Vec<Idle>> = const { RefCell::new(Vec::new()) };
}

/// Sends `request` (origin-form, its `Host` set) to `target` over one of this thread's idle
/// connections to it, else a new one: the answer, whose body gives the connection back when it
/// ends.
pub async fn send(
    target: SocketAddr,
    mut request: Request<Incoming>,
) -> Result<Response<PooledBody>, SendError> {
    while let Some(mut sender) = take_idle(target) {
        match sender.try_send_request(request).await {
            Ok(response) => return Ok(pooled(response, target, sender)),
            Err(mut failed) => match failed.take_message() {
                // Not written: the connection closed before it could be; another one.
                Some(unsent) => request = unsent,
                None => return Err(failed.into_error().into()),
            },
        }
    }
    let mut sender = connect(target).await?;
    let response = sender.send_request(request).await?;
    Ok(pooled(response, target, sender))
}

/// A new connection to `target`, its task spawned on this thread's runtime (upgrades allowed:
/// a WebSocket's `101` hands the connection to the tunnel).
async fn connect(target: SocketAddr) -> Result<SendRequest<Incoming>, SendError> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(target))
        .await
        .map_err(|_| format!("connecting to {target} took more than {CONNECT_TIMEOUT:?}"))??;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            tracing::debug!(cause = %e, "a connection to a named server ended");
        }
    });
    Ok(sender)
}

/// The most recently used of this thread's idle connections to `target` that is ready for a
/// request, taken out of the list.
fn take_idle(target: SocketAddr) -> Option<SendRequest<Incoming>> {
    IDLE.with_borrow_mut(|idle| {
        let at = idle
            .iter()
            .rposition(|c| c.target == target && c.sender.is_ready())?;
        Some(idle.remove(at).sender)
    })
}

/// Keeps `sender` for another request, unless it is closed.
fn give_back(target: SocketAddr, sender: SendRequest<Incoming>) {
    if sender.is_closed() {
        return;
    }
    IDLE.with_borrow_mut(|idle| {
        if idle.len() >= MAX_IDLE {
            idle.remove(0);
        }
        idle.push(Idle {
            target,
            sender,
            since: Instant::now(),
        });
    });
}

/// Closes this thread's connections that are closed or have been idle too long (run
/// periodically by each proxy thread).
pub fn sweep() {
    let now = Instant::now();
    IDLE.with_borrow_mut(|idle| {
        idle.retain(|c| !c.sender.is_closed() && now.duration_since(c.since) < IDLE_TIMEOUT)
    });
}

/// This thread's idle connections (for tests).
#[cfg(test)]
fn idle_count() -> usize {
    IDLE.with_borrow(Vec::len)
}

/// `response` with a body that gives `sender` back when it ends; a switch of protocols keeps
/// the connection for the tunnel instead.
fn pooled(
    response: Response<Incoming>,
    target: SocketAddr,
    sender: SendRequest<Incoming>,
) -> Response<PooledBody> {
    let back = (response.status() != StatusCode::SWITCHING_PROTOCOLS).then_some((target, sender));
    response.map(|inner| PooledBody { inner, back })
}

/// A named server's answer's body, streamed as it comes; once it has ended, its connection is
/// kept for the next request. One dropped before its end closes the connection (its server may
/// still be sending).
pub struct PooledBody {
    inner: Incoming,
    back: Option<(SocketAddr, SendRequest<Incoming>)>,
}

impl PooledBody {
    fn ended(&mut self) {
        if let Some((target, sender)) = self.back.take() {
            give_back(target, sender);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = frame {
            self.ended();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // An empty body (a `HEAD`'s, a `204`'s) is never polled: it has ended all the same.
        if self.inner.is_end_stream() {
            self.ended();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A server on loopback answering `answer` to each request head; counts its connections.
    /// `close_after` answers: it closes a connection after that many.
    fn server(answer: &'static str, close_after: usize) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                counted.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || serve(stream, answer, close_after));
            }
        });
        (addr, accepted)
    }

    fn serve(mut stream: std::net::TcpStream, answer: &str, close_after: usize) {
        let mut seen = Vec::new();
        let mut chunk = [0u8; 4096];
        let mut answered = 0;
        while answered < close_after {
            let Ok(n) = stream.read(&mut chunk) else {
                return;
            };
            if n == 0 {
                return;
            }
            seen.extend_from_slice(&chunk[..n]);
            while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                seen.drain(..end + 4);
                if stream.write_all(answer.as_bytes()).is_err() {
                    return;
                }
                answered += 1;
            }
        }
    }

    /// A GET to send upstream, its body an empty `Incoming` as the proxy's are — one can only
    /// come from hyper, so from a request it parsed — and the connection it came on (kept
    /// open while the request is used).
    async fn get(path: &str) -> (Request<Incoming>, tokio::net::TcpStream) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tx = std::sync::Mutex::new(Some(tx));
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                if let Some(tx) = tx.lock().unwrap().take() {
                    let _ = tx.send(request);
                }
                async { Ok::<_, std::convert::Infallible>(Response::new(String::new())) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(
            &mut client,
            format!("GET {path} HTTP/1.1\r\nHost: example.localhost\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        (rx.await.unwrap(), client)
    }

    async fn body_of(response: Response<PooledBody>) -> String {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn sequential_requests_share_one_connection() {
        let (target, accepted) = server("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 1000);
        for _ in 0..50 {
            let response = {
                let (request, _client) = get("/x").await;
                send(target, request).await.unwrap()
            };
            assert_eq!(body_of(response).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(idle_count(), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_the_server_closed_is_not_used_again() {
        // The server answers once per connection and closes it without saying so.
        let (target, accepted) = server("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 1);
        for n in 1..=5 {
            let response = {
                let (request, _client) = get("/x").await;
                send(target, request).await.unwrap()
            };
            assert_eq!(body_of(response).await, "ok", "request {n}");
            // Let the connection's task see the server's end.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
        sweep();
        assert_eq!(idle_count(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_answer_dropped_before_its_end_does_not_come_back() {
        let (target, _) = server(
            "HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\nonly a little",
            1000,
        );
        let response = {
            let (request, _client) = get("/x").await;
            send(target, request).await.unwrap()
        };
        drop(response);
        assert_eq!(idle_count(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_empty_answer_gives_its_connection_back() {
        let (target, accepted) = server("HTTP/1.1 204 No Content\r\n\r\n", 1000);
        for _ in 0..3 {
            let response = {
                let (request, _client) = get("/x").await;
                send(target, request).await.unwrap()
            };
            assert_eq!(response.status(), StatusCode::NO_CONTENT);
            drop(response);
            tokio::task::yield_now().await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }
}
