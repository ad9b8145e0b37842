//! Which connections the daemon takes on its Unix socket. Each user (root included) may hold at
//! most [`PER_USER`] at once, and all together at most what its descriptor limit allows with
//! [`RESERVE`] descriptors kept back for its own work (journal, `/proc`, pidfds, eBPF). A
//! connection over a cap is closed at once — never queued — counted, and logged (now and then).
//! Without this, one user holding ~20,000 idle connections exhausted the daemon's descriptors.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use tokio::net::UnixStream;

/// Connections one user may hold at once.
pub(super) const PER_USER: usize = 256;
/// Descriptors kept back from connections for the daemon's own work.
const RESERVE: usize = 128;

/// The counts behind the caps, shared by every server thread.
pub(super) struct Admission {
    per_user: Mutex<HashMap<u32, usize>>,
    total: Mutex<usize>,
    total_cap: usize,
    refused: Counter,
    logged: AtomicU64,
}

/// A connection's place; given back when the connection closes.
pub(super) struct Slot {
    admission: Arc<Admission>,
    uid: u32,
}

impl Admission {
    /// Caps from the daemon's open-file limit; refusals count into `refused`.
    pub(super) fn new(refused: Counter) -> Arc<Admission> {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one plain struct.
        let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
        } else {
            1024
        };
        Arc::new(Admission {
            per_user: Mutex::new(HashMap::new()),
            total: Mutex::new(0),
            total_cap: soft.saturating_sub(RESERVE).max(16),
            refused,
            logged: AtomicU64::new(0),
        })
    }

    /// A slot for `stream`, or `None` when its user (known from SO_PEERCRED) or everyone is at
    /// the cap; the caller then drops the stream, which closes it.
    pub(super) fn admit(self: &Arc<Self>, stream: &UnixStream) -> Option<Slot> {
        let uid = stream.peer_cred().map_or(u32::MAX, |c| c.uid());
        let mut total = self.total.lock().unwrap_or_else(|e| e.into_inner());
        let mut per_user = self.per_user.lock().unwrap_or_else(|e| e.into_inner());
        let mine = per_user.entry(uid).or_default();
        if *mine >= PER_USER || *total >= self.total_cap {
            let (held, all) = (*mine, *total);
            drop(per_user);
            drop(total);
            self.refused.inc();
            let refused = self.logged.fetch_add(1, Ordering::Relaxed);
            if refused.is_multiple_of(100) {
                tracing::warn!(
                    uid,
                    held,
                    all,
                    per_user = PER_USER,
                    total_cap = self.total_cap,
                    refused = refused + 1,
                    "refusing a connection: its user, or everyone, holds as many as the daemon takes"
                );
            }
            return None;
        }
        *mine += 1;
        *total += 1;
        Some(Slot {
            admission: self.clone(),
            uid,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut total = self
            .admission
            .total
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *total = total.saturating_sub(1);
        let mut per_user = self
            .admission
            .per_user
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(held) = per_user.get_mut(&self.uid) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                per_user.remove(&self.uid);
            }
        }
    }
}
