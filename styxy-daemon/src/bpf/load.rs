//! Loading the `styxy-ebpf` object: the globals the programs read, the observer's programs
//! attached to a cgroup v2 directory, the session programs loaded (attached later, by
//! [`SessionPrograms`]), and the maps the daemon keeps.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use aya::maps::{Array, MapData, RingBuf};
use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, Lsm, TracePoint};
use aya::{Ebpf, EbpfLoader};
use aya_log::EbpfLogger;
use styxy_common::event::{
    BOUND_MAP, CONFIG_MAP, CONFIG_NETNS_COOKIE, DROPPED_MAP, EVENTS_MAP, PORTS_MAP, PORT_SLOTS,
    PROGRAMS_SOCK,
};
use styxy_common::maps::{PORT_INFO_LEN, UNREPORTED_MAP};
use styxy_common::{protection, session};

use super::attached::{counted_since, Attached, DROP_CHECK_RECORDS};
use super::counts::KernelPortCounts;
use super::kernel_btf;
use super::kernel_log::{KernelLogLevel, ToTracing};
use super::mapped::{MappedArray, Slot};
use super::pins::{self, ObserverLinks, Pins};
use super::protection::{KillProtection, Refusals};
use super::session_programs::{self, SessionPrograms};
use super::sessions::{KernelSessionMaps, NUMBERS_FILE};

/// The kernel's range of ephemeral ports (what a port-0 bind gets), as (first, last).
pub fn ephemeral_ports() -> (u16, u16) {
    let range = styxy_common::net::ephemeral_ports();
    (*range.start(), *range.end())
}

/// Takes map `name` out of `ebpf`, as type `M`.
fn take<M>(ebpf: &mut Ebpf, name: &str) -> Result<M>
where
    M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))?;
    M::try_from(map).with_context(|| format!("map {name}"))
}

/// Maps array `name` of `len` values into memory.
fn take_mapped<A: Slot>(
    ebpf: &mut Ebpf,
    name: &str,
    len: u32,
    writable: bool,
) -> Result<MappedArray<A>> {
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))?;
    // The mapping keeps the map alive; the descriptor may close.
    map_array(&map, name, len, writable)
}

/// A mapping of `map`, array `name` of `len` values.
fn map_array<A: Slot>(
    map: &aya::maps::Map,
    name: &str,
    len: u32,
    writable: bool,
) -> Result<MappedArray<A>> {
    let aya::maps::Map::Array(data) = map else {
        bail!("map {name} is not an array");
    };
    MappedArray::new(data.fd().as_fd(), len as usize, writable)
        .with_context(|| format!("mapping {name} into memory (needs Linux 5.5+)"))
}

/// Offsets the session programs need: in the tracepoints' records, from their own formats in
/// tracefs (they moved between kernel versions: 6.x records comms as `__data_loc`), and in the
/// kernel's task structs, from its BTF (see `kernel_btf`).
struct SessionOffsets {
    fork_child_pid: u32,
    exit_group_dead: u32,
    exec_pid: u32,
    exec_old_pid: u32,
    task: kernel_btf::TaskOffsets,
}

fn session_offsets() -> Result<SessionOffsets> {
    let tracefs = tracefs()?;
    let offset = |event: &str, field: &str| -> Result<u32> {
        let path = tracefs.join("events/sched").join(event).join("format");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        field_offset(&text, field)
            .with_context(|| format!("no field {field} in {}", path.display()))
    };
    Ok(SessionOffsets {
        fork_child_pid: offset("sched_process_fork", "child_pid")?,
        exit_group_dead: offset("sched_process_exit", "group_dead")?,
        exec_pid: offset("sched_process_exec", "pid")?,
        exec_old_pid: offset("sched_process_exec", "old_pid")?,
        task: kernel_btf::running_kernel_offsets()?,
    })
}

/// Where tracefs is; mounted at `/sys/kernel/tracing` when it is not mounted anywhere yet (as
/// systemd does at boot; some minimal systems do not).
fn tracefs() -> Result<PathBuf> {
    for dir in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        if Path::new(dir).join("events").is_dir() {
            return Ok(PathBuf::from(dir));
        }
    }
    if let Err(e) = super::object::mount_kernel_fs(c"tracefs", c"/sys/kernel/tracing") {
        bail!("tracefs is not mounted and mounting it at /sys/kernel/tracing failed: {e}");
    }
    tracing::info!("mounted tracefs at /sys/kernel/tracing (for the session tracepoints)");
    Ok(PathBuf::from("/sys/kernel/tracing"))
}

/// The `offset:` of `field` in a tracefs `format` file.
fn field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let mut parts = line.trim().split(';').map(str::trim);
        let declaration = parts.next()?.strip_prefix("field:")?;
        let name = declaration.split_whitespace().last()?;
        if name.split('[').next()? != field {
            return None;
        }
        parts.find_map(|p| p.strip_prefix("offset:")?.parse().ok())
    })
}

/// How the programs are loaded.
pub struct AttachOptions<'a> {
    pub object: &'a super::object::Object,
    pub cgroup: &'a Path,
    /// The cgroup is the root: the programs see every bind, so they may move and redirect.
    pub whole_machine: bool,
    pub log_level: KernelLogLevel,
    /// The service ranges, in the broker's order (their index is the kernel's range number).
    pub ranges: Vec<(u16, u16)>,
    /// The daemon's state directory: its programs and maps are pinned under its name (see
    /// [`Pins`]), and its kernel sessions' numbers kept in it.
    pub state_dir: &'a Path,
    /// Whether the kernel refuses signals between sessions where BPF LSM allows it (see
    /// [`super::protection`]).
    pub kill_protection: bool,
}

/// Loads the object and attaches the observer's programs (post_bind4|6, sock_release) to the
/// cgroup directory; the session programs are loaded (and so verified) too, and attached by
/// [`SessionPrograms`] while a kernel session is live.
///
/// The attach mode is `Single` because these are links (kernel ≥ 5.7): link_create takes no
/// flags, and cgroup links always coexist with other programs, as `AllowMultiple` would.
pub fn attach(options: &AttachOptions<'_>) -> Result<Attached> {
    let (object, cgroup) = (options.object, options.cgroup);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the eBPF observer needs root (CAP_BPF and CAP_NET_ADMIN, or CAP_SYS_ADMIN)");
    }
    raise_memlock_limit();
    let bytes: &[u8] = &object.bytes;
    let cgroup_dir = std::fs::File::open(cgroup)
        .with_context(|| format!("opening cgroup directory {}", cgroup.display()))?;
    ensure_cgroup2(&cgroup_dir, cgroup)?;
    // Sessions need the whole machine (a port held anywhere must count), the tracepoints and
    // the kernel's type information.
    let offsets = if options.whole_machine {
        session_offsets().map_err(|e| format!("{e:#}"))
    } else {
        Err(format!(
            "the programs are attached to {}, below the cgroup root, and see only its binds",
            cgroup.display()
        ))
    };
    let (fork_offset, exit_offset, exec_offsets, task, enforce) = match &offsets {
        Ok(o) => (
            o.fork_child_pid,
            o.exit_group_dead,
            (o.exec_pid, o.exec_old_pid),
            o.task,
            1u32,
        ),
        Err(_) => (
            0,
            0,
            (0, 0),
            kernel_btf::TaskOffsets {
                group_leader: 0,
                start_time: 0,
                cred: 0,
                euid: 0,
                tgid: 0,
                comm: 0,
            },
            0,
        ),
    };
    // Pinned, so the sessions outlive this daemon, when the programs may enforce sessions;
    // otherwise whatever an earlier daemon of this state directory left pinned goes.
    let pins = match (&offsets, options.whole_machine) {
        (Ok(_), true) => match Pins::prepare(options.state_dir, bytes) {
            Ok(pins) => Some(Arc::new(pins)),
            Err(e) => {
                tracing::warn!(cause = %format!("{e:#}"),
                    "the kernel programs are not pinned: kernel sessions end with this daemon");
                pins::remove_left_behind(options.state_dir);
                None
            }
        },
        _ => {
            pins::remove_left_behind(options.state_dir);
            None
        }
    };
    let reused = pins.as_ref().is_some_and(|p| p.reused());
    let log_level = options.log_level.aya_level();
    let (ephemeral_low, ephemeral_high) = ephemeral_ports();
    let ephemeral_in_no_range = u32::from(
        !options
            .ranges
            .iter()
            .any(|(start, end)| *start <= ephemeral_high && *end >= ephemeral_low),
    );
    let mut loader = EbpfLoader::new();
    if let Some(pins) = &pins {
        for map in styxy_common::maps::MAPS {
            loader.map_pin_path(map.name, pins.map_path(map.name));
        }
    }
    let mut ebpf = loader
        .override_global(session::GLOBAL_FORK_CHILD_PID_OFFSET, &fork_offset, true)
        .override_global(session::GLOBAL_EXIT_GROUP_DEAD_OFFSET, &exit_offset, true)
        .override_global(session::GLOBAL_EXEC_PID_OFFSET, &exec_offsets.0, true)
        .override_global(session::GLOBAL_EXEC_OLD_PID_OFFSET, &exec_offsets.1, true)
        .override_global(
            session::GLOBAL_TASK_GROUP_LEADER_OFFSET,
            &task.group_leader,
            true,
        )
        .override_global(
            session::GLOBAL_TASK_START_TIME_OFFSET,
            &task.start_time,
            true,
        )
        .override_global(session::GLOBAL_TASK_CRED_OFFSET, &task.cred, true)
        .override_global(session::GLOBAL_CRED_EUID_OFFSET, &task.euid, true)
        .override_global(protection::GLOBAL_TASK_TGID_OFFSET, &task.tgid, true)
        .override_global(protection::GLOBAL_TASK_COMM_OFFSET, &task.comm, true)
        .override_global(session::GLOBAL_ENFORCE, &enforce, true)
        .override_global("AYA_LOG_LEVEL", &log_level, true)
        .override_global("EPHEMERAL_LOW", &u32::from(ephemeral_low), true)
        .override_global("EPHEMERAL_HIGH", &u32::from(ephemeral_high), true)
        .override_global("EPHEMERAL_IN_NO_RANGE", &ephemeral_in_no_range, true)
        .load(bytes)
        .with_context(|| format!("loading the eBPF object ({})", object.origin))?;
    let mut links = Vec::new();
    for name in PROGRAMS_SOCK {
        let program: &mut CgroupSock = ebpf
            .program_mut(name)
            .with_context(|| {
                format!(
                    "program {name} missing from the eBPF object ({})",
                    object.origin
                )
            })?
            .try_into()?;
        program.load().with_context(|| format!("loading {name}"))?;
        let fd = program.fd()?.as_fd().try_clone_to_owned()?;
        // Pinned while a session lives (see `ObserverLinks`): the last daemon's are, when a
        // session outlived it.
        let link = pins::hold_cgroup_link(pins.as_deref(), name, fd.as_fd(), false, || {
            let id = program
                .attach(&cgroup_dir, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
            Ok(FdLink::try_from(program.take_link(id)?)?)
        })?;
        links.push((name, link));
    }
    let observer_links = Arc::new(ObserverLinks::new(pins.clone(), links));
    // Every program is loaded before any map is taken out of the object (a taken map's
    // descriptor may close, and the programs refer to the maps by descriptor).
    if offsets.is_ok() {
        for name in session_programs::cgroup_program_names() {
            let program: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .with_context(|| {
                    format!(
                        "program {name} missing from the eBPF object ({})",
                        object.origin
                    )
                })?
                .try_into()?;
            program.load().with_context(|| format!("loading {name}"))?;
        }
        for (name, _) in session_programs::TRACEPOINTS {
            let program: &mut TracePoint = ebpf
                .program_mut(name)
                .with_context(|| {
                    format!(
                        "program {name} missing from the eBPF object ({})",
                        object.origin
                    )
                })?
                .try_into()?;
            program.load().with_context(|| format!("loading {name}"))?;
        }
    }
    let kill_protection = match &offsets {
        Ok(_) if !options.kill_protection => {
            KillProtection::Off("turned off (styxy daemon --kill-protection off)".to_string())
        }
        Ok(_) => load_task_kill(&mut ebpf),
        Err(reason) => KillProtection::Off(reason.clone()),
    };
    // PORTS twice from one descriptor: writable for the counts (the daemon adds what was bound
    // before), read-only for the session maps' spare-port choice.
    let (ports, ports_for_sessions) = {
        let map = ebpf.take_map(PORTS_MAP).context("map PORTS missing")?;
        let writable = map_array(&map, PORTS_MAP, PORT_SLOTS, true)?;
        let read_only = map_array(&map, PORTS_MAP, PORT_SLOTS, false)?;
        (
            KernelPortCounts::new(writable, &options.ranges, (ephemeral_low, ephemeral_high)),
            read_only,
        )
    };
    // PORT_INFO: the service range of every port, which the programs need to move a bind and to
    // know which port-0 binds to report; the session maps keep the lease holders in it.
    let port_info: MappedArray<AtomicU64> =
        take_mapped(&mut ebpf, session::PORT_INFO_MAP, PORT_INFO_LEN, true)?;
    for port in 0..=u16::MAX {
        let range = options
            .ranges
            .iter()
            .take(session::RANGES_MAX as usize)
            .position(|(start, end)| (*start..=*end).contains(&port))
            .and_then(|i| u32::try_from(i).ok());
        // Who holds it stays as the last daemon left it, until the broker's holders are
        // published (see `KernelSessions::publish_all`).
        let slot = port_info.slot(usize::from(port));
        let (held_by, held_for) = if reused {
            let left = session::PortInfo(slot.load(Ordering::Acquire));
            (left.reserved_by(), left.held_for())
        } else {
            (0, 0)
        };
        let info = session::PortInfo::new(held_by, held_for, range);
        port_info
            .slot(usize::from(port))
            .store(info.0, Ordering::Release);
    }
    let sessions_maps = match offsets {
        Ok(_) => Ok((
            take(&mut ebpf, session::SESSIONS_MAP)?,
            take(&mut ebpf, session::VIEWS_MAP)?,
            take(&mut ebpf, session::STICKY_MAP)?,
            take_mapped(&mut ebpf, session::SPARES_MAP, session::SPARES_LEN, true)?,
            (
                take(&mut ebpf, session::FOCUS_MAP)?,
                take(&mut ebpf, session::FOCUSING_MAP)?,
            ),
            Refusals::new(take(&mut ebpf, protection::REFUSALS_MAP)?),
        )),
        Err(reason) => Err(reason),
    };
    let log = if options.log_level == KernelLogLevel::Off {
        None
    } else {
        Some(
            EbpfLogger::init_with_logger(&mut ebpf, ToTracing)
                .context("reading the kernel programs' log")?,
        )
    };
    let mut events: RingBuf<MapData> = take(&mut ebpf, EVENTS_MAP)?;
    let dropped = take(&mut ebpf, DROPPED_MAP)?;
    let unreported = take(&mut ebpf, UNREPORTED_MAP)?;
    let (mut dropped_seen, mut unreported_seen) = (0, 0);
    if reused {
        // What happened while no daemon ran is in the first reading of the socket tables, which
        // comes next; records of it would only repeat it, older.
        while events.next().is_some() {}
        dropped_seen = counted_since(&dropped, &mut 0);
        unreported_seen = counted_since(&unreported, &mut 0);
    }
    let bound = take(&mut ebpf, BOUND_MAP)?;
    let reader = take_mapped(&mut ebpf, session::READER_MAP, 1, true)?;
    // Only binds in this network namespace: a container's ports are not the host's.
    if let Some(cookie) = own_netns_cookie() {
        let mut config: Array<MapData, u64> = take(&mut ebpf, CONFIG_MAP)?;
        config
            .set(CONFIG_NETNS_COOKIE, cookie, 0)
            .context("writing the network namespace to the eBPF programs")?;
    }
    let ebpf = Arc::new(Mutex::new(ebpf));
    let sessions = match sessions_maps {
        Ok((sessions, views, sticky, spares, (focus, focusing), refusals)) => {
            Ok(KernelSessionMaps {
                sessions,
                views,
                sticky,
                focus,
                focusing,
                port_info,
                spares,
                ports: ports_for_sessions,
                programs: SessionPrograms::new(
                    ebpf.clone(),
                    cgroup_dir
                        .try_clone()
                        .context("duplicating the cgroup directory's descriptor")?,
                    pins.clone(),
                    observer_links.clone(),
                    kill_protection,
                )?,
                refusals,
                numbers_file: options.state_dir.join(NUMBERS_FILE),
                reused,
            })
        }
        Err(reason) => Err(reason),
    };
    Ok(Attached {
        _ebpf: ebpf,
        _links: observer_links,
        pins: pins.map(|p| p.dir().to_path_buf()),
        events,
        dropped,
        unreported,
        unreported_seen,
        bound,
        reader,
        ports: Some(ports),
        sessions,
        log,
        cgroup: cgroup.to_path_buf(),
        dropped_seen,
        // So the first drain reads the counter.
        drained_since_drop_check: DROP_CHECK_RECORDS,
        last_drop_check: std::time::Instant::now(),
    })
}

/// This process's network namespace cookie (`SO_NETNS_COOKIE`, Linux 5.14+); `None` on older
/// kernels, where the programs then report binds from every namespace.
fn own_netns_cookie() -> Option<u64> {
    // SAFETY: a throwaway socket (never bound) queried for one u64 option, then closed.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        );
        libc::close(fd);
        (rc == 0 && cookie != 0).then_some(cookie)
    }
}

/// Loads `lsm/task_kill` when BPF LSM is active (attached with the session programs); else says
/// why the kernel does not protect sessions from each other's signals. Never fails the load: the
/// sessions work without it.
fn load_task_kill(ebpf: &mut Ebpf) -> KillProtection {
    if let Err(why) = super::protection::bpf_lsm_active() {
        return KillProtection::Off(why);
    }
    let loaded = (|| -> Result<()> {
        let btf = aya::Btf::from_sys_fs().context("reading the kernel's BTF")?;
        let program: &mut Lsm = ebpf
            .program_mut(protection::PROGRAM_TASK_KILL)
            .context("program missing from the eBPF object")?
            .try_into()?;
        program.load(protection::TASK_KILL_HOOK, &btf)?;
        Ok(())
    })();
    match loaded {
        Ok(()) => KillProtection::Kernel,
        Err(e) => {
            let mut why = format!("loading {} failed: {e:#}", protection::PROGRAM_TASK_KILL);
            if let Some(hint) = super::protection::refusal_hint(&why) {
                why = format!("{hint}; {why}");
            }
            tracing::warn!("{why}");
            KillProtection::Off(why)
        }
    }
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; lift it (harmless on newer ones).
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit struct; failure only matters on old kernels and shows at load time.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}

/// Fails with what to give instead when `dir` is not a directory of a cgroup v2 file system: the
/// kernel's own answer to attaching there is a bare EBADF.
fn ensure_cgroup2(dir: &std::fs::File, path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    /// `CGROUP2_SUPER_MAGIC` in linux/magic.h.
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    // SAFETY: statfs is plain data; all zeroes is a valid value of it.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a descriptor this function borrows, and a buffer of the right type.
    if unsafe { libc::fstatfs(dir.as_raw_fd(), &mut fs) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("reading the file system of {}", path.display()));
    }
    #[allow(clippy::unnecessary_cast)] // f_type is i64 on x86_64, not on every target.
    let kind = fs.f_type as i64;
    if kind != CGROUP2_SUPER_MAGIC {
        bail!(
            "{} is not a cgroup v2 directory (its file system's magic is {kind:#x}); give --cgroup \
             a directory of the cgroup2 mount (`findmnt -t cgroup2`), or leave it out for the root",
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracepoint_field_offsets_come_from_the_format_text() {
        // Linux 6.x: comms as __data_loc, so child_pid is at 20, not at 44 as before.
        let fork = "name: sched_process_fork\nID: 366\nformat:\n\
            \tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
            \tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;\n\
            \tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;\n\
            \tfield:__data_loc char[] child_comm;\toffset:16;\tsize:4;\tsigned:0;\n\
            \tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;\n";
        assert_eq!(field_offset(fork, "child_pid"), Some(20));
        assert_eq!(field_offset(fork, "parent_comm"), Some(8));
        let old = "\tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:0;\n\
            \tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;\n";
        assert_eq!(field_offset(old, "child_comm"), Some(28));
        assert_eq!(field_offset(old, "child_pid"), Some(44));
        assert_eq!(field_offset(old, "group_dead"), None);
    }
}
