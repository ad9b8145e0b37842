//! Busy-polling while traffic flows: after each request, answer or tunnelled read, a proxy
//! thread keeps polling its sockets without sleeping for a short window (`--proxy-spin-us`),
//! so the next event is picked up at once instead of by a wake-up. On loopback a wake-up is most
//! of what a hop costs: a relay that only copies bytes between two blocking threads added as
//! much to a keep-alive GET as the whole direct round trip (`styxy-bench proxy`, see the
//! README for the figures with and without the window). Idle, nothing spins: the window opens
//! only on traffic and closes a window's length after the last of it, so the cost is at most
//! one window of one core per burst of traffic.
//!
//! Each proxy thread runs a current-thread runtime, so the state is the thread's own: a task
//! ([`run`]) that, while the window is open, yields to the runtime — which then polls its I/O
//! driver without blocking before running it again — and otherwise waits for [`activity`].

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

thread_local! {
    /// How long this thread polls after the last activity; zero: never.
    static WINDOW: Cell<Duration> = const { Cell::new(Duration::ZERO) };
    /// When this thread's window closes.
    static HOT_UNTIL: Cell<Option<Instant>> = const { Cell::new(None) };
    /// The spinning task, while it waits for activity.
    static SLEEPER: RefCell<Option<Waker>> = const { RefCell::new(None) };
}

/// The wall time the proxy's threads have spent polling, in ns (added when a window closes).
static POLLED_NS: AtomicU64 = AtomicU64::new(0);

/// The wall time the proxy's threads have spent polling (the metric `proxy_polled_seconds`):
/// how a test tells a polling proxy from a sleeping one on a busy machine, where a polling
/// thread, yielding its core to others, gets little CPU time but polls for its whole window.
pub fn polled() -> Duration {
    Duration::from_nanos(POLLED_NS.load(Ordering::Relaxed))
}

/// Marks traffic on this thread: its window opens (or stays open) for the window's length.
pub fn activity() {
    let window = WINDOW.get();
    if window.is_zero() {
        return;
    }
    HOT_UNTIL.set(Some(Instant::now() + window));
    if let Some(sleeper) = SLEEPER.take() {
        sleeper.wake();
    }
}

/// Whether this thread's window is open.
fn hot() -> bool {
    HOT_UNTIL.get().is_some_and(|until| Instant::now() < until)
}

/// Polls this thread's runtime without sleeping while its window is open (`window` zero: it
/// returns at once and nothing spins). Runs as long as the runtime.
pub async fn run(window: Duration) {
    WINDOW.set(window);
    if window.is_zero() {
        return;
    }
    loop {
        if hot() {
            let opened = Instant::now();
            while hot() {
                // Another thread ready to run on this core goes first: a spinning proxy must
                // not slow the servers and clients it waits for (with 32 clients on two cores,
                // one run spinning without this gave 0.99× and 0.64× a sleeping proxy's
                // throughput; with it, and the host quiet, 1.14× and 1.21×).
                std::thread::yield_now();
                // The runtime runs what is ready, polls its driver without blocking, then this.
                tokio::task::yield_now().await;
            }
            let polled = u64::try_from(opened.elapsed().as_nanos()).unwrap_or(u64::MAX);
            POLLED_NS.fetch_add(polled, Ordering::Relaxed);
            continue;
        }
        poll_fn(|cx| {
            if hot() {
                return Poll::Ready(());
            }
            SLEEPER.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await;
    }
}

/// A stream whose reads are traffic: a tunnel's two ends, so a WebSocket's messages keep the
/// window open both ways.
pub struct Active<S>(pub S);

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Active<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = std::pin::Pin::new(&mut self.0).poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            activity();
        }
        read
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Active<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
