//! What the engine reports from the broker and the audit log together: `ListPorts`, a session's
//! report (with who held each moved server's port), `ListAudit`.

use super::{lock, Engine, EngineError};
use styxy_broker::{AuditRecord, BrokerError, Lease, SessionServer};

/// A session's servers and what changed since it was last told, each server with who held the
/// port it asked for when it was moved (from the audit log), if known.
pub struct SessionReport {
    pub started: Vec<(SessionServer, Option<AskedHolder>)>,
    pub stopped: Vec<(SessionServer, Option<AskedHolder>)>,
    pub running: Vec<(SessionServer, Option<AskedHolder>)>,
    /// The users who focus the session (`styxy focus`).
    pub focused_by: Vec<u32>,
    /// Whether it gained or lost the focus since its last report.
    pub focus_changed: bool,
}

/// Who held the port a moved server asked for, as its move's audit entry recorded it.
pub struct AskedHolder {
    pub pid: u32,
    pub comm: String,
    pub cmdline: String,
    /// The holder's agent session, if any.
    pub instance_id: String,
}

/// Everything `ListPorts` answers.
pub struct PortList {
    pub holders: Vec<styxy_broker::Held>,
    pub leases: Vec<Lease>,
    pub views: Vec<styxy_broker::ViewEntry>,
    pub sticky: Vec<styxy_broker::StickyPort>,
}

impl Engine {
    /// Every registered session, with its name (as its servers' names have it).
    pub fn sessions(&self) -> Vec<(styxy_broker::Instance, styxy_broker::SessionName)> {
        let broker = lock(&self.broker);
        let names: std::collections::HashMap<String, styxy_broker::SessionName> = broker
            .session_names()
            .into_iter()
            .map(|n| (n.instance_id.clone(), n))
            .collect();
        broker
            .instances()
            .filter_map(|i| names.get(&i.id).map(|n| (i.clone(), n.clone())))
            .collect()
    }

    /// Every socket, lease and session view entry, as one consistent reading.
    pub fn list(&self) -> PortList {
        let broker = lock(&self.broker);
        PortList {
            holders: broker.holders(),
            leases: broker.leases().cloned().collect(),
            views: broker.views(),
            sticky: broker.sticky_ports(),
        }
    }

    /// The servers of session `instance` that `uid` may see (root: all) and what changed since
    /// the session was last told; unless `peek`, this becomes what it was last told. Another
    /// user's registered instance is refused.
    pub fn session_report(
        &self,
        instance: &str,
        uid: u32,
        peek: bool,
    ) -> Result<SessionReport, EngineError> {
        let (running, focused_by) = {
            let broker = lock(&self.broker);
            if let Some(owner) = broker.instance_owner(instance) {
                if owner != uid && uid != 0 {
                    return Err(EngineError::Broker(BrokerError::InstanceTaken {
                        id: instance.to_string(),
                        owner_uid: owner,
                    }));
                }
            }
            let focused_by = broker
                .instances()
                .find(|i| i.id == instance)
                .map(|i| i.focused_by.clone())
                .unwrap_or_default();
            (
                broker.session_servers(instance, (uid != 0).then_some(uid)),
                focused_by,
            )
        };
        let (changes, focus_changed) =
            self.session_reports
                .next(instance, &running, !focused_by.is_empty(), peek);
        let audit = lock(&self.audit);
        let with_holder =
            |servers: Vec<SessionServer>| -> Vec<(SessionServer, Option<AskedHolder>)> {
                servers
                    .into_iter()
                    .map(|s| {
                        let holder = s.asked.and_then(|asked| {
                            audit
                                .iter()
                                .rev()
                                .find(|r| {
                                    r.pid == s.pid
                                        && r.assigned_port == s.port
                                        && r.requested_port == asked
                                })
                                .and_then(|r| {
                                    Some(AskedHolder {
                                        pid: r.holder_pid?,
                                        comm: r.holder_comm.clone().unwrap_or_default(),
                                        cmdline: r.holder_cmdline.clone().unwrap_or_default(),
                                        instance_id: r
                                            .holder_instance_id
                                            .clone()
                                            .unwrap_or_default(),
                                    })
                                })
                        });
                        (s, holder)
                    })
                    .collect()
            };
        Ok(SessionReport {
            started: with_holder(changes.started),
            stopped: with_holder(changes.stopped),
            running: with_holder(running),
            focused_by,
            focus_changed,
        })
    }

    pub fn audit(&self, since_ms: Option<u64>, limit: usize) -> Vec<AuditRecord> {
        let audit = lock(&self.audit);
        let matching: Vec<&AuditRecord> = audit
            .iter()
            .filter(|r| since_ms.is_none_or(|s| r.at_ms >= s))
            .collect();
        let skip = matching.len().saturating_sub(limit);
        matching.into_iter().skip(skip).cloned().collect()
    }
}
