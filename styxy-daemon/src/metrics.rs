//! What the daemon exposes to operators, in the OpenMetrics text format (Prometheus scrapes it):
//! binds seen, moves, leases and claims by service type, RPCs by method and status code,
//! `ResolveBind` latency, lost eBPF records, resyncs, refused connections, the names' proxy's
//! WebSockets and polling time, the observer in use and the live heap. Counters are kept as
//! things happen; the lease, observer and heap gauges, and the proxy's polling time (counted by
//! the proxy itself), are read when scraped.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use styxy_broker::Broker;

/// An RPC's method and gRPC status code (`OK`, `INVALID_ARGUMENT`, …).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub method: &'static str,
    pub code: String,
}

/// How a client's WebSocket reached the proxy: `http/1.1` (an upgrade) or `h2` (RFC 8441's
/// extended CONNECT).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebSocketLabels {
    pub over: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LeaseLabels {
    kind: &'static str,
    service_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ObserverLabels {
    observer: String,
}

/// The daemon's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// gRPC calls answered, by method and status code.
    pub rpcs: Family<RpcLabels, Counter>,
    /// How long `ResolveBind` took, from request to answer.
    pub resolve_bind_seconds: Histogram,
    /// Sockets the observers saw bound.
    pub binds_seen: Counter,
    /// Binds moved off a held port.
    pub moves: Counter,
    /// Full readings of the kernel's socket tables.
    pub resyncs: Counter,
    /// eBPF records the kernel could not hand over (ring buffer full).
    pub lost_records: Counter,
    /// Connections refused at once: their user, or everyone, held as many as the daemon takes.
    pub refused_connections: Counter,
    /// WebSockets the names' proxy opened to a named server, by how the client asked.
    pub proxy_websockets: Family<WebSocketLabels, Counter>,
    /// Wall time the names' proxy's threads spent polling after traffic (`--proxy-spin-us`),
    /// read from the proxy at each scrape.
    proxy_polled_seconds: Counter<f64, AtomicU64>,
    leases: Family<LeaseLabels, Gauge>,
    observer: Family<ObserverLabels, Gauge>,
    heap_live_bytes: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let metrics = Metrics {
            registry: Mutex::new(Registry::with_prefix("styxy")),
            rpcs: Family::default(),
            // 10 µs to ~0.3 s, doubling.
            resolve_bind_seconds: Histogram::new(exponential_buckets(0.000_01, 2.0, 15)),
            binds_seen: Counter::default(),
            moves: Counter::default(),
            resyncs: Counter::default(),
            lost_records: Counter::default(),
            refused_connections: Counter::default(),
            proxy_websockets: Family::default(),
            proxy_polled_seconds: Counter::default(),
            leases: Family::default(),
            observer: Family::default(),
            heap_live_bytes: Gauge::default(),
        };
        {
            let mut r = metrics.registry.lock().unwrap_or_else(|e| e.into_inner());
            r.register(
                "rpcs",
                "gRPC calls answered, by method and status code",
                metrics.rpcs.clone(),
            );
            r.register(
                "proxy_websockets",
                "WebSockets the names' proxy opened to a named server, by how the client asked (http/1.1 upgrade, h2 extended CONNECT)",
                metrics.proxy_websockets.clone(),
            );
            r.register(
                "proxy_polled_seconds",
                "Wall time the names' proxy's threads spent polling after traffic instead of sleeping (--proxy-spin-us)",
                metrics.proxy_polled_seconds.clone(),
            );
            r.register(
                "resolve_bind_seconds",
                "Time to answer ResolveBind (the shim's question)",
                metrics.resolve_bind_seconds.clone(),
            );
            r.register(
                "binds_seen",
                "Sockets the observers saw bound",
                metrics.binds_seen.clone(),
            );
            r.register(
                "moves",
                "Binds moved off a held port",
                metrics.moves.clone(),
            );
            r.register(
                "resyncs",
                "Full readings of the kernel's socket tables",
                metrics.resyncs.clone(),
            );
            r.register(
                "lost_records",
                "eBPF records lost to a full ring buffer (each followed by a resync)",
                metrics.lost_records.clone(),
            );
            r.register(
                "leases",
                "Live leases and claims, by kind and service type",
                metrics.leases.clone(),
            );
            r.register(
                "observer",
                "The observer in use (1 for it)",
                metrics.observer.clone(),
            );
            if crate::heap::live_bytes().is_some() {
                r.register(
                    "heap_live_bytes",
                    "Bytes the daemon holds on its heap (not what the allocator keeps free for reuse)",
                    metrics.heap_live_bytes.clone(),
                );
            }
        }
        metrics
    }
}

impl Metrics {
    /// Counts an answered RPC.
    pub fn count_rpc(&self, method: &'static str, code: tonic::Code) {
        let code = format!("{code:?}");
        self.rpcs
            .get_or_create(&RpcLabels {
                method,
                code: screaming_snake(&code),
            })
            .inc();
    }

    /// The text a scrape gets: the gauges read from `broker`, `observer` and the heap now.
    pub fn render(&self, broker: &Broker, observer: &str) -> String {
        self.leases.clear();
        for lease in broker.leases() {
            self.leases
                .get_or_create(&LeaseLabels {
                    kind: if lease.is_claim() { "claim" } else { "lease" },
                    service_type: lease.service_type.clone(),
                })
                .inc();
        }
        self.observer.clear();
        self.observer
            .get_or_create(&ObserverLabels {
                observer: observer.to_string(),
            })
            .set(1);
        if let Some(live) = crate::heap::live_bytes() {
            self.heap_live_bytes
                .set(i64::try_from(live).unwrap_or(i64::MAX));
        }
        let mut text = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Brought up to the proxy's own count under the registry's lock: two scrapes at once
        // do not both add the same time.
        let polled = crate::proxy::polled().as_secs_f64() - self.proxy_polled_seconds.get();
        if polled > 0.0 {
            self.proxy_polled_seconds.inc_by(polled);
        }
        if let Err(e) = encode(&mut text, &registry) {
            tracing::warn!(cause = %e, "encoding the metrics");
        }
        text
    }
}

/// `InvalidArgument` → `INVALID_ARGUMENT`, as gRPC names its codes.
fn screaming_snake(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_read_as_grpc_names_them_and_the_text_ends_as_openmetrics_does() {
        assert_eq!(screaming_snake("InvalidArgument"), "INVALID_ARGUMENT");
        assert_eq!(screaming_snake("Ok"), "OK");
        let metrics = Metrics::default();
        metrics.count_rpc("Suggest", tonic::Code::InvalidArgument);
        metrics.moves.inc();
        let broker = Broker::new(Default::default(), Default::default());
        let text = metrics.render(&broker, "ebpf");
        assert!(
            text.contains(r#"styxy_rpcs_total{method="Suggest",code="INVALID_ARGUMENT"} 1"#),
            "{text}"
        );
        assert!(text.contains("styxy_moves_total 1"), "{text}");
        assert!(
            text.contains(r#"styxy_observer{observer="ebpf"} 1"#),
            "{text}"
        );
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
    }
}
