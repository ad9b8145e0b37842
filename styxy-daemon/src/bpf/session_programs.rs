//! The programs only kernel sessions need — `bind4|6` (moves), `connect4|6`, `sendmsg4|6`,
//! `recvmsg4|6` and `getpeername4|6` (the session view, and the shim's question), and the
//! `sched_process_fork|exit|exec` tracepoints (membership) — attached while a session may
//! have a live process, and detached a few seconds after the last one ended. With no session, the
//! machine's binds, connects and UDP receives pay for none of them; only the observer's
//! `post_bind4|6` and `sock_release` stay.
//!
//! They are loaded (and verified) with the rest at start, so attaching is a few `bpf_link_create`
//! calls, done before the first process of a session is placed: the tracepoints first, so that
//! none of its children is missed. Links are file descriptors, gone with the daemon as ever.

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use aya::programs::cgroup_sock_addr::CgroupSockAddrLinkId;
use aya::programs::trace_point::TracePointLinkId;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, TracePoint};
use aya::Ebpf;
use styxy_common::event::PROGRAMS_SOCK_ADDR;
use styxy_common::session;

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
    links: Option<Links>,
    idle_checks: u32,
}

struct Links {
    cgroup: Vec<(&'static str, CgroupSockAddrLinkId)>,
    tracepoints: Vec<(&'static str, TracePointLinkId)>,
}

fn lock(ebpf: &Mutex<Ebpf>) -> std::sync::MutexGuard<'_, Ebpf> {
    ebpf.lock().unwrap_or_else(|e| e.into_inner())
}

impl SessionPrograms {
    /// The programs of `ebpf` (loaded already), to attach to the cgroup directory `cgroup`.
    pub fn new(ebpf: Arc<Mutex<Ebpf>>, cgroup: std::fs::File) -> SessionPrograms {
        SessionPrograms {
            ebpf,
            cgroup,
            links: None,
            idle_checks: 0,
        }
    }

    pub fn is_attached(&self) -> bool {
        self.links.is_some()
    }

    /// Attaches every session program, unless they are attached; all or none.
    pub fn attach(&mut self) -> Result<()> {
        self.idle_checks = 0;
        if self.links.is_some() {
            return Ok(());
        }
        let mut links = Links {
            cgroup: Vec::new(),
            tracepoints: Vec::new(),
        };
        let attached = self.attach_into(&mut links);
        if attached.is_err() {
            self.detach_links(links);
            return attached;
        }
        self.links = Some(links);
        tracing::info!("kernel session programs attached");
        Ok(())
    }

    fn attach_into(&self, links: &mut Links) -> Result<()> {
        let mut ebpf = lock(&self.ebpf);
        for (name, event) in TRACEPOINTS {
            let program: &mut TracePoint = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing"))?
                .try_into()?;
            let link = program
                .attach("sched", event)
                .with_context(|| format!("attaching {name} to sched/{event}"))?;
            links.tracepoints.push((name, link));
        }
        for name in cgroup_program_names() {
            let program: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing"))?
                .try_into()?;
            let link = program
                .attach(&self.cgroup, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name}"))?;
            links.cgroup.push((name, link));
        }
        Ok(())
    }

    fn detach_links(&self, links: Links) {
        let mut ebpf = lock(&self.ebpf);
        // The two program types share no detach trait: the same step, once per type.
        macro_rules! detach {
            ($kind:ty, $name:expr, $link:expr) => {{
                let name = $name;
                let detached = ebpf
                    .program_mut(name)
                    .map(<&mut $kind>::try_from)
                    .and_then(Result::ok)
                    .map(|p| p.detach($link));
                if !matches!(detached, Some(Ok(()))) {
                    tracing::warn!(program = name, "detaching a kernel session program failed");
                }
            }};
        }
        // The view and bind programs first (the shim takes over again), the membership
        // tracepoints last.
        for (name, link) in links.cgroup {
            detach!(CgroupSockAddr, name, link);
        }
        for (name, link) in links.tracepoints {
            detach!(TracePoint, name, link);
        }
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
            self.detach_links(links);
            tracing::info!("kernel session programs detached: no session is live");
        }
        true
    }
}
