//! The daemon's eBPF side, in one place: the kernel programs of `styxy-ebpf` loaded and attached
//! ([`object`], [`load`]), what the daemon then holds ([`attached`]: the ring buffer it drains
//! into broker events, [`events`]; the per-port counts, [`counts`]), and the kernel sessions
//! ([`sessions`]: the maps that say who is in which session and what it sees, with
//! [`session_programs`] attached while one is live, and [`protection`], the kill protection
//! between sessions). [`mapped`] maps arrays into memory, [`kernel_btf`] reads the running
//! kernel's struct offsets, [`kernel_log`] forwards the programs' log, [`pins`] keeps the
//! programs and maps of live sessions in bpffs so they outlive a daemon restart.

pub mod attached;
pub mod counts;
pub mod events;
pub mod kernel_btf;
pub mod kernel_log;
pub mod load;
pub mod mapped;
pub mod object;
pub mod pins;
pub mod protection;
pub mod session_programs;
pub mod sessions;

pub use attached::Attached;
pub use events::OwnerCache;
pub use load::{attach, ephemeral_ports, AttachOptions};
pub use object::{cgroup2_root, embedded_object, find_object, find_object_file};
