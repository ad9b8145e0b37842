//! The session table (`styxy_common::table`), mapped read-only on first use.
//!
//! Where: the daemon's socket path (`STYXY_SOCKET`, else the default the CLI also uses) with
//! `.table` appended. Missing, or not a table of this layout: every call goes on as without it,
//! and the shim tries again at most once a second. Stale: a daemon that stopped says so in the
//! table; one killed outright cannot, so its pid is checked with `kill(pid, 0)` at most once a
//! second, and a table whose daemon is gone is dropped (and looked for again: a restarted daemon
//! writes a new file).
//!
//! A mapping is never unmapped once published: another thread may be reading it. A replaced one
//! stays mapped (once per daemon restart seen by this process).
//!
//! Only a table nobody else could have planted is used: a regular file owned by this user or
//! root and writable by nobody else (checked on the open descriptor). Without `XDG_RUNTIME_DIR`
//! the user's path is under `/tmp`, where another user may have made `/tmp/styxy-UID` first: a
//! table of theirs there is passed over for the system daemon's.

use core::ffi::{c_char, c_int, c_void};
use core::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

use styxy_common::env;
use styxy_common::paths::SYSTEM_SOCKET;
use styxy_common::table::{Table, BYTES, FILE_SUFFIX as TABLE_SUFFIX, WORDS};

use crate::sys::{env_str, errno, set_errno};

static MAPPED: AtomicPtr<AtomicU64> = AtomicPtr::new(core::ptr::null_mut());
/// Monotonic ms before which no new attempt to map (or check the daemon) is made.
static NEXT_CHECK_MS: AtomicU64 = AtomicU64::new(0);
const CHECK_EVERY_MS: u64 = 1000;

/// The table, when a live daemon publishes one. Leaves errno as it found it.
pub(crate) fn current() -> Option<Table<'static>> {
    let saved = errno();
    let found = lookup();
    set_errno(saved);
    found
}

/// Milliseconds of the coarse monotonic clock: a vDSO read of the last tick, plenty for a
/// once-a-second check and cheaper than the precise clock on every bind and connect.
pub(crate) fn coarse_ms() -> u64 {
    // SAFETY: timespec is plain data; clock_gettime writes it.
    let mut ts: libc::timespec = unsafe { core::mem::zeroed() };
    // SAFETY: CLOCK_MONOTONIC_COARSE exists on every Linux this runs on; ts is valid for writes.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000
}

fn lookup() -> Option<Table<'static>> {
    let mapped = as_table(MAPPED.load(Ordering::Acquire));
    let now = coarse_ms();
    let due = now >= NEXT_CHECK_MS.load(Ordering::Relaxed);
    match mapped {
        Some(table) if table.is_current() && table.serving() && (!due || daemon_alive(&table)) => {
            if due {
                NEXT_CHECK_MS.store(now + CHECK_EVERY_MS, Ordering::Relaxed);
            }
            Some(table)
        }
        _ if due => {
            NEXT_CHECK_MS.store(now + CHECK_EVERY_MS, Ordering::Relaxed);
            let fresh = map_table()?;
            match MAPPED.compare_exchange(
                mapped.map_or(core::ptr::null_mut(), base_of),
                fresh,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => as_table(fresh).filter(usable),
                Err(theirs) => {
                    // Another thread published its mapping first; this one was never seen.
                    // SAFETY: `fresh` is our own mapping of BYTES bytes, used by nobody else.
                    unsafe { libc::munmap(fresh.cast::<c_void>(), BYTES) };
                    as_table(theirs).filter(usable)
                }
            }
        }
        _ => None,
    }
}

/// A table of this layout whose daemon still serves (and, killed outright, is still there).
fn usable(table: &Table<'_>) -> bool {
    table.is_current() && table.serving() && daemon_alive(table)
}

fn base_of(table: Table<'static>) -> *mut AtomicU64 {
    table.base().cast_mut()
}

fn as_table(base: *mut AtomicU64) -> Option<Table<'static>> {
    if base.is_null() {
        return None;
    }
    // SAFETY: a non-null MAPPED points at a read-only shared mapping of BYTES (= WORDS × 8)
    // bytes, page-aligned, never unmapped; it is only read through atomics.
    Table::new(unsafe { core::slice::from_raw_parts(base, WORDS) })
        .map(|t| t.patient(wait_for_writer))
}

/// While the daemon is in the middle of an update (its writer preempted, on a busy machine), a
/// reader yields the processor and tries again, rather than leave a connect unredirected — to
/// the port's real holder, another session's server. Bounded: a daemon stopped mid-write
/// (SIGSTOP) costs a call some thousands of yields, never a hang.
fn wait_for_writer(attempt: u32) -> bool {
    // SAFETY: sched_yield has no preconditions.
    unsafe { libc::sched_yield() };
    attempt < 4096
}

/// `kill(pid, 0)`: the daemon is gone only when the kernel says there is no such process
/// (`EPERM`, another user's live daemon, counts as alive).
fn daemon_alive(table: &Table<'_>) -> bool {
    let Ok(pid) = libc::pid_t::try_from(table.daemon_pid()) else {
        return false;
    };
    // SAFETY: signal 0 checks for existence only.
    pid > 0 && (unsafe { libc::kill(pid, 0) } == 0 || errno() != libc::ESRCH)
}

/// Maps the table file read-only; `None` when it is missing, too short or cannot be mapped.
fn map_table() -> Option<*mut AtomicU64> {
    let mut path = [0u8; 512];
    table_path(&mut path)?;
    let path = path.as_ptr().cast::<c_char>();
    // SAFETY: `path` is NUL-terminated (table_path wrote it so).
    let fd = unsafe { libc::open(path, libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW) };
    if fd < 0 {
        return None;
    }
    let mapped = map_fd(fd);
    // SAFETY: fd is ours; the mapping outlives it.
    unsafe { libc::close(fd) };
    mapped
}

fn map_fd(fd: c_int) -> Option<*mut AtomicU64> {
    // SAFETY: stat is plain data; fstat writes it.
    let mut stat: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: fd is open; stat is valid for writes.
    if unsafe { libc::fstat(fd, &mut stat) } != 0
        || (stat.st_size as u64) < BYTES as u64
        || !trusted(&stat)
    {
        return None;
    }
    // SAFETY: a fresh read-only shared mapping of an open file; no existing memory is touched.
    let base = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            BYTES,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    (base != libc::MAP_FAILED).then_some(base.cast::<AtomicU64>())
}

/// Whether a table file could only have been written by this user or root: a regular file owned
/// by one of them that nobody else may write.
fn trusted(stat: &libc::stat) -> bool {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    stat.st_mode & libc::S_IFMT == libc::S_IFREG
        && (stat.st_uid == me || stat.st_uid == 0)
        && stat.st_mode & 0o022 == 0
}

/// Writes the table's path, NUL-terminated, into `out`: `$STYXY_SOCKET.table`; else the user's
/// own daemon's (`$XDG_RUNTIME_DIR/styxy/styxy.sock.table`, or `/tmp/styxy-UID/…` — root's is the
/// system one) when it exists, else the system daemon's.
fn table_path(out: &mut [u8]) -> Option<()> {
    if let Some(socket) = env_str(env::SOCKET.c_name).filter(|s| !s.is_empty()) {
        return Path::new(out)
            .push(socket)?
            .push(TABLE_SUFFIX.as_bytes())?
            .finish();
    }
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid != 0 {
        let mut own = Path::new(out);
        own = match env_str(c"XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
            Some(dir) => own.push(dir)?,
            None => own.push(b"/tmp/styxy-")?.push_decimal(uid)?,
        };
        own.push(b"/styxy/styxy.sock")?
            .push(TABLE_SUFFIX.as_bytes())?
            .finish()?;
        // SAFETY: stat is plain data; lstat writes it.
        let mut stat: libc::stat = unsafe { core::mem::zeroed() };
        // SAFETY: `out` now holds a NUL-terminated path; stat is valid for writes.
        if unsafe { libc::lstat(out.as_ptr().cast::<c_char>(), &mut stat) } == 0 && trusted(&stat) {
            return Some(());
        }
    }
    Path::new(out)
        .push(SYSTEM_SOCKET.as_bytes())?
        .push(TABLE_SUFFIX.as_bytes())?
        .finish()
}

/// A path being written into a fixed buffer.
struct Path<'a> {
    out: &'a mut [u8],
    len: usize,
}

impl<'a> Path<'a> {
    fn new(out: &'a mut [u8]) -> Path<'a> {
        Path { out, len: 0 }
    }

    fn push(mut self, bytes: &[u8]) -> Option<Path<'a>> {
        let end = self.len.checked_add(bytes.len())?;
        // Not `contains`: it calls core's memchr, which links core's unwinding tables into the shim.
        #[allow(clippy::manual_contains)]
        if bytes.iter().any(|&b| b == 0) {
            return None;
        }
        self.out.get_mut(self.len..end)?.copy_from_slice(bytes);
        self.len = end;
        Some(self)
    }

    fn push_decimal(self, mut value: u32) -> Option<Path<'a>> {
        // u32::MAX has 10 digits; they are written from the end.
        let mut digits = [0u8; 10];
        let mut start = digits.len();
        for digit in digits.iter_mut().rev() {
            *digit = b'0' + (value % 10) as u8;
            start -= 1;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        self.push(digits.get(start..)?)
    }

    fn finish(self) -> Option<()> {
        *self.out.get_mut(self.len)? = 0;
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_written_whole_and_terminated_or_not_at_all() {
        let mut out = [0xffu8; 32];
        Path::new(&mut out)
            .push(b"/run/x")
            .and_then(|p| p.push_decimal(1042))
            .and_then(|p| p.push(b".table"))
            .and_then(Path::finish)
            .expect("fits");
        assert_eq!(&out[..18], b"/run/x1042.table\0\xff"[..18].as_ref());
        let mut small = [0u8; 8];
        assert!(Path::new(&mut small).push(b"/run/styxy").is_none());
        assert!(Path::new(&mut small)
            .push(b"1234567")
            .and_then(Path::finish)
            .is_some());
        assert!(Path::new(&mut small)
            .push(b"12345678")
            .and_then(Path::finish)
            .is_none());
        assert!(Path::new(&mut small).push(b"a\0b").is_none());
        let mut zero = [0u8; 4];
        Path::new(&mut zero)
            .push_decimal(0)
            .and_then(Path::finish)
            .expect("fits");
        assert_eq!(&zero[..2], b"0\0");
    }
}
