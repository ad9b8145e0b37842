//! Styxy's daemon: it learns which ports are bound, decides with the broker (`styxy-broker`), keeps
//! leases and the audit log on disk and serves `styxy.v1` over gRPC.
//!
//! - `daemon` wires everything together and runs until its shutdown future completes ([`run`]);
//! - `bpf` loads the kernel programs and keeps their maps (observing, kernel sessions);
//! - `observe` reads the kernel's socket tables; `procs` reads `/proc`; `clock` tells the time;
//! - `engine` does the I/O around each broker decision; `rpc` serves `styxy.v1`;
//! - `store` persists leases, instances and the audit log;
//! - `table` publishes the session table the shim maps (taken ports, session views);
//! - `session_reports` remembers what each agent session was last told (`SessionReport`);
//! - `closing` aborts loopback connections a focus switch retargets (sock_diag);
//! - `lingering` reads which ports old TCP connections still hold (TIME_WAIT), for the broker;
//! - `metrics` counts what operators watch (served with `--metrics ADDR`); `heap` counts the live
//!   heap, through the allocator the `styxy` binary installs;
//! - `proxy` serves every live server by its name (`--proxy ADDR`).

mod bpf;
mod clock;
mod closing;
mod daemon;
mod engine;
pub mod heap;
mod lingering;
mod metrics;
mod observe;
mod procs;
mod proxy;
mod rpc;
mod session_reports;
mod store;
mod table;

pub use bpf::{embedded_object as embedded_ebpf_object, find_object_file as find_ebpf_object_file};
pub use daemon::{run, KernelLogLevel, ObserverChoice, Options};
pub use observe::sockets::inodes_connected_to;
pub use proxy::{HostHeader, ProxyEntry};
