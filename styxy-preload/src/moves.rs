//! This process's moves: which asked port it bound where (so its other sockets follow, and a move
//! is announced once), kept in atomics so a `fork()` cannot leave a lock held.

use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// Pid that owns the entries of `MOVES` (a forked child starts a fresh list).
static MOVES_PID: AtomicU32 = AtomicU32::new(0);
/// `(requested << 16) | new` of each move this process made (whether announced or not), and
/// `(port << 16) | port` of each port the daemon let it keep.
static MOVES: [AtomicU32; 32] = [const { AtomicU32::new(0) }; 32];

/// This process's pid, cached: every bind asks (a `getpid` system call costs a bind on this kind
/// of VM a measurable part of its time). A `fork()` child forgets it through a `pthread_atfork`
/// handler; a child made by a raw `clone` without one keeps its parent's until it `exec`s, which
/// only makes it look at its parent's move records (a bind then asks the daemon, as any other).
pub(crate) fn own_pid() -> u32 {
    static PID: AtomicU32 = AtomicU32::new(0);
    static FORK_HANDLER: AtomicBool = AtomicBool::new(false);
    extern "C" fn forget_in_child() {
        PID.store(0, Ordering::Relaxed);
    }
    let cached = PID.load(Ordering::Relaxed);
    if cached != 0 {
        return cached;
    }
    if !FORK_HANDLER.swap(true, Ordering::AcqRel) {
        // SAFETY: registers a handler that only stores to an atomic; no other preconditions.
        unsafe { libc::pthread_atfork(None, None, Some(forget_in_child)) };
    }
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() } as u32;
    PID.store(pid, Ordering::Relaxed);
    pid
}

/// Records that this process moved `requested` to `new`; true the first time (IPv4 and IPv6 binds
/// of one server make a single line).
pub(crate) fn record_move(requested: u16, new: u16) -> bool {
    let pid = own_pid();
    if MOVES_PID.swap(pid, Ordering::AcqRel) != pid {
        for slot in &MOVES {
            slot.store(0, Ordering::Relaxed);
        }
    }
    let key = (u32::from(requested) << 16) | u32::from(new);
    for slot in &MOVES {
        match slot.compare_exchange(0, key, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return true,
            Err(existing) if existing == key => return false,
            Err(_) => continue,
        }
    }
    true
}

/// Whether this process has moved `requested` before (to another port).
pub(crate) fn moved_before(requested: u16) -> bool {
    history(requested).0
}

/// The ports this process moved `requested` to, in the order it made the moves.
pub(crate) fn moves_of(requested: u16) -> impl Iterator<Item = u16> {
    let mine = MOVES_PID.load(Ordering::Acquire) == own_pid();
    MOVES.iter().filter_map(move |slot| {
        let key = slot.load(Ordering::Acquire);
        let (asked, bound) = ((key >> 16) as u16, key as u16);
        (mine && key != 0 && asked == requested && bound != requested).then_some(bound)
    })
}

/// The port this process's program asked for when it was moved to `bound` (`bound` itself when
/// no move of this process led there).
pub(crate) fn asked_for(bound: u16) -> u16 {
    let mine = MOVES_PID.load(Ordering::Acquire) == own_pid();
    MOVES
        .iter()
        .map(|slot| slot.load(Ordering::Acquire))
        .find(|&key| mine && key != 0 && key as u16 == bound && (key >> 16) as u16 != bound)
        .map_or(bound, |key| (key >> 16) as u16)
}

/// Whether this process moved `port` before (to another port), and whether the daemon let it
/// keep `port` before (a move "to itself" in `MOVES`): one look, no system call.
pub(crate) fn history(port: u16) -> (bool, bool) {
    let owner = MOVES_PID.load(Ordering::Acquire);
    if owner == 0 || owner != own_pid() {
        // Nothing recorded, or recorded by the parent this process was forked from.
        return (false, false);
    }
    MOVES.iter().fold((false, false), |(moved, kept), slot| {
        let key = slot.load(Ordering::Acquire);
        let (asked, bound) = ((key >> 16) as u16, key as u16);
        let mine = key != 0 && asked == port;
        (
            moved || (mine && bound != port),
            kept || (mine && bound == port),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_move_is_announced_once_per_process_and_remembered() {
        assert!(!moved_before(7001));
        assert!(record_move(7001, 7002));
        assert!(!record_move(7001, 7002));
        assert!(record_move(7001, 7003));
        assert!(moved_before(7001));
        assert!(!moved_before(7002));
    }
}
