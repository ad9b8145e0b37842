//! Styxy's daemon: it learns which ports are bound, decides with the broker (`styxy-broker`), keeps
//! leases and the audit log on disk and serves `styxy.v1` over gRPC.
//!
//! - `daemon` wires everything together and runs until its shutdown future completes ([`run`]);
//! - `observe` watches the kernel's sockets (eBPF, or the socket tables) and reads `/proc`;
//! - `engine` does the I/O around each broker decision; `rpc` serves `styxy.v1`;
//! - `store` persists leases, instances and the audit log;
//! - `table` publishes the session table the shim maps (taken ports, session views);
//! - `session_reports` remembers what each agent session was last told (`SessionReport`);
//! - `kernel_sessions` keeps the eBPF programs' session maps in step (kernel-enforced views);
//! - `lingering` reads which ports old TCP connections still hold (TIME_WAIT), for the broker;
//! - `metrics` counts what operators watch (served with `--metrics ADDR`).

mod daemon;
mod engine;
mod journal;
mod kernel_sessions;
mod lingering;
mod metrics;
mod observe;
mod rpc;
mod session_reports;
mod store;
mod table;

pub use daemon::{run, KernelLogLevel, ObserverChoice, Options};
pub use observe::ebpf::find_object as find_ebpf_object;
