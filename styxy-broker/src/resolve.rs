//! `ResolveBind`: whether a `bind()` keeps its port or moves, and where — the port a moved
//! process had before, its project's sticky port, or the next free one of its range.

use crate::{
    AuditRecord, Broker, BrokerError, Effects, Family, Held, Lease, LeaseKind, Notice, PortRange,
    ProcessId, ProcessInfo, ProcessView, Protocol, StickyKey,
};

/// Who holds a port, as told to a process whose bind was moved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HolderView {
    /// A socket bound in the kernel.
    Socket(Held),
    /// A lease or a claim, not bound yet.
    Lease(Lease),
}

/// What `ResolveBind` tells the shim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BindDecision {
    /// Bind the port asked for.
    Keep {
        /// The port asked for.
        port: u16,
    },
    /// Bind `port` instead: the one asked for is held.
    Reassign {
        /// The free port picked in the asked port's range.
        port: u16,
        /// Who holds the asked port, when known.
        holder: Option<HolderView>,
    },
}

/// A `bind()` about to happen, as the shim reported it and the daemon identified the asker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindRequest {
    /// The process that is about to bind.
    pub asker: ProcessInfo,
    /// Its user, as the transport identified it.
    pub uid: u32,
    /// The port it asked for.
    pub port: u16,
    /// TCP or UDP: the two protocols' ports are separate.
    pub protocol: Protocol,
    /// IPv4 or IPv6: a process's own socket on a port is in its way only in the same family.
    pub family: Family,
    /// The socket has `SO_REUSEPORT` (or a UDP `SO_REUSEADDR`): intended sharing, never moved.
    pub reuseport: bool,
    /// The agent session (`STYXY_INSTANCE`) of the asking process.
    pub instance_id: Option<String>,
    /// The asker's project (git worktree root, else working directory): with the uid, the
    /// service type and the asked port, what a move's sticky port is remembered by.
    pub project: Option<String>,
}

/// A bind that may take over the port of the exited server it replaces.
pub(crate) struct Successor<'a> {
    pub(crate) req: &'a BindRequest,
    pub(crate) processes: &'a dyn ProcessView,
}

impl Broker {
    // ---- the shim's question -----------------------------------------------------------------------

    /// Decides whether a `bind()` keeps its port or moves, and claims the answer for the asker so that two
    /// racing processes never get the same port.
    pub fn resolve_bind(
        &mut self,
        req: &BindRequest,
        processes: &dyn ProcessView,
        now_ms: u64,
    ) -> Result<(BindDecision, Effects), BrokerError> {
        let mut effects = Effects::default();
        // Intended sharing (worker pools): never moved, never claimed.
        if req.reuseport {
            return Ok((BindDecision::Keep { port: req.port }, effects));
        }
        let me = req.asker.id;

        // The same process binding the same port again (IPv4 then IPv6) goes where its first bind
        // went — unless that port lingers and the process holds no socket there: then this is the
        // shim asking again because the kernel refused the move (a program binding without
        // SO_REUSEADDR over old connections), and it moves elsewhere.
        // The refused claim stays until the answer is sure (an error changes nothing): while it
        // does, its port is taken, so no pick below gives it again.
        let mut refused = None;
        if let Some(port) = self.earlier_move(me, req.port) {
            if self.is_lingering(port) && !self.holds_socket_on(me, port, req.protocol) {
                refused = Some(port);
            } else {
                let holder = self.holder_of(req.port, req.protocol, me);
                self.audit_move(req, port, holder.as_ref(), &mut effects, now_ms);
                return Ok((BindDecision::Reassign { port, holder }, effects));
            }
        }

        // The session's server for this port is back: the port held for it since the last one
        // stopped is its own (see `hold`).
        if let Some(port) = req
            .instance_id
            .as_deref()
            .and_then(|i| self.held_for(i, req.uid, req.port, req.protocol, processes))
            .filter(|_| refused.is_none())
        {
            self.take_hold(port, me, now_ms, &mut effects);
            if port == req.port {
                return Ok((BindDecision::Keep { port }, effects));
            }
            let holder = self.holder_of(req.port, req.protocol, me);
            self.audit_move(req, port, holder.as_ref(), &mut effects, now_ms);
            return Ok((BindDecision::Reassign { port, holder }, effects));
        }

        // A lease whose process has exited holds nothing, whatever the last sweep saw. It is
        // dropped only on the way to an answer: an error must leave the broker as it found it,
        // or the change would be lost with the error while the journal still held the lease.
        let dead_lease = self
            .leases
            .get(&req.port)
            .is_some_and(|l| l.process.is_some_and(|p| !processes.is_alive(p)));
        // But a dead claim of a live session is that session's hold (see `hold`), whether or not
        // the sweep has made it one yet.
        let dead_but_held = dead_lease
            && self
                .leases
                .get(&req.port)
                .is_some_and(|l| self.is_held_when_its_server_goes(l));
        let holder = self.holder_of(req.port, req.protocol, me).or_else(|| {
            self.leases
                .get(&req.port)
                .filter(|l| {
                    (!dead_lease || dead_but_held) && !self.lease_belongs_to(l, req, processes)
                })
                .cloned()
                .map(HolderView::Lease)
        });
        let Some(holder) = holder else {
            if let Some(claim) = refused.and_then(|port| self.take_lease(port)) {
                effects.lease_removed(claim);
            }
            if dead_lease {
                if let Some(lease) = self.take_lease(req.port) {
                    effects.lease_removed(lease);
                }
            }
            if !self.leases.contains_key(&req.port) {
                let claim = self.new_claim(req, req.port, None, now_ms);
                effects.lease_put(&claim);
                self.insert_lease(claim);
            }
            return Ok((BindDecision::Keep { port: req.port }, effects));
        };

        let range = self.ranges.move_range(req.port);
        let key = req.project.clone().map(|project| StickyKey {
            uid: req.uid,
            project,
            service_type: range.service_type.clone(),
            asked: req.port,
        });
        let successor = Successor { req, processes };
        let port = self
            .pick_for_move(&range, req.port, key.as_ref(), Some(&successor))
            .ok_or_else(|| BrokerError::NoFreePort {
                service_type: range.service_type.clone(),
                start: range.start,
                end: range.end,
            })?;
        if let Some(claim) = refused.and_then(|port| self.take_lease(port)) {
            effects.lease_removed(claim);
        }
        if dead_lease {
            // Held for its session from now on (or ended, if its session is gone).
            self.hold_or_end(req.port, now_ms, &mut effects);
        }
        // The claim of the exited server this one replaces (its sticky port) ends here.
        if let Some(old) = self.take_lease(port) {
            effects.lease_removed(old);
        }
        let claim = self.new_claim(req, port, Some(req.port), now_ms);
        effects.lease_put(&claim);
        self.insert_lease(claim);
        if let Some(key) = key {
            self.remember_sticky(key, port, now_ms, &mut effects);
        }
        self.audit_move(req, port, Some(&holder), &mut effects, now_ms);
        Ok((
            BindDecision::Reassign {
                port,
                holder: Some(holder),
            },
            effects,
        ))
    }

    /// Where process `me` was moved when it asked for `asked` before (its claim), if anywhere.
    pub fn earlier_move(&self, me: ProcessId, asked: u16) -> Option<u16> {
        self.leases
            .values()
            .find(|l| l.is_claim() && l.process == Some(me) && l.asked() == Some(asked))
            .map(|l| l.port)
    }

    /// Whether process `me` holds a `protocol` socket on `port`.
    pub(crate) fn holds_socket_on(&self, me: ProcessId, port: u16, protocol: Protocol) -> bool {
        self.sockets_on(port, Some(protocol))
            .any(|h| h.socket.owner.as_ref().map(|o| o.id) == Some(me))
    }

    /// A socket on `port` that another process holds. (The kernel's bind programs decide the
    /// same question for a session's binds — `styxy-ebpf/src/moving.rs`, `taken` — from the
    /// kernel's counts and the reservations the daemon writes from this broker's leases.)
    pub(crate) fn holder_of(
        &self,
        port: u16,
        protocol: Protocol,
        me: ProcessId,
    ) -> Option<HolderView> {
        self.sockets_on(port, Some(protocol))
            .find(|h| h.socket.owner.as_ref().map(|o| o.id) != Some(me))
            .cloned()
            .map(HolderView::Socket)
    }

    /// Whether a lease is the asker's own: leased to it or to one of its ancestors (a shell that allocated
    /// a port for the server it starts), to its instance, or, tied to no process, to its user.
    /// A claim taken by a move never is: its port stands, in its session's view, for the port
    /// its server asked, so a bind asking that port itself — by another server of the session,
    /// or a second server of the same process — must move, or the asked port's clients would
    /// reach it. (The session's next server for the asked port takes a hold back through
    /// `held_for`.)
    pub(crate) fn lease_belongs_to(
        &self,
        lease: &Lease,
        req: &BindRequest,
        processes: &dyn ProcessView,
    ) -> bool {
        if lease.asked().is_some_and(|asked| asked != req.port) {
            return false;
        }
        // Of the asker's session — as its owner's, or in root's session — not merely of a
        // session of the same name (names are global: another user may use one).
        let same_owner = lease.owner_uid == req.uid
            || lease
                .instance_id
                .as_ref()
                .and_then(|i| self.instances.get(i))
                .is_some_and(|i| i.owner_uid == 0);
        if lease.instance_id.is_some() && lease.instance_id == req.instance_id && same_owner {
            return true;
        }
        match lease.process {
            // A hold is its session's alone (above).
            None if lease.is_claim() => false,
            None => lease.owner_uid == req.uid,
            Some(p) if p == req.asker.id => true,
            Some(p) => processes.ancestors(req.asker.id.pid).contains(&p),
        }
    }

    /// The port this identity got last when it is free (a sticky port is given back even while
    /// it lingers: most servers bind with SO_REUSEADDR, and a restart right after a stop is when
    /// the port matters most); else the next free port after `requested` in its range (wrapping
    /// around to the range's start) that is not lingering and no other identity remembers; else
    /// the next one not lingering; else the next free one.
    ///
    /// With a `successor`, the sticky port is also given back while only the exited server it
    /// replaces still takes it (see [`Broker::left_for`]).
    pub(crate) fn pick_for_move(
        &self,
        range: &PortRange,
        requested: u16,
        key: Option<&StickyKey>,
        successor: Option<&Successor<'_>>,
    ) -> Option<u16> {
        if let Some(port) = key
            .and_then(|k| self.remembered_port(k, range.start, range.end))
            .filter(|port| {
                !self.is_taken(*port) || successor.is_some_and(|s| self.left_for(*port, s))
            })
        {
            return Some(port);
        }
        let after = requested.saturating_add(1).max(range.start);
        let before = requested.min(range.end);
        let candidates = || {
            let after = self.taken.free_in(after, range.end);
            let before = self.taken.free_in(range.start, before);
            after.chain(before).filter(move |p| *p != requested)
        };
        let settled = || {
            let after = self.settled_free_in(after, range.end);
            let before = self.settled_free_in(range.start, before);
            after.chain(before).filter(move |p| *p != requested)
        };
        settled()
            .find(|p| !self.remembered_by_other(*p, key))
            .or_else(|| settled().next())
            .or_else(|| candidates().next())
    }

    /// Whether `port`, taken in the table, was left by a server that has exited, for the
    /// `successor` to take over: every socket shown there is of an exited process (the observer
    /// has not seen them go yet), and the claim there, if any, is of an exited process and not
    /// held for another session than the successor's that still runs. An autoreloader's next
    /// child, or Ctrl-C and up-arrow, binds before the old process's exit is seen; without this
    /// it would move one port further each time. The daemon reads the kernel for the port before
    /// it answers with it.
    pub(crate) fn left_for(&self, port: u16, successor: &Successor<'_>) -> bool {
        let Successor { req, processes } = *successor;
        // What the table knows settles most cases without reading /proc: a port the asker itself
        // holds or claims (a process binding its port again), or whose holder is unknown, is not
        // an exited server's.
        let me = req.asker.id;
        let mine_or_unknown = self
            .sockets_on(port, None)
            .any(|h| h.socket.owner.as_ref().is_none_or(|o| o.id == me))
            || self
                .leases
                .get(&port)
                .is_some_and(|l| l.process == Some(me));
        if mine_or_unknown || !self.bound_only_by_the_exited(port, processes) {
            return false;
        }
        self.leases.get(&port).is_none_or(|lease| {
            let exited = lease.process.is_some_and(|p| !processes.is_alive(p));
            // Held for another session only while that session runs: one whose every process
            // has exited is over, whether or not the sweep has ended it yet.
            let held_for_another = self.is_held_when_its_server_goes(lease)
                && !(lease.instance_id == req.instance_id && lease.owner_uid == req.uid)
                && lease
                    .instance_id
                    .as_ref()
                    .and_then(|i| self.instances.get(i))
                    .is_some_and(|i| i.processes().any(|p| processes.is_alive(p)));
            exited && !held_for_another
        })
    }

    pub(crate) fn new_claim(
        &mut self,
        req: &BindRequest,
        port: u16,
        requested: Option<u16>,
        now_ms: u64,
    ) -> Lease {
        Lease {
            id: self.new_lease_id(),
            port,
            service_type: self.ranges.move_range(port).service_type,
            owner_uid: req.uid,
            process: Some(req.asker.id),
            instance_id: req.instance_id.clone(),
            created_ms: now_ms,
            expires_ms: Some(now_ms.saturating_add(self.settings.claim_ttl_ms)),
            kind: LeaseKind::Claim {
                asked: requested,
                protocol: Some(req.protocol),
            },
        }
    }

    /// The audit entry and event of a move, unless this process was moved the same way before
    /// (see `moves_told`).
    pub(crate) fn audit_move(
        &mut self,
        req: &BindRequest,
        port: u16,
        holder: Option<&HolderView>,
        effects: &mut Effects,
        now_ms: u64,
    ) {
        if !self
            .moves_told
            .first_time(req.asker.id, req.protocol, req.port, port)
        {
            return;
        }
        self.reassignments += 1;
        let (holder_pid, holder_comm, holder_cmdline, holder_instance_id) = match holder {
            Some(HolderView::Socket(h)) => {
                let owner = h.socket.owner.as_ref();
                (
                    owner.map(|o| o.id.pid),
                    owner.map(|o| o.comm.clone()),
                    owner.map(|o| o.cmdline.clone()),
                    h.instance_id
                        .clone()
                        .or_else(|| owner.and_then(|o| o.instance_id.clone())),
                )
            }
            Some(HolderView::Lease(l)) => {
                (l.process.map(|p| p.pid), None, None, l.instance_id.clone())
            }
            None => (None, None, None, None),
        };
        effects.notices.push(Notice::Reassigned(AuditRecord {
            at_ms: now_ms,
            pid: req.asker.id.pid,
            comm: req.asker.comm.clone(),
            uid: req.uid,
            requested_port: req.port,
            assigned_port: port,
            protocol: req.protocol,
            service_type: self.ranges.move_range(port).service_type,
            holder_pid,
            holder_comm,
            holder_cmdline,
            holder_instance_id,
            instance_id: req.instance_id.clone(),
        }));
    }
}
