//! The session table: what the daemon publishes for the shim in a file the shim maps read-only,
//! so that neither a loopback `connect()` nor the bind of a free port costs a call to the daemon.
//!
//! It holds, as 64-bit words (every access is an atomic load or store, so a reader never sees a
//! torn word):
//! - a header: magic, version, a sequence counter (odd while the daemon writes), the daemon's pid,
//!   whether it still serves, and its network namespace (the inode of `/proc/self/ns/net`; 0 from
//!   a daemon that does not say): a process in another namespace is the business of neither
//!   enforcer;
//! - `TAKEN`: one bit per port, set while anything holds it (a socket of either protocol, a
//!   lease, a claim) — a bind of a port whose bit is clear goes straight to the kernel;
//! - `VIEWED` and `TARGETED`: per protocol and port, whether some session's view redirects that
//!   asked port, or to that bound port — a `connect()` or a `recvfrom()` whose port's bit is
//!   clear needs nothing more;
//! - the view entries: protocol, asked port, bound port, the user and the session's id, packed
//!   from the start, `ENTRY_COUNT` of them. An entry applies to that user's processes only.
//!
//! The daemon changes it under a seqlock (the counter odd, the words, the counter even again); a
//! reader that saw the counter move, or odd, reads again. Entries are looked up only when a bit
//! says one may apply, so the common case is one atomic load.

use core::sync::atomic::{fence, AtomicU64, Ordering};

use crate::net::Protocol;

/// `STYXYTAB`, little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"STYXYTAB");
/// Bumped on every incompatible change of the layout.
pub const VERSION: u64 = 3;
/// The table's file is the daemon's socket path with this appended (`styxy.sock.table`).
pub const FILE_SUFFIX: &str = ".table";

/// The longest session id an entry holds (the daemon accepts no longer one).
pub const MAX_INSTANCE_ID: usize = 128;
/// How many view entries the table holds; more are left out (and logged by the daemon).
pub const MAX_ENTRIES: usize = 1024;

// The header's read-mostly words share one cache line; the words the daemon writes on every
// change (the sequence and the entry count) have a line of their own, so that a shim reading the
// header on every bind does not take a cache miss each time the daemon publishes.
const WORD_MAGIC: usize = 0;
const WORD_VERSION: usize = 1;
const WORD_DAEMON_PID: usize = 3;
const WORD_SERVING: usize = 4;
const WORD_NETNS: usize = 5;
const WORD_SEQ: usize = 8;
const WORD_ENTRY_COUNT: usize = 9;
const HEADER_WORDS: usize = 16;
const PORT_BITS_WORDS: usize = 65_536 / 64;
const TAKEN: usize = HEADER_WORDS;
const VIEWED: usize = TAKEN + PORT_BITS_WORDS;
const TARGETED: usize = VIEWED + 2 * PORT_BITS_WORDS;
const ENTRIES: usize = TARGETED + 2 * PORT_BITS_WORDS;
const ENTRY_WORDS: usize = 2 + MAX_INSTANCE_ID / 8;
/// The table's length in words.
pub const WORDS: usize = ENTRIES + MAX_ENTRIES * ENTRY_WORDS;
/// The table's length in bytes (the file's size; it never changes while mapped).
pub const BYTES: usize = WORDS * 8;

/// How many times a reader spins for a consistent reading before it asks its [`Table::patient`]
/// wait whether to go on (by default it gives up then, and the shim would leave the call alone).
const SPIN_ATTEMPTS: u32 = 64;

/// One view entry, as the daemon writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    /// The session whose view this is.
    pub instance_id: &'a [u8],
    /// The user whose processes it applies to (the moved server's).
    pub uid: u32,
    /// Only traffic of this protocol is redirected.
    pub protocol: Protocol,
    /// The port the session's clients use.
    pub asked: u16,
    /// The port the moved server is bound to.
    pub bound: u16,
}

/// A table in memory: the daemon's writable mapping or the shim's read-only one. Every index
/// into it is a constant or bounded by a port number, so none can fail (the shim links no panic).
#[derive(Clone, Copy)]
pub struct Table<'a> {
    words: &'a [AtomicU64; WORDS],
    /// Called (with the attempt number) once spinning did not get a consistent reading: waits a
    /// little and says whether to try again.
    wait: fn(u32) -> bool,
}

fn give_up(_: u32) -> bool {
    false
}

type Words = [AtomicU64; WORDS];

fn bit(words: &Words, base: usize, index: usize) -> bool {
    words
        .get(base + index / 64)
        .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (index % 64)) != 0)
}

fn protocol_index(protocol: Protocol, port: u16) -> usize {
    match protocol {
        Protocol::Tcp => usize::from(port),
        Protocol::Udp => 65_536 + usize::from(port),
    }
}

impl<'a> Table<'a> {
    /// A table over `words`; `None` when it is too short. The header is not checked: see
    /// [`Table::is_current`].
    pub fn new(words: &'a [AtomicU64]) -> Option<Table<'a>> {
        let words = words.get(..WORDS)?.try_into().ok()?;
        Some(Table {
            words,
            wait: give_up,
        })
    }

    /// The same table, whose readers call `wait` (with the attempt number) while a write is
    /// under way past their spinning, instead of giving up. A reader that gave up would leave a
    /// connect unredirected — to the port's real holder, another session's server — when all it
    /// met was a writer preempted mid-update (seen in the session soak on 2 busy cores). `wait`
    /// yields the processor and bounds the attempts: a writer that never finishes (a stopped
    /// daemon) must not hang the reader.
    pub fn patient(self, wait: fn(u32) -> bool) -> Table<'a> {
        Table { wait, ..self }
    }

    /// The first word: where the table is in memory.
    pub fn base(&self) -> *const AtomicU64 {
        self.words.as_ptr()
    }

    /// Whether the header says this is a table of this layout.
    pub fn is_current(&self) -> bool {
        self.words[WORD_MAGIC].load(Ordering::Acquire) == MAGIC
            && self.words[WORD_VERSION].load(Ordering::Relaxed) == VERSION
    }

    /// The pid of the daemon that writes it.
    pub fn daemon_pid(&self) -> u32 {
        self.words[WORD_DAEMON_PID].load(Ordering::Relaxed) as u32
    }

    /// The daemon's network namespace (the inode of its `/proc/self/ns/net`), 0 when unknown.
    pub fn netns(&self) -> u64 {
        self.words[WORD_NETNS].load(Ordering::Relaxed)
    }

    /// False once the daemon stopped (a daemon killed outright cannot say so: check its pid).
    pub fn serving(&self) -> bool {
        self.words[WORD_SERVING].load(Ordering::Acquire) == 1
    }

    /// Whether anything holds `port` (either protocol, a lease, a claim).
    pub fn is_taken(&self, port: u16) -> bool {
        bit(self.words, TAKEN, usize::from(port))
    }

    /// Whether some session's view redirects `(protocol, port)`.
    pub fn is_viewed(&self, protocol: Protocol, port: u16) -> bool {
        bit(self.words, VIEWED, protocol_index(protocol, port))
    }

    /// Whether some session's view redirects to `(protocol, port)`.
    pub fn is_targeted(&self, protocol: Protocol, port: u16) -> bool {
        bit(self.words, TARGETED, protocol_index(protocol, port))
    }

    /// The bound port that user `uid`'s session `instance_id` reaches at `asked`; `None` when its
    /// view has none, or no consistent reading could be had.
    pub fn redirect(
        &self,
        instance_id: &[u8],
        uid: u32,
        protocol: Protocol,
        asked: u16,
    ) -> Option<u16> {
        self.find(instance_id, uid, protocol, |e| {
            (e.asked == asked).then_some(e.bound)
        })
    }

    /// The asked port that user `uid`'s session `instance_id` knows `bound` by; `None` when its
    /// view has none.
    pub fn asked_for(
        &self,
        instance_id: &[u8],
        uid: u32,
        protocol: Protocol,
        bound: u16,
    ) -> Option<u16> {
        self.find(instance_id, uid, protocol, |e| {
            (e.bound == bound).then_some(e.asked)
        })
    }

    /// Scans the entries of one user's session and one protocol under the seqlock.
    fn find(
        &self,
        instance_id: &[u8],
        uid: u32,
        protocol: Protocol,
        pick: impl Fn(&RawEntry) -> Option<u16>,
    ) -> Option<u16> {
        let mut attempt: u32 = 0;
        loop {
            if attempt > 0 {
                if attempt < SPIN_ATTEMPTS {
                    core::hint::spin_loop();
                } else if !(self.wait)(attempt) {
                    return None;
                }
            }
            attempt = attempt.saturating_add(1);
            let before = self.words[WORD_SEQ].load(Ordering::Acquire);
            if before % 2 == 1 {
                continue;
            }
            let count =
                (self.words[WORD_ENTRY_COUNT].load(Ordering::Relaxed) as usize).min(MAX_ENTRIES);
            let mut found = None;
            for index in 0..count {
                let raw = RawEntry::read(self.words, index);
                if raw.protocol == Some(protocol)
                    && raw.uid == uid
                    && raw.instance_is(self.words, index, instance_id)
                {
                    if let Some(port) = pick(&raw) {
                        found = Some(port);
                        break;
                    }
                }
            }
            fence(Ordering::Acquire);
            if self.words[WORD_SEQ].load(Ordering::Relaxed) == before {
                return found;
            }
        }
    }

    /// Writes a fresh table's header: empty, serving, written by `daemon_pid` in network namespace
    /// `netns` (0: unknown).
    pub fn init(&self, daemon_pid: u32, netns: u64) {
        for word in self.words {
            word.store(0, Ordering::Relaxed);
        }
        self.words[WORD_VERSION].store(VERSION, Ordering::Relaxed);
        self.words[WORD_DAEMON_PID].store(u64::from(daemon_pid), Ordering::Relaxed);
        self.words[WORD_SERVING].store(1, Ordering::Relaxed);
        self.words[WORD_NETNS].store(netns, Ordering::Relaxed);
        self.words[WORD_MAGIC].store(MAGIC, Ordering::Release);
    }

    /// Says the daemon stopped serving (a reader then leaves every call alone).
    pub fn set_stopped(&self) {
        self.words[WORD_SERVING].store(0, Ordering::Release);
    }

    /// Whether `port`'s taken bit already says `taken` (nothing to write for it).
    pub fn taken_is(&self, port: u16, taken: bool) -> bool {
        self.is_taken(port) == taken
    }

    /// Runs `write` between the two steps of the seqlock. One writer at a time (the daemon calls
    /// it under its broker lock).
    pub fn write(&self, write: impl FnOnce(&Writer<'a>)) {
        let seq = self.words[WORD_SEQ].load(Ordering::Relaxed);
        self.words[WORD_SEQ].store(seq.wrapping_add(1) | 1, Ordering::Relaxed);
        fence(Ordering::Release);
        write(&Writer { table: *self });
        self.words[WORD_SEQ].store((seq | 1).wrapping_add(1), Ordering::Release);
    }
}

/// What the daemon may change, inside [`Table::write`].
pub struct Writer<'a> {
    table: Table<'a>,
}

fn set_bit(words: &Words, base: usize, index: usize, on: bool) {
    let mask = 1 << (index % 64);
    let Some(word) = words.get(base + index / 64) else {
        return;
    };
    // Written only when it changes: a write takes the cache line from every reader.
    if (word.load(Ordering::Relaxed) & mask != 0) == on {
        return;
    }
    if on {
        word.fetch_or(mask, Ordering::Relaxed);
    } else {
        word.fetch_and(!mask, Ordering::Relaxed);
    }
}

impl Writer<'_> {
    /// Marks `port` taken or free.
    pub fn set_taken(&self, port: u16, taken: bool) {
        set_bit(self.table.words, TAKEN, usize::from(port), taken);
    }

    /// Replaces every view entry (and the `VIEWED` and `TARGETED` bits) with `entries`; returns
    /// how many did not fit ([`MAX_ENTRIES`]) or had too long an id, and were left out.
    ///
    /// The bits are read without the seqlock (one load per connect), so a bit that stays set is
    /// never cleared on the way: the new entries' bits are set first, and only then the bits of
    /// the old entries' ports that no new entry keeps are cleared. (Clearing them all first, then
    /// setting the new ones, left every viewed port unviewed for a moment at each change: a
    /// connect then went to the asked port's real holder, another session's server.)
    pub fn set_views<'e>(&self, entries: impl IntoIterator<Item = Entry<'e>>) -> usize {
        let words = self.table.words;
        let old_count = (words[WORD_ENTRY_COUNT].load(Ordering::Relaxed) as usize).min(MAX_ENTRIES);
        let mut old = [(None, 0u16, 0u16); MAX_ENTRIES];
        for (index, slot) in old.iter_mut().enumerate().take(old_count) {
            let raw = RawEntry::read(words, index);
            *slot = (raw.protocol, raw.asked, raw.bound);
        }
        let mut written = 0;
        let mut left_out = 0;
        for entry in entries {
            if written == MAX_ENTRIES || entry.instance_id.len() > MAX_INSTANCE_ID {
                left_out += 1;
                continue;
            }
            RawEntry::write(words, written, &entry);
            set_bit(
                words,
                VIEWED,
                protocol_index(entry.protocol, entry.asked),
                true,
            );
            set_bit(
                words,
                TARGETED,
                protocol_index(entry.protocol, entry.bound),
                true,
            );
            written += 1;
        }
        words[WORD_ENTRY_COUNT].store(written as u64, Ordering::Relaxed);
        let kept = |protocol: Protocol, port: u16, by_asked: bool| {
            (0..written).any(|index| {
                let raw = RawEntry::read(words, index);
                raw.protocol == Some(protocol)
                    && if by_asked {
                        raw.asked == port
                    } else {
                        raw.bound == port
                    }
            })
        };
        for (protocol, asked, bound) in old.iter().take(old_count) {
            let Some(protocol) = *protocol else {
                continue;
            };
            if !kept(protocol, *asked, true) {
                set_bit(words, VIEWED, protocol_index(protocol, *asked), false);
            }
            if !kept(protocol, *bound, false) {
                set_bit(words, TARGETED, protocol_index(protocol, *bound), false);
            }
        }
        left_out
    }
}

/// Bytes `8n..8n+8` of `bytes` as one little-endian word, zero-padded. No slicing: nothing in
/// this module may panic, not even in code only the daemon runs, or the shim would not link.
fn pack(bytes: &[u8], n: usize) -> u64 {
    bytes
        .iter()
        .skip(n * 8)
        .take(8)
        .enumerate()
        .fold(0, |word, (k, byte)| word | u64::from(*byte) << (8 * k))
}

/// An entry's first word, decoded: protocol (0 TCP, 1 UDP, else none), asked and bound ports,
/// and the id's length; its id follows in [`MAX_INSTANCE_ID`] bytes.
struct RawEntry {
    protocol: Option<Protocol>,
    asked: u16,
    bound: u16,
    id_len: usize,
    uid: u32,
}

impl RawEntry {
    fn at(index: usize) -> usize {
        ENTRIES + index * ENTRY_WORDS
    }

    fn read(words: &Words, index: usize) -> RawEntry {
        let head = words
            .get(Self::at(index))
            .map_or(0, |w| w.load(Ordering::Relaxed));
        let uid = words
            .get(Self::at(index) + 1)
            .map_or(u64::from(u32::MAX), |w| w.load(Ordering::Relaxed));
        RawEntry {
            protocol: match head & 0xff {
                1 => Some(Protocol::Tcp),
                2 => Some(Protocol::Udp),
                _ => None,
            },
            asked: (head >> 8) as u16,
            bound: (head >> 24) as u16,
            id_len: ((head >> 40) & 0xff) as usize,
            uid: uid as u32,
        }
    }

    fn write(words: &Words, index: usize, entry: &Entry<'_>) {
        let protocol = match entry.protocol {
            Protocol::Tcp => 1u64,
            Protocol::Udp => 2,
        };
        let head = protocol
            | u64::from(entry.asked) << 8
            | u64::from(entry.bound) << 24
            | (entry.instance_id.len() as u64) << 40;
        let at = Self::at(index);
        let Some((first, rest)) = words
            .get(at..at + ENTRY_WORDS)
            .and_then(<[AtomicU64]>::split_first)
        else {
            return;
        };
        let Some((uid, id_words)) = rest.split_first() else {
            return;
        };
        first.store(head, Ordering::Relaxed);
        uid.store(u64::from(entry.uid), Ordering::Relaxed);
        for (n, word) in id_words.iter().enumerate() {
            word.store(pack(entry.instance_id, n), Ordering::Relaxed);
        }
    }

    /// Whether the entry's id is `id`, compared word by word.
    fn instance_is(&self, words: &Words, index: usize, id: &[u8]) -> bool {
        if self.id_len != id.len() || id.len() > MAX_INSTANCE_ID {
            return false;
        }
        let at = Self::at(index) + 2;
        (0..id.len().div_ceil(8)).all(|n| {
            words
                .get(at + n)
                .is_some_and(|w| w.load(Ordering::Relaxed) == pack(id, n))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    fn words() -> Vec<AtomicU64> {
        (0..WORDS).map(|_| AtomicU64::new(0)).collect()
    }

    /// A view entry that stays through a rewrite of the views is seen by every reader all along:
    /// its `VIEWED` and `TARGETED` bits (read without the seqlock, on every connect) never clear,
    /// and its lookup never misses. A reader that saw the bit clear for a moment would connect to
    /// the asked port's real holder, another session's server (the session soak's last misroutes).
    #[test]
    fn an_entry_that_stays_is_never_missing_while_the_views_are_rewritten() {
        let memory = words();
        let table = Table::new(&memory).expect("long enough");
        table.init(1, 0);
        let stays = Entry {
            instance_id: b"session-a",
            uid: 1000,
            protocol: Protocol::Tcp,
            asked: 8000,
            bound: 8100,
        };
        let others = |round: u16| {
            (0..8u16).map(move |i| Entry {
                instance_id: b"session-b",
                uid: 1000,
                protocol: Protocol::Tcp,
                asked: 9000 + i,
                bound: 9100 + (i + round) % 50,
            })
        };
        table.write(|w| {
            w.set_views(core::iter::once(stays).chain(others(0)));
        });
        let done = std::sync::atomic::AtomicBool::new(false);
        let misses = std::thread::scope(|scope| {
            let reader = scope.spawn(|| {
                let patient = table.patient(|attempt| {
                    std::thread::yield_now();
                    attempt < 1_000_000
                });
                let mut misses = 0u64;
                while !done.load(Ordering::Relaxed) {
                    if !patient.is_viewed(Protocol::Tcp, 8000)
                        || !patient.is_targeted(Protocol::Tcp, 8100)
                        || patient.redirect(b"session-a", 1000, Protocol::Tcp, 8000) != Some(8100)
                    {
                        misses += 1;
                    }
                }
                misses
            });
            for round in 0..60_000u16 {
                // The entry that stays moves about among the others, as a new lease reorders them.
                let at = usize::from(round % 9);
                let mut entries: std::vec::Vec<Entry<'_>> = others(round).collect();
                entries.insert(at, stays);
                table.write(|w| {
                    w.set_views(entries);
                });
            }
            done.store(true, Ordering::Relaxed);
            reader.join().expect("the reader")
        });
        assert_eq!(misses, 0, "readers missed an entry that never went");
    }

    #[test]
    fn a_table_reads_back_what_was_written() {
        let memory = words();
        let table = Table::new(&memory).expect("long enough");
        assert!(!table.is_current(), "all zero is no table");
        table.init(4121, 0);
        assert!(table.is_current() && table.serving());
        assert_eq!(table.daemon_pid(), 4121);
        table.write(|w| {
            w.set_taken(8000, true);
            w.set_taken(8001, true);
            let left_out = w.set_views([
                Entry {
                    instance_id: b"session-b",
                    uid: 1000,
                    protocol: Protocol::Tcp,
                    asked: 8000,
                    bound: 8001,
                },
                Entry {
                    instance_id: b"session-c",
                    uid: 1000,
                    protocol: Protocol::Udp,
                    asked: 8000,
                    bound: 8002,
                },
            ]);
            assert_eq!(left_out, 0);
        });
        assert!(table.is_taken(8000) && table.is_taken(8001) && !table.is_taken(8002));
        assert!(table.is_viewed(Protocol::Tcp, 8000) && table.is_viewed(Protocol::Udp, 8000));
        assert!(!table.is_viewed(Protocol::Tcp, 8001));
        assert!(table.is_targeted(Protocol::Tcp, 8001) && !table.is_targeted(Protocol::Udp, 8001));
        assert_eq!(
            table.redirect(b"session-b", 1000, Protocol::Tcp, 8000),
            Some(8001)
        );
        assert_eq!(
            table.redirect(b"session-b", 1000, Protocol::Udp, 8000),
            None,
            "per protocol"
        );
        assert_eq!(
            table.redirect(b"session-b", 1001, Protocol::Tcp, 8000),
            None,
            "per user"
        );
        assert_eq!(
            table.redirect(b"session-c", 1000, Protocol::Udp, 8000),
            Some(8002)
        );
        assert_eq!(
            table.redirect(b"session", 1000, Protocol::Tcp, 8000),
            None,
            "whole ids only"
        );
        assert_eq!(
            table.redirect(b"session-bb", 1000, Protocol::Tcp, 8000),
            None
        );
        assert_eq!(
            table.asked_for(b"session-b", 1000, Protocol::Tcp, 8001),
            Some(8000)
        );

        // Replaced, not added to: old bits go.
        table.write(|w| {
            w.set_taken(8001, false);
            w.set_views([]);
        });
        assert!(!table.is_taken(8001) && table.is_taken(8000));
        assert!(!table.is_viewed(Protocol::Tcp, 8000) && !table.is_targeted(Protocol::Tcp, 8001));
        assert_eq!(
            table.redirect(b"session-b", 1000, Protocol::Tcp, 8000),
            None
        );
        table.set_stopped();
        assert!(!table.serving());
    }

    #[test]
    fn ids_too_long_and_entries_past_the_end_are_left_out() {
        let memory = words();
        let table = Table::new(&memory).expect("long enough");
        table.init(1, 0);
        let long = [b'x'; MAX_INSTANCE_ID + 1];
        let full = [b'y'; MAX_INSTANCE_ID];
        let entries = (0..MAX_ENTRIES as u16 + 1).map(|n| Entry {
            instance_id: if n == 0 { &long[..] } else { &full[..] },
            uid: 7,
            protocol: Protocol::Tcp,
            asked: n,
            bound: n + 1,
        });
        let mut left_out = 0;
        table.write(|w| left_out = w.set_views(entries));
        assert_eq!(left_out, 1, "the long id; the rest fit exactly");
        assert_eq!(table.redirect(&full, 7, Protocol::Tcp, 1), Some(2));
        assert_eq!(
            table.redirect(&full, 7, Protocol::Tcp, MAX_ENTRIES as u16),
            Some(MAX_ENTRIES as u16 + 1)
        );
        assert!(Table::new(&memory[..WORDS - 1]).is_none());
    }

    #[test]
    fn a_patient_reader_waits_out_a_writer_stalled_mid_update() {
        use std::sync::atomic::AtomicBool;
        let memory = words();
        let table = Table::new(&memory).expect("long enough");
        table.init(1, 0);
        let entry = |bound| Entry {
            instance_id: b"session-b",
            uid: 1000,
            protocol: Protocol::Tcp,
            asked: 8000,
            bound,
        };
        table.write(|w| {
            w.set_views([entry(9001)]);
        });
        let inside = AtomicBool::new(false);
        let release = AtomicBool::new(false);
        std::thread::scope(|scope| {
            // A writer preempted in the middle of an update (the sequence stays odd meanwhile).
            scope.spawn(|| {
                table.write(|w| {
                    w.set_views([entry(9002)]);
                    inside.store(true, Ordering::SeqCst);
                    while !release.load(Ordering::SeqCst) {
                        std::thread::yield_now();
                    }
                });
            });
            while !inside.load(Ordering::SeqCst) {
                std::thread::yield_now();
            }
            // Impatient (the default): gives up, and the caller would leave the connect alone.
            assert_eq!(
                table.redirect(b"session-b", 1000, Protocol::Tcp, 8000),
                None
            );
            // Patient: waits for the writer, and finds the entry.
            let patient = table.patient(|attempt| {
                if attempt == 1000 {
                    RELEASE_THE_WRITER.store(true, Ordering::SeqCst);
                }
                std::thread::yield_now();
                attempt < 1_000_000
            });
            let waiter =
                scope.spawn(move || patient.redirect(b"session-b", 1000, Protocol::Tcp, 8000));
            while !RELEASE_THE_WRITER.load(Ordering::SeqCst) {
                std::thread::yield_now();
            }
            release.store(true, Ordering::SeqCst);
            assert_eq!(waiter.join().expect("reader"), Some(9002));
        });
    }

    /// Set by the patient reader once it has waited a while (a `fn` wait cannot capture).
    static RELEASE_THE_WRITER: std::sync::atomic::AtomicBool =
        std::sync::atomic::AtomicBool::new(false);

    #[test]
    fn a_reader_never_sees_a_half_written_view() {
        let memory = words();
        let table = Table::new(&memory).expect("long enough");
        table.init(1, 0);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for round in 0..20_000u16 {
                    // Each round moves session-b's 8000 to a new port, together with its id.
                    let bound = 9000 + round % 500;
                    table.write(|w| {
                        w.set_views([Entry {
                            instance_id: b"session-b",
                            uid: 1000,
                            protocol: Protocol::Tcp,
                            asked: 8000,
                            bound,
                        }]);
                    });
                }
            });
            for _ in 0..20_000 {
                if let Some(bound) = table.redirect(b"session-b", 1000, Protocol::Tcp, 8000) {
                    assert!((9000..9500).contains(&bound), "torn read: {bound}");
                }
            }
        });
    }
}
