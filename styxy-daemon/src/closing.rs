//! Closing loopback TCP connections through sock_diag (`SOCK_DESTROY`, as `ss -K` does): after a
//! focus switch, a user's connections that still reach the old destination of a port are
//! aborted (the client sees ECONNABORTED, the server a reset), so a browser's kept-alive
//! connection does not keep showing the old session: its next request opens a connection, which
//! the kernel programs send to the new one.
//!
//! Hand-written over a netlink socket: two fixed-layout requests (a dump and a destroy) and one
//! reply record; no kept crate sends `SOCK_DESTROY`. The parsing of replies is covered by a
//! property test (any bytes: no panic, every record inside the buffer).

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `linux/sock_diag.h`, `linux/inet_diag.h`, `linux/netlink.h`.
const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDRLEN: usize = 16;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, then the socket id.
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// `struct inet_diag_sockid`: sport, dport (network order), src[4], dst[4], if, cookie[2].
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_msg`: family, state, timer, retrans, the id, expires, rqueue, wqueue,
/// uid, inode.
const MSG_LEN: usize = 4 + SOCKID_LEN + 20;

/// TCP states a connection is closed in: established, SYN sent, and close-wait (`1 << state`).
const CLOSED_STATES: u32 = (1 << 1) | (1 << 2) | (1 << 8);

/// One TCP socket as sock_diag describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiagSocket {
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    /// The raw `inet_diag_sockid` (to name the socket back in a destroy request).
    pub id: [u8; SOCKID_LEN],
    /// The socket's owner.
    pub uid: u32,
    /// Its inode (`socket:[N]` in `/proc/PID/fd`).
    pub inode: u32,
}

impl DiagSocket {
    /// The local port.
    #[cfg(test)]
    pub fn local_port(&self) -> u16 {
        u16::from_be_bytes([self.id[0], self.id[1]])
    }
    /// The remote port.
    pub fn remote_port(&self) -> u16 {
        u16::from_be_bytes([self.id[2], self.id[3]])
    }
    fn address(&self, offset: usize) -> [u8; 16] {
        let mut a = [0; 16];
        a.copy_from_slice(&self.id[offset..offset + 16]);
        a
    }
    /// Whether both ends are loopback addresses (127/8, `::1`, `::ffff:127.x`).
    pub fn is_loopback(&self) -> bool {
        let loopback = |a: [u8; 16]| match self.family as i32 {
            libc::AF_INET => a[0] == 127,
            libc::AF_INET6 => {
                let v6 = std::net::Ipv6Addr::from(a);
                v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
            }
            _ => false,
        };
        loopback(self.address(4)) && loopback(self.address(20))
    }
}

/// The records of one netlink reply buffer: `(type, payload)`, as far as they are whole.
pub fn records(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while buf.len().saturating_sub(at) >= NLMSG_HDRLEN {
        let header = &buf[at..at + NLMSG_HDRLEN];
        let len = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let kind = u16::from_ne_bytes([header[4], header[5]]);
        if len < NLMSG_HDRLEN || len > buf.len() - at {
            break;
        }
        out.push((kind, &buf[at + NLMSG_HDRLEN..at + len]));
        // Records are 4-byte aligned.
        at += (len + 3) & !3;
    }
    out
}

/// A socket of an `inet_diag_msg` payload.
pub fn diag_socket(payload: &[u8]) -> Option<DiagSocket> {
    if payload.len() < MSG_LEN {
        return None;
    }
    let mut id = [0; SOCKID_LEN];
    id.copy_from_slice(&payload[4..4 + SOCKID_LEN]);
    let word = |at: usize| {
        u32::from_ne_bytes([
            payload[at],
            payload[at + 1],
            payload[at + 2],
            payload[at + 3],
        ])
    };
    Some(DiagSocket {
        family: payload[0],
        id,
        uid: word(4 + SOCKID_LEN + 12),
        inode: word(4 + SOCKID_LEN + 16),
    })
}

/// A request: the netlink header, then `inet_diag_req_v2`.
fn request(kind: u16, flags: u16, family: u8, id: &[u8; SOCKID_LEN]) -> Vec<u8> {
    let len = NLMSG_HDRLEN + REQ_LEN;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    m.extend_from_slice(&0u32.to_ne_bytes()); // to the kernel
    m.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 0, 0]);
    m.extend_from_slice(&CLOSED_STATES.to_ne_bytes());
    m.extend_from_slice(id);
    m
}

fn netlink() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned from here.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // Replies that never come (a kernel without sock_diag for TCP) must not hold the daemon.
    let timeout = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: a valid timeval for SO_RCVTIMEO on an owned socket.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    Ok(fd)
}

fn send(fd: &OwnedFd, message: &[u8]) -> io::Result<()> {
    // SAFETY: the buffer is valid for its length; to the kernel (the default peer).
    let sent = unsafe { libc::send(fd.as_raw_fd(), message.as_ptr().cast(), message.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn receive(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the buffer is valid and writable for its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// The errno of an `NLMSG_ERROR` payload (0: an acknowledgement).
fn error_of(payload: &[u8]) -> i32 {
    payload
        .get(..4)
        .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// Every TCP socket of `family` in a state [`CLOSED_STATES`] names, in this network namespace.
pub fn tcp_sockets(family: u8) -> io::Result<Vec<DiagSocket>> {
    let fd = netlink()?;
    send(
        &fd,
        &request(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            family,
            &[0; SOCKID_LEN],
        ),
    )?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut sockets = Vec::new();
    loop {
        let n = receive(&fd, &mut buf)?;
        if n == 0 {
            return Ok(sockets);
        }
        for (kind, payload) in records(&buf[..n]) {
            match kind {
                NLMSG_DONE => return Ok(sockets),
                NLMSG_ERROR => {
                    let errno = error_of(payload);
                    if errno != 0 {
                        return Err(io::Error::from_raw_os_error(-errno));
                    }
                }
                SOCK_DIAG_BY_FAMILY => sockets.extend(diag_socket(payload)),
                _ => {}
            }
        }
    }
}

/// Aborts one socket (`SOCK_DESTROY`). A socket that is gone meanwhile is not an error.
pub fn destroy(socket: &DiagSocket) -> io::Result<()> {
    let fd = netlink()?;
    send(
        &fd,
        &request(
            SOCK_DESTROY,
            NLM_F_REQUEST | NLM_F_ACK,
            socket.family,
            &socket.id,
        ),
    )?;
    let mut buf = [0u8; 1024];
    let n = receive(&fd, &mut buf)?;
    for (kind, payload) in records(&buf[..n]) {
        if kind == NLMSG_ERROR {
            return match error_of(payload) {
                0 => Ok(()),
                e if -e == libc::ENOENT => Ok(()),
                e => Err(io::Error::from_raw_os_error(-e)),
            };
        }
    }
    Ok(())
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

/// Aborts `uid`'s loopback TCP connections to any of `ports` (their remote port), except the
/// sockets `spared` returns the inodes of (asked only when some connection is found). How many.
pub fn close_connections(
    uid: u32,
    ports: &HashSet<u16>,
    spared: impl FnOnce() -> HashSet<u32>,
) -> io::Result<usize> {
    if ports.is_empty() {
        return Ok(0);
    }
    let mut found = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        found.extend(
            tcp_sockets(family)?
                .into_iter()
                .filter(|s| s.uid == uid && ports.contains(&s.remote_port()) && s.is_loopback()),
        );
    }
    if found.is_empty() {
        return Ok(0);
    }
    let spared = spared();
    let mut closed = 0;
    for socket in found.iter().filter(|s| !spared.contains(&s.inode)) {
        match destroy(socket) {
            Ok(()) => closed += 1,
            Err(e) => tracing::warn!(cause = %e, port = socket.remote_port(),
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
    fn a_dump_finds_a_loopback_connection_and_a_destroy_aborts_it() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
        let port = listener.local_addr().expect("address").port();
        let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connected");
        let (mut server, _) = listener.accept().expect("accepted");
        // SAFETY: geteuid has no preconditions and cannot fail.
        let uid = unsafe { libc::geteuid() };
        let mine: Vec<DiagSocket> = tcp_sockets(libc::AF_INET as u8)
            .expect("sock_diag dump")
            .into_iter()
            .filter(|s| s.remote_port() == port)
            .collect();
        assert_eq!(mine.len(), 1, "{mine:?}");
        assert!(mine[0].is_loopback());
        assert_eq!(mine[0].uid, uid);
        assert_eq!(
            Some(mine[0].local_port()),
            client.local_addr().ok().map(|a| a.port())
        );
        // Spared: left open.
        let inode = mine[0].inode;
        let ports = HashSet::from([port]);
        assert_eq!(
            close_connections(uid, &ports, || HashSet::from([inode])).expect("closing"),
            0
        );
        client.write_all(b"x").expect("still open");
        // Not spared: aborted, both ends see it.
        match destroy(&mine[0]) {
            Ok(()) => {}
            // A kernel built without CONFIG_INET_DIAG_DESTROY, or no CAP_NET_ADMIN.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EPERM)) => {
                eprintln!("SKIP: this kernel or user cannot destroy sockets ({e}): CONFIG_INET_DIAG_DESTROY and CAP_NET_ADMIN are needed");
                return;
            }
            Err(e) => panic!("destroy: {e}"),
        }
        let mut byte = [0u8; 1];
        assert!(client.read(&mut byte).is_err(), "the client's end aborted");
        let mut got = [0u8; 2];
        let _ = server.read(&mut got);
    }

    proptest::proptest! {
        /// Any reply bytes: records stay inside the buffer and parsing never panics.
        #[test]
        fn fuzz_replies_parse_without_panics(buf in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            for (_, payload) in records(&buf) {
                proptest::prop_assert!(payload.len() <= buf.len());
                let _ = diag_socket(payload);
                let _ = error_of(payload);
            }
        }
    }
}
