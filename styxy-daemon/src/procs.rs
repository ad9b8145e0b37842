//! Reading processes from `/proc`: identity (pid + start time), command line, ancestry, and which process
//! owns a socket. This is the daemon's [`ProcessView`] for the broker.
//!
//! Processes the daemon has just read are kept in a small cache, each with a pidfd: a pidfd refers to one
//! process, not to a pid, and turns readable when that process exits, so "is this still the process I
//! read?" costs one `poll()` instead of reading and parsing `/proc/<pid>/stat` — every `ResolveBind`
//! asks it of the asker, twice. The command line may change on `exec()`, so it is re-read after
//! [`INFO_TTL`]; the identity (pid + start time) never changes while the pidfd says alive.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use procfs::process::{FDTarget, Process};

use styxy_broker::{ProcessId, ProcessInfo, ProcessView};

/// How long a cached command line is trusted (an `exec()` changes it; the pid and start time stay).
const INFO_TTL: Duration = Duration::from_secs(1);
/// The bytes of a command line the daemon keeps (see [`kept_cmdline`]).
const CMDLINE_KEPT: usize = 256;
/// Processes kept in the cache (each holds a descriptor); past this, the exited ones are dropped,
/// then all.
const CACHE_CAPACITY: usize = 512;

struct Cached {
    pidfd: OwnedFd,
    info: ProcessInfo,
    read_at: Instant,
}

static CACHE: LazyLock<Mutex<HashMap<u32, Cached>>> = LazyLock::new(Default::default);

fn cache() -> std::sync::MutexGuard<'static, HashMap<u32, Cached>> {
    CACHE.lock().unwrap_or_else(|e| e.into_inner())
}

/// A pidfd for `pid`, if the kernel has them and the process exists.
pub(crate) fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a non-negative result is a descriptor that is ours.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Drops the cached processes that have exited, closing their pidfds: called once a second, so
/// the descriptors of short-lived processes do not pile up until the cache is full.
pub fn forget_exited() {
    cache().retain(|_, c| pidfd_alive(&c.pidfd));
}

/// Whether the process a pidfd refers to is still running (it turns readable on exit).
pub(crate) fn pidfd_alive(pidfd: &OwnedFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no waiting.
    unsafe { libc::poll(&mut pfd, 1, 0) == 0 }
}

/// The cached entry for `pid` if its process is still running (dropped if not), and whether it is
/// younger than [`INFO_TTL`].
fn cached(pid: u32) -> Option<(ProcessInfo, bool)> {
    let mut cache = cache();
    let entry = cache.get(&pid)?;
    if pidfd_alive(&entry.pidfd) {
        return Some((entry.info.clone(), entry.read_at.elapsed() < INFO_TTL));
    }
    cache.remove(&pid);
    None
}

/// Every running process's children, by parent pid (threads aside), from one reading of
/// `/proc/*/stat`.
pub fn children_by_parent() -> HashMap<u32, Vec<u32>> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    let Ok(all) = procfs::process::all_processes() else {
        return children;
    };
    for process in all.flatten() {
        let Ok(stat) = process.stat() else {
            continue;
        };
        if let (Ok(pid), Ok(parent)) = (u32::try_from(stat.pid), u32::try_from(stat.ppid)) {
            children.entry(parent).or_default().push(pid);
        }
    }
    children
}

/// A process's identity, if it is running.
pub fn process_id(pid: u32) -> Option<ProcessId> {
    if let Some((info, _)) = cached(pid) {
        return Some(info.id);
    }
    let stat = Process::new(i32::try_from(pid).ok()?).ok()?.stat().ok()?;
    Some(ProcessId {
        pid,
        start_time: stat.starttime,
    })
}

/// What the broker is told about a process: identity, short name and command line.
pub fn process_info(pid: u32) -> Option<ProcessInfo> {
    if let Some((info, true)) = cached(pid) {
        return Some(info);
    }
    // The pidfd is opened before reading, and checked after: if the process is still alive then,
    // what was read is that process's, not a later one's that reused the pid.
    let pidfd = pidfd_open(pid);
    let info = read_process_info(pid)?;
    if let Some(pidfd) = pidfd.filter(pidfd_alive) {
        let mut cache = cache();
        if cache.len() >= CACHE_CAPACITY {
            cache.retain(|_, c| pidfd_alive(&c.pidfd));
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
        }
        cache.insert(
            pid,
            Cached {
                pidfd,
                info: info.clone(),
                read_at: Instant::now(),
            },
        );
    }
    Some(info)
}

fn read_process_info(pid: u32) -> Option<ProcessInfo> {
    let process = Process::new(i32::try_from(pid).ok()?).ok()?;
    let stat = process.stat().ok()?;
    let cmdline = process
        .cmdline()
        .map(|args| kept_cmdline(&args))
        .unwrap_or_default();
    Some(ProcessInfo {
        id: ProcessId {
            pid,
            start_time: stat.starttime,
        },
        comm: stat.comm,
        cmdline,
        instance_id: session_of(&process),
    })
}

/// A command line as the daemon keeps it — for people (`styxy ports`, the audit, the dashboard)
/// and for a service type's name: the arguments joined by spaces, cut after
/// [`CMDLINE_KEPT`] bytes (at a character boundary, marked `…`). A whole one can be tens of
/// kilobytes (a Java class path, a `python3 -c` script), and each is kept per cached process, per
/// socket's owner and per audit record (10,000 of them).
fn kept_cmdline(args: &[String]) -> String {
    let mut line = args.join(" ");
    if line.len() > CMDLINE_KEPT {
        let mut end = CMDLINE_KEPT;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
        line.push('…');
    }
    line
}

/// `STYXY_INSTANCE` in the process's environment (as it was at exec): the agent session its
/// binds belong to when the shim did not ask the daemon. `None` when unset, unreadable (another
/// user's process while not root) or not a valid id.
fn session_of(process: &Process) -> Option<String> {
    let environ = process.environ().ok()?;
    let id = environ
        .get(std::ffi::OsStr::new(styxy_common::env::INSTANCE.name))?
        .to_str()?;
    (!id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()))
        .then(|| id.to_string())
}

/// What a process's environment (as it was at exec) turns off for itself in its kernel
/// session: `STYXY_VIEW=off` and `STYXY_DISABLE=1` (`true`, `yes`), as
/// [`styxy_common::session::Member::flags`]. 0 when neither, or unreadable.
pub fn member_flags_of(pid: u32) -> u32 {
    use styxy_common::session::{MEMBER_MOVES_OFF, MEMBER_VIEW_OFF};
    let Some(environ) = i32::try_from(pid)
        .ok()
        .and_then(|pid| Process::new(pid).ok())
        .and_then(|p| p.environ().ok())
    else {
        return 0;
    };
    let value = |name: &str| {
        environ
            .get(std::ffi::OsStr::new(name))
            .and_then(|v| v.to_str())
    };
    let view_off = value(styxy_common::env::VIEW.name) == Some("off");
    let moves_off = matches!(
        value(styxy_common::env::DISABLE.name),
        Some("1") | Some("true") | Some("yes")
    );
    (if view_off { MEMBER_VIEW_OFF } else { 0 }) | (if moves_off { MEMBER_MOVES_OFF } else { 0 })
}

/// The project a process works in ([`styxy_common::paths::project_of_dir`] of its working
/// directory); `None` when that cannot be read. What sticky ports are remembered by.
pub fn project_of(pid: u32) -> Option<String> {
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
    styxy_common::paths::project_of_dir(&cwd)
}

/// The uid a process runs as.
pub fn process_uid(pid: u32) -> Option<u32> {
    Process::new(i32::try_from(pid).ok()?).ok()?.uid().ok()
}

/// The live `/proc`, as the broker's view of processes.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcFs;

/// How far up the process tree [`ProcessView::ancestors`] looks.
const MAX_ANCESTRY: usize = 64;

/// Times a process's liveness could not be checked (see [`ProcFs::is_alive`]).
pub static UNCHECKED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl ProcessView for ProcFs {
    /// A process is dead only when the kernel says so: no such pid (`kill(pid, 0)` fails with
    /// ESRCH, or `/proc/<pid>` is gone), or another start time under the pid (reused). When `/proc`
    /// cannot be read — out of descriptors (EMFILE), memory, or permission — it is alive: taking
    /// every process for dead then once ended every lease tied to one, with nothing logged.
    fn is_alive(&self, id: ProcessId) -> bool {
        if let Some((info, _)) = cached(id.pid) {
            return info.id == id;
        }
        let Ok(pid) = libc::pid_t::try_from(id.pid) else {
            return false;
        };
        // SAFETY: signal 0 only checks for the process; it has no memory preconditions.
        if unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
        {
            return false;
        }
        match Process::new(pid).and_then(|p| p.stat()) {
            Ok(stat) => stat.starttime == id.start_time,
            Err(procfs::ProcError::NotFound(_)) => false,
            Err(e) => {
                let unchecked = UNCHECKED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if unchecked.is_multiple_of(1000) {
                    tracing::warn!(
                        pid,
                        cause = %e,
                        unchecked = unchecked + 1,
                        "could not read a process to check it is alive; keeping what it holds"
                    );
                }
                true
            }
        }
    }

    fn ancestors(&self, pid: u32) -> Vec<ProcessId> {
        let mut out = Vec::new();
        let mut current = pid;
        while out.len() < MAX_ANCESTRY {
            let parent = Process::new(current as i32)
                .and_then(|p| p.stat())
                .map(|s| s.ppid)
                .unwrap_or(0);
            let Some(parent) = u32::try_from(parent).ok().filter(|p| *p > 1) else {
                break;
            };
            match process_id(parent) {
                Some(id) => out.push(id),
                None => break,
            }
            current = parent;
        }
        out
    }
}

/// Finds the processes that own sockets, by socket inode, scanning `/proc/*/fd` only for inodes it has not
/// looked for before. When several processes share a socket (a pre-fork server), the lowest pid (usually the
/// parent that bound it) is taken. An inode no process could be found for (another user's, without root)
/// is remembered as such, so it does not cost a scan on every reading.
#[derive(Debug, Default)]
pub struct SocketOwners {
    known: HashMap<u64, Option<ProcessInfo>>,
}

impl SocketOwners {
    /// The inodes among `inodes` not looked for yet.
    pub fn missing(&self, inodes: &[u64]) -> HashSet<u64> {
        inodes
            .iter()
            .copied()
            .filter(|i| *i != 0 && !self.known.contains_key(i))
            .collect()
    }

    /// Records what [`find_owners`] found.
    pub fn learn(&mut self, found: HashMap<u64, Option<ProcessInfo>>) {
        self.known.extend(found);
    }

    /// Owners of the given inodes, as far as they are known.
    pub fn owners(&self, inodes: &[u64]) -> HashMap<u64, ProcessInfo> {
        inodes
            .iter()
            .filter_map(|i| Some((*i, self.known.get(i)?.clone()?)))
            .collect()
    }

    /// Forgets inodes that are no longer bound, so the cache stays the size of the socket table.
    pub fn retain(&mut self, live: &HashSet<u64>) {
        self.known.retain(|inode, _| live.contains(inode));
    }
}

/// Scans `/proc/*/fd` for the processes holding the `missing` socket inodes (only processes of
/// `uids` when it is not empty); every missing inode gets an entry, `None` when no owner was found.
/// Stops as soon as every inode is found: `/proc` lists pids in ascending order, so the first
/// process found for an inode is the lowest pid.
pub fn find_owners(
    missing: &HashSet<u64>,
    uids: &HashSet<u32>,
) -> HashMap<u64, Option<ProcessInfo>> {
    let mut found: HashMap<u64, u32> = HashMap::new();
    if let Ok(processes) = procfs::process::all_processes() {
        for process in processes.flatten() {
            if found.len() == missing.len() {
                break;
            }
            if !uids.is_empty() && !process.uid().is_ok_and(|u| uids.contains(&u)) {
                continue;
            }
            let Ok(fds) = process.fd() else { continue };
            for fd in fds.flatten() {
                if let FDTarget::Socket(inode) = fd.target {
                    if missing.contains(&inode) {
                        found.entry(inode).or_insert(process.pid as u32);
                    }
                }
            }
        }
    }
    missing
        .iter()
        .map(|inode| (*inode, found.get(inode).and_then(|pid| process_info(*pid))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_command_line_is_cut_at_a_character_boundary() {
        let short = vec!["vite".to_string(), "--port".to_string(), "5173".to_string()];
        assert_eq!(kept_cmdline(&short), "vite --port 5173");
        let script = vec!["python3".to_string(), "-c".to_string(), "é".repeat(400)];
        let kept = kept_cmdline(&script);
        assert!(
            kept.starts_with("python3 -c éé") && kept.ends_with('…'),
            "{kept}"
        );
        assert!(
            kept.len() <= CMDLINE_KEPT + '…'.len_utf8(),
            "{}",
            kept.len()
        );
        let exact = vec!["x".repeat(CMDLINE_KEPT)];
        assert_eq!(kept_cmdline(&exact), exact[0]);
    }
}
