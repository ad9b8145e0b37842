//! Binds the kernel moved: a process of a kernel session (a static binary, say, that no shim
//! reaches) asked for a taken port, and the bind program sent it to a spare port of the same
//! range. The broker records what `ResolveBind` would have: the move's claim (so the session's
//! view has the entry and the port is the process's for its life), the audit entry and the
//! notices, then the bound socket itself.

use crate::{BindRequest, Broker, Effects, HolderView, PortEvent};

impl Broker {
    /// Applies [`PortEvent::MovedByKernel`].
    pub(crate) fn apply_kernel_move(
        &mut self,
        socket: crate::BoundSocket,
        asked: u16,
        instance_id: String,
        project: Option<String>,
        now_ms: u64,
        effects: &mut Effects,
    ) {
        if let Some(owner) = socket.owner.clone() {
            let me = owner.id;
            let request = BindRequest {
                asker: owner,
                uid: socket.uid,
                port: asked,
                protocol: socket.protocol,
                family: socket.family,
                reuseport: false,
                instance_id: Some(instance_id),
                project,
            };
            // The session's server back on the port held for it (see `hold`): the hold is its.
            let held = self.leases.get(&socket.port).is_some_and(|l| {
                l.is_claim()
                    && l.process.is_none()
                    && l.instance_id == request.instance_id
                    && l.asked() == Some(asked)
            });
            if held {
                self.take_hold(socket.port, me, now_ms, effects);
                let holder = self.holder_of(asked, socket.protocol, me);
                self.audit_move(&request, socket.port, holder.as_ref(), effects, now_ms);
            }
            // The process's other family's bind of the same port was moved there already: one
            // claim, one audit entry.
            let already = self
                .leases
                .get(&socket.port)
                .is_some_and(|l| l.is_claim() && l.process == Some(me) && l.asked() == Some(asked));
            if !already && !self.leases.contains_key(&socket.port) {
                let holder = self
                    .holder_of(asked, socket.protocol, me)
                    .or_else(|| self.leases.get(&asked).cloned().map(HolderView::Lease));
                let claim = self.new_claim(&request, socket.port, Some(asked), now_ms);
                effects.lease_put(&claim);
                self.insert_lease(claim);
                self.audit_move(&request, socket.port, holder.as_ref(), effects, now_ms);
                if let Some(project) = request.project.clone() {
                    let key = crate::StickyKey {
                        uid: request.uid,
                        project,
                        service_type: self.ranges.move_range(asked).service_type,
                        asked,
                    };
                    self.remember_sticky(key, socket.port, now_ms, effects);
                }
            }
        }
        // Settles the claim: it lives as long as the process holds the port.
        let bound = self.apply(PortEvent::Bound(socket), now_ms);
        effects.changes.extend(bound.changes);
        effects.notices.extend(bound.notices);
    }
}
