//! Between two lives of a session's server: its port is held for its session.
//!
//! A dev server restarts all the time (an autoreloader, Ctrl-C and up-arrow, a crash loop). When
//! a session's server stops, the port it listened on — the asked one, or the one it was moved to
//! — stays the session's for [`LeaseSettings::restart_hold_ms`] while the session lives: a claim
//! with no process (a *hold*). Meanwhile
//! - another session's server asking that port is moved, as if the port were bound;
//! - the session's own clients find nothing there ("connection refused"), and through its view a
//!   moved port still leads there, instead of to another session's server that took the port;
//! - the session's next server for the asked port takes the hold back: the same port as before,
//!   for the browser tab and the bookmark.
//!
//! A hold ends when its time is up, when its session ends, or when a server of the session takes
//! it back (then it lives with that server, as any claim).
//!
//! [`LeaseSettings::restart_hold_ms`]: crate::LeaseSettings::restart_hold_ms

use crate::{Broker, Effects, Held, Lease, LeaseKind, Protocol};

impl Broker {
    /// Whether `instance` is a registered session that `uid`'s ports may be held for: its owner's
    /// (any user's, in root's sessions). Session names are global: another user naming the same
    /// session holds nothing in it.
    fn session_lives_for(&self, instance: &str, uid: u32) -> bool {
        self.instances
            .get(instance)
            .is_some_and(|i| i.owner_uid == 0 || i.owner_uid == uid)
    }

    /// Whether `lease`, a claim whose server is gone, is held for its session (rather than
    /// ending): its session lives and holds are on.
    pub(crate) fn is_held_when_its_server_goes(&self, lease: &Lease) -> bool {
        lease.is_claim()
            && self.settings.restart_hold_ms > 0
            && lease
                .instance_id
                .as_deref()
                .is_some_and(|i| self.session_lives_for(i, lease.owner_uid))
    }

    /// A claim of a live session that is about to end with its server (its socket released, or
    /// its process gone) becomes a hold; any other ends. True when it was held.
    pub(crate) fn hold_or_end(&mut self, port: u16, now_ms: u64, effects: &mut Effects) -> bool {
        let hold_ms = self.settings.restart_hold_ms;
        let held = match self.leases.get(&port) {
            Some(lease) if self.is_held_when_its_server_goes(lease) => Lease {
                process: None,
                expires_ms: Some(now_ms.saturating_add(hold_ms)),
                ..lease.clone()
            },
            Some(_) => {
                if let Some(lease) = self.take_lease(port) {
                    effects.lease_removed(lease);
                }
                return false;
            }
            None => return false,
        };
        effects.lease_put(&held);
        self.leases.insert(port, held);
        true
    }

    /// A socket of a session's process was released from a port nobody else claims (it bound it
    /// free, with no claim): the port is held for its session too.
    pub(crate) fn hold_released_port(
        &mut self,
        released: &Held,
        now_ms: u64,
        effects: &mut Effects,
    ) {
        let socket = &released.socket;
        let hold_ms = self.settings.restart_hold_ms;
        let instance = released
            .instance_id
            .clone()
            .or_else(|| socket.owner.as_ref().and_then(|o| o.instance_id.clone()));
        let Some(instance) = instance.filter(|i| self.session_lives_for(i, socket.uid)) else {
            return;
        };
        let in_a_range = self.ranges.type_of_port(socket.port).is_some();
        let still_bound = self.sockets_on(socket.port, None).next().is_some();
        if hold_ms == 0 || !in_a_range || still_bound || self.leases.contains_key(&socket.port) {
            return;
        }
        let hold = Lease {
            id: self.new_lease_id(),
            port: socket.port,
            service_type: self.ranges.move_range(socket.port).service_type,
            owner_uid: socket.uid,
            process: None,
            instance_id: Some(instance),
            created_ms: now_ms,
            expires_ms: Some(now_ms.saturating_add(hold_ms)),
            kind: LeaseKind::Claim {
                asked: None,
                protocol: Some(socket.protocol),
            },
        };
        effects.lease_put(&hold);
        self.insert_lease(hold);
    }

    /// The port `instance` holds for `uid`'s servers that ask `asked` (`protocol`), when nothing
    /// but exited processes is bound there: where its next one goes. A claim whose process has
    /// exited counts already (the sweep that makes it a hold may not have run yet), and so does a
    /// socket of an exited process (the observer may not have seen it go: an autoreloader starts
    /// its next child at once). The daemon reads the kernel before it answers with the port.
    pub(crate) fn held_for(
        &self,
        instance: &str,
        uid: u32,
        asked: u16,
        protocol: Protocol,
        processes: &dyn crate::ProcessView,
    ) -> Option<u16> {
        self.leases
            .values()
            .filter(|l| {
                l.is_claim()
                    && l.owner_uid == uid
                    && l.process.is_none_or(|p| !processes.is_alive(p))
                    && l.instance_id.as_deref() == Some(instance)
                    && l.protocol().is_none_or(|p| p == protocol)
                    && l.asked().unwrap_or(l.port) == asked
            })
            .map(|l| l.port)
            .find(|port| self.bound_only_by_the_exited(*port, processes))
    }

    /// Whether every socket the table shows on `port` (if any) belongs to a process that has
    /// exited: the table is behind, not the port taken. A socket of an unknown owner counts as
    /// live.
    pub(crate) fn bound_only_by_the_exited(
        &self,
        port: u16,
        processes: &dyn crate::ProcessView,
    ) -> bool {
        self.sockets_on(port, None).all(|h| {
            h.socket
                .owner
                .as_ref()
                .is_some_and(|o| !processes.is_alive(o.id))
        })
    }

    /// The hold on `port` (or the claim of an exited server of the session) goes to process `me`
    /// (its session's new server): it lives with it from now on, as the claim it was.
    pub(crate) fn take_hold(
        &mut self,
        port: u16,
        me: crate::ProcessId,
        now_ms: u64,
        effects: &mut Effects,
    ) {
        let Some(lease) = self.leases.get(&port).filter(|l| l.is_claim()) else {
            return;
        };
        let taken = Lease {
            process: Some(me),
            expires_ms: Some(now_ms.saturating_add(self.settings.claim_ttl_ms)),
            ..lease.clone()
        };
        effects.lease_put(&taken);
        self.leases.insert(port, taken);
    }

    /// The holds of `instance` (a session that ended) end with it.
    pub(crate) fn end_holds_of(&mut self, instance: &str, effects: &mut Effects) {
        let ports: Vec<u16> = self
            .leases
            .values()
            .filter(|l| {
                l.is_claim() && l.process.is_none() && l.instance_id.as_deref() == Some(instance)
            })
            .map(|l| l.port)
            .collect();
        for port in ports {
            if let Some(lease) = self.take_lease(port) {
                effects.lease_removed(lease);
            }
        }
    }
}
