//! Putting processes in kernel sessions: a process placed with its identity checked under a
//! pidfd, and after a daemon restart every registered live process and its descendants again.

use super::*;

impl KernelSessions {
    /// Puts `process` (and from now on its descendants) in the kernel session of `instance_id`,
    /// placed by `uid`. The caller has checked that `uid` may act for it, and the broker that
    /// `uid` owns the instance.
    pub fn place(
        &self,
        instance_id: &str,
        uid: u32,
        process: ProcessId,
        broker: &Broker,
    ) -> Result<u32> {
        let pid = process.pid;
        // Held from before the identity check until after the entry is written: if the process
        // is alive after both, the entry is its own (its pid cannot have been reused meanwhile),
        // and the exit program, attached by then, removes it when it ends.
        let pidfd = crate::procs::pidfd_open(pid)
            .with_context(|| format!("process {pid} is not running"))?;
        if crate::procs::process_id(pid) != Some(process) {
            bail!("process {pid} ended (its pid now names another process)");
        }
        let (number, owner) = {
            let mut registry = lock(&self.registry);
            let number = match registry.numbers.get(instance_id) {
                Some(known) => *known,
                None => {
                    // Never a number the last daemon's maps still hold.
                    let next = registry
                        .numbers
                        .values()
                        .map(|(n, _)| *n)
                        .max()
                        .unwrap_or(0)
                        .max(registry.numbers_floor)
                        .checked_add(1)
                        .filter(|n| *n != RESERVED_BY_OTHER)
                        .context("too many kernel sessions")?;
                    // The uid that placed it first owns it (the broker keeps other users off the
                    // id).
                    registry
                        .numbers
                        .insert(instance_id.to_string(), (next, uid));
                    registry.instances.insert(next, instance_id.to_string());
                    // Saved before any map holds it.
                    self.save_numbers(&registry, next);
                    (next, uid)
                }
            };
            number
        };
        // Its project: where its first placed process runs (an agent's worktree, the directory
        // `styxy run` was started in).
        let project = crate::procs::project_of(pid);
        {
            // Attached before the process is in the map, and not detached until it is; the
            // idle check (which also forgets ended sessions) waits for this lock.
            let mut programs = lock(&self.programs);
            programs
                .attach()
                .context("attaching the kernel session programs")?;
            // What its environment turns off (`STYXY_VIEW=off styxy run -- ./server`): the
            // kernel's answer to the shim's question keeps it up to date where the shim runs;
            // a static binary keeps what it started with.
            let member = Member {
                session: number,
                owner,
                stamp_ns: monotonic_ns(),
                flags: crate::procs::member_flags_of(pid),
                _pad: 0,
            };
            let mut sessions = lock(&self.sessions);
            sessions
                .insert(pid, member, 0)
                .with_context(|| format!("adding pid {pid} to the kernel's session map"))?;
            if !crate::procs::pidfd_alive(&pidfd) {
                let _ = sessions.remove(&pid);
                bail!("process {pid} ended while it was being placed");
            }
            drop(sessions);
            let mut registry = lock(&self.registry);
            if let std::collections::hash_map::Entry::Vacant(entry) =
                registry.projects.entry(number)
            {
                entry.insert((uid, project));
                self.save_numbers(&registry, number);
            }
        }
        // Its moves so far (through the shim) join the kernel's view, its project's sticky ports
        // its choices, and its leases count as its own.
        self.sync_views(broker);
        self.sync_sticky(broker, true);
        self.sync_focus(broker);
        let registry = lock(&self.registry);
        for lease in broker
            .leases()
            .filter(|l| l.instance_id.as_deref() == Some(instance_id))
        {
            self.republish_holder(broker, &registry, lease.port);
        }
        Ok(number)
    }

    /// At start: puts back in the kernel's session map the sessions whose first process still
    /// runs — after a restart (an upgrade, a crash, `kill -9`) the new daemon's maps are empty,
    /// and without this their processes would fall out of their sessions (their connections
    /// reaching other sessions' servers, their binds no longer moved). Each such process and its
    /// live descendants are placed, stamped with the time taken before `/proc` was read: a
    /// process started after that reading (a reused pid among them) is not covered; one forked
    /// since by a placed process joins through the fork program, attached first. A descendant
    /// that left the tree (reparented to init by a double fork) is not found: it stays outside.
    /// Every process registered with a session (each `styxy run`, the agent) is a root of such a
    /// tree. Returns how many sessions and processes were placed.
    pub fn adopt(&self, broker: &Broker) -> (usize, usize) {
        let live: Vec<(String, u32, ProcessId)> = broker
            .instances()
            .flat_map(|i| i.processes().map(|p| (i.id.clone(), i.owner_uid, p)))
            .filter(|(_, _, p)| crate::procs::process_id(p.pid) == Some(*p))
            .collect();
        let mut sessions = std::collections::HashSet::new();
        let mut processes = 0;
        for (instance, owner, process) in live {
            match self.place(&instance, owner, process, broker) {
                Ok(number) => {
                    sessions.insert(number);
                    processes += 1 + self.place_descendants(number, owner, process.pid);
                }
                Err(e) => tracing::warn!(instance = %instance, cause = %format!("{e:#}"),
                    "a session of the last run could not be put back in the kernel"),
            }
        }
        (sessions.len(), processes)
    }

    /// Places the live descendants of `pid` in session `number` (see [`KernelSessions::adopt`]);
    /// how many.
    pub(super) fn place_descendants(&self, number: u32, owner: u32, pid: u32) -> usize {
        let mut placed = std::collections::HashSet::new();
        // Twice: a child forked between the first reading and its parent's entry is in the
        // second (and from then on the fork program sees every new one).
        for _ in 0..2 {
            let stamp_ns = monotonic_ns();
            let children = crate::procs::children_by_parent();
            let mut queue = vec![pid];
            let mut sessions = lock(&self.sessions);
            while let Some(parent) = queue.pop() {
                for child in children.get(&parent).into_iter().flatten() {
                    let member = Member {
                        session: number,
                        owner,
                        stamp_ns,
                        flags: crate::procs::member_flags_of(*child),
                        _pad: 0,
                    };
                    if placed.insert(*child) || sessions.get(child, 0).is_err() {
                        if let Err(e) = sessions.insert(*child, member, 0) {
                            tracing::warn!(cause = %e, task = child, "the kernel's session map refused a process");
                        }
                    }
                    queue.push(*child);
                }
            }
        }
        placed.len()
    }
}
