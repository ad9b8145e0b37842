//! The attached programs as the daemon holds them: the ring buffer it drains, the counters it
//! reads, the maps it fills; dropping it detaches everything that is not pinned.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use aya::Ebpf;
use aya_log::EbpfLogger;
use styxy_broker::{BoundSocket, PortEvent};
use styxy_common::event::{port_slot, BindEvent, BoundRecord, EVENTS_RING_RECORDS, KIND_WAKE};

use super::counts::KernelPortCounts;
use super::events::{port_event, OwnerCache};
use super::kernel_log::ToTracing;
use super::mapped::MappedArray;
use super::pins::ObserverLinks;
use super::sessions::KernelSessionMaps;

/// Records drained between two readings of the lost-record counter: half a full ring.
pub(super) const DROP_CHECK_RECORDS: usize = EVENTS_RING_RECORDS / 2;
/// The longest time between two readings of the lost-record counter while records arrive.
const DROP_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The loaded, attached programs and the maps the daemon reads.
pub struct Attached {
    /// Owns the programs (shared with the kernel sessions' [`SessionPrograms`]).
    pub(super) _ebpf: Arc<Mutex<Ebpf>>,
    /// The observer's links (post_bind4|6, sock_release), pinned while a session lives.
    pub(super) _links: Arc<ObserverLinks>,
    /// Where the programs and maps are pinned, when they are.
    pub pins: Option<PathBuf>,
    pub events: RingBuf<MapData>,
    pub(super) dropped: PerCpuArray<MapData, u64>,
    /// Binds of ephemeral ports outside every service range, counted but not reported one by one.
    pub(super) unreported: PerCpuArray<MapData, u64>,
    pub(super) unreported_seen: u64,
    pub(super) bound: BpfHashMap<MapData, u64, BoundRecord>,
    /// The reader's state word (see `styxy_common::session::READER_MAP`).
    pub(super) reader: MappedArray<AtomicU32>,
    /// Until handed to the engine with [`Attached::take_port_counts`].
    pub(super) ports: Option<KernelPortCounts>,
    /// Until handed to the engine with [`Attached::take_sessions`]; else why there are none.
    pub(super) sessions: Result<KernelSessionMaps, String>,
    /// The kernel programs' log records, unless `--ebpf-log off`.
    pub log: Option<EbpfLogger<ToTracing>>,
    pub cgroup: PathBuf,
    pub(super) dropped_seen: u64,
    /// Records drained since `DROPPED` was last read, and when that was.
    pub(super) drained_since_drop_check: usize,
    pub(super) last_drop_check: std::time::Instant,
}

impl std::os::fd::AsRawFd for Attached {
    /// The ring buffer's descriptor: readable when records wait.
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.events.as_raw_fd()
    }
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
pub(super) fn counted_since(counter: &PerCpuArray<MapData, u64>, seen: &mut u64) -> u64 {
    let total: u64 = counter
        .get(&0, 0)
        .map(|per_cpu| per_cpu.iter().sum())
        .unwrap_or(*seen);
    let new = total.saturating_sub(*seen);
    *seen = total;
    new
}

fn address_bytes(address: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match address {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out.copy_from_slice(&v6.octets()),
    }
    out
}
