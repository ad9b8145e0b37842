//! Session views: what each agent session (instance) sees of the ports its processes were moved
//! off. A moved bind is right for its server and wrong for everyone who calls it — the session's
//! frontend, tests and `.env` still say the port it asked for — so, inside the session, loopback
//! traffic to the asked port goes to the bound one; outside it nothing changes.
//!
//! The view is derived, never stored on its own: an entry is a move's claim (taken by
//! `ResolveBind` for a process of an instance, with the port it asked for) that still stands. It
//! appears with the move, and ends when the moved socket is released or its process dies (the
//! claim's end). The enforcers read it from what the daemon publishes — the shim from the session
//! table, the kernel programs from their view maps; here it is plain data.

use std::collections::BTreeMap;

use crate::{Broker, Effects, Held, Protocol};

/// One moved port of a session: inside it (for the processes of the same user), `(protocol,
/// asked)` on loopback means `bound`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ViewEntry {
    /// The session (`STYXY_INSTANCE`) whose process was moved.
    pub instance_id: String,
    /// TCP or UDP: only traffic of this protocol is redirected.
    pub protocol: Protocol,
    /// The port the process asked for (and the session's clients still use).
    pub asked: u16,
    /// The port it was moved to and bound.
    pub bound: u16,
    /// The moved process (0 while its port is held between two lives of the server).
    pub pid: u32,
    /// Its user. A view applies to that user's processes only: another user who names the same
    /// session cannot redirect this user's traffic to a server of theirs.
    pub uid: u32,
}

/// What one view entry is for: a user's session, a protocol and an asked port.
type ViewKey<'a> = (&'a str, u32, Protocol, u16);

impl Broker {
    /// Every session's view, ordered by (instance, protocol, asked port). When one session moved
    /// two servers off the same port, the newest move is the one its clients reach.
    pub fn views(&self) -> Vec<ViewEntry> {
        let mut newest: BTreeMap<ViewKey<'_>, (u64, &str, ViewEntry)> = BTreeMap::new();
        for lease in self.leases() {
            // A hold (no process: the session's server between two lives) keeps its entry.
            let (Some(instance), Some(asked), Some(protocol)) = (
                lease.instance_id.as_deref(),
                lease.asked(),
                lease.protocol(),
            ) else {
                continue;
            };
            if !lease.is_claim() {
                continue;
            }
            // A server moved once for both protocols (a dev server's TCP and UDP on one port: a
            // claim is per port, recorded with its first bind's protocol) is reached by both.
            let mut protocols = vec![protocol];
            if let Some(owner) = lease.process {
                for held in self.sockets_on(lease.port, None) {
                    let own = held.socket.owner.as_ref().map(|o| o.id) == Some(owner);
                    if own && !protocols.contains(&held.socket.protocol) {
                        protocols.push(held.socket.protocol);
                    }
                }
            }
            for protocol in protocols {
                let entry = ViewEntry {
                    instance_id: instance.to_string(),
                    protocol,
                    asked,
                    bound: lease.port,
                    pid: lease.process.map_or(0, |p| p.pid),
                    uid: lease.owner_uid,
                };
                let rank = (lease.created_ms, lease.id.as_str());
                let key = (instance, lease.owner_uid, protocol, asked);
                if newest.get(&key).is_none_or(|(at, id, _)| (*at, *id) < rank) {
                    newest.insert(key, (rank.0, rank.1, entry));
                }
            }
        }
        newest.into_values().map(|(_, _, entry)| entry).collect()
    }

    /// Whether a socket bound or released changes a view: it is the moved process's socket on
    /// its claim's port (the view follows the protocols that process holds there).
    pub fn changes_a_view(&self, held: &Held) -> bool {
        self.leases.get(&held.socket.port).is_some_and(|l| {
            l.is_claim()
                && l.asked().is_some()
                && l.process.is_some()
                && l.process == held.socket.owner.as_ref().map(|o| o.id)
        })
    }

    /// One session's view.
    pub fn view_of(&self, instance_id: &str) -> Vec<ViewEntry> {
        let mut all = self.views();
        all.retain(|e| e.instance_id == instance_id);
        all
    }

    /// Ends the view entry of a moved socket that was just released: the move's claim goes once
    /// its process holds no other socket on the port (IPv4 and IPv6 of one server share it). A
    /// claim whose process never bound yet lapses by its TTL instead.
    pub(crate) fn end_view_entry_of(
        &mut self,
        released: &Held,
        now_ms: u64,
        effects: &mut Effects,
    ) {
        let Some(owner) = released.socket.owner.as_ref().map(|o| o.id) else {
            return;
        };
        let port = released.socket.port;
        let ends = self.leases.get(&port).is_some_and(|l| {
            l.is_claim()
                && l.asked().is_some()
                && l.process == Some(owner)
                && l.expires_ms.is_none()
        });
        let still_bound = self
            .sockets_on(port, None)
            .any(|h| h.socket.owner.as_ref().map(|o| o.id) == Some(owner));
        if ends && !still_bound {
            self.hold_or_end(port, now_ms, effects);
        }
    }
}
