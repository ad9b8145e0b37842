//! The eBPF observer: loads the `styxy-ebpf` object, attaches its programs to a cgroup v2
//! directory, and turns the ring buffer's records into [`PortEvent`]s for the broker.
//!
//! Links are plain file descriptors (`bpf_link_create`), never pinned: they detach when the daemon
//! exits, `kill -9` included, so nothing is left attached behind it and no bpffs is needed.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, TracePoint};
use aya::{Ebpf, EbpfLoader};
use aya_log::EbpfLogger;
use styxy_common::env;
use styxy_common::event::{
    port_slot, BindEvent, BoundRecord, BOUND_MAP, CONFIG_MAP, CONFIG_NETNS_COOKIE, DROPPED_MAP,
    EVENTS_MAP, EVENTS_RING_RECORDS, FLAG_REWRITTEN, IPPROTO_TCP, IPPROTO_UDP, KIND_BOUND,
    KIND_RELEASED, KIND_WAKE, PORTS_MAP, PORT_SLOTS, PROGRAMS_SOCK,
};
use styxy_common::paths::{artifact_candidates, EBPF_OBJECT};
use styxy_common::session;

use crate::kernel_sessions::KernelSessionMaps;
use crate::observe::kernel_log::{KernelLogLevel, ToTracing};
use crate::observe::mapped::MappedArray;
use crate::observe::session_programs::{self, SessionPrograms};
use crate::observe::{procs, PortCounts};
use styxy_broker::{BoundSocket, Family, PortEvent, ProcessInfo, Protocol};

/// Where the object may be: see [`artifact_candidates`] (`$STYXY_EBPF_OBJECT` first;
/// `cargo xtask build-ebpf` puts it in `target/`, above the binaries).
fn object_candidates() -> Vec<PathBuf> {
    artifact_candidates(env::EBPF_OBJECT, EBPF_OBJECT)
}

/// The object to load, or why there is none.
pub fn find_object(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        if path.is_file() {
            return Ok(path.to_path_buf());
        }
        bail!("--ebpf-object {}: no such file", path.display());
    }
    let candidates = object_candidates();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "no eBPF object ({EBPF_OBJECT}) in {}; build it with `cargo xtask build-ebpf`",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// Where cgroup v2 is mounted: `/sys/fs/cgroup` on a unified layout, `/sys/fs/cgroup/unified` on
/// a hybrid one; read from this process's mount table.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = procfs::process::Process::myself()
        .and_then(|me| me.mountinfo())
        .context("reading /proc/self/mountinfo")?;
    mounts
        .into_iter()
        .find(|m| m.fs_type == "cgroup2")
        .map(|m| m.mount_point)
        .context("no cgroup v2 mount found (mount one with `mount -t cgroup2 none /sys/fs/cgroup`)")
}

/// Records drained between two readings of the lost-record counter: half a full ring.
const DROP_CHECK_RECORDS: usize = EVENTS_RING_RECORDS / 2;
/// The longest time between two readings of the lost-record counter while records arrive.
const DROP_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The loaded, attached programs and the maps the daemon reads.
pub struct Attached {
    /// Owns the programs and their links (shared with the kernel sessions' [`SessionPrograms`]):
    /// dropping both detaches everything.
    _ebpf: Arc<Mutex<Ebpf>>,
    pub events: RingBuf<MapData>,
    dropped: PerCpuArray<MapData, u64>,
    /// Binds of ephemeral ports outside every service range, counted but not reported one by one.
    unreported: PerCpuArray<MapData, u64>,
    unreported_seen: u64,
    bound: BpfHashMap<MapData, u64, BoundRecord>,
    /// The reader's state word (see `styxy_common::session::READER_MAP`).
    reader: MappedArray<AtomicU32>,
    /// Until handed to the engine with [`Attached::take_port_counts`].
    ports: Option<KernelPortCounts>,
    /// Until handed to the engine with [`Attached::take_sessions`]; else why there are none.
    sessions: Result<KernelSessionMaps, String>,
    /// The kernel programs' log records, unless `--ebpf-log off`.
    pub log: Option<EbpfLogger<ToTracing>>,
    pub cgroup: PathBuf,
    dropped_seen: u64,
    /// Records drained since `DROPPED` was last read, and when that was.
    drained_since_drop_check: usize,
    last_drop_check: std::time::Instant,
}

/// The kernel's `PORTS` counts, mapped into memory: a read is a load, no syscall. The daemon adds
/// the sockets bound before the programs attached (whose release the kernel then counts down),
/// so the counts are every socket bound now, for the programs as for the daemon. Any error in
/// them leans to "bound" (a socket counted twice), never to "free": the engine then reads the
/// socket tables, as without counts.
pub struct KernelPortCounts {
    mapped: MappedArray<AtomicU64>,
    /// Ports the programs do not count one by one: ephemeral ports (`ip_local_port_range`)
    /// outside every service range, whose binds are counted only in `UNREPORTED`.
    uncounted: Vec<bool>,
}

impl KernelPortCounts {
    fn new(
        mapped: MappedArray<AtomicU64>,
        ranges: &[(u16, u16)],
        (low, high): (u16, u16),
    ) -> KernelPortCounts {
        let uncounted = (0..=u16::MAX)
            .map(|port| {
                (low..=high).contains(&port)
                    && !ranges
                        .iter()
                        .any(|(start, end)| (*start..=*end).contains(&port))
            })
            .collect();
        KernelPortCounts { mapped, uncounted }
    }

    fn slot(&self, protocol: u8, port: u16) -> u64 {
        self.mapped
            .slot(port_slot(protocol, port) as usize)
            .load(Ordering::Relaxed)
    }
}

/// The kernel's range of ephemeral ports (what a port-0 bind gets).
pub(crate) fn ephemeral_ports() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut words = text.split_whitespace().map(|w| w.parse::<u16>().ok());
            Some((words.next()??, words.next()??))
        })
        .unwrap_or((32_768, 60_999))
}

impl PortCounts for KernelPortCounts {
    fn bound(&self, port: u16, protocol: Option<Protocol>) -> Option<u64> {
        if self.uncounted[usize::from(port)] {
            return None;
        }
        let tcp = || self.slot(IPPROTO_TCP, port);
        let udp = || self.slot(IPPROTO_UDP, port);
        Some(match protocol {
            Some(Protocol::Tcp) => tcp(),
            Some(Protocol::Udp) => udp(),
            None => tcp().wrapping_add(udp()),
        })
    }
}

impl std::os::fd::AsRawFd for Attached {
    /// The ring buffer's descriptor: readable when records wait.
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.events.as_raw_fd()
    }
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
fn take_mapped<A: crate::observe::mapped::Slot>(
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
fn map_array<A: crate::observe::mapped::Slot>(
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
    task: crate::observe::kernel_btf::TaskOffsets,
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
        task: crate::observe::kernel_btf::running_kernel_offsets()?,
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
    let target = c"/sys/kernel/tracing";
    // SAFETY: valid NUL-terminated strings; a failure is reported.
    let rc = unsafe {
        libc::mount(
            c"tracefs".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "tracefs is not mounted and mounting it at /sys/kernel/tracing failed: {}",
            std::io::Error::last_os_error()
        );
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
    pub object: &'a Path,
    pub cgroup: &'a Path,
    /// The cgroup is the root: the programs see every bind, so they may move and redirect.
    pub whole_machine: bool,
    pub log_level: KernelLogLevel,
    /// The service ranges, in the broker's order (their index is the kernel's range number).
    pub ranges: Vec<(u16, u16)>,
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
    let cgroup_dir = std::fs::File::open(cgroup)
        .with_context(|| format!("opening cgroup directory {}", cgroup.display()))?;
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
            crate::observe::kernel_btf::TaskOffsets {
                group_leader: 0,
                start_time: 0,
                cred: 0,
                euid: 0,
            },
            0,
        ),
    };
    let log_level = options.log_level.aya_level();
    let (ephemeral_low, ephemeral_high) = ephemeral_ports();
    let ephemeral_in_no_range = u32::from(
        !options
            .ranges
            .iter()
            .any(|(start, end)| *start <= ephemeral_high && *end >= ephemeral_low),
    );
    let mut ebpf = EbpfLoader::new()
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
        .override_global(session::GLOBAL_ENFORCE, &enforce, true)
        .override_global("AYA_LOG_LEVEL", &log_level, true)
        .override_global("EPHEMERAL_LOW", &u32::from(ephemeral_low), true)
        .override_global("EPHEMERAL_HIGH", &u32::from(ephemeral_high), true)
        .override_global("EPHEMERAL_IN_NO_RANGE", &ephemeral_in_no_range, true)
        .load_file(object)
        .with_context(|| format!("loading eBPF object {}", object.display()))?;
    // The two program types share no trait for load/attach: the same steps, once per type.
    macro_rules! load_and_attach {
        ($kind:ty, $names:expr) => {
            for name in $names {
                let program: &mut $kind = ebpf
                    .program_mut(name)
                    .with_context(|| format!("program {name} missing from {}", object.display()))?
                    .try_into()?;
                program.load().with_context(|| format!("loading {name}"))?;
                program
                    .attach(&cgroup_dir, CgroupAttachMode::Single)
                    .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
            }
        };
    }
    load_and_attach!(CgroupSock, PROGRAMS_SOCK);
    // Every program is loaded before any map is taken out of the object (a taken map's
    // descriptor may close, and the programs refer to the maps by descriptor).
    if offsets.is_ok() {
        for name in session_programs::cgroup_program_names() {
            let program: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from {}", object.display()))?
                .try_into()?;
            program.load().with_context(|| format!("loading {name}"))?;
        }
        for (name, _) in session_programs::TRACEPOINTS {
            let program: &mut TracePoint = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from {}", object.display()))?
                .try_into()?;
            program.load().with_context(|| format!("loading {name}"))?;
        }
    }
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
        take_mapped(&mut ebpf, session::PORT_INFO_MAP, 65_536, true)?;
    for port in 0..=u16::MAX {
        let range = options
            .ranges
            .iter()
            .take(session::RANGES_MAX as usize)
            .position(|(start, end)| (*start..=*end).contains(&port))
            .and_then(|i| u32::try_from(i).ok());
        let info = session::PortInfo::new(0, range);
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
    let events = take(&mut ebpf, EVENTS_MAP)?;
    let dropped = take(&mut ebpf, DROPPED_MAP)?;
    let unreported = take(&mut ebpf, "UNREPORTED")?;
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
        Ok((sessions, views, sticky, spares)) => Ok(KernelSessionMaps {
            sessions,
            views,
            sticky,
            port_info,
            spares,
            ports: ports_for_sessions,
            programs: SessionPrograms::new(
                ebpf.clone(),
                cgroup_dir
                    .try_clone()
                    .context("duplicating the cgroup directory's descriptor")?,
            ),
        }),
        Err(reason) => Err(reason),
    };
    Ok(Attached {
        _ebpf: ebpf,
        events,
        dropped,
        unreported,
        unreported_seen: 0,
        bound,
        reader,
        ports: Some(ports),
        sessions,
        log,
        cgroup: cgroup.to_path_buf(),
        dropped_seen: 0,
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

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; lift it (harmless on newer ones).
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit struct; failure only matters on old kernels and shows at load time.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}

impl Attached {
    /// Tell the kernel side about sockets bound before it attached, so their release is reported.
    pub fn seed_bound(&mut self, sockets: &[BoundSocket]) -> usize {
        let mut seeded = 0;
        for socket in sockets.iter().filter(|s| s.cookie != 0) {
            let record = BoundRecord {
                port: socket.port,
                family: socket.family.af(),
                protocol: socket.protocol.ipproto(),
                _pad: 0,
                addr: address_bytes(socket.address),
            };
            // Seen by post_bind already (bound after the programs attached): counted there.
            if self.bound.get(&socket.cookie, 0).is_ok() {
                continue;
            }
            if self.bound.insert(socket.cookie, record, 0).is_ok() {
                seeded += 1;
                if let Some(ports) = &self.ports {
                    ports
                        .mapped
                        .slot(port_slot(record.protocol, record.port) as usize)
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        seeded
    }

    /// The per-port counts, for the engine's point checks (once).
    pub fn take_port_counts(&mut self) -> Option<KernelPortCounts> {
        self.ports.take()
    }

    /// The session maps, for the engine (once); else why the kernel manages no sessions.
    pub fn take_sessions(&mut self) -> Result<KernelSessionMaps, String> {
        std::mem::replace(&mut self.sessions, Err("handed over already".into()))
    }

    /// Tells the programs whether the reader is about to wait for a wake-up
    /// (`READER_SLEEPING`) or is draining (`READER_AWAKE`: records come without one). The
    /// store is followed by a full fence, so a reader that says "sleeping" and then looks at the
    /// ring sees every record whose program read "awake" (see `reader_sleeps_now` there).
    pub fn set_reader_state(&self, state: u32) {
        self.reader.slot(0).store(state, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
    }

    /// Binds of ephemeral ports outside every service range since the last call (counted, not reported): a
    /// syscall, so the reader calls it about once a second.
    pub fn newly_unreported(&mut self) -> u64 {
        counted_since(&self.unreported, &mut self.unreported_seen)
    }

    /// Records lost since the last call (the ring buffer was full).
    ///
    /// Reading the kernel's counter is a syscall, so it is read only when it can have moved since
    /// the last reading: a record is lost only when the ring is full, and every record in the ring
    /// at that moment is drained afterwards, so a loss shows by the time [`DROP_CHECK_RECORDS`]
    /// (half a full ring) have been drained since the last reading. Also read after
    /// [`DROP_CHECK_INTERVAL`], for the instant between a failed reservation and its count.
    pub fn newly_dropped(&mut self) -> u64 {
        if self.drained_since_drop_check < DROP_CHECK_RECORDS
            && self.last_drop_check.elapsed() < DROP_CHECK_INTERVAL
        {
            return 0;
        }
        self.drained_since_drop_check = 0;
        self.last_drop_check = std::time::Instant::now();
        counted_since(&self.dropped, &mut self.dropped_seen)
    }

    /// Every record waiting in the ring buffer, as broker events, with the kernel time
    /// (`CLOCK_MONOTONIC` ns) of each record.
    pub fn drain(
        &mut self,
        owners: &mut OwnerCache,
        instance_of: &dyn Fn(u32) -> Option<String>,
    ) -> (Vec<PortEvent>, Vec<u64>) {
        let mut events = Vec::new();
        let mut seen_at = Vec::new();
        while let Some(item) = self.events.next() {
            self.drained_since_drop_check += 1;
            let Some(record) = BindEvent::from_bytes(&item) else {
                continue;
            };
            if record.kind == KIND_WAKE {
                continue;
            }
            seen_at.push(record.timestamp_ns);
            if let Some(event) = port_event(&record, owners, instance_of) {
                events.push(event);
            }
        }
        (events, seen_at)
    }
}

/// What a per-CPU counter (index 0, summed over the CPUs) gained since `seen`, which it updates;
/// 0 when it cannot be read.
fn counted_since(counter: &PerCpuArray<MapData, u64>, seen: &mut u64) -> u64 {
    let total: u64 = counter
        .get(&0, 0)
        .map(|per_cpu| per_cpu.iter().sum())
        .unwrap_or(*seen);
    let new = total.saturating_sub(*seen);
    *seen = total;
    new
}

/// `CLOCK_MONOTONIC` in ns: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    // SAFETY: timespec is plain data; clock_gettime fills it and cannot fail for this clock.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

fn address_bytes(address: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match address {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out.copy_from_slice(&v6.octets()),
    }
    out
}

/// Process details by pid, so a burst of binds from one process reads `/proc` once. An entry is
/// trusted for [`OwnerCache::FRESH_NS`] and only while the record's comm matches (an `exec`
/// changes it), so a reused pid or a new program is looked up again.
#[derive(Default)]
pub struct OwnerCache {
    by_pid: HashMap<u32, CachedOwner>,
}

struct CachedOwner {
    info: Option<ProcessInfo>,
    comm: [u8; 16],
    fetched_ns: u64,
}

impl OwnerCache {
    const FRESH_NS: u64 = 1_000_000_000;
    const MAX_ENTRIES: usize = 4096;

    fn owner(&mut self, event: &BindEvent) -> Option<ProcessInfo> {
        let now = monotonic_ns();
        if let Some(cached) = self.by_pid.get(&event.tgid) {
            if cached.comm == event.comm && now.saturating_sub(cached.fetched_ns) < Self::FRESH_NS {
                return cached.info.clone();
            }
        }
        if self.by_pid.len() >= Self::MAX_ENTRIES {
            self.by_pid.clear();
        }
        let info = procs::process_info(event.tgid);
        self.by_pid.insert(
            event.tgid,
            CachedOwner {
                info: info.clone(),
                comm: event.comm,
                fetched_ns: now,
            },
        );
        info
    }
}

/// A kernel record as a broker event; `None` for what the broker does not track.
pub fn port_event(
    event: &BindEvent,
    owners: &mut OwnerCache,
    instance_of: &dyn Fn(u32) -> Option<String>,
) -> Option<PortEvent> {
    match event.kind {
        KIND_RELEASED => Some(PortEvent::Released {
            cookie: event.cookie,
        }),
        KIND_BOUND => {
            let protocol = Protocol::from_ipproto(event.protocol)?;
            let family = Family::from_af(event.family)?;
            let address = match family {
                Family::Inet => {
                    let mut v4 = [0u8; 4];
                    v4.copy_from_slice(&event.addr[..4]);
                    IpAddr::V4(Ipv4Addr::from(v4))
                }
                Family::Inet6 => IpAddr::V6(Ipv6Addr::from(event.addr)),
            };
            let socket = BoundSocket {
                cookie: event.cookie,
                protocol,
                family,
                address,
                port: event.port,
                uid: event.uid,
                owner: owners.owner(event),
                since_ms: crate::engine::now_ms(),
            };
            let moved = event.flags & FLAG_REWRITTEN != 0 && event.requested_port != event.port;
            match instance_of(event.session).filter(|_| moved) {
                Some(instance_id) => Some(PortEvent::MovedByKernel {
                    project: socket
                        .owner
                        .as_ref()
                        .and_then(|o| super::procs::project_of(o.id.pid)),
                    socket,
                    asked: event.requested_port,
                    instance_id,
                }),
                None => Some(PortEvent::Bound(socket)),
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_records_become_broker_events() {
        let mut record = BindEvent::zeroed();
        record.kind = KIND_BOUND;
        record.family = Family::Inet6.af();
        record.protocol = Protocol::Udp.ipproto();
        record.port = 5353;
        record.cookie = 42;
        record.tgid = u32::MAX; // no such process: no owner
        record.addr[15] = 1; // ::1
        let mut owners = OwnerCache::default();
        let none = |_: u32| None;
        let Some(PortEvent::Bound(socket)) = port_event(&record, &mut owners, &none) else {
            panic!("a bound record gives a Bound event");
        };
        assert_eq!(
            (socket.port, socket.protocol, socket.family, socket.cookie),
            (5353, Protocol::Udp, Family::Inet6, 42)
        );
        assert_eq!(socket.address, IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert!(socket.owner.is_none());

        record.kind = KIND_RELEASED;
        assert_eq!(
            port_event(&record, &mut owners, &none),
            Some(PortEvent::Released { cookie: 42 })
        );
        record.kind = KIND_BOUND;
        record.protocol = 132; // SCTP: not tracked
        assert_eq!(port_event(&record, &mut owners, &none), None);
    }

    #[test]
    fn a_kernel_move_becomes_a_moved_by_kernel_event_of_its_session() {
        let mut record = BindEvent::zeroed();
        record.kind = KIND_BOUND;
        record.family = Family::Inet.af();
        record.protocol = Protocol::Tcp.ipproto();
        record.tgid = u32::MAX;
        record.port = 8001;
        record.requested_port = 8000;
        record.flags = FLAG_REWRITTEN;
        record.session = 3;
        let mut owners = OwnerCache::default();
        let sessions = |n: u32| (n == 3).then(|| "run-7".to_string());
        let Some(PortEvent::MovedByKernel {
            socket,
            asked,
            instance_id,
            ..
        }) = port_event(&record, &mut owners, &sessions)
        else {
            panic!("a rewritten bind of a known session is a kernel move");
        };
        assert_eq!(
            (socket.port, asked, instance_id.as_str()),
            (8001, 8000, "run-7")
        );
        // A session the daemon does not know (or no rewrite): a plain bind.
        record.session = 4;
        assert!(matches!(
            port_event(&record, &mut owners, &sessions),
            Some(PortEvent::Bound(_))
        ));
    }

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
