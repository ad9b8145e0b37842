//! Kernel sessions: the maps through which the daemon tells the eBPF programs which processes
//! belong to which session, which ports are spoken for, which spare ports a moved bind may take,
//! and what each session's view redirects. Both sides read these layouts from here.
//!
//! - `SESSIONS` (hash, `u32` task id → [`Member`]): filled by the daemon for the process a
//!   session starts with, inherited at `fork`/`clone` by the `sched_process_fork` tracepoint,
//!   dropped at exit by `sched_process_exit` and, for a thread that called `exec`, by
//!   `sched_process_exec`. An entry holds only for a process that is not newer than it (a reused
//!   pid is not a member) and steers only a process running as the session's owner.
//! - `PORT_INFO` (mmapable array, one [`PortInfo`] word per port): written by the daemon.
//! - `SPARES` (mmapable array of `u32`): [`SPARE_SLOTS`] free ports per service range, which the
//!   bind programs take with an atomic exchange and the daemon refills.
//! - `MOVES` (LRU hash, [`MoveKey`] → bound port): a process's earlier kernel move, so its IPv4
//!   and IPv6 binds of one port end on one port.
//! - `VIEWS` (hash, [`ViewKey`] → bound port): the daemon's session views.
//! - `REVERSE` (LRU hash, [`ReverseKey`] → asked port): what connect and sendmsg redirected, per
//!   socket, so getpeername and recvmsg show the asked port back.
//! - `STICKY` (hash, [`StickyKey`] → port, with [`STICKY_LINGERING`]): the sticky ports of each
//!   session's project, so a kernel move gets the port its project got before while it is free.
//! - `FOCUS` (hash, `u32` uid → session number, with `FOCUSING[0]` counting its entries): the
//!   session whose view a user's processes outside every session follow (`styxy focus`); a
//!   session's process follows it too for a port its own session neither maps nor serves; the
//!   daemon's own process never does (`FOCUSING[FOCUSING_DAEMON]`).
//! - `READER` (mmapable array, one `u32`): [`READER_SLEEPING`] while the daemon's ring-buffer
//!   reader waits for a wake-up; otherwise records are submitted without one.

/// Map names (the whole contract, with sizes, is [`crate::maps::MAPS`]).
pub const SESSIONS_MAP: &str = "SESSIONS";
pub const PORT_INFO_MAP: &str = "PORT_INFO";
pub const SPARES_MAP: &str = "SPARES";
pub const MOVES_MAP: &str = "MOVES";
pub const VIEWS_MAP: &str = "VIEWS";
pub const REVERSE_MAP: &str = "REVERSE";
pub const READER_MAP: &str = "READER";
pub const STICKY_MAP: &str = "STICKY";
pub const FOCUS_MAP: &str = "FOCUS";
pub const FOCUSING_MAP: &str = "FOCUSING";

/// Value of `SESSIONS`: which session a task belongs to, whose it is, and since when.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// The session number.
    pub session: u32,
    /// The uid that owns the session: its moves and view apply to processes whose effective uid
    /// is this one (any uid when it is 0, root).
    pub owner: u32,
    /// CLOCK_MONOTONIC nanoseconds when the entry was written (by the daemon, or by the fork
    /// tracepoint for a child). The task it was written for started before; a process whose
    /// group leader started after it holds the number of a task that is gone, and is no member.
    pub stamp_ns: u64,
    /// What the process turned off for itself ([`MEMBER_VIEW_OFF`], [`MEMBER_MOVES_OFF`]), as
    /// its environment says (`STYXY_VIEW=off`, `STYXY_DISABLE=1`); inherited at `fork`, so a
    /// child starts with its parent's, as it starts with its environment.
    pub flags: u32,
    pub _pad: u32,
}

/// [`Member::flags`]: `STYXY_VIEW=off` — the process's loopback traffic follows no view.
pub const MEMBER_VIEW_OFF: u32 = 1;
/// [`Member::flags`]: `STYXY_DISABLE=1` — the process's binds are never moved.
pub const MEMBER_MOVES_OFF: u32 = 2;

impl Member {
    /// Whether this entry holds for a process whose group leader started at `start_ns`.
    pub const fn holds_for(&self, start_ns: u64) -> bool {
        start_ns <= self.stamp_ns
    }
    /// Whether its session steers a process running with effective uid `euid`.
    pub const fn steers(&self, euid: u32) -> bool {
        self.owner == 0 || self.owner == euid
    }
    /// Whether the session's view applies to the process's traffic.
    pub const fn views(&self) -> bool {
        self.flags & MEMBER_VIEW_OFF == 0
    }
    /// Whether the session moves the process's binds.
    pub const fn moves(&self) -> bool {
        self.flags & MEMBER_MOVES_OFF == 0
    }
}

/// Entries of `SESSIONS`: processes and threads of every managed session together.
pub const SESSIONS_MAX: u32 = 65_536;
/// Entries of `VIEWS`.
pub const VIEWS_MAX: u32 = 16_384;
/// Entries of `MOVES` and `REVERSE` (least recently used ones are dropped first).
pub const MOVES_MAX: u32 = 16_384;
pub const REVERSE_MAX: u32 = 65_536;
/// Entries of `FOCUS`: users with a focus.
pub const FOCUS_MAX: u32 = 4_096;
/// `FOCUSING`: how many entries `FOCUS` holds, and the daemon's process (which never follows a
/// focus: its proxy reaches each server by its real port).
pub const FOCUSING_COUNT: u32 = 0;
pub const FOCUSING_DAEMON: u32 = 1;
pub const FOCUSING_LEN: u32 = 2;
/// Entries of `STICKY`.
pub const STICKY_MAX: u32 = 16_384;
/// In a `STICKY` value: old connections linger on the port (TIME_WAIT), so only a socket with
/// SO_REUSEADDR may be sent there.
pub const STICKY_LINGERING: u32 = 1 << 16;

/// Service ranges the kernel path knows (the first ones of the daemon's configuration).
pub const RANGES_MAX: u32 = 64;
/// Spare ports kept ready per range.
pub const SPARE_SLOTS: u32 = 8;
/// Entries of `SPARES`.
pub const SPARES_LEN: u32 = RANGES_MAX * SPARE_SLOTS;

/// `READER[0]` while the reader sleeps in the kernel; `READER_AWAKE` while it drains.
pub const READER_SLEEPING: u32 = 1;
pub const READER_AWAKE: u32 = 0;

/// Names of the tracepoint programs and what they attach to (`sched/<name>`).
pub const PROGRAM_FORK: &str = "styxy_sched_process_fork";
pub const PROGRAM_EXIT: &str = "styxy_sched_process_exit";
pub const PROGRAM_EXEC: &str = "styxy_sched_process_exec";
/// The shim's question "does the kernel steer me?": a UDP `connect()` (no packet is sent) to
/// [`PROBE_ADDR_V4`]:[`probe_port`]`(flags)`. The `connect4` program, for a process it steers,
/// sends it to [`PROBE_ANSWER_PORT`] instead, which `getpeername` then shows; for anyone else (or
/// with no programs attached) the peer stays where it was sent. It rides on the member check
/// `connect4` makes anyway, so it costs processes outside every session nothing (a
/// `cgroup/getsockopt` program answering a private level cost every `getsockopt` on the machine
/// 0.25 µs, 1.8×). The question also tells: the port carries the asker's
/// [`Member::flags`] (what its environment turns off), which `connect4` writes into its entry.
pub const PROBE_ADDR_V4: [u8; 4] = [127, 255, 255, 254];
/// The first of the four probe ports (flags 0 to 3).
pub const PROBE_PORT: u16 = 16;
pub const PROBE_ANSWER_PORT: u16 = 1;
/// Every flag a probe may carry.
pub const PROBE_FLAGS: u32 = MEMBER_VIEW_OFF | MEMBER_MOVES_OFF;

/// The probe port that tells `flags` (only [`PROBE_FLAGS`] count).
pub const fn probe_port(flags: u32) -> u16 {
    PROBE_PORT + (flags & PROBE_FLAGS) as u16
}

/// The flags a probe to `port` tells; `None` when `port` is no probe port.
pub const fn probe_flags(port: u16) -> Option<u32> {
    if port >= PROBE_PORT && port <= PROBE_PORT + PROBE_FLAGS as u16 {
        Some((port - PROBE_PORT) as u32)
    } else {
        None
    }
}
/// Programs of the session view (sock_addr, like the bind programs).
pub const PROGRAMS_VIEW: [&str; 8] = [
    "styxy_connect4",
    "styxy_connect6",
    "styxy_sendmsg4",
    "styxy_sendmsg6",
    "styxy_recvmsg4",
    "styxy_recvmsg6",
    "styxy_getpeername4",
    "styxy_getpeername6",
];

/// Globals the daemon sets when it loads the object (constants for the verifier).
/// Offset of `child_pid` in the `sched_process_fork` record (from its tracefs format).
pub const GLOBAL_FORK_CHILD_PID_OFFSET: &str = "FORK_CHILD_PID_OFFSET";
/// Offset of `group_dead` in the `sched_process_exit` record.
pub const GLOBAL_EXIT_GROUP_DEAD_OFFSET: &str = "EXIT_GROUP_DEAD_OFFSET";
/// 1 when the programs may rewrite binds and redirect traffic (attached at the cgroup root).
pub const GLOBAL_ENFORCE: &str = "ENFORCE";
/// Offsets of `pid` and `old_pid` in the `sched_process_exec` record.
pub const GLOBAL_EXEC_PID_OFFSET: &str = "EXEC_PID_OFFSET";
pub const GLOBAL_EXEC_OLD_PID_OFFSET: &str = "EXEC_OLD_PID_OFFSET";
/// Byte offsets in the running kernel's structs (from its BTF): `task_struct.group_leader`,
/// `task_struct.start_time`, `task_struct.cred` and `cred.euid`.
pub const GLOBAL_TASK_GROUP_LEADER_OFFSET: &str = "TASK_GROUP_LEADER_OFFSET";
pub const GLOBAL_TASK_START_TIME_OFFSET: &str = "TASK_START_TIME_OFFSET";
pub const GLOBAL_TASK_CRED_OFFSET: &str = "TASK_CRED_OFFSET";
pub const GLOBAL_CRED_EUID_OFFSET: &str = "CRED_EUID_OFFSET";

/// `PORT_INFO[port]`: who holds a lease or claim on the port (bits 0..32), the port's service
/// range (bits 32..40, index + 1; 0 for none) and, for a session's *hold* of a port its server
/// was moved to, the port that server asked (bits 40..56; 0 for any other lease).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortInfo(pub u64);

/// A lease or claim of no kernel session (a script's allocation, another user's shim claim).
pub const RESERVED_BY_OTHER: u32 = u32::MAX;

impl PortInfo {
    pub const fn new(reserved_by: u32, held_for: u16, range: Option<u32>) -> Self {
        let range = match range {
            Some(index) if index < RANGES_MAX => index as u64 + 1,
            _ => 0,
        };
        PortInfo(reserved_by as u64 | (range << 32) | ((held_for as u64) << 40))
    }
    /// 0: no lease; [`RESERVED_BY_OTHER`]; else the session number holding it.
    pub const fn reserved_by(self) -> u32 {
        self.0 as u32
    }
    /// The index of the port's service range.
    pub const fn range(self) -> Option<u32> {
        match (self.0 >> 32) as u8 {
            0 => None,
            n => Some(n as u32 - 1),
        }
    }
    /// For a hold of a port its session's server was moved to (and that server has stopped):
    /// the port it asked, whose next server alone may take the port back. In the session's view
    /// the port stands for that one, so a bind of the session asking any other port — the held
    /// port itself included — must not get it. 0: the lease is its session's for any bind.
    pub const fn held_for(self) -> u16 {
        (self.0 >> 40) as u16
    }
    /// Whether a bind asking `asked`, by a process of `session`, must leave the port alone.
    pub const fn reserved_against(self, session: u32, asked: u16) -> bool {
        let by = self.reserved_by();
        let held_for = self.held_for();
        by != 0 && (by != session || (held_for != 0 && held_for != asked))
    }
}

/// Key of `MOVES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoveKey {
    pub tgid: u32,
    pub asked: u16,
    pub protocol: u8,
    pub _pad: u8,
}

/// Key of `VIEWS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ViewKey {
    pub session: u32,
    pub asked: u16,
    pub protocol: u8,
    pub _pad: u8,
}

/// Key of `STICKY`: a session and a port its processes may ask for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StickyKey {
    pub session: u32,
    pub asked: u16,
    pub _pad: u16,
}

/// Key of `REVERSE`: a socket and the real port it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReverseKey {
    pub cookie: u64,
    pub bound: u16,
    pub protocol: u8,
    pub _pad: [u8; 5],
}

/// Value of the `REQUESTED` map (socket cookie → what bind4/6 saw), for post_bind.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Requested {
    /// The port the program asked for.
    pub asked: u16,
    /// `FLAG_*` of the event record.
    pub flags: u8,
    pub _pad: u8,
    /// The session of the binding process (0: none).
    pub session: u32,
}

// SAFETY: plain repr(C) data with explicit padding; any bit pattern is valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for ViewKey {}
// SAFETY: as above (two u32, a u64, two u32: no padding).
#[cfg(feature = "user")]
unsafe impl aya::Pod for Member {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for MoveKey {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for StickyKey {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_entry_holds_for_the_process_it_was_written_for_only() {
        let member = Member {
            session: 3,
            owner: 1000,
            stamp_ns: 5_000,
            flags: 0,
            _pad: 0,
        };
        assert!(member.holds_for(4_999) && member.holds_for(5_000));
        assert!(
            !member.holds_for(5_001),
            "a process started after the entry reuses its pid"
        );
        assert!(member.steers(1000));
        assert!(
            !member.steers(0),
            "a setuid-root program in a user's session"
        );
        assert!(!member.steers(1001));
        let root_owned = Member { owner: 0, ..member };
        assert!(
            root_owned.steers(0) && root_owned.steers(110),
            "root's sessions steer every uid"
        );
    }

    #[test]
    fn a_probe_port_carries_the_flags_and_nothing_else_is_one() {
        for flags in 0..=PROBE_FLAGS {
            assert_eq!(probe_flags(probe_port(flags)), Some(flags));
        }
        assert_eq!(probe_port(MEMBER_VIEW_OFF | 8), probe_port(MEMBER_VIEW_OFF));
        assert_eq!(probe_flags(PROBE_PORT - 1), None);
        assert_eq!(probe_flags(PROBE_PORT + PROBE_FLAGS as u16 + 1), None);
        let member = Member {
            session: 1,
            owner: 0,
            stamp_ns: 0,
            flags: MEMBER_VIEW_OFF,
            _pad: 0,
        };
        assert!(!member.views() && member.moves());
    }

    #[test]
    fn port_info_packs_holder_hold_and_range() {
        let info = PortInfo::new(7, 0, Some(3));
        assert_eq!(
            (info.reserved_by(), info.held_for(), info.range()),
            (7, 0, Some(3))
        );
        let none = PortInfo::new(0, 0, None);
        assert_eq!((none.reserved_by(), none.range()), (0, None));
        let other = PortInfo::new(RESERVED_BY_OTHER, 0, Some(RANGES_MAX - 1));
        assert_eq!(other.reserved_by(), RESERVED_BY_OTHER);
        assert_eq!(other.range(), Some(RANGES_MAX - 1));
        let held = PortInfo::new(u32::MAX - 1, u16::MAX, Some(RANGES_MAX - 1));
        assert_eq!(
            (held.reserved_by(), held.held_for(), held.range()),
            (u32::MAX - 1, u16::MAX, Some(RANGES_MAX - 1))
        );
        // A range index the kernel has no spares for is no range.
        assert_eq!(PortInfo::new(1, 0, Some(RANGES_MAX)).range(), None);
    }

    #[test]
    fn a_hold_is_its_sessions_only_for_the_port_its_server_asked() {
        // Session 7's server asked 8000 and was moved to 8001, then stopped: 8001 is held.
        let hold = PortInfo::new(7, 8000, None);
        assert!(
            !hold.reserved_against(7, 8000),
            "its next server takes it back"
        );
        assert!(
            hold.reserved_against(7, 8001),
            "the session's server asking 8001 moves"
        );
        assert!(
            hold.reserved_against(8, 8000),
            "another session's server moves"
        );
        // Any other lease of a session is its own for every bind of the session.
        let claim = PortInfo::new(7, 0, None);
        assert!(!claim.reserved_against(7, 8001) && claim.reserved_against(8, 8001));
        assert!(!PortInfo::new(0, 0, None).reserved_against(7, 8001));
        assert!(PortInfo::new(RESERVED_BY_OTHER, 0, None).reserved_against(7, 8001));
    }
}
