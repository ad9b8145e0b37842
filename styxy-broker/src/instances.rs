//! Instances (agent sessions): registered, with every process that belongs to them, and ended.

use crate::{
    Broker, BrokerError, Effects, Instance, ProcessId, StateChange, INSTANCE_PROCESSES_MAX,
};

/// What a session is called by, given when it is registered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstanceLabel {
    /// The registering process's project (git worktree root, else working directory).
    pub project: Option<String>,
    /// The name its user gave it.
    pub name: Option<String>,
}

impl Broker {
    /// Ends a session (Claude Code's SessionEnd): every lease and claim of instance `id` that
    /// `uid` owns (root: all) ends, and the instance is forgotten. Nothing is killed: a server of
    /// the session keeps its socket, as any process does. Returns how many leases ended.
    pub fn end_instance(&mut self, id: &str, uid: u32) -> Result<(usize, Effects), BrokerError> {
        if let Some(owner) = self
            .instances
            .get(id)
            .map(|i| i.owner_uid)
            .filter(|owner| *owner != uid && uid != 0)
        {
            return Err(BrokerError::InstanceTaken {
                id: id.to_string(),
                owner_uid: owner,
            });
        }
        let mut effects = Effects::default();
        let ports: Vec<u16> = self
            .leases
            .values()
            .filter(|l| l.instance_id.as_deref() == Some(id) && (uid == 0 || l.owner_uid == uid))
            .map(|l| l.port)
            .collect();
        for port in &ports {
            if let Some(lease) = self.take_lease(*port) {
                effects.lease_removed(lease);
            }
        }
        if self.instances.remove(id).is_some() {
            effects
                .changes
                .push(StateChange::RemoveInstance { id: id.to_string() });
        }
        Ok((ports.len(), effects))
    }

    /// Names a group of processes; `ldpreload-<pid>-<start time>` when no id is given (never the
    /// id of an earlier process that had the same pid).
    pub fn register_instance(
        &mut self,
        id: Option<String>,
        process: ProcessId,
        uid: u32,
        now_ms: u64,
    ) -> Result<(String, Effects), BrokerError> {
        self.register_named_instance(id, process, uid, InstanceLabel::default(), now_ms)
    }

    /// [`Broker::register_instance`], with what the session is called by: its project and the
    /// name its user gave it (kept from the first registration that had them).
    pub fn register_named_instance(
        &mut self,
        id: Option<String>,
        process: ProcessId,
        uid: u32,
        label: InstanceLabel,
        now_ms: u64,
    ) -> Result<(String, Effects), BrokerError> {
        // The start time too: a later process with the same pid (pid reuse) is not the earlier
        // one's group, and never joins it.
        let id = id.unwrap_or_else(|| format!("ldpreload-{}-{}", process.pid, process.start_time));
        if let Some(taken) = self
            .instances
            .get(&id)
            .filter(|i| i.owner_uid != uid && uid != 0)
        {
            return Err(BrokerError::InstanceTaken {
                id,
                owner_uid: taken.owner_uid,
            });
        }
        // Its processes so far stay with it (a session's servers outlive the `styxy run` of a
        // short client registered after them).
        let mut placed: Vec<ProcessId> = self
            .instances
            .get(&id)
            .filter(|i| i.owner_uid == uid)
            .map(|i| i.processes().filter(|p| *p != process).collect())
            .unwrap_or_default();
        placed.push(process);
        if placed.len() > INSTANCE_PROCESSES_MAX {
            placed.drain(..placed.len() - INSTANCE_PROCESSES_MAX);
        }
        let earlier = self.instances.get(&id).filter(|i| i.owner_uid == uid);
        let instance = Instance {
            id: id.clone(),
            process,
            registered_ms: now_ms,
            owner_uid: uid,
            placed,
            project: earlier.and_then(|i| i.project.clone()).or(label.project),
            name: label.name.or_else(|| earlier.and_then(|i| i.name.clone())),
            first_registered_ms: earlier.map_or(now_ms, Instance::since_ms),
            focused_by: earlier.map(|i| i.focused_by.clone()).unwrap_or_default(),
        };
        let mut effects = Effects::default();
        effects.changes.push(StateChange::PutInstance {
            instance: instance.clone(),
        });
        self.instances.insert(id.clone(), instance);
        Ok((id, effects))
    }
}
