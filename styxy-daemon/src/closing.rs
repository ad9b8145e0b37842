//! Closing loopback TCP connections after a focus switch: a user's connections that still reach
//! the old destination of a port are aborted (`SOCK_DESTROY` through sock_diag, as `ss -K`
//! does; the client sees ECONNABORTED, the server a reset), so a browser's kept-alive connection
//! does not keep showing the old session: its next request opens a connection, which the kernel
//! programs send to the new one. The sessions' processes' connections, and the daemon's own,
//! are left alone.

use std::collections::HashSet;
use std::io;

use netlink_packet_sock_diag::inet::StateFlags;

use crate::observe::sockets::{Connection, SockDiag};

/// TCP states a connection is closed in: established, SYN sent, and close-wait.
fn closed_states() -> StateFlags {
    StateFlags::ESTABLISHED | StateFlags::SYN_SENT | StateFlags::CLOSE_WAIT
}

/// The socket inodes `pids` hold open (`/proc/PID/fd`); processes that are gone hold none.
pub fn socket_inodes_of(pids: impl IntoIterator<Item = u32>) -> HashSet<u32> {
    let mut inodes = HashSet::new();
    for pid in pids {
        let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(target) = std::fs::read_link(entry.path()) else {
                continue;
            };
            let inode = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|n| n.parse::<u32>().ok());
            inodes.extend(inode);
        }
    }
    inodes
}

/// The connections to close: `uid`'s loopback TCP connections to any of `ports` (their remote
/// port).
pub fn to_close(connections: Vec<Connection>, uid: u32, ports: &HashSet<u16>) -> Vec<Connection> {
    connections
        .into_iter()
        .filter(|c| c.uid == uid && ports.contains(&c.id.destination_port) && c.is_loopback())
        .collect()
}

/// Aborts `uid`'s loopback TCP connections to any of `ports`, except the sockets `spared`
/// returns the inodes of (asked only when some connection is found). How many.
pub fn close_connections(
    uid: u32,
    ports: &HashSet<u16>,
    spared: impl FnOnce() -> HashSet<u32>,
) -> io::Result<usize> {
    if ports.is_empty() {
        return Ok(0);
    }
    let mut diag = SockDiag::new()?;
    let found = to_close(diag.tcp_connections(closed_states())?, uid, ports);
    if found.is_empty() {
        return Ok(0);
    }
    let spared = spared();
    let mut closed = 0;
    for connection in found.iter().filter(|c| !spared.contains(&c.inode)) {
        match diag.destroy(connection) {
            Ok(()) => closed += 1,
            Err(e) => tracing::warn!(cause = %e, port = connection.id.destination_port,
                "a connection to the old focus could not be closed"),
        }
    }
    Ok(closed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn a_loopback_connection_is_found_spared_when_asked_and_else_aborted() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
        let port = listener.local_addr().expect("address").port();
        let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connected");
        let (mut server, _) = listener.accept().expect("accepted");
        // SAFETY: geteuid has no preconditions and cannot fail.
        let uid = unsafe { libc::geteuid() };
        let ports = HashSet::from([port]);
        let mut diag = SockDiag::new().expect("sock_diag");
        let mine = to_close(
            diag.tcp_connections(closed_states()).expect("dump"),
            uid,
            &ports,
        );
        assert_eq!(mine.len(), 1, "the client's end only: {mine:?}");
        assert_eq!(
            Some(mine[0].id.source_port),
            client.local_addr().ok().map(|a| a.port())
        );
        assert!(to_close(vec![mine[0].clone()], uid.wrapping_add(1), &ports).is_empty());
        // Spared: left open.
        let inode = mine[0].inode;
        assert_eq!(
            close_connections(uid, &ports, || HashSet::from([inode])).expect("closing"),
            0
        );
        client.write_all(b"x").expect("still open");
        // Not spared: aborted, and the client sees it (SOCK_DESTROY needs CAP_NET_ADMIN).
        if uid != 0 {
            eprintln!("SKIP: aborting a connection needs root (CAP_NET_ADMIN)");
            return;
        }
        assert_eq!(
            close_connections(uid, &ports, HashSet::new).expect("closing"),
            1
        );
        let mut byte = [0u8; 1];
        assert!(client.read(&mut byte).is_err(), "the client's end aborted");
        let mut got = [0u8; 2];
        let _ = server.read(&mut got);
    }
}
