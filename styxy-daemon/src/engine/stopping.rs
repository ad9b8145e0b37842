//! `styxy stop`: the caller's session found from its process, the target resolved by the broker
//! (see `styxy_broker::stopping`), and each server it names ended — SIGTERM, then SIGKILL when
//! the grace period runs out — through a pidfd, so a pid reused meanwhile is never signalled.
//! Also which session a process is in, for the kill guard (`ProcessSessions`).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use styxy_broker::{stopping, StopCandidate, StopRefused, StopTarget};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::{lock, Engine, EngineError};

/// The grace period when the caller gives none.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

/// What to stop, as the caller asked.
pub enum StopRequest {
    Target(StopTarget),
    Pid(u32),
}

/// A server stopped (or that would be, in a dry run).
pub struct Stopped {
    pub candidate: StopCandidate,
    /// "SIGTERM", "SIGKILL", "gone" (it had ended already), or "" in a dry run.
    pub ended_by: &'static str,
}

/// The outcome of a stop.
pub struct StopOutcome {
    pub instance_id: String,
    pub stopped: Vec<Stopped>,
}

/// A process and its session, for the kill guard.
pub struct ProcessSession {
    pub pid: u32,
    pub comm: String,
    pub instance_id: Option<String>,
    pub ports: Vec<u16>,
}

impl Engine {
    /// The session process `pid` is in: its kernel session (membership follows forks, so a
    /// server that double-forked away is still its session's), else the instance registered for
    /// it or an ancestor, else `STYXY_INSTANCE` in its environment.
    pub fn session_of_process(&self, pid: u32) -> Option<String> {
        self.kernel_sessions
            .get()
            .and_then(|k| k.instance_of_task(pid))
            .or_else(|| self.instance_of_pid(pid))
    }

    /// The sessions of `pids` (those that run), with the ports each holds.
    pub fn process_sessions(&self, pids: &[u32]) -> Vec<ProcessSession> {
        let held = lock(&self.broker).holders();
        pids.iter()
            .filter_map(|&pid| {
                let info = crate::procs::process_info(pid)?;
                let mut ports: Vec<u16> = held
                    .iter()
                    .filter(|h| h.socket.owner.as_ref().is_some_and(|o| o.id.pid == pid))
                    .map(|h| h.socket.port)
                    .collect();
                ports.sort_unstable();
                ports.dedup();
                Some(ProcessSession {
                    pid,
                    comm: info.comm,
                    instance_id: self.session_of_process(pid),
                    ports,
                })
            })
            .collect()
    }

    /// Stops what `request` names in the caller's session: the session of `caller_pid`, or,
    /// for a caller outside every session, `session` (an id or name the caller owns).
    pub async fn stop_servers(
        &self,
        caller_uid: u32,
        caller_pid: u32,
        session: Option<&str>,
        request: StopRequest,
        grace: Duration,
        dry_run: bool,
    ) -> Result<StopOutcome, EngineError> {
        let instance = self.callers_session(caller_uid, caller_pid, session)?;
        let candidates = match request {
            StopRequest::Target(target) => {
                let names = self.names();
                // Each holder's session, read before the decision: reading one may take the
                // broker lock itself (a registered ancestor), which the decision holds.
                let holders: std::collections::BTreeSet<u32> = lock(&self.broker)
                    .holders()
                    .iter()
                    .filter_map(|h| h.socket.owner.as_ref().map(|o| o.id.pid))
                    .collect();
                let sessions: std::collections::HashMap<u32, String> = holders
                    .into_iter()
                    .filter_map(|pid| Some((pid, self.session_of_process(pid)?)))
                    .collect();
                let decided =
                    lock(&self.broker).servers_to_stop(&instance, &target, &names, &|pid| {
                        sessions.get(&pid).cloned()
                    });
                decided.map_err(|refused| self.refusal(&instance, refused))?
            }
            StopRequest::Pid(pid) => {
                let info = crate::procs::process_info(pid)
                    .ok_or_else(|| EngineError::NotFound(format!("no process {pid} runs")))?;
                let ports = self
                    .process_sessions(&[pid])
                    .pop()
                    .map(|p| p.ports)
                    .unwrap_or_default();
                let its = self.session_of_process(pid);
                stopping::check_session(&instance, pid, &info.comm, ports.clone(), its.clone())
                    .map_err(|refused| self.refusal(&instance, refused))?;
                vec![StopCandidate {
                    pid,
                    comm: info.comm,
                    cmdline: info.cmdline,
                    ports,
                    asked: None,
                    instance_id: its,
                }]
            }
        };
        // The signals are the daemon's (root): a user stops only what it could signal itself.
        if caller_uid != 0 {
            if let Some(c) = candidates
                .iter()
                .find(|c| process_uid(c.pid).is_some_and(|uid| uid != caller_uid))
            {
                return Err(EngineError::Refused(format!(
                    "pid {} ({}) runs as another user (uid {}): only that user or root may stop it",
                    c.pid,
                    c.comm,
                    process_uid(c.pid).unwrap_or_default()
                )));
            }
        }
        if dry_run {
            return Ok(StopOutcome {
                instance_id: instance,
                stopped: candidates
                    .into_iter()
                    .map(|candidate| Stopped {
                        candidate,
                        ended_by: "",
                    })
                    .collect(),
            });
        }
        let stopped = end_processes_whatever_the_caller(candidates, grace).await;
        for s in &stopped {
            tracing::info!(pid = s.candidate.pid, comm = %s.candidate.comm, session = %instance,
                ended_by = s.ended_by, "stopped a server for its session (styxy stop)");
        }
        Ok(StopOutcome {
            instance_id: instance,
            stopped,
        })
    }

    /// The orphans: servers whose session ended while they run on.
    pub fn orphans(&self) -> Vec<StopCandidate> {
        let broker = lock(&self.broker);
        broker.orphans(&|pid| {
            self.kernel_sessions
                .get()
                .and_then(|k| k.instance_of_task(pid))
        })
    }

    /// Stops the orphans of `uid` (root: everyone's); lists them in a dry run.
    pub async fn prune(&self, uid: u32, grace: Duration, dry_run: bool) -> Vec<Stopped> {
        let orphans: Vec<StopCandidate> = self
            .orphans()
            .into_iter()
            .filter(|c| uid == 0 || process_uid(c.pid) == Some(uid))
            .collect();
        self.end_or_list(
            orphans,
            grace,
            dry_run,
            "pruned an orphan (its session ended)",
        )
        .await
    }

    /// Stops the servers of session `instance`, which just ended (it opted in).
    pub async fn stop_servers_of_ended(&self, instance: &str, uid: u32) -> Vec<Stopped> {
        let servers: Vec<StopCandidate> = self
            .orphans()
            .into_iter()
            .filter(|c| c.instance_id.as_deref() == Some(instance))
            .filter(|c| uid == 0 || process_uid(c.pid) == Some(uid))
            .collect();
        self.end_or_list(
            servers,
            DEFAULT_GRACE,
            false,
            "stopped a server with its session (SessionEnd)",
        )
        .await
    }

    async fn end_or_list(
        &self,
        candidates: Vec<StopCandidate>,
        grace: Duration,
        dry_run: bool,
        what: &str,
    ) -> Vec<Stopped> {
        if dry_run {
            return candidates
                .into_iter()
                .map(|candidate| Stopped {
                    candidate,
                    ended_by: "",
                })
                .collect();
        }
        let stopped = end_processes_whatever_the_caller(candidates, grace).await;
        for s in &stopped {
            tracing::info!(pid = s.candidate.pid, comm = %s.candidate.comm,
                session = s.candidate.instance_id.as_deref().unwrap_or_default(),
                ended_by = s.ended_by, "{what}");
        }
        stopped
    }

    fn callers_session(
        &self,
        uid: u32,
        pid: u32,
        session: Option<&str>,
    ) -> Result<String, EngineError> {
        if let Some(own) = self.session_of_process(pid) {
            return Ok(own);
        }
        let Some(handle) = session.filter(|s| !s.trim().is_empty()) else {
            return Err(EngineError::Unavailable(
                "this process is in no session, so it has no servers of its own to stop: run \
                 `styxy stop` inside the session (its agent's shell, or `styxy run`), or name one \
                 of your sessions with --in SESSION"
                    .to_string(),
            ));
        };
        let broker = lock(&self.broker);
        let found = broker.session_named(handle).ok_or_else(|| {
            EngineError::NotFound(format!(
                "no session is called {handle:?} (`styxy ports` lists them)"
            ))
        })?;
        if uid != 0 && found.owner_uid != uid {
            return Err(EngineError::Refused(format!(
                "session {handle} belongs to uid {}: a user stops the servers of its own sessions only",
                found.owner_uid
            )));
        }
        Ok(found.id.clone())
    }

    /// A refusal as the caller reads it: whose the server is, and what to do instead.
    fn refusal(&self, instance: &str, refused: StopRefused) -> EngineError {
        match refused {
            StopRefused::NotFound(what) => {
                EngineError::NotFound(format!("{what} in session {}", self.label(instance)))
            }
            StopRefused::NotYours {
                pid,
                comm,
                ports,
                instance_id,
            } => {
                let holds = if ports.is_empty() {
                    String::new()
                } else {
                    let list: Vec<String> = ports.iter().map(u16::to_string).collect();
                    format!(", on port {}", list.join(", "))
                };
                let whose = match instance_id {
                    Some(other) => format!("a server of session {}", self.label(&other)),
                    None => "a process of no session".to_string(),
                };
                EngineError::Refused(format!(
                    "pid {pid} ({comm}{holds}) is {whose}, not of this session ({}): styxy stop \
                     ends only this session's own servers",
                    self.label(instance)
                ))
            }
        }
    }

    /// A session as people read it: its name, with its id when they differ.
    fn label(&self, instance: &str) -> String {
        let names = lock(&self.broker).session_names();
        match names.iter().find(|n| n.instance_id == instance) {
            Some(n) if n.name != instance => format!("{} ({instance})", n.name),
            _ => instance.to_string(),
        }
    }
}

/// The effective uid process `pid` runs as.
fn process_uid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// [`end_processes`] on a task of its own: a caller that goes away (a client's deadline, a hook
/// killed) does not leave a server with SIGTERM sent and no SIGKILL to follow.
async fn end_processes_whatever_the_caller(
    candidates: Vec<StopCandidate>,
    grace: Duration,
) -> Vec<Stopped> {
    tokio::spawn(end_processes(candidates, grace))
        .await
        .unwrap_or_default()
}

/// SIGTERM to each, then SIGKILL to those still running after `grace`.
async fn end_processes(candidates: Vec<StopCandidate>, grace: Duration) -> Vec<Stopped> {
    let mut running = Vec::new();
    let mut stopped = Vec::new();
    for candidate in candidates {
        match Pidfd::open(candidate.pid) {
            Some(pidfd) if pidfd.signal(libc::SIGTERM) => running.push((candidate, pidfd)),
            _ => stopped.push(Stopped {
                candidate,
                ended_by: "gone",
            }),
        }
    }
    let deadline = tokio::time::Instant::now() + grace;
    for (candidate, pidfd) in running {
        let ended = tokio::time::timeout_at(deadline, pidfd.exited())
            .await
            .is_ok();
        let ended_by = if ended {
            "SIGTERM"
        } else {
            pidfd.signal(libc::SIGKILL);
            // SIGKILL cannot be caught: the process is gone as soon as the kernel tears it down.
            let _ = tokio::time::timeout(Duration::from_secs(5), pidfd.exited()).await;
            "SIGKILL"
        };
        stopped.push(Stopped {
            candidate,
            ended_by,
        });
    }
    stopped.sort_by_key(|s| s.candidate.pid);
    stopped
}

/// A process by descriptor (`pidfd_open`, Linux 5.3+): signals go to that process, never to one
/// that got its pid later; readable once it has exited.
struct Pidfd(OwnedFd);

impl Pidfd {
    fn open(pid: u32) -> Option<Pidfd> {
        let pid = libc::pid_t::try_from(pid).ok()?;
        // SAFETY: pidfd_open takes a pid and flags; a descriptor or -1 comes back.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, libc::O_NONBLOCK) };
        let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
        // SAFETY: a new descriptor, ours alone.
        Some(Pidfd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn signal(&self, signal: i32) -> bool {
        // SAFETY: a valid pidfd, a signal number, no siginfo, no flags.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        rc == 0
    }

    /// Resolves when the process has exited.
    async fn exited(&self) {
        let Ok(fd) = self.0.try_clone() else {
            return std::future::pending().await;
        };
        // SAFETY: `fd` is a descriptor of our own (a duplicate), owned by the AsyncFd: it stays
        // open and the same for the AsyncFd's life.
        let Ok(watch) = (unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }) else {
            return std::future::pending().await;
        };
        if let Ok(mut ready) = watch.readable().await {
            ready.retain_ready();
        }
    }
}
