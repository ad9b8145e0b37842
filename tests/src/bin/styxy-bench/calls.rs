//! Timed socket calls for the benchmarks: the latencies `call-timer` measures, and how to read
//! its output.

use std::process::Command;

use anyhow::{bail, Context, Result};

/// Nanosecond samples, reported in µs.
#[derive(Default)]
pub struct Samples(pub Vec<u64>);

impl Samples {
    /// The `q` quantile in µs (NaN when there are none).
    pub fn pct(&self, q: f64) -> f64 {
        let mut sorted = self.0.clone();
        sorted.sort_unstable();
        if sorted.is_empty() {
            return f64::NAN;
        }
        sorted[((sorted.len() as f64 - 1.0) * q).round() as usize] as f64 / 1000.0
    }

    /// The mean in µs.
    pub fn mean(&self) -> f64 {
        self.0.iter().sum::<u64>() as f64 / self.0.len() as f64 / 1000.0
    }
}

/// Runs `command` (a `call-timer CALL PORT COUNT`, prepared by the caller) to its end: the calls
/// that failed, and the latency of every call.
pub fn run_call_timer(command: &mut Command, call: &str) -> Result<(usize, Samples)> {
    let out = command.output().context("running call-timer")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    if words.next() != Some("ok") {
        bail!("call-timer {call} failed: {out:?}");
    }
    let failed = words.next().context("failed count")?.parse()?;
    let samples = words.map(str::parse).collect::<Result<Vec<u64>, _>>()?;
    Ok((failed, Samples(samples)))
}
