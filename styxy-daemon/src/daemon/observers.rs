//! Which observer feeds the broker, and the tasks that run it: the eBPF ring-buffer reader (on a
//! thread of its own) with a periodic safety-net reading, or the sockets-table reader alone.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::{ObserverChoice, Options};
use crate::bpf as ebpf;
use crate::bpf::sessions::KernelSessions;
use crate::engine::{Engine, ObserverStatus};
use styxy_common::session;

/// How often the eBPF observer's port table is checked against a full socket-table reading.
const EBPF_SAFETY_RESYNC: Duration = Duration::from_secs(60);

/// Starts the chosen observer (its tasks go into `tasks`), takes the first reading of the socket
/// tables, and says which observer runs and why.
pub(super) fn start(
    opts: &Options,
    engine: Arc<Engine>,
    stop: &watch::Receiver<bool>,
    tasks: &mut JoinSet<()>,
) -> Result<ObserverStatus> {
    let ebpf = match opts.observer {
        ObserverChoice::Sockets => None,
        ObserverChoice::Auto | ObserverChoice::Ebpf => {
            Some(attach_ebpf(opts, engine.range_bounds()))
        }
    };
    let ebpf_error = match ebpf {
        Some(Ok((mut attached, whole_machine, origin))) => {
            let reading = tokio::task::block_in_place(|| engine.resync_reading())
                .context("reading the kernel's socket tables")?;
            let seeded = attached.seed_bound(&reading);
            let sessions = match attached.take_sessions() {
                Ok(maps) => {
                    engine.use_kernel_sessions(KernelSessions::new(maps));
                    "kernel sessions enforced (static binaries included)".to_string()
                }
                Err(why) => {
                    let why = format!("kernel sessions off: {why}");
                    engine.set_kernel_sessions_missing(why.clone());
                    why
                }
            };
            // The kernel's per-port counts stand for the socket tables only when the programs
            // see every bind, i.e. at the root of the cgroup tree.
            let point_checks = match attached.take_port_counts() {
                Some(counts) if whole_machine => {
                    engine.use_port_counts(Box::new(counts));
                    "point checks read the kernel's per-port counts, mapped into memory"
                }
                _ => "point checks read the socket tables (a cgroup below the root sees only its own binds)",
            };
            let pinned = match &attached.pins {
                Some(dir) => format!(
                    "programs and maps pinned in {} (kernel sessions outlive the daemon)",
                    dir.display()
                ),
                None => "nothing pinned (kernel sessions end with the daemon)".to_string(),
            };
            let status = ObserverStatus {
                kind: "ebpf",
                reason: format!(
                    "the programs ({origin}) attached to cgroup {}; {seeded} socket(s) bound before it were read \
                     from the socket tables; {point_checks}; {sessions}; {pinned}; a full reading every {} s as a \
                     safety net",
                    attached.cgroup.display(),
                    EBPF_SAFETY_RESYNC.as_secs()
                ),
            };
            let reader = spawn_ebpf_reader(engine.clone(), attached, stop.clone())?;
            tasks.spawn_blocking(move || {
                if reader.join().is_err() {
                    tracing::error!("the eBPF ring buffer reader panicked");
                }
            });
            // A safety net for what no hook reports (a TCP socket that starts listening over
            // `UNLISTED_TCP_GRACE_MS` after its bind, dropped by a reading meanwhile; a lost
            // record the counter has not shown yet): a full reading now and then.
            tasks.spawn(scan_socket_tables(engine, EBPF_SAFETY_RESYNC, stop.clone()));
            return Ok(status);
        }
        Some(Err(e)) if opts.observer == ObserverChoice::Ebpf => {
            return Err(e.context("--observer ebpf"));
        }
        Some(Err(e)) => Some(format!("eBPF unavailable: {e:#}")),
        None => None,
    };
    // Programs an earlier daemon of this state directory left pinned would enforce next to this
    // daemon's shims, on maps nobody keeps current: they go.
    ebpf::pins::remove_left_behind(&opts.state_dir);
    tokio::task::block_in_place(|| engine.resync())
        .context("reading the kernel's socket tables")?;
    let reason = ebpf_error.unwrap_or_else(|| "chosen with --observer sockets".to_string());
    engine.set_kernel_sessions_missing(format!(
        "the daemon runs without eBPF ({reason}): only the bind() shim moves ports, and static binaries are not moved"
    ));
    tasks.spawn(scan_socket_tables(engine, opts.scan_interval, stop.clone()));
    Ok(ObserverStatus {
        kind: "sockets-table",
        reason: format!(
            "{reason}; reading socket tables every {} ms",
            opts.scan_interval.as_millis()
        ),
    })
}

/// The attached programs, whether they sit at the root of the cgroup tree (and so see every bind
/// on the machine), and where the object came from.
fn attach_ebpf(opts: &Options, ranges: Vec<(u16, u16)>) -> Result<(ebpf::Attached, bool, String)> {
    let object = ebpf::find_object(opts.ebpf_object.as_deref())?;
    let root = ebpf::cgroup2_root();
    let cgroup = match (&opts.cgroup, &root) {
        (Some(path), _) => path.clone(),
        (None, Ok(root)) => root.clone(),
        (None, Err(e)) => bail!("{e:#}"),
    };
    let at_root = match (
        root.map(std::fs::canonicalize),
        std::fs::canonicalize(&cgroup),
    ) {
        (Ok(Ok(root)), Ok(cgroup)) => root == cgroup,
        _ => false,
    };
    let attached = ebpf::attach(&ebpf::AttachOptions {
        object: &object,
        cgroup: &cgroup,
        whole_machine: at_root,
        log_level: opts.ebpf_log,
        ranges,
        state_dir: &opts.state_dir,
        kill_protection: opts.kill_protection,
    })?;
    Ok((attached, at_root, object.origin))
}

/// Runs the eBPF reader on a thread of its own, scheduled `SCHED_BATCH`, and returns once it
/// watches the ring buffer; the thread ends when `stop` turns true.
///
/// Why a batch thread: when the reader has caught up, each record wakes it, from inside the
/// `bind()` of whatever program binds; a normal thread then preempted that program on its own
/// CPU, several times the cost of a bind whenever the reader was idle (`cargo xtask bench shim`,
/// case (a), shows it). A batch thread never preempts on wake-up: it runs on an idle CPU, or at
/// the next tick. Unlike a high nice value or `SCHED_IDLE` it keeps its full share of the CPU, so
/// a busy machine cannot starve it.
fn spawn_ebpf_reader(
    engine: Arc<Engine>,
    attached: ebpf::Attached,
    stop: watch::Receiver<bool>,
) -> Result<std::thread::JoinHandle<()>> {
    let (watching, started) = std::sync::mpsc::channel::<Result<()>>();
    let reader = std::thread::Builder::new()
        .name("styxy-ebpf".into())
        .spawn(move || {
            schedule_this_thread_as_batch();
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = watching.send(Err(anyhow::anyhow!("starting its runtime: {e}")));
                    return;
                }
            };
            runtime.block_on(async move {
                // SAFETY: the descriptor is the ring buffer's map fd, owned by `attached`, which
                // the AsyncFd owns in turn: it stays open and the same for the AsyncFd's life.
                match unsafe { AsyncFd::register_with_interest(attached, Interest::READABLE) } {
                    Ok(events) => {
                        let _ = watching.send(Ok(()));
                        read_ebpf_events(engine, events, stop).await;
                    }
                    Err(e) => {
                        let _ = watching.send(Err(anyhow::anyhow!("watching it: {e}")));
                    }
                }
            });
        })
        .context("starting the eBPF ring buffer reader")?;
    tokio::task::block_in_place(|| started.recv())
        .context("the eBPF ring buffer reader ended at start")?
        .context("the eBPF ring buffer reader")?;
    Ok(reader)
}

/// Puts the calling thread in the `SCHED_BATCH` class (see [`spawn_ebpf_reader`]); where that
/// is refused it stays as it was, which costs latency, not correctness.
fn schedule_this_thread_as_batch() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param for SCHED_BATCH.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
        tracing::debug!(
            cause = %std::io::Error::last_os_error(),
            "SCHED_BATCH for the eBPF reader refused"
        );
    }
}

/// How long the reader keeps draining after its last record before it waits for a wake-up. While
/// it drains, the programs submit records without waking it, so a burst of binds costs one
/// wake-up instead of one per record (each wake-up is paid inside some program's `bind()`); a
/// lone bind still wakes it at once.
/// (A thread sleep, not a tokio timer: tokio's timers have millisecond resolution.)
const LINGER: Duration = Duration::from_micros(100);
/// Drains with nothing new before the reader goes to sleep (so ~1 ms of lingering).
const LINGER_ROUNDS: u32 = 10;
/// How often the reader checks for binds the programs counted without reporting them (ephemeral
/// ports outside every service range; then it reads the socket tables): so such a server shows
/// within about this long.
const UNREPORTED_CHECK: Duration = Duration::from_secs(1);

/// The eBPF observer's reader: feeds the ring buffer's records to the broker, and resyncs from
/// the socket tables when the kernel side had to drop some. Also forwards the programs' log.
async fn read_ebpf_events(
    engine: Arc<Engine>,
    mut events: AsyncFd<ebpf::Attached>,
    mut stop: watch::Receiver<bool>,
) {
    let mut owners = ebpf::OwnerCache::default();
    let log = events.get_mut().log.take();
    let mut log = log.and_then(|logger| {
        // SAFETY: the descriptor is the log ring buffer's map fd, owned by the logger, which the
        // AsyncFd owns in turn: it stays open and the same for the AsyncFd's life.
        let registered = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) };
        registered
            .inspect_err(|e| tracing::warn!(cause = %e, "the kernel programs' log cannot be read"))
            .ok()
    });
    let instance_of = {
        let engine = engine.clone();
        move |number: u32| engine.kernel_instance_of(number)
    };
    let mut idle_rounds = 0;
    let mut next_check = tokio::time::Instant::now() + UNREPORTED_CHECK;
    loop {
        let attached = events.get_mut();
        if tokio::time::Instant::now() >= next_check {
            next_check = tokio::time::Instant::now() + UNREPORTED_CHECK;
            resync_if_unreported(&engine, attached);
        }
        let drained = drain_once(&engine, attached, &mut owners, &instance_of);
        flush_kernel_log(&mut log); // it fills while the reader stays awake, too
        if drained {
            idle_rounds = 0;
        } else {
            idle_rounds += 1;
        }
        if idle_rounds <= LINGER_ROUNDS {
            // Awake: the programs do not wake us; look again shortly. This thread runs nothing
            // else, so it may block.
            if *stop.borrow() {
                return;
            }
            std::thread::sleep(LINGER);
            continue;
        }
        // Going to sleep: say so, then look once more (a record submitted before the programs
        // saw the new state is found here; one after it wakes us).
        attached.set_reader_state(session::READER_SLEEPING);
        if drain_once(&engine, attached, &mut owners, &instance_of) {
            attached.set_reader_state(session::READER_AWAKE);
            idle_rounds = 0;
            continue;
        }
        let woken = loop {
            let log_ready = async {
                match log.as_mut() {
                    Some(fd) => fd.readable_mut().await.map(|mut g| g.clear_ready()),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ready = events.readable_mut() => break ready.map(|mut guard| guard.clear_ready()),
                _ = tokio::time::sleep_until(next_check) => {
                    next_check = tokio::time::Instant::now() + UNREPORTED_CHECK;
                    resync_if_unreported(&engine, events.get_mut());
                }
                logged = log_ready => {
                    match logged {
                        Ok(()) => flush_kernel_log(&mut log),
                        Err(e) => {
                            tracing::warn!(cause = %e, "the kernel programs' log is unreadable");
                            log = None;
                        }
                    }
                }
                _ = stop.wait_for(|stop| *stop) => return,
            }
        };
        if let Err(e) = woken {
            tracing::error!(cause = %e, "eBPF ring buffer unreadable; no more bind events");
            return;
        }
        events.get_mut().set_reader_state(session::READER_AWAKE);
        idle_rounds = 0;
        flush_kernel_log(&mut log);
    }
}

/// The kernel programs' log records into the daemon's log. aya-log panics on a record it cannot
/// parse (our own programs write them, so it would be a bug): the log then stops, the observer
/// does not.
fn flush_kernel_log(
    log: &mut Option<AsyncFd<aya_log::EbpfLogger<crate::bpf::kernel_log::ToTracing>>>,
) {
    let Some(fd) = log.as_mut() else {
        return;
    };
    let flushed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fd.get_mut().flush()));
    if flushed.is_err() {
        tracing::error!(
            "a kernel log record could not be read: the kernel programs' log stops here"
        );
        *log = None;
    }
}

/// Reads the socket tables when the programs counted binds they did not report.
fn resync_if_unreported(engine: &Engine, attached: &mut ebpf::Attached) {
    if attached.newly_unreported() > 0 {
        if let Err(e) = engine.resync() {
            tracing::warn!(cause = %e, "reading the socket tables for unreported binds");
        }
    }
}

/// Drains the ring once into the broker; true when there were records.
fn drain_once(
    engine: &Engine,
    attached: &mut ebpf::Attached,
    owners: &mut ebpf::OwnerCache,
    instance_of: &dyn Fn(u32) -> Option<String>,
) -> bool {
    let (batch, seen_at) = attached.drain(owners, instance_of);
    let lost = attached.newly_dropped();
    if seen_at.is_empty() && lost == 0 {
        return false;
    }
    if !batch.is_empty() {
        engine.apply_events(batch);
    }
    let applied_at = crate::clock::monotonic_ns();
    engine.record_observer_delays(
        seen_at
            .iter()
            .map(|t| (applied_at.saturating_sub(*t) / 1000).min(u64::from(u32::MAX)) as u32),
    );
    if lost > 0 {
        tracing::warn!(
            lost,
            "eBPF records lost (ring buffer full): resyncing from the socket tables"
        );
        if let Err(e) = engine.resync() {
            tracing::warn!(cause = %e, "resync after lost records");
        }
        // Counted once the table is repaired: whoever sees the loss in Status sees the fix.
        engine.count_dropped(lost);
    }
    true
}

/// The sockets-table observer: a full sock_diag reading at each interval, reconciled into the broker.
async fn scan_socket_tables(engine: Arc<Engine>, every: Duration, mut stop: watch::Receiver<bool>) {
    // The first reading was taken at start: the first tick is one interval away.
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        let engine = engine.clone();
        match tokio::task::spawn_blocking(move || engine.resync()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(cause = %e, "reading the socket tables"),
            Err(e) => tracing::error!(cause = %e, "socket-table reader failed"),
        }
    }
}
