//! Keeps the broker's lingering ports current (see `styxy_broker`'s `lingering`): ports with TCP
//! connections and nothing bound, where a bind without SO_REUSEADDR fails. They are read from the
//! socket tables, outside the broker lock: at start, soon after a TCP server's release (its port
//! counts as lingering until then), and every few seconds while any port lingers, so a port comes
//! back when its TIME_WAIT ends (a minute at most). A reading is one `sock_diag` dump of the TCP
//! connections; while nothing lingers and nothing is released, one every ten minutes.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::engine::Engine;
use crate::observe::sockets::SockDiag;

/// How long after a release the reading waits: the server's connections close as it exits,
/// right after its listener (its descriptors close in order), and one reading covers a burst.
/// At 50 ms, readings during a flood of short-lived servers (200,000 binds/s) took enough CPU to
/// lift the observer's bind → broker p99 from 0.25–0.33 ms to 0.6–1.2 ms (`bench ebpf`).
const SETTLE: Duration = Duration::from_millis(200);
/// How often the ports are read again while any lingers.
const WHILE_LINGERING: Duration = Duration::from_secs(2);
/// How often otherwise (a connection that outlived its listener unseen, say).
const IDLE: Duration = Duration::from_secs(600);

/// Runs until `stop`.
pub async fn keep_current(engine: Arc<Engine>, mut stop: watch::Receiver<bool>) {
    let mut diag = None;
    loop {
        diag = read_once(&engine, diag).await;
        // Wait for a TCP release (a `Notify`: a burst of them is one wake-up, and nothing is
        // copied per release), or (while any port lingers) for the next look.
        let again = if engine.lingering_count() > 0 {
            WHILE_LINGERING
        } else {
            IDLE
        };
        let released = tokio::select! {
            () = tokio::time::sleep(again) => false,
            () = engine.tcp_released() => true,
            _ = stop.wait_for(|stop| *stop) => return,
        };
        if released {
            tokio::time::sleep(SETTLE).await;
        }
    }
}

/// One reading, handed to the broker; gives the `sock_diag` connection back for the next one.
/// Read on this worker thread (`block_in_place`: a dump takes well under a millisecond), not on
/// a blocking-pool thread, whose own malloc arena would stay resident for a rare reading.
async fn read_once(engine: &Arc<Engine>, diag: Option<SockDiag>) -> Option<SockDiag> {
    let read = tokio::task::block_in_place(|| {
        let mut diag = match diag {
            Some(diag) => diag,
            None => SockDiag::new()?,
        };
        engine.begin_lingering_reading();
        let ports = diag.connection_ports()?;
        engine.set_lingering(ports);
        Ok::<_, std::io::Error>(diag)
    });
    match read {
        Ok(diag) => Some(diag),
        Err(e) => {
            tracing::warn!(cause = %e, "reading the ports TCP connections sit on");
            None
        }
    }
}
