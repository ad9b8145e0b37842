//! The signals the kernel refused between sessions (see `bpf::protection`), read once a second:
//! logged, counted, and kept for the sending session's next report, so its agent is told once
//! why its `kill` failed and what to use instead.

use std::collections::{HashMap, VecDeque};

use styxy_common::protection::{signal_name, SignalRefusal};

use super::{lock, Engine};
use crate::bpf::protection::comm_text;

/// Refusals kept per session until its next report, and sessions with some kept: bounded, as
/// a process may send signals in a loop.
const KEPT_PER_SESSION: usize = 16;
const SESSIONS_KEPT: usize = 256;

/// A refused signal, as a session's report tells it.
#[derive(Clone, Debug)]
pub struct Refused {
    pub at_ms: u64,
    pub signal: String,
    pub sender_pid: u32,
    pub sender_comm: String,
    pub target_pid: u32,
    pub target_comm: String,
    pub target_instance_id: String,
    pub target_ports: Vec<u16>,
}

/// Refusals waiting for their session's report, and how many there were since start.
#[derive(Default)]
pub struct RefusedSignals {
    waiting: HashMap<String, VecDeque<Refused>>,
    total: u64,
}

impl Engine {
    /// Once a second: reads what the kernel refused since the last call.
    pub fn collect_refused_signals(&self) {
        let Some(kernel) = self.kernel_sessions.get() else {
            return;
        };
        let refused = kernel.refused_signals();
        if refused.is_empty() {
            return;
        }
        let now_ms = self.clock_ms();
        let holders = lock(&self.broker).holders();
        let mut log = lock(&self.refused_signals);
        for r in refused {
            log.total += 1;
            let sender = kernel.instance_of(r.sender_session).unwrap_or_default();
            let refusal = describe(&r, now_ms, kernel.instance_of(r.target_session), &holders);
            tracing::warn!(
                signal = %refusal.signal, sender = r.sender, sender_comm = %refusal.sender_comm,
                sender_session = %sender, target = r.target, target_comm = %refusal.target_comm,
                target_session = %refusal.target_instance_id,
                "refused a signal between sessions (lsm/task_kill)"
            );
            if sender.is_empty() {
                continue;
            }
            if log.waiting.len() >= SESSIONS_KEPT && !log.waiting.contains_key(&sender) {
                continue;
            }
            let queue = log.waiting.entry(sender).or_default();
            if queue.len() >= KEPT_PER_SESSION {
                queue.pop_front();
            }
            queue.push_back(refusal);
        }
    }

    /// The refusals waiting for `instance`'s report; unless `peek`, they are told now.
    pub fn take_refused_signals(&self, instance: &str, peek: bool) -> Vec<Refused> {
        let mut log = lock(&self.refused_signals);
        if peek {
            return log
                .waiting
                .get(instance)
                .map(|q| q.iter().cloned().collect())
                .unwrap_or_default();
        }
        log.waiting
            .remove(instance)
            .map(Vec::from)
            .unwrap_or_default()
    }

    /// Signals refused since the daemon started.
    pub fn refused_signal_count(&self) -> u64 {
        lock(&self.refused_signals).total
    }

    /// Whether the kernel refuses signals between sessions, and what that means or why not.
    pub fn kill_protection(&self) -> (bool, String) {
        match self.kernel_sessions.get() {
            Some(kernel) => {
                let protection = kernel.kill_protection();
                (protection.is_kernel(), protection.describe())
            }
            None => (
                false,
                crate::bpf::protection::KillProtection::Off(
                    "the kernel programs do not manage sessions here".to_string(),
                )
                .describe(),
            ),
        }
    }

    fn clock_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

fn describe(
    r: &SignalRefusal,
    now_ms: u64,
    target_instance: Option<String>,
    holders: &[styxy_broker::Held],
) -> Refused {
    let mut target_ports: Vec<u16> = holders
        .iter()
        .filter(|h| {
            h.socket
                .owner
                .as_ref()
                .is_some_and(|o| o.id.pid == r.target)
        })
        .map(|h| h.socket.port)
        .collect();
    target_ports.sort_unstable();
    target_ports.dedup();
    Refused {
        at_ms: now_ms,
        signal: signal_name(r.signal).map_or_else(|| format!("signal {}", r.signal), String::from),
        sender_pid: r.sender,
        sender_comm: comm_text(&r.sender_comm),
        target_pid: r.target,
        target_comm: comm_text(&r.target_comm),
        target_instance_id: target_instance.unwrap_or_default(),
        target_ports,
    }
}
