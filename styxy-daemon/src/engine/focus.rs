//! The focus (`styxy focus`): a user gives a session's view to their processes outside every
//! session. The broker decides and keeps it (with the session); the kernel programs follow it;
//! here the connections that still reach the old destinations are closed after a switch.

use std::collections::HashSet;

use styxy_broker::{retargets, Retarget};

use super::{lift, lock, Engine, EngineError};

/// What a focus request did (or, for a look, what stands).
#[derive(Clone, Debug, Default)]
pub struct FocusOutcome {
    /// The session focused before, if any.
    pub before: Option<String>,
    /// The session focused now, if any.
    pub after: Option<String>,
    /// The TCP ports whose destination changed (for a look: what the focus redirects).
    pub retargets: Vec<Retarget>,
    /// Connections to the old destinations that were closed.
    pub closed: usize,
}

impl Engine {
    /// Why the focus cannot be followed here, if it cannot.
    fn focus_unavailable(&self) -> Option<String> {
        if self.kernel_sessions.get().is_some() {
            return None;
        }
        Some(format!(
            "the focus needs the kernel programs (the root daemon with eBPF): {}; a session's \
             servers are reachable by name meanwhile (http://<session>.localhost through the \
             daemon's proxy, see `styxy status`)",
            lock(&self.kernel_sessions_missing)
        ))
    }

    /// `uid` gives the focus to the session `handle` names (`Some`), or gives it up (`None`).
    pub async fn set_focus(
        &self,
        handle: Option<&str>,
        uid: u32,
    ) -> Result<FocusOutcome, EngineError> {
        if let Some(why) = self.focus_unavailable() {
            return Err(EngineError::Unavailable(why));
        }
        let (decided, ticket) = self.commit(|b| {
            let result = match handle {
                Some(handle) => b.set_focus(handle, uid),
                None => Ok(b.clear_focus(uid)),
            };
            let (result, effects) = lift(result);
            let outcome = result.map(|change| {
                let view =
                    |id: &Option<String>| id.as_deref().map(|id| b.view_of(id)).unwrap_or_default();
                FocusOutcome {
                    retargets: retargets(&view(&change.before), &view(&change.after)),
                    before: change.before,
                    after: change.after,
                    closed: 0,
                }
            });
            (outcome, effects)
        });
        let mut outcome = decided?;
        // The kernel follows the new focus (published in the commit): what still reaches an old
        // destination is closed now, so the next connection goes to the new one.
        if outcome.before != outcome.after {
            outcome.closed = self.close_retargeted(uid, &outcome.retargets).await;
        }
        self.wait_durable(ticket).await?;
        Ok(outcome)
    }

    /// Every user's focus.
    pub fn focuses(&self) -> Vec<styxy_broker::Focus> {
        lock(&self.broker).focuses()
    }

    /// The session `uid` focuses and what its view redirects.
    pub fn focus_of(&self, uid: u32) -> FocusOutcome {
        let broker = lock(&self.broker);
        let after = broker.focus_of(uid).map(|i| i.id.clone());
        let view = after
            .as_deref()
            .map(|id| broker.view_of(id))
            .unwrap_or_default();
        FocusOutcome {
            before: after.clone(),
            retargets: retargets(&[], &view),
            after,
            closed: 0,
        }
    }

    /// Closes `uid`'s loopback connections to the old destinations of `retargets`, but for those
    /// of the sessions' processes (they keep their own views) and the daemon's own (its proxy).
    pub(super) async fn close_retargeted(&self, uid: u32, retargets: &[Retarget]) -> usize {
        let ports: HashSet<u16> = retargets.iter().map(|r| r.from).collect();
        let tasks = self
            .kernel_sessions
            .get()
            .map(|k| k.session_tasks())
            .unwrap_or_default();
        let spared =
            || crate::closing::socket_inodes_of(tasks.into_iter().chain([std::process::id()]));
        // Netlink and /proc reads: off the async workers (the Unix socket's are single-threaded).
        let closing = tokio::task::spawn_blocking(move || {
            crate::closing::close_connections(uid, &ports, spared)
        });
        match closing.await {
            Ok(Ok(closed)) => closed,
            Ok(Err(e)) => {
                tracing::warn!(cause = %e, "the connections to the old focus could not be listed (sock_diag): they stay open");
                0
            }
            Err(e) => {
                tracing::warn!(cause = %e, "closing the connections to the old focus failed: they stay open");
                0
            }
        }
    }
}
