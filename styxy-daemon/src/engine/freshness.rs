//! Keeping the broker's port table fresh: the kernel's per-port counts or a socket-table reading
//! for the ports at stake before a decision, observers' events applied, full resyncs.

use super::{lock, Engine};
use crate::clock::now_ms;
use crate::observe::PortCounts;
use std::sync::atomic::Ordering;
use styxy_broker::{BoundSocket, Effects, PortEvent, ProcessId, Protocol, Scope};

impl Engine {
    /// Point checks answer "nothing bound" from the kernel's per-port counts from now on.
    pub fn use_port_counts(&self, counts: Box<dyn PortCounts>) {
        let _ = self.port_counts.set(counts);
    }

    /// True when the kernel's per-port counts say nothing is bound on `port` right now.
    pub(super) fn kernel_counts_none(&self, port: u16, protocol: Option<Protocol>) -> bool {
        self.port_counts
            .get()
            .and_then(|counts| counts.bound(port, protocol))
            == Some(0)
    }

    /// True when the kernel's per-port counts exist and agree with the table on every port of
    /// `start..=end` (bound exactly where the table has a socket): a full reading would change
    /// nothing there. False without counts.
    pub(super) fn table_matches_kernel_counts(&self, start: u16, end: u16) -> bool {
        let Some(counts) = self.port_counts.get() else {
            return false;
        };
        // Read the counts first: without the mapping each is a syscall, not for under the lock.
        let Some(bound) = (start..=end)
            .map(|port| counts.bound(port, None).map(|n| n > 0))
            .collect::<Option<Vec<bool>>>()
        else {
            return false;
        };
        let broker = lock(&self.broker);
        (start..=end)
            .zip(bound)
            .all(|(port, bound)| bound == broker.has_socket_on(port))
    }

    /// True when the kernel's per-port counts say as many sockets are bound on `port` as the
    /// table holds there: the observer has applied every bind and release of that port, so the
    /// table is what a reading would give. (Were a bind and a release both still in flight, the
    /// counts would agree with a stale holder: the port is bound either way, only the name shown
    /// could lag, by the observer's delay.) False without counts.
    pub(super) fn table_current_for(&self, port: u16, protocol: Option<Protocol>) -> bool {
        let Some(kernel) = self.port_counts.get().and_then(|c| c.bound(port, protocol)) else {
            return false;
        };
        usize::try_from(kernel)
            .is_ok_and(|k| k == lock(&self.broker).socket_count_on(port, protocol))
    }

    /// Brings the table up to date for one port (or a range) from the kernel: its per-port counts
    /// when they say nothing is bound or agree with the table, else its socket tables.
    pub(super) fn refresh(&self, scope: Scope) {
        let reading = match scope {
            // Nothing bound: the reading a dump would give, without the dump.
            Scope::Port { port, protocol } if self.kernel_counts_none(port, protocol) => {
                Ok(Vec::new())
            }
            Scope::Port { port, protocol } if self.table_current_for(port, protocol) => return,
            Scope::Port { port, protocol } => self.kernel.read(Some(port), protocol),
            _ => self.kernel.read(None, None),
        };
        match reading {
            Ok(reading) => {
                self.commit_effects(|b| b.reconcile(scope, reading, now_ms()));
            }
            Err(e) => tracing::warn!("reading the kernel's socket tables: {e}"),
        }
    }

    /// Whether the kernel shows anything bound on `port` right now (any protocol).
    pub(super) fn kernel_shows_bound(&self, port: u16) -> bool {
        self.kernel_shows_bound_except(port, None, None)
    }

    /// Whether the kernel shows `port` bound right now (for `protocol`, or any) by anyone but
    /// `except` (a process that may bind its own port again, e.g. IPv6 next to IPv4); folds what
    /// it saw into the port table.
    pub(super) fn kernel_shows_bound_except(
        &self,
        port: u16,
        protocol: Option<Protocol>,
        except: Option<(ProcessId, styxy_broker::Family)>,
    ) -> bool {
        if self.kernel_counts_none(port, protocol) {
            return false;
        }
        // The table may miss a socket bound a moment ago by the asker's own sibling thread (a
        // move it is asking about again, its bind having failed): for a move, always the kernel.
        if except.is_none() && self.table_current_for(port, protocol) {
            return lock(&self.broker).has_socket_of_other(port, protocol, except);
        }
        match self.kernel.read(Some(port), protocol) {
            Ok(reading) if reading.is_empty() => false,
            Ok(reading) => {
                let by_other = reading
                    .iter()
                    .any(|s| !styxy_broker::is_own_other_family(s, except));
                let scope = Scope::Port { port, protocol };
                self.commit_effects(|b| b.reconcile(scope, reading, now_ms()));
                by_other
            }
            Err(e) => {
                tracing::warn!("checking port {port} in the kernel: {e}");
                false
            }
        }
    }

    // ---- observers ---------------------------------------------------------------------------------

    /// Events from an observer.
    pub fn apply_events(&self, events: Vec<PortEvent>) {
        self.observed_events
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        let now = now_ms();
        self.commit_effects(|b| {
            let mut effects = Effects::default();
            for event in events {
                effects.extend(b.apply(event, now));
            }
            effects
        });
    }

    /// A full reading of the kernel's socket tables.
    pub fn resync(&self) -> std::io::Result<()> {
        self.resync_reading().map(drop)
    }

    /// [`Engine::resync`], returning what the kernel showed.
    pub fn resync_reading(&self) -> std::io::Result<Vec<BoundSocket>> {
        let reading = self.kernel.read(None, None)?;
        self.commit_effects(|b| b.reconcile(Scope::All, reading.clone(), now_ms()));
        self.metrics.resyncs.inc();
        Ok(reading)
    }
}
