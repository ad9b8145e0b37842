//! The journal: its records, reading them back with damage detected rather than guessed past, and
//! the file they are appended to, filled with zeros ahead of its end.
//!
//! A record is one line: the CRC-32 of its JSON (8 hex digits), a space, the JSON of one state
//! change. Lines from before checksums (plain JSON) are still read. The file is filled with zeros
//! ahead of its end, so its records end at the first zero byte — unless non-zero bytes follow it,
//! which is damage too. Replay stops at the first damaged record: what came before is kept, and
//! the caller is told exactly where the damage is and how many records were dropped. A last line
//! cut short (no newline, zeros after it) is a write torn by a crash, never acknowledged (every
//! answer waits for its fsync): it is dropped and said, not called damage.

use std::fs::File;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use styxy_broker::StateChange;

use super::dir::{refused_file, state_file_options};
use super::{JOURNAL, JOURNAL_CHUNK};

/// Appends one record for `value` to `buf`.
pub fn append_record(buf: &mut Vec<u8>, value: &impl Serialize) {
    let Ok(json) = serde_json::to_vec(value) else {
        return;
    };
    buf.extend_from_slice(format!("{:08x} ", crc32fast::hash(&json)).as_bytes());
    buf.extend_from_slice(&json);
    buf.push(b'\n');
}

/// Where replay stopped, and what it dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The damaged record's number (1-based).
    pub record: usize,
    /// Its byte offset in the file.
    pub offset: usize,
    /// Records kept (all before it).
    pub kept: usize,
    /// Records dropped: the damaged one and every one after it.
    pub dropped: usize,
    /// What was wrong with it.
    pub reason: String,
}

/// What a journal held.
#[derive(Debug, Default)]
pub struct Replay {
    /// The good records, in order.
    pub changes: Vec<StateChange>,
    /// The first damage, if any.
    pub damage: Option<Damage>,
    /// A last record cut short by a crash, dropped.
    pub torn_tail: bool,
}

/// Reads the records of a journal file's bytes.
pub fn replay(bytes: &[u8]) -> Replay {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    let (data, after) = bytes.split_at(end);
    // Lines with non-zero bytes after the first zero: records follow a zero that is not the end.
    let hidden: usize = after
        .split(|b| *b == 0 || *b == b'\n')
        .filter(|chunk| !chunk.is_empty())
        .count();
    let chunks: Vec<&[u8]> = data.split_inclusive(|b| *b == b'\n').collect();
    let mut replay = Replay::default();
    let mut offset = 0;
    for (n, chunk) in chunks.iter().enumerate() {
        let complete = chunk.ends_with(b"\n");
        if !complete && hidden == 0 {
            replay.torn_tail = true;
            break;
        }
        let line = chunk.strip_suffix(b"\n").unwrap_or(chunk);
        if line.is_empty() {
            // A blank line holds no record (none is ever written): nothing to keep or drop.
            offset += chunk.len();
            continue;
        }
        match record(line) {
            Ok(change) => replay.changes.push(change),
            Err(reason) => {
                replay.damage = Some(Damage {
                    record: n + 1,
                    offset,
                    kept: replay.changes.len(),
                    dropped: lines_from(bytes, offset),
                    reason,
                });
                return replay;
            }
        }
        offset += chunk.len();
    }
    if hidden > 0 {
        replay.damage = Some(Damage {
            record: replay.changes.len() + 1,
            offset: end,
            kept: replay.changes.len(),
            dropped: lines_from(bytes, end),
            reason: "a zero byte inside the records".into(),
        });
    }
    replay
}

/// How many records the bytes from `offset` on held: lines with anything but zeros in them (a
/// line with a zero byte inside it is one record).
fn lines_from(bytes: &[u8], offset: usize) -> usize {
    let rest = bytes.get(offset..).unwrap_or_default();
    let mut count = 0;
    let mut in_line = false;
    for byte in rest {
        match byte {
            b'\n' => {
                count += usize::from(in_line);
                in_line = false;
            }
            0 => {}
            _ => in_line = true,
        }
    }
    count + usize::from(in_line)
}

/// One line: `CRC JSON`, or a plain JSON line from before checksums.
fn record(line: &[u8]) -> Result<StateChange, String> {
    let json = if line.first() == Some(&b'{') {
        line
    } else {
        let (crc, json) = match line.iter().position(|b| *b == b' ') {
            Some(space) => (&line[..space], &line[space + 1..]),
            None => return Err("no checksum".into()),
        };
        let expected = std::str::from_utf8(crc)
            .ok()
            .and_then(|hex| u32::from_str_radix(hex, 16).ok())
            .ok_or("an unreadable checksum")?;
        if crc32fast::hash(json) != expected {
            return Err("its checksum does not match".into());
        }
        json
    };
    serde_json::from_slice(json).map_err(|e| format!("not a state change ({e})"))
}

/// The journal file: where its data ends, and how far it is filled with zeros.
pub(super) struct Journal {
    pub(super) file: File,
    pub(super) end: u64,
    pub(super) zeroed: u64,
    pub(super) lines: usize,
}

impl Journal {
    /// Starts an empty journal (truncating the one there), its first chunk zeroed and on disk.
    pub(super) fn create(dir: &Path) -> Result<Journal> {
        let path = dir.join(JOURNAL);
        let file = state_file_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .with_context(|| refused_file(&path))?;
        let mut journal = Journal {
            file,
            end: 0,
            zeroed: 0,
            lines: 0,
        };
        journal.zero(0, JOURNAL_CHUNK)?;
        journal
            .file
            .sync_all()
            .context("fsync of the new journal")?;
        Ok(journal)
    }

    /// Writes `bytes` (whole lines) at the end and fsyncs them. Safe to repeat after a failure:
    /// the end moves only once the data is on disk.
    pub(super) fn append(&mut self, bytes: &[u8], lines: usize) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let end = self.end + bytes.len() as u64;
        self.file
            .write_all_at(bytes, self.end)
            .context("writing to the journal")?;
        // Zeros ahead again (this fsync then carries the new size too, once per chunk).
        if end > self.zeroed {
            self.zero(end, end.next_multiple_of(JOURNAL_CHUNK))?;
        }
        self.file.sync_data().context("fsync of the journal")?;
        self.end = end;
        self.lines += lines;
        Ok(())
    }

    /// Fills `from..limit` of the file with zeros.
    pub(super) fn zero(&mut self, from: u64, limit: u64) -> Result<()> {
        use std::os::unix::fs::FileExt;
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        let mut at = from;
        while at < limit {
            let len = (limit - at).min(ZEROS.len() as u64) as usize;
            self.file
                .write_all_at(&ZEROS[..len], at)
                .context("filling the journal with zeros")?;
            at += len as u64;
        }
        self.zeroed = limit;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use styxy_broker::StateChange;

    fn journal(n: usize) -> Vec<u8> {
        let mut buf = Vec::new();
        for i in 0..n {
            append_record(
                &mut buf,
                &StateChange::RemoveInstance {
                    id: format!("i{i}"),
                },
            );
        }
        buf
    }

    fn ids(replay: &Replay) -> Vec<String> {
        replay
            .changes
            .iter()
            .map(|c| match c {
                StateChange::RemoveInstance { id } => id.clone(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_whole_journal_with_its_zeroed_tail_reads_back_whole() {
        let mut bytes = journal(5);
        bytes.extend([0u8; 64]);
        let replay = replay(&bytes);
        assert_eq!(ids(&replay), ["i0", "i1", "i2", "i3", "i4"]);
        assert_eq!((replay.damage, replay.torn_tail), (None, false));
    }

    #[test]
    fn a_flipped_byte_stops_replay_there_and_says_what_was_dropped() {
        let mut bytes = journal(5);
        let third = bytes
            .split(|b| *b == b'\n')
            .take(2)
            .map(|l| l.len() + 1)
            .sum::<usize>();
        bytes[third + 20] ^= 0x01;
        let replay = replay(&bytes);
        assert_eq!(ids(&replay), ["i0", "i1"]);
        let damage = replay.damage.expect("damage");
        assert_eq!(
            (damage.record, damage.offset, damage.kept, damage.dropped),
            (3, third, 2, 3)
        );
        assert!(damage.reason.contains("checksum"), "{damage:?}");
    }

    #[test]
    fn a_zero_byte_inside_the_records_is_damage_not_the_end() {
        let mut bytes = journal(5);
        bytes[3] = 0;
        bytes.extend([0u8; 16]);
        let replay = replay(&bytes);
        let damage = replay.damage.expect("damage");
        assert_eq!((damage.kept, damage.dropped), (0, 5), "{damage:?}");
    }

    #[test]
    fn a_torn_last_record_is_dropped_as_torn_not_damage() {
        let mut bytes = journal(3);
        let whole = bytes.len();
        append_record(&mut bytes, &StateChange::RemoveInstance { id: "i3".into() });
        bytes.truncate(whole + 7);
        bytes.extend([0u8; 16]);
        let replay = replay(&bytes);
        assert_eq!(ids(&replay), ["i0", "i1", "i2"]);
        assert_eq!((replay.damage, replay.torn_tail), (None, true));
    }

    #[test]
    fn lines_from_before_checksums_still_read() {
        let mut bytes = br#"{"op":"remove_instance","id":"old"}"#.to_vec();
        bytes.push(b'\n');
        bytes.extend(journal(1));
        assert_eq!(ids(&replay(&bytes)), ["old", "i0"]);
    }

    proptest::proptest! {
        /// Fuzzing the journal reader (a long run: `PROPTEST_CASES=100000 cargo test -p
        /// styxy-daemon fuzz_`): any bytes, and good journals with bytes changed, never panic,
        /// and what is reported adds up.
        #[test]
        fn fuzz_any_bytes_read_back_consistently(
            records in 0usize..8,
            flips in proptest::collection::vec((proptest::prelude::any::<usize>(), proptest::prelude::any::<u8>()), 0..4),
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            let mut bytes = journal(records);
            for (at, value) in flips {
                if !bytes.is_empty() {
                    let at = at % bytes.len();
                    bytes[at] = value;
                }
            }
            bytes.extend(tail);
            let replay = replay(&bytes);
            if let Some(damage) = &replay.damage {
                proptest::prop_assert_eq!(damage.kept, replay.changes.len());
                proptest::prop_assert!(damage.record >= 1 && damage.offset <= bytes.len());
                proptest::prop_assert!(damage.dropped >= 1);
            }
            proptest::prop_assert!(replay.changes.len() <= records + 8);
        }
    }

    #[test]
    fn garbage_and_empty_input_never_panic() {
        for bytes in [
            &b""[..],
            b"\n",
            b"zz",
            b"12345678 {",
            b"\xff\xfe",
            b"0000000g {}\n",
            b"\0\0x",
        ] {
            let _ = replay(bytes);
        }
    }
}
