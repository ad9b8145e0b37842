//! The programs only kernel sessions need — `bind4|6` (moves), `connect4|6`, `sendmsg4|6`,
//! `recvmsg4|6` and `getpeername4|6` (the session view, and the shim's question), and the
//! `sched_process_fork|exit|exec` tracepoints (membership), and `lsm/task_kill` where BPF LSM
//! is active (the kill protection between sessions, see `protection`) — attached while a session may
//! have a live process, and detached a few seconds after the last one ended. With no session, the
//! machine's binds, connects and UDP receives pay for none of them; only the observer's
//! `post_bind4|6` and `sock_release` stay.
//!
//! They are loaded (and verified) with the rest at start, so attaching is a few `bpf_link_create`
//! calls, done before the first process of a session is placed: the tracepoints first, so that
//! none of its children is missed. The links are pinned (see `pins`): attached when a daemon
//! ends, they stay attached for the sessions still live, and the next daemon takes them over.

use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, Lsm, TracePoint};
use aya::Ebpf;
use styxy_common::event::PROGRAMS_SOCK_ADDR;
use styxy_common::{protection, session};

use super::pins::{self, HeldLink, ObserverLinks, Pins};
use super::protection::KillProtection;

/// How many idle checks in a row (one a second, from the lease sweep) find no session before
/// the programs are detached: a session started right after another ended finds them attached.
const IDLE_CHECKS_BEFORE_DETACH: u32 = 5;

/// The tracepoints and the events they attach to.
pub const TRACEPOINTS: [(&str, &str); 3] = [
    (session::PROGRAM_FORK, "sched_process_fork"),
    (session::PROGRAM_EXIT, "sched_process_exit"),
    (session::PROGRAM_EXEC, "sched_process_exec"),
];

/// The cgroup programs of sessions: the bind programs and the view programs.
pub fn cgroup_program_names() -> impl Iterator<Item = &'static str> {
    PROGRAMS_SOCK_ADDR.into_iter().chain(session::PROGRAMS_VIEW)
}

/// The loaded session programs and, while attached, their links.
pub struct SessionPrograms {
    ebpf: Arc<Mutex<Ebpf>>,
    cgroup: std::fs::File,
    /// Where links are pinned, when they are (see `pins`).
    pins: Option<Arc<Pins>>,
    /// The observer's links, pinned while these are attached.
    observer: Arc<ObserverLinks>,
    links: Option<Links>,
    idle_checks: u32,
    /// Whether `lsm/task_kill` is loaded (and so attached with the rest), or why not.
    kill_protection: KillProtection,
}

#[derive(Default)]
struct Links {
    cgroup: Vec<(&'static str, HeldLink)>,
    tracepoints: Vec<(&'static str, HeldLink)>,
    lsm: Option<HeldLink>,
}

fn lock(ebpf: &Mutex<Ebpf>) -> std::sync::MutexGuard<'_, Ebpf> {
    ebpf.lock().unwrap_or_else(|e| e.into_inner())
}

impl SessionPrograms {
    /// The programs of `ebpf` (loaded already), to attach to the cgroup directory `cgroup`,
    /// pinned under `pins`. When the last daemon left them attached (a session was live), they
    /// are taken over at once: the pinned links get these programs.
    pub fn new(
        ebpf: Arc<Mutex<Ebpf>>,
        cgroup: std::fs::File,
        pins: Option<Arc<Pins>>,
        observer: Arc<ObserverLinks>,
        kill_protection: KillProtection,
    ) -> Result<SessionPrograms> {
        if !kill_protection.is_kernel() {
            // A daemon before this one may have left it attached for its sessions.
            if let Some(pins) = pins.as_deref() {
                pins::remove_links(pins, protection::PROGRAM_TASK_KILL);
            }
        }
        let mut programs = SessionPrograms {
            ebpf,
            cgroup,
            pins,
            observer,
            links: None,
            idle_checks: 0,
            kill_protection,
        };
        let left_attached = programs
            .pins
            .as_deref()
            .is_some_and(|p| p.reused() && pins::has_tracepoint_link(p, session::PROGRAM_FORK));
        if left_attached {
            programs
                .attach()
                .context("taking over the session programs the last daemon left attached")?;
        }
        Ok(programs)
    }

    pub fn is_attached(&self) -> bool {
        self.links.is_some()
    }

    /// Whether the kernel refuses signals between sessions (while these are attached), or why
    /// not.
    pub fn kill_protection(&self) -> &KillProtection {
        &self.kill_protection
    }

    /// Attaches every session program, unless they are attached; all or none.
    pub fn attach(&mut self) -> Result<()> {
        self.idle_checks = 0;
        if self.links.is_some() {
            return Ok(());
        }
        // The observer's links first: a daemon that dies from here on leaves the per-port
        // counts the session programs read kept true.
        self.observer
            .pin()
            .context("pinning the observer's programs")?;
        let mut links = Links::default();
        let attached = self.attach_into(&mut links);
        if attached.is_ok() && self.kill_protection.is_kernel() {
            // The sessions work without it: a failure turns the protection off, not them.
            match self.attach_task_kill() {
                Ok(link) => links.lsm = Some(link),
                Err(e) => {
                    let why = format!("attaching lsm/task_kill failed: {e:#}");
                    tracing::warn!("{why}");
                    self.kill_protection = KillProtection::Off(why);
                }
            }
        }
        if attached.is_err() {
            detach_links(links);
            // Nothing of a session is attached: nothing needs to outlive the daemon.
            if let Err(e) = self.observer.unpin() {
                tracing::warn!(cause = %format!("{e:#}"), "unpinning the observer's programs");
            }
            return attached;
        }
        self.links = Some(links);
        tracing::info!("kernel session programs attached");
        Ok(())
    }

    fn attach_into(&self, links: &mut Links) -> Result<()> {
        let mut ebpf = lock(&self.ebpf);
        let pins = self.pins.as_deref();
        for (name, event) in TRACEPOINTS {
            let program: &mut TracePoint = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing"))?
                .try_into()?;
            let link = pins::hold_numbered_link(pins, name, || {
                let id = program
                    .attach("sched", event)
                    .with_context(|| format!("attaching {name} to sched/{event}"))?;
                Ok(FdLink::try_from(program.take_link(id)?)?)
            })?;
            links.tracepoints.push((name, link));
        }
        for name in cgroup_program_names() {
            let program: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing"))?
                .try_into()?;
            let fd = program.fd()?.as_fd().try_clone_to_owned()?;
            let link = pins::hold_cgroup_link(pins, name, fd.as_fd(), true, || {
                let id = program
                    .attach(&self.cgroup, CgroupAttachMode::Single)
                    .with_context(|| format!("attaching {name}"))?;
                Ok(FdLink::try_from(program.take_link(id)?)?)
            })?;
            links.cgroup.push((name, link));
        }
        Ok(())
    }

    fn attach_task_kill(&self) -> Result<HeldLink> {
        let mut ebpf = lock(&self.ebpf);
        let name = protection::PROGRAM_TASK_KILL;
        let program: &mut Lsm = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing"))?
            .try_into()?;
        pins::hold_numbered_link(self.pins.as_deref(), name, || {
            let id = program
                .attach()
                .with_context(|| format!("attaching {name}"))?;
            Ok(FdLink::from(program.take_link(id)?))
        })
    }

    /// One idle check: `no_session` says the kernel's session map is empty. After
    /// [`IDLE_CHECKS_BEFORE_DETACH`] such checks in a row the programs are detached; true then.
    pub fn check_idle(&mut self, no_session: bool) -> bool {
        if self.links.is_none() {
            return false;
        }
        if !no_session {
            self.idle_checks = 0;
            return false;
        }
        self.idle_checks += 1;
        if self.idle_checks < IDLE_CHECKS_BEFORE_DETACH {
            return false;
        }
        if let Some(links) = self.links.take() {
            detach_links(links);
            if let Err(e) = self.observer.unpin() {
                tracing::warn!(cause = %format!("{e:#}"), "unpinning the observer's programs");
            }
            tracing::info!("kernel session programs detached: no session is live");
        }
        true
    }
}

/// Detaches `links`: the view and bind programs first (the shim takes over again), the
/// kill protection, and the membership tracepoints last.
fn detach_links(links: Links) {
    let lsm = links.lsm.map(|link| (protection::PROGRAM_TASK_KILL, link));
    for (name, link) in links.cgroup.into_iter().chain(lsm).chain(links.tracepoints) {
        if let Err(e) = link.detach() {
            tracing::warn!(program = name, cause = %format!("{e:#}"), "detaching a kernel session program failed");
        }
    }
}
