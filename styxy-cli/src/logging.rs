//! The daemon's log: to the journal when systemd connected stderr to it (structured fields, no
//! second timestamp), otherwise plain lines on stderr, coloured only when stderr is a terminal.

use std::io::IsTerminal;

use styxy_common::env;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Installs the daemon's log subscriber; the level comes from `STYXY_LOG` (default `info`).
pub(crate) fn init_daemon_logging() {
    let filter =
        || EnvFilter::try_from_env(env::LOG.name).unwrap_or_else(|_| EnvFilter::new("info"));
    if stderr_is_the_journal() {
        match tracing_journald::layer() {
            Ok(journal) => {
                tracing_subscriber::registry()
                    .with(filter())
                    .with(journal.with_syslog_identifier("styxy".into()))
                    .init();
                return;
            }
            Err(e) => eprintln!("styxy: cannot log to the journal ({e}); logging to stderr"),
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Whether stderr is the journal stream systemd set up: `JOURNAL_STREAM` is `DEVICE:INODE` of it,
/// and it must still be fd 2 (a program that redirected stderr inherits the variable all the same).
fn stderr_is_the_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((device, inode)) = stream
        .to_str()
        .and_then(|s| s.split_once(':'))
        .and_then(|(d, i)| Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?)))
    else {
        return false;
    };
    // SAFETY: fstat writes into a zeroed, properly sized stat struct; fd 2 may be closed, which
    // fstat reports as an error.
    let stat = unsafe {
        let mut stat: libc::stat = std::mem::zeroed();
        (libc::fstat(2, &mut stat) == 0).then_some(stat)
    };
    stat.is_some_and(|s| s.st_dev == device && s.st_ino == inode)
}
