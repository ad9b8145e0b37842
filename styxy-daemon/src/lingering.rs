//! Keeps the broker's lingering ports current (see `styxy_broker`'s `lingering`): ports with TCP
//! connections and nothing bound, where a bind without SO_REUSEADDR fails. They are read from the
//! socket tables, outside the broker lock: at start, soon after a TCP server's release (its port
//! counts as lingering until then), and every few seconds while any port lingers, so a port comes
//! back when its TIME_WAIT ends (a minute at most). A reading is one `sock_diag` dump of the TCP
//! connections; nothing is read while nothing lingers and nothing is released.

use std::sync::Arc;
use std::time::Duration;

use styxy_broker::{Notice, Protocol};
use tokio::sync::{broadcast, watch};

use crate::engine::{now_ms, Engine};
use crate::observe::sockets::SockDiag;

/// How long after a release the reading waits: the server's connections close as it exits,
/// right after its listener (its descriptors close in order), and one reading covers a burst.
const SETTLE: Duration = Duration::from_millis(50);
/// How often the ports are read again while any lingers.
const WHILE_LINGERING: Duration = Duration::from_secs(2);
/// How often otherwise (a connection that outlived its listener unseen, say).
const IDLE: Duration = Duration::from_secs(600);

/// Runs until `stop`.
pub async fn keep_current(engine: Arc<Engine>, mut stop: watch::Receiver<bool>) {
    let mut notices = engine.subscribe();
    let mut diag = None;
    loop {
        diag = read_once(&engine, diag).await;
        // Wait for a TCP release, or (while any port lingers) for the next look.
        let again = tokio::time::sleep(if engine.lingering_count() > 0 {
            WHILE_LINGERING
        } else {
            IDLE
        });
        tokio::pin!(again);
        let released = loop {
            tokio::select! {
                () = &mut again => break false,
                notice = notices.recv() => match notice {
                    Ok(Notice::Released(held)) if held.socket.protocol == Protocol::Tcp => break true,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => break true,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = stop.wait_for(|stop| *stop) => return,
            }
        };
        if released {
            tokio::time::sleep(SETTLE).await;
        }
        // Releases queued meanwhile are covered by the reading about to start.
        while let Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) = notices.try_recv() {}
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
        let started_ms = now_ms();
        let ports = diag.connection_ports()?;
        engine.set_lingering(ports, started_ms);
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
