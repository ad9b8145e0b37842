//! Where the kernel keeps the few task fields the session programs read, found in the running
//! kernel's own type information (`/sys/kernel/btf/vmlinux`), so one object loads on any kernel.
//!
//! The programs check, for each process of a session, that it is the process the session holds
//! (its start time is not newer than the membership entry: a reused pid is not a member) and that
//! it runs as the session's owner (its effective uid: a setuid program in a user's session is not
//! steered by that user). aya-ebpf cannot emit CO-RE relocations, so the daemon hands the programs
//! the offsets they need as load-time constants.
//!
//! Hand-written rather than a crate: the one BTF crate that reads struct members (`btf-rs`) is
//! LGPL, which this MIT/Apache project would carry into its static binary; `aya-obj` keeps its
//! type walk crate-private. The reader takes only what it needs — the type records' sizes, struct
//! members, names — and is fuzzed (`fuzz_btf_reader_never_panics`).

use std::collections::HashMap;

use thiserror::Error;

/// The offsets (in bytes) the session programs read through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskOffsets {
    /// `task_struct.group_leader` (a pointer).
    pub group_leader: u32,
    /// `task_struct.start_time` (CLOCK_MONOTONIC nanoseconds, as `bpf_ktime_get_ns`).
    pub start_time: u32,
    /// `task_struct.cred` (a pointer: the subjective credentials).
    pub cred: u32,
    /// `cred.euid`.
    pub euid: u32,
    /// `task_struct.tgid` and `task_struct.comm`, read of a signal's target by the kill
    /// protection (see `styxy_common::protection`).
    pub tgid: u32,
    pub comm: u32,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("not BTF: {0}")]
    Malformed(&'static str),
    #[error("struct {0} is not in the kernel's BTF")]
    NoStruct(String),
    #[error("struct {0} has no member {1}")]
    NoMember(String, String),
    #[error("{0}.{1} is a bit field")]
    BitField(String, String),
}

const MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

/// One struct or union member.
#[derive(Clone, Copy, Debug)]
struct Member {
    name_off: u32,
    type_id: u32,
    /// In bits; `None` for a bit field.
    bit_offset: Option<u32>,
}

#[derive(Clone, Debug)]
enum Type {
    Composite {
        name_off: u32,
        members: Vec<Member>,
    },
    /// A typedef or modifier: the type it stands for.
    Alias(u32),
    Other,
}

/// The parts of a BTF blob the offsets need: its types by id and its strings.
pub struct Btf<'a> {
    types: Vec<Type>,
    strings: &'a [u8],
    /// Struct name → id of the first struct of that name with members.
    structs: HashMap<&'a [u8], u32>,
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, BtfError> {
    let bytes = data
        .get(at..at.checked_add(4).ok_or(BtfError::Malformed("offset"))?)
        .ok_or(BtfError::Malformed("truncated"))?;
    Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

impl<'a> Btf<'a> {
    /// Reads a little-endian BTF blob (the kernel's, as `/sys/kernel/btf/vmlinux` holds it).
    pub fn parse(data: &'a [u8]) -> Result<Btf<'a>, BtfError> {
        let magic = data.get(0..2).ok_or(BtfError::Malformed("truncated"))?;
        if u16::from_le_bytes([magic[0], magic[1]]) != MAGIC {
            return Err(BtfError::Malformed("bad magic (or not little-endian)"));
        }
        let header_len = u32_at(data, 4)? as usize;
        let section = |off_at: usize, len_at: usize| -> Result<&'a [u8], BtfError> {
            let start = header_len
                .checked_add(u32_at(data, off_at)? as usize)
                .ok_or(BtfError::Malformed("offset"))?;
            let end = start
                .checked_add(u32_at(data, len_at)? as usize)
                .ok_or(BtfError::Malformed("offset"))?;
            data.get(start..end)
                .ok_or(BtfError::Malformed("section beyond the end"))
        };
        let type_section = section(8, 12)?;
        let strings = section(16, 20)?;
        // Type id 0 is void.
        let mut types = vec![Type::Other];
        let mut at = 0usize;
        while at < type_section.len() {
            let name_off = u32_at(type_section, at)?;
            let info = u32_at(type_section, at + 4)?;
            let size_or_type = u32_at(type_section, at + 8)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let (extra, ty) = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => (4, Type::Other),
                KIND_ARRAY => (12, Type::Other),
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen.min(1024));
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let offset = u32_at(type_section, m + 8)?;
                        members.push(Member {
                            name_off: u32_at(type_section, m)?,
                            type_id: u32_at(type_section, m + 4)?,
                            bit_offset: match (kind_flag, offset >> 24) {
                                (true, 0) => Some(offset & 0x00ff_ffff),
                                (true, _) => None,
                                (false, _) => Some(offset),
                            },
                        });
                    }
                    (vlen * 12, Type::Composite { name_off, members })
                }
                KIND_ENUM | KIND_FUNC_PROTO => (vlen * 8, Type::Other),
                KIND_DATASEC | KIND_ENUM64 => (vlen * 12, Type::Other),
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    (0, Type::Alias(size_or_type))
                }
                KIND_PTR | 7 | 12 | 16 => (0, Type::Other), // ptr, fwd, func, float
                _ => return Err(BtfError::Malformed("unknown type kind")),
            };
            at = at.checked_add(extra).ok_or(BtfError::Malformed("offset"))?;
            types.push(ty);
        }
        if at != type_section.len() {
            return Err(BtfError::Malformed("type section ends inside a type"));
        }
        let mut btf = Btf {
            types,
            strings,
            structs: HashMap::new(),
        };
        for (id, ty) in btf.types.iter().enumerate() {
            if let Type::Composite { name_off, members } = ty {
                if *name_off != 0 && !members.is_empty() {
                    let name = btf.name(*name_off);
                    let id =
                        u32::try_from(id).map_err(|_| BtfError::Malformed("too many types"))?;
                    btf.structs.entry(name).or_insert(id);
                }
            }
        }
        Ok(btf)
    }

    fn name(&self, offset: u32) -> &'a [u8] {
        let tail = self.strings.get(offset as usize..).unwrap_or_default();
        let end = tail.iter().position(|b| *b == 0).unwrap_or(tail.len());
        &tail[..end]
    }

    /// The struct or union that type `id` is, through typedefs and modifiers.
    fn composite(&self, mut id: u32) -> Option<&[Member]> {
        for _ in 0..32 {
            match self.types.get(id as usize)? {
                Type::Composite { members, .. } => return Some(members),
                Type::Alias(next) => id = *next,
                Type::Other => return None,
            }
        }
        None
    }

    /// The byte offset of `member` in struct `name`, looking into anonymous structs and unions.
    pub fn member_offset(&self, name: &str, member: &str) -> Result<u32, BtfError> {
        let id = *self
            .structs
            .get(name.as_bytes())
            .ok_or_else(|| BtfError::NoStruct(name.to_string()))?;
        let members = self
            .composite(id)
            .ok_or_else(|| BtfError::NoStruct(name.to_string()))?;
        let bits = self
            .find(members, member.as_bytes(), 0)
            .ok_or_else(|| BtfError::NoMember(name.to_string(), member.to_string()))?
            .ok_or_else(|| BtfError::BitField(name.to_string(), member.to_string()))?;
        if bits % 8 != 0 {
            return Err(BtfError::BitField(name.to_string(), member.to_string()));
        }
        Ok(bits / 8)
    }

    /// `Some(Some(bits))` where `wanted` is, `Some(None)` when it is a bit field.
    fn find(&self, members: &[Member], wanted: &[u8], depth: u32) -> Option<Option<u32>> {
        if depth > 8 {
            return None;
        }
        for m in members {
            if m.name_off != 0 && self.name(m.name_off) == wanted {
                return Some(m.bit_offset);
            }
        }
        for m in members.iter().filter(|m| m.name_off == 0) {
            let (Some(inner), Some(base)) = (self.composite(m.type_id), m.bit_offset) else {
                continue;
            };
            if let Some(found) = self.find(inner, wanted, depth + 1) {
                return Some(found.and_then(|bits| bits.checked_add(base)));
            }
        }
        None
    }

    /// The offsets the session programs need.
    pub fn task_offsets(&self) -> Result<TaskOffsets, BtfError> {
        Ok(TaskOffsets {
            group_leader: self.member_offset("task_struct", "group_leader")?,
            start_time: self.member_offset("task_struct", "start_time")?,
            cred: self.member_offset("task_struct", "cred")?,
            euid: self.member_offset("cred", "euid")?,
            tgid: self.member_offset("task_struct", "tgid")?,
            comm: self.member_offset("task_struct", "comm")?,
        })
    }
}

/// The running kernel's offsets, or why they cannot be had.
pub fn running_kernel_offsets() -> anyhow::Result<TaskOffsets> {
    use anyhow::Context;
    let path = "/sys/kernel/btf/vmlinux";
    let data = std::fs::read(path)
        .with_context(|| format!("reading {path} (the kernel needs CONFIG_DEBUG_INFO_BTF)"))?;
    let btf = Btf::parse(&data).with_context(|| format!("reading {path}"))?;
    btf.task_offsets()
        .with_context(|| format!("looking up task fields in {path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob built by hand: `struct cred { int uid; int euid; }`, and a `task_struct` whose
    /// `start_time` sits in an anonymous struct, behind a typedef.
    fn sample() -> Vec<u8> {
        let strings =
            b"\0int\0cred\0uid\0euid\0task_struct\0group_leader\0start_time\0flags\0tgid\0comm\0";
        let name = |s: &str| -> u32 {
            let pos = strings
                .windows(s.len() + 2)
                .position(|w| w[0] == 0 && &w[1..=s.len()] == s.as_bytes() && w[s.len() + 1] == 0)
                .expect("name in the sample");
            pos as u32 + 1
        };
        let mut types: Vec<u32> = Vec::new();
        let mut push = |words: &[u32]| types.extend_from_slice(words);
        // 1: int (4 bytes)
        push(&[name("int"), KIND_INT << 24, 4, 32]);
        // 2: struct cred { int uid @0; int euid @32 bits }
        push(&[name("cred"), KIND_STRUCT << 24 | 2, 8]);
        push(&[name("uid"), 1, 0, name("euid"), 1, 32]);
        // 3: pointer to cred
        push(&[0, KIND_PTR << 24, 2]);
        // 4: anonymous struct { int start_time @0 } — a stand-in for the real u64
        push(&[0, KIND_STRUCT << 24 | 1, 8]);
        push(&[name("start_time"), 1, 0]);
        // 5: typedef of 4 (unnamed), so the walk goes through an alias
        push(&[0, KIND_TYPEDEF << 24, 4]);
        // 6: struct task_struct (kind_flag: bit-field offsets) { int flags:3 @0; ptr
        //    group_leader @64; anon @128; ptr cred @256; int tgid @320; int comm @352 }
        push(&[name("task_struct"), 1 << 31 | KIND_STRUCT << 24 | 6, 48]);
        push(&[name("flags"), 1, 3 << 24]);
        push(&[name("group_leader"), 3, 64]);
        push(&[0, 5, 128]);
        push(&[name("cred"), 3, 256]);
        push(&[name("tgid"), 1, 320]);
        push(&[name("comm"), 1, 352]);
        let type_bytes: Vec<u8> = types.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut blob = Vec::new();
        blob.extend_from_slice(&MAGIC.to_le_bytes());
        blob.extend_from_slice(&[1, 0]); // version, flags
        blob.extend_from_slice(&24u32.to_le_bytes()); // header length
        blob.extend_from_slice(&0u32.to_le_bytes()); // type_off
        blob.extend_from_slice(&(type_bytes.len() as u32).to_le_bytes());
        blob.extend_from_slice(&(type_bytes.len() as u32).to_le_bytes()); // str_off
        blob.extend_from_slice(&(strings.len() as u32).to_le_bytes());
        blob.extend_from_slice(&type_bytes);
        blob.extend_from_slice(strings);
        blob
    }

    #[test]
    fn finds_members_through_anonymous_structs_and_typedefs() {
        let data = sample();
        let btf = Btf::parse(&data).expect("sample parses");
        assert_eq!(
            btf.task_offsets(),
            Ok(TaskOffsets {
                group_leader: 8,
                start_time: 16,
                cred: 32,
                euid: 4,
                tgid: 40,
                comm: 44,
            })
        );
        assert_eq!(
            btf.member_offset("task_struct", "flags"),
            Err(BtfError::BitField("task_struct".into(), "flags".into()))
        );
        assert!(matches!(
            btf.member_offset("task_struct", "nope"),
            Err(BtfError::NoMember(..))
        ));
        assert!(matches!(
            btf.member_offset("mm_struct", "pgd"),
            Err(BtfError::NoStruct(..))
        ));
    }

    #[test]
    fn the_running_kernels_task_fields_are_found() {
        // The machine's own BTF, when it has one (every kernel the session programs run on).
        let Ok(data) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            eprintln!("SKIP: no /sys/kernel/btf/vmlinux");
            return;
        };
        let offsets = Btf::parse(&data)
            .and_then(|b| b.task_offsets())
            .expect("task fields in the kernel's BTF");
        // Sane shapes: pointers aligned, euid after uid/gid/suid... in struct cred.
        assert!(offsets.group_leader.is_multiple_of(8));
        assert!(offsets.cred.is_multiple_of(8));
        assert!(offsets.start_time.is_multiple_of(8));
        assert!(offsets.euid >= 4 && offsets.euid.is_multiple_of(4));
        assert!(offsets.tgid.is_multiple_of(4) && offsets.comm > offsets.tgid);
    }

    proptest::proptest! {
        #[test]
        fn fuzz_btf_reader_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            if let Ok(btf) = Btf::parse(&bytes) {
                let _ = btf.task_offsets();
            }
        }

        #[test]
        fn fuzz_btf_reader_survives_damaged_samples(flips in proptest::collection::vec((0usize..400, proptest::num::u8::ANY), 1..6)) {
            let mut data = sample();
            for (at, byte) in flips {
                let len = data.len();
                data[at % len] = byte;
            }
            if let Ok(btf) = Btf::parse(&data) {
                let _ = btf.task_offsets();
            }
        }
    }
}
