//! What the kernel's own accounting says an eBPF program costs per run: with `BPF_ENABLE_STATS`
//! on, the kernel adds up each loaded program's run time and count. A cost far below what timing
//! whole system calls can separate on a shared machine (a focus lookup inside `connect()`, next
//! to the connect's 10–14 µs and its 0.6–1.6× spread from round to round) is measured this way
//! where it is spent.

use std::os::fd::OwnedFd;
use std::time::Duration;

use anyhow::{Context, Result};

/// Keeps the kernel's run-time statistics on while held (they cost every program a clock
/// reading per run, so they are off by default).
pub struct RunTimeStats {
    _on: OwnedFd,
}

impl RunTimeStats {
    pub fn enable() -> Result<RunTimeStats> {
        let on = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .context("turning the kernel's eBPF run-time statistics on (BPF_ENABLE_STATS)")?;
        Ok(RunTimeStats { _on: on })
    }
}

/// The run time and runs, so far, of every loaded program named `name`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Runs {
    pub time: Duration,
    pub count: u64,
}

impl Runs {
    pub fn of(name: &str) -> Result<Runs> {
        let mut runs = Runs::default();
        for program in aya::programs::loaded_programs() {
            let program = program.context("reading a loaded program's information")?;
            if program.name_as_str() == Some(name) {
                runs.time += program.run_time();
                runs.count += program.run_count();
            }
        }
        Ok(runs)
    }

    /// The runs between `earlier` and these.
    pub fn since(self, earlier: Runs) -> Runs {
        Runs {
            time: self.time.saturating_sub(earlier.time),
            count: self.count.saturating_sub(earlier.count),
        }
    }

    pub fn add(&mut self, other: Runs) {
        self.time += other.time;
        self.count += other.count;
    }

    /// Nanoseconds per run.
    pub fn per_run_ns(&self) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        self.time.as_nanos() as f64 / self.count as f64
    }
}
