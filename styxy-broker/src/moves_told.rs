//! Which moves were told: a process that binds its asked port again and lands where it landed
//! before — a port probe and then the real bind (Vite binds its port three times before it
//! listens), or the IPv6 socket after the IPv4 one — made one move, so it gets one audit entry
//! and one event, whichever path (the shim's question or the kernel's move) told it.

use std::collections::{HashSet, VecDeque};

use crate::{ProcessId, Protocol};

/// How many recent moves are remembered: far more than the processes that move at once on one
/// machine; a process's moves older than that are told again (harmless).
const REMEMBERED: usize = 1024;

/// The most recent moves told: a set to look them up (every move asks), and their order to
/// forget the oldest.
#[derive(Clone, Debug, Default)]
pub(crate) struct MovesTold {
    recent: VecDeque<Move>,
    known: HashSet<Move>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Move {
    process: ProcessId,
    protocol: Protocol,
    asked: u16,
    bound: u16,
}

impl MovesTold {
    /// Records that `process` was moved from `asked` to `bound`; true when this move is new
    /// (to be told), false when the process was moved the same way before.
    pub(crate) fn first_time(
        &mut self,
        process: ProcessId,
        protocol: Protocol,
        asked: u16,
        bound: u16,
    ) -> bool {
        let this = Move {
            process,
            protocol,
            asked,
            bound,
        };
        if !self.known.insert(this) {
            return false;
        }
        if self.recent.len() == REMEMBERED {
            if let Some(oldest) = self.recent.pop_front() {
                self.known.remove(&oldest);
            }
        }
        self.recent.push_back(this);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(pid: u32, start_time: u64) -> ProcessId {
        ProcessId { pid, start_time }
    }

    #[test]
    fn the_same_move_of_the_same_process_is_told_once() {
        let mut told = MovesTold::default();
        assert!(told.first_time(id(7, 1), Protocol::Tcp, 5173, 5174));
        assert!(!told.first_time(id(7, 1), Protocol::Tcp, 5173, 5174));
        // Another port, protocol, asked port or process (a reused pid included) is another move.
        assert!(told.first_time(id(7, 1), Protocol::Tcp, 5173, 5175));
        assert!(told.first_time(id(7, 1), Protocol::Udp, 5173, 5174));
        assert!(told.first_time(id(7, 1), Protocol::Tcp, 5180, 5174));
        assert!(told.first_time(id(7, 2), Protocol::Tcp, 5173, 5174));
        assert!(told.first_time(id(8, 1), Protocol::Tcp, 5173, 5174));
    }

    #[test]
    fn memory_is_bounded_and_the_oldest_go_first() {
        let mut told = MovesTold::default();
        for pid in 0..=REMEMBERED as u32 {
            assert!(told.first_time(id(pid, 1), Protocol::Tcp, 1, 2));
        }
        assert_eq!(
            (told.recent.len(), told.known.len()),
            (REMEMBERED, REMEMBERED)
        );
        assert!(told.first_time(id(0, 1), Protocol::Tcp, 1, 2), "forgotten");
        assert!(!told.first_time(id(REMEMBERED as u32, 1), Protocol::Tcp, 1, 2));
    }
}
