//! The eBPF observer: loads the `styxy-ebpf` object, attaches its programs to a cgroup v2
//! directory, and turns the ring buffer's records into [`PortEvent`]s for the broker.
//!
//! Links are plain file descriptors (`bpf_link_create`), never pinned: they detach when the daemon
//! exits, `kill -9` included, so nothing is left attached behind it and no bpffs is needed.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr};
use aya::Ebpf;
use styxy_common::env;
use styxy_common::event::{
    port_slot, BindEvent, BoundRecord, BOUND_MAP, CONFIG_MAP, CONFIG_NETNS_COOKIE, DROPPED_MAP,
    EVENTS_MAP, EVENTS_RING_RECORDS, IPPROTO_TCP, IPPROTO_UDP, KIND_BOUND, KIND_RELEASED,
    PORTS_MAP, PORT_SLOTS, PROGRAMS_SOCK, PROGRAMS_SOCK_ADDR,
};
use styxy_common::paths::{artifact_candidates, EBPF_OBJECT};

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
    /// Owns the programs and their links: dropping it detaches everything.
    _ebpf: Ebpf,
    pub events: RingBuf<MapData>,
    dropped: PerCpuArray<MapData, u64>,
    bound: BpfHashMap<MapData, u64, BoundRecord>,
    /// Until handed to the engine with [`Attached::take_port_counts`].
    ports: Option<KernelPortCounts>,
    pub cgroup: PathBuf,
    dropped_seen: u64,
    /// Records drained since `DROPPED` was last read, and when that was.
    drained_since_drop_check: usize,
    last_drop_check: std::time::Instant,
}

/// The kernel's `PORTS` counts plus the sockets that were bound before the programs attached.
///
/// The kernel counts what post_bind saw and subtracts what sock_release reports, including the
/// release of a socket the daemon seeded, so for such a port the kernel's count goes below zero
/// (wrapping) and `seeded` brings it back: the wrapping sum is the number of sockets bound now.
/// Any error in it leans to "bound" (a socket counted twice), never to "free": the engine then
/// reads the socket tables, as without counts.
pub struct KernelPortCounts {
    map: Array<MapData, u64>,
    /// The map in this process's memory, when the kernel allows it: a read is a load, no syscall.
    mapped: Option<MappedCounts>,
    seeded: Vec<u64>,
}

impl KernelPortCounts {
    fn new(map: aya::maps::Map) -> Result<KernelPortCounts> {
        let mapped = match &map {
            aya::maps::Map::Array(data) => MappedCounts::new(data.fd().as_fd()),
            _ => None,
        };
        Ok(KernelPortCounts {
            map: Array::try_from(map)?,
            mapped,
            seeded: vec![0; PORT_SLOTS as usize],
        })
    }

    /// Whether reads are plain loads from a mapping (else one syscall each).
    pub fn is_mapped(&self) -> bool {
        self.mapped.is_some()
    }

    fn slot(&self, protocol: u8, port: u16) -> Option<u64> {
        let slot = port_slot(protocol, port);
        let kernel = match &self.mapped {
            Some(mapped) => mapped.get(slot),
            None => self.map.get(&slot, 0).ok()?,
        };
        Some(kernel.wrapping_add(self.seeded[slot as usize]))
    }
}

/// A read-only shared mapping of the `PORTS` array (created `BPF_F_MMAPABLE`).
struct MappedCounts {
    base: std::ptr::NonNull<std::sync::atomic::AtomicU64>,
}

// SAFETY: the mapping is shared memory the kernel updates with atomic adds; this side only loads
// from it through AtomicU64, from any thread.
unsafe impl Send for MappedCounts {}
// SAFETY: as above.
unsafe impl Sync for MappedCounts {}

impl MappedCounts {
    const BYTES: usize = PORT_SLOTS as usize * std::mem::size_of::<u64>();

    fn new(fd: std::os::fd::BorrowedFd<'_>) -> Option<MappedCounts> {
        use std::os::fd::AsRawFd;
        // SAFETY: mapping a BPF array map's fd read-only and shared, at offset 0, for exactly its
        // size; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                Self::BYTES,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        Some(MappedCounts {
            base: std::ptr::NonNull::new(ptr.cast())?,
        })
    }

    fn get(&self, slot: u32) -> u64 {
        let slot = (slot as usize).min(PORT_SLOTS as usize - 1);
        // SAFETY: slot < PORT_SLOTS and the mapping holds PORT_SLOTS u64 values, 8-byte aligned
        // (page-aligned base).
        unsafe { self.base.as_ptr().add(slot).as_ref() }
            .map_or(0, |v| v.load(std::sync::atomic::Ordering::Relaxed))
    }
}

impl Drop for MappedCounts {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what new() mapped.
        unsafe { libc::munmap(self.base.as_ptr().cast(), Self::BYTES) };
    }
}

impl PortCounts for KernelPortCounts {
    fn bound(&self, port: u16, protocol: Option<Protocol>) -> Option<u64> {
        let tcp = || self.slot(IPPROTO_TCP, port);
        let udp = || self.slot(IPPROTO_UDP, port);
        match protocol {
            Some(Protocol::Tcp) => tcp(),
            Some(Protocol::Udp) => udp(),
            None => Some(tcp()?.wrapping_add(udp()?)),
        }
    }
}

impl std::os::fd::AsRawFd for Attached {
    /// The ring buffer's descriptor: readable when records wait.
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.events.as_raw_fd()
    }
}

/// Loads `object` and attaches every program to the cgroup directory `cgroup`.
///
/// The attach mode is `Single` because these are links (kernel ≥ 5.7): link_create takes no
/// flags, and cgroup links always coexist with other programs, as `AllowMultiple` would.
pub fn attach(object: &Path, cgroup: &Path) -> Result<Attached> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the eBPF observer needs root (CAP_BPF and CAP_NET_ADMIN, or CAP_SYS_ADMIN)");
    }
    raise_memlock_limit();
    let cgroup_dir = std::fs::File::open(cgroup)
        .with_context(|| format!("opening cgroup directory {}", cgroup.display()))?;
    let mut ebpf = Ebpf::load_file(object)
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
    load_and_attach!(CgroupSockAddr, PROGRAMS_SOCK_ADDR);
    load_and_attach!(CgroupSock, PROGRAMS_SOCK);
    let events = RingBuf::try_from(ebpf.take_map(EVENTS_MAP).context("EVENTS map missing")?)?;
    let dropped =
        PerCpuArray::try_from(ebpf.take_map(DROPPED_MAP).context("DROPPED map missing")?)?;
    let bound = BpfHashMap::try_from(ebpf.take_map(BOUND_MAP).context("BOUND map missing")?)?;
    let ports = KernelPortCounts::new(ebpf.take_map(PORTS_MAP).context("PORTS map missing")?)?;
    // Only binds in this network namespace: a container's ports are not the host's.
    if let Some(cookie) = own_netns_cookie() {
        let mut config: Array<MapData, u64> =
            Array::try_from(ebpf.take_map(CONFIG_MAP).context("CONFIG map missing")?)?;
        config
            .set(CONFIG_NETNS_COOKIE, cookie, 0)
            .context("writing the network namespace to the eBPF programs")?;
    }
    Ok(Attached {
        _ebpf: ebpf,
        events,
        dropped,
        bound,
        ports: Some(ports),
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
                if let Some(ports) = &mut self.ports {
                    ports.seeded[port_slot(record.protocol, record.port) as usize] += 1;
                }
            }
        }
        seeded
    }

    /// The per-port counts, for the engine's point checks (once).
    pub fn take_port_counts(&mut self) -> Option<KernelPortCounts> {
        self.ports.take()
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
        let total: u64 = self
            .dropped
            .get(&0, 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(self.dropped_seen);
        let new = total.saturating_sub(self.dropped_seen);
        self.dropped_seen = total;
        new
    }

    /// Every record waiting in the ring buffer, as broker events, with the kernel time
    /// (`CLOCK_MONOTONIC` ns) of each record.
    pub fn drain(&mut self, owners: &mut OwnerCache) -> (Vec<PortEvent>, Vec<u64>) {
        let mut events = Vec::new();
        let mut seen_at = Vec::new();
        while let Some(item) = self.events.next() {
            self.drained_since_drop_check += 1;
            let Some(record) = BindEvent::from_bytes(&item) else {
                continue;
            };
            seen_at.push(record.timestamp_ns);
            if let Some(event) = port_event(&record, owners) {
                events.push(event);
            }
        }
        (events, seen_at)
    }
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
pub fn port_event(event: &BindEvent, owners: &mut OwnerCache) -> Option<PortEvent> {
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
            Some(PortEvent::Bound(BoundSocket {
                cookie: event.cookie,
                protocol,
                family,
                address,
                port: event.port,
                uid: event.uid,
                owner: owners.owner(event),
                since_ms: crate::engine::now_ms(),
            }))
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
        let Some(PortEvent::Bound(socket)) = port_event(&record, &mut owners) else {
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
            port_event(&record, &mut owners),
            Some(PortEvent::Released { cookie: 42 })
        );
        record.kind = KIND_BOUND;
        record.protocol = 132; // SCTP: not tracked
        assert_eq!(port_event(&record, &mut owners), None);
    }
}
