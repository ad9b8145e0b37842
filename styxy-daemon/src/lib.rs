//! Styxy: a port broker for machines where many dev servers and AI coding agents run side by side.
//!
//! - [`broker`] decides (pure data in, data out);
//! - [`observe`] watches the kernel's sockets and reads `/proc`;
//! - [`store`] persists leases, instances and the audit log;
//! - [`engine`] does the I/O around each decision; [`rpc`] serves `styxy.v1` over gRPC;
//! - [`daemon`] wires them together; [`cli`] and [`client`] are the `styxy` command-line client;
//! - [`preload`] turns the bind() shim on for a command (`styxy run`, `styxy env`);
//! - [`install`] puts everything in place for systemd; [`hook`] is the Claude Code SessionStart hook.

pub mod broker;
pub mod cli;
pub mod client;
pub mod daemon;
pub mod engine;
pub mod hook;
pub mod install;
pub mod observe;
pub mod paths;
pub mod preload;
pub mod rpc;
pub mod store;
