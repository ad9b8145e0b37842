//! The kernel programs' own diagnostics (`aya-log-ebpf`: a move, an empty spare pool, a full map, a
//! bind outside every session) forwarded into the daemon's log, at the level `--ebpf-log` sets.
//!
//! The level is written into the programs as a load-time constant (`AYA_LOG_LEVEL`), so the
//! verifier removes every log statement above it: a level that is off costs a bind nothing.

/// `styxy daemon --ebpf-log`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum KernelLogLevel {
    /// No kernel log lines at all.
    Off,
    /// Problems only: an empty spare pool, a full map.
    #[default]
    Warn,
    /// Also each bind the kernel moved.
    Info,
    /// Also each bind outside every session and each redirected connection (busy).
    Debug,
}

impl KernelLogLevel {
    /// The value of `AYA_LOG_LEVEL` (aya-log's `Level` numbering: error 1 … trace 5).
    pub fn aya_level(self) -> u8 {
        match self {
            KernelLogLevel::Off => 0,
            KernelLogLevel::Warn => 2,
            KernelLogLevel::Info => 3,
            KernelLogLevel::Debug => 4,
        }
    }
}

/// A `log::Log` that hands the kernel's records to `tracing`, under the target `styxy::kernel`.
pub struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _metadata: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args().to_string();
        match record.level() {
            log::Level::Error => tracing::error!(target: "styxy::kernel", "{message}"),
            log::Level::Warn => tracing::warn!(target: "styxy::kernel", "{message}"),
            log::Level::Info => tracing::info!(target: "styxy::kernel", "{message}"),
            log::Level::Debug | log::Level::Trace => {
                tracing::debug!(target: "styxy::kernel", "{message}")
            }
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_map_onto_aya_logs_numbering() {
        // aya-log-common: Error = 1, Warn, Info, Debug, Trace = 5; a statement runs when its
        // level is at most AYA_LOG_LEVEL.
        assert_eq!(KernelLogLevel::Off.aya_level(), 0);
        assert!(KernelLogLevel::Warn.aya_level() < KernelLogLevel::Info.aya_level());
        assert_eq!(KernelLogLevel::Debug.aya_level(), 4);
    }
}
