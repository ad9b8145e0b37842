//! What `Status` and the metrics report: the observer and its delays, endpoints, counters, the
//! kernel sessions' state, damage found at start.

use super::{lock, Engine};
use crate::metrics::Metrics;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

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
    /// Where the names' proxy listens, when it runs.
    pub proxy_listen: Option<String>,
    /// Where it serves HTTPS, when it does.
    pub proxy_tls_listen: Option<String>,
    /// The authority behind its HTTPS.
    pub local_ca: Option<std::sync::Arc<crate::proxy::LocalCa>>,
    /// Why an entry of the proxy that was asked for does not serve, when one does not.
    pub proxy_detail: Option<String>,
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
    pub fn set_observer(&self, status: ObserverStatus) {
        *lock(&self.observer) = status;
    }

    pub fn set_endpoints(&self, endpoints: Endpoints) {
        *lock(&self.endpoints) = endpoints;
    }

    /// Where the names' proxy listens (plain HTTP, HTTPS), each when it runs.
    pub fn proxy_listen(&self) -> (Option<String>, Option<String>) {
        let endpoints = lock(&self.endpoints);
        (
            endpoints.proxy_listen.clone(),
            endpoints.proxy_tls_listen.clone(),
        )
    }

    /// The authority behind the proxy's HTTPS, when it serves HTTPS.
    pub fn local_ca(&self) -> Option<std::sync::Arc<crate::proxy::LocalCa>> {
        lock(&self.endpoints).local_ca.clone()
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

    /// Delays (µs) between the kernel seeing binds and the broker applying them.
    pub fn record_observer_delays(&self, micros: impl IntoIterator<Item = u32>) {
        lock(&self.observer_delays).record(micros);
    }

    pub fn count_dropped(&self, n: u64) {
        self.dropped_events.fetch_add(n, Ordering::Relaxed);
        self.metrics.lost_records.inc_by(n);
    }

    /// (sessions with a live process in the kernel, and what that means or why there are none).
    pub fn kernel_session_status(&self) -> (Option<usize>, String) {
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
