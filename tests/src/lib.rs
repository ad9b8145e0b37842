//! Helpers for the end-to-end tests: start the real `styxy` daemon on a private socket, state dir and port
//! block; start real servers; find real clients (grpcurl). The binaries come from `target/<profile>/`, built
//! by `cargo xtask test` (or `cargo build --workspace && cargo xtask build-preload`) before the tests run.
//!
//! By subject: [`daemon`] (the daemon under test), [`processes`] (servers, holders, any command's
//! output), [`ports`] (port blocks, machine-wide), [`binaries`] (what is tested and the clients),
//! [`ebpf`], [`users`], [`claude`] (the Claude Code CLI), [`dev_tools`] (Django, Vite, Jupyter);
//! all re-exported here.

mod binaries;
pub mod claude;
mod daemon;
mod dev_tools;
mod ebpf;
pub mod names;
mod ports;
mod processes;
mod users;

pub use binaries::*;
pub use daemon::*;
pub use dev_tools::{chromium, django, jupyter, playwright_core, vite, Chromium};
pub use ebpf::*;
pub use ports::{give_back_port_block, port_block, BLOCK};
pub use processes::*;
pub use users::*;

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

pub use styxy_proto::v1;

/// Polls `check` until it returns `Some`, or fails after `secs` seconds with `what`.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {secs} s waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
