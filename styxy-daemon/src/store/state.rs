//! The state the store keeps: leases, instances and sticky ports by id, as the journal's
//! changes address them, and the snapshot written of it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use styxy_broker::{Instance, Lease, StateChange, StickyKey, StickyPort};

/// What the state dir held at start.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Snapshot {
    pub leases: Vec<Lease>,
    pub instances: Vec<Instance>,
    /// Sticky ports: the port each identity got last (absent in snapshots of older daemons).
    #[serde(default)]
    pub sticky: Vec<StickyPort>,
    /// The highest `N` of any `lease-N` ever issued, released ones included: a restarted daemon
    /// issues ids after it, so an id a script kept never names someone else's lease.
    #[serde(default)]
    pub lease_ids_issued: u64,
    /// What damage was found reading the state dir, and what was dropped for it (not saved).
    #[serde(skip)]
    pub damage: Vec<String>,
}

/// Leases and instances by id, the way the journal's changes address them.
#[derive(Debug, Default)]
pub(super) struct State {
    pub(super) leases: BTreeMap<String, Lease>,
    pub(super) instances: BTreeMap<String, Instance>,
    pub(super) sticky: BTreeMap<StickyKey, StickyPort>,
    pub(super) lease_ids_issued: u64,
}

/// `N` of a `lease-N` id (0 for any other id).
pub(super) fn lease_number(id: &str) -> u64 {
    id.strip_prefix("lease-")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

impl State {
    pub(super) fn apply(&mut self, change: StateChange) {
        match change {
            StateChange::PutLease { lease } => {
                self.lease_ids_issued = self.lease_ids_issued.max(lease_number(&lease.id));
                self.leases.insert(lease.id.clone(), lease);
            }
            StateChange::RemoveLease { id } => {
                self.leases.remove(&id);
            }
            StateChange::PutInstance { instance } => {
                self.instances.insert(instance.id.clone(), instance);
            }
            StateChange::RemoveInstance { id } => {
                self.instances.remove(&id);
            }
            StateChange::PutSticky { sticky } => {
                self.sticky.insert(sticky.key.clone(), sticky);
            }
            StateChange::RemoveSticky { key } => {
                self.sticky.remove(&key);
            }
        }
    }

    /// Checks what was loaded against the broker's invariant: one lease per port. Of leases that
    /// share a port, the first issued stays; the others are dropped, each reported.
    pub(super) fn drop_double_bookings(&mut self) -> Vec<String> {
        let mut by_port: BTreeMap<u16, Vec<(u64, String)>> = BTreeMap::new();
        for lease in self.leases.values() {
            by_port
                .entry(lease.port)
                .or_default()
                .push((lease_number(&lease.id), lease.id.clone()));
        }
        let mut reports = Vec::new();
        for (port, mut ids) in by_port.into_iter().filter(|(_, ids)| ids.len() > 1) {
            ids.sort();
            let kept = ids.remove(0).1;
            for (_, id) in ids {
                self.leases.remove(&id);
                reports.push(format!(
                    "{id} held port {port}, which {kept} holds too: dropped (a port has one lease)"
                ));
            }
        }
        reports
    }

    pub(super) fn snapshot(&self) -> Snapshot {
        Snapshot {
            leases: self.leases.values().cloned().collect(),
            instances: self.instances.values().cloned().collect(),
            sticky: self.sticky.values().cloned().collect(),
            lease_ids_issued: self.lease_ids_issued,
            damage: Vec::new(),
        }
    }
}
