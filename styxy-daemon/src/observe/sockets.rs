//! The kernel's socket tables through netlink `sock_diag`: listening TCP and bound UDP sockets, all of them
//! or only those on one port (the kernel filters by source port, so a point check costs a few syscalls,
//! not a walk of `/proc/net/*`); the ports TCP connections sit on (lingering ports); TCP
//! connections whole, which `SOCK_DESTROY` aborts (a focus switch's, see `closing`); and the
//! connections to given ports (the kill guard's `lsof -i:P`, [`inodes_connected_to`]).

use std::collections::HashSet;
use std::io;
use std::net::IpAddr;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::{
    inet::{ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags},
    SockDiagDestroy, SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};

use styxy_broker::{Family, Protocol};

/// The socket inodes of the TCP connections to any of `ports` (their remote port) that a process
/// holds (`lsof -i:P` lists their processes besides the port's holders). The kernel picks them
/// by port as it walks its table: the thousands of TIME_WAIT sockets a busy machine keeps cost
/// no formatting and no copy, as they do in `/proc/net/tcp`.
pub fn inodes_connected_to(ports: &[u16]) -> io::Result<HashSet<u64>> {
    let mut diag = SockDiag::new()?;
    let mut inodes = HashSet::new();
    for &port in ports {
        inodes.extend(diag.inodes_connected_to(port)?);
    }
    Ok(inodes)
}

/// One socket as `sock_diag` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelSocket {
    pub cookie: u64,
    pub inode: u64,
    pub uid: u32,
    pub protocol: Protocol,
    pub family: Family,
    pub address: IpAddr,
    pub port: u16,
}

/// A TCP connection as `sock_diag` reports it: both ends, its owner, and what names it in a
/// `SOCK_DESTROY`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    pub family: Family,
    /// Local and remote address and port, and the cookie.
    pub id: SocketId,
    pub uid: u32,
    pub inode: u32,
}

impl Connection {
    /// Whether both ends are loopback (127/8, `::1`, `::ffff:127.x`).
    pub fn is_loopback(&self) -> bool {
        let loopback = |a: &IpAddr| match a {
            IpAddr::V4(v4) => v4.is_loopback(),
            IpAddr::V6(v6) => {
                v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
            }
        };
        loopback(&self.id.source_address) && loopback(&self.id.destination_address)
    }
}

/// A netlink `sock_diag` connection.
pub struct SockDiag {
    socket: Socket,
    buf: Vec<u8>,
}

impl SockDiag {
    pub fn new() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(SockDiag {
            socket,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Listening TCP and unconnected bound UDP sockets, of every family, on `port` (all ports when `None`),
    /// of `protocol` (both when `None`).
    pub fn bound_sockets(
        &mut self,
        port: Option<u16>,
        protocol: Option<Protocol>,
    ) -> io::Result<Vec<KernelSocket>> {
        let mut out = Vec::new();
        for proto in Protocol::ALL
            .into_iter()
            .filter(|p| protocol.is_none_or(|want| want == *p))
        {
            let states = match proto {
                Protocol::Tcp => StateFlags::LISTEN,
                // An unconnected UDP socket is in TCP_CLOSE: a server waiting for datagrams, not a client.
                Protocol::Udp => StateFlags::CLOSE,
            };
            for family in [Family::Inet, Family::Inet6] {
                self.dump(proto, family, states.clone(), port, &mut out)?;
            }
        }
        Ok(out)
    }

    /// The local ports of TCP connections in any state but listening (established, closing, in
    /// TIME_WAIT…), of both families, sorted and without repeats: where a bind without
    /// SO_REUSEADDR fails although nothing is bound.
    pub fn connection_ports(&mut self) -> io::Result<Vec<u16>> {
        let states = StateFlags::all() - StateFlags::LISTEN - StateFlags::CLOSE;
        let mut sockets = Vec::new();
        for family in [Family::Inet, Family::Inet6] {
            self.dump(Protocol::Tcp, family, states.clone(), None, &mut sockets)?;
        }
        let mut ports: Vec<u16> = sockets.into_iter().map(|s| s.port).collect();
        ports.sort_unstable();
        ports.dedup();
        Ok(ports)
    }

    /// TCP connections of both families in `states`.
    pub fn tcp_connections(&mut self, states: StateFlags) -> io::Result<Vec<Connection>> {
        let mut out = Vec::new();
        for family in [Family::Inet, Family::Inet6] {
            self.dump_headers(Protocol::Tcp, family, states.clone(), (None, None), |h| {
                out.push(Connection {
                    family,
                    id: h.socket_id.clone(),
                    uid: h.uid,
                    inode: h.inode,
                });
            })?;
        }
        Ok(out)
    }

    /// The socket inodes of TCP connections of both families whose remote port is `port`, in a
    /// state a process holds them in (not listening, not TIME_WAIT, not a half-open request).
    pub fn inodes_connected_to(&mut self, port: u16) -> io::Result<Vec<u64>> {
        let states = StateFlags::all()
            - StateFlags::LISTEN
            - StateFlags::TIME_WAIT
            - StateFlags::SYN_RECV
            - StateFlags::CLOSE;
        let mut out = Vec::new();
        for family in [Family::Inet, Family::Inet6] {
            self.dump_headers(
                Protocol::Tcp,
                family,
                states.clone(),
                (None, Some(port)),
                |h| {
                    if h.socket_id.destination_port == port && h.inode != 0 {
                        out.push(u64::from(h.inode));
                    }
                },
            )?;
        }
        Ok(out)
    }

    /// Aborts a TCP connection (`SOCK_DESTROY`: the kernel needs CONFIG_INET_DIAG_DESTROY, and
    /// the caller CAP_NET_ADMIN). One that is gone meanwhile is not an error.
    pub fn destroy(&mut self, connection: &Connection) -> io::Result<()> {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK;
        let mut request = NetlinkMessage::new(
            header,
            NetlinkPayload::InnerMessage(SockDiagDestroy::new(SockDiagMessage::InetRequest(
                InetRequest {
                    family: connection.family.af(),
                    protocol: Protocol::Tcp.ipproto(),
                    extensions: ExtensionFlags::empty(),
                    states: StateFlags::all(),
                    socket_id: connection.id.clone(),
                },
            ))),
        );
        request.finalize();
        let mut bytes = vec![0; request.buffer_len()];
        request.serialize(&mut bytes);
        self.socket.send(&bytes, 0)?;
        let size = self.socket.recv(&mut &mut self.buf[..], 0)?;
        let reply =
            <NetlinkMessage<SockDiagMessage>>::deserialize(&self.buf[..size]).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag reply: {e}"))
            })?;
        match reply.payload {
            NetlinkPayload::Error(e) if e.code.is_some() => {
                let error = e.to_io();
                if error.raw_os_error() == Some(libc::ENOENT) {
                    Ok(())
                } else {
                    Err(error)
                }
            }
            _ => Ok(()),
        }
    }

    fn dump(
        &mut self,
        protocol: Protocol,
        family: Family,
        states: StateFlags,
        port: Option<u16>,
        out: &mut Vec<KernelSocket>,
    ) -> io::Result<()> {
        self.dump_headers(protocol, family, states, (port, None), |h| {
            out.extend(to_kernel_socket(h, protocol, family, port));
        })
    }

    /// Every socket of `protocol` and `family` in `states` (on the local and remote ports of
    /// `ports`, where given: the kernel compares them while it walks its table), one response
    /// header at a time.
    fn dump_headers(
        &mut self,
        protocol: Protocol,
        family: Family,
        states: StateFlags,
        ports: (Option<u16>, Option<u16>),
        mut each: impl FnMut(&InetResponseHeader),
    ) -> io::Result<()> {
        let mut socket_id = match family {
            Family::Inet => SocketId::new_v4(),
            Family::Inet6 => SocketId::new_v6(),
        };
        socket_id.source_port = ports.0.unwrap_or(0);
        socket_id.destination_port = ports.1.unwrap_or(0);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut request = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family: family.af(),
                protocol: protocol.ipproto(),
                extensions: ExtensionFlags::empty(),
                states,
                socket_id,
            })
            .into(),
        );
        request.finalize();
        let mut bytes = vec![0; request.buffer_len()];
        request.serialize(&mut bytes);
        self.socket.send(&bytes, 0)?;

        loop {
            let size = self.socket.recv(&mut &mut self.buf[..], 0)?;
            let mut offset = 0;
            while offset < size {
                let message =
                    <NetlinkMessage<SockDiagMessage>>::deserialize(&self.buf[offset..size])
                        .map_err(|e| {
                            io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!("sock_diag reply: {e}"),
                            )
                        })?;
                let length = message.header.length as usize;
                match message.payload {
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                        each(&response.header);
                    }
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::Error(e) => {
                        return Err(e.to_io());
                    }
                    _ => {}
                }
                if length == 0 {
                    break;
                }
                offset += length;
            }
        }
    }
}

fn to_kernel_socket(
    h: &InetResponseHeader,
    protocol: Protocol,
    family: Family,
    port: Option<u16>,
) -> Option<KernelSocket> {
    let id = &h.socket_id;
    // Older kernels ignore the port filter for some tables: filter here as well.
    if id.source_port == 0 || port.is_some_and(|p| p != id.source_port) {
        return None;
    }
    // The kernel writes the cookie as two native-endian u32 halves, low half first.
    let lo = u32::from_ne_bytes([id.cookie[0], id.cookie[1], id.cookie[2], id.cookie[3]]);
    let hi = u32::from_ne_bytes([id.cookie[4], id.cookie[5], id.cookie[6], id.cookie[7]]);
    Some(KernelSocket {
        cookie: u64::from(lo) | (u64::from(hi) << 32),
        inode: u64::from(h.inode),
        uid: h.uid,
        protocol,
        family,
        address: id.source_address,
        port: id.source_port,
    })
}

/// The users owning these sockets, to narrow a `/proc` scan for their owners.
pub fn owners_uids(sockets: &[KernelSocket]) -> HashSet<u32> {
    sockets.iter().map(|s| s.uid).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, UdpSocket};

    /// The socket inode behind a descriptor of this process.
    fn inode_of(fd: &impl std::os::fd::AsRawFd) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .expect("the descriptor")
            .ino()
    }

    /// The connections to a port are its clients' ends, of both families, and nothing else: not
    /// the server's accepted ends, not the listener, not a connection to another port.
    #[test]
    fn the_connections_to_a_port_are_its_clients_ends() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind tcp");
        let port = listener.local_addr().expect("address").port();
        let other = TcpListener::bind("127.0.0.1:0").expect("bind tcp");
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let (served, _) = listener.accept().expect("accept");
        let elsewhere =
            std::net::TcpStream::connect(other.local_addr().expect("address")).expect("connect");
        let v6 = TcpListener::bind("[::1]:0").ok().map(|l6| {
            let client6 = std::net::TcpStream::connect(l6.local_addr().expect("address"))
                .expect("connect over ::1");
            (l6, client6)
        });
        let found = inodes_connected_to(&[port]).expect("sock_diag");
        assert_eq!(found, HashSet::from([inode_of(&client)]), "{found:?}");
        assert!(!found.contains(&inode_of(&served)));
        assert!(!found.contains(&inode_of(&elsewhere)));
        if let Some((l6, client6)) = &v6 {
            let port6 = l6.local_addr().expect("address").port();
            let both = inodes_connected_to(&[port, port6]).expect("sock_diag");
            assert_eq!(
                both,
                HashSet::from([inode_of(&client), inode_of(client6)]),
                "{both:?}"
            );
        }
    }

    /// A server that closes its side first leaves its port in TIME_WAIT after the listener is
    /// gone: the port is among the connection ports, though nothing listens there.
    #[test]
    fn a_port_left_in_time_wait_is_a_connection_port() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind tcp");
        let port = listener.local_addr().unwrap().port();
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let (served, _) = listener.accept().expect("accept");
        drop(listener);
        drop(served); // the server closes first: its side goes to TIME_WAIT
        let mut buf = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &client, &mut buf).unwrap(), 0);
        drop(client);
        let mut diag = SockDiag::new().expect("sock_diag socket");
        assert!(diag.bound_sockets(Some(port), None).unwrap().is_empty());
        let ports = diag.connection_ports().unwrap();
        assert!(
            ports.binary_search(&port).is_ok(),
            "{port} not in {ports:?}"
        );
        assert!(ports.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn finds_a_listening_tcp_socket_and_a_udp_socket_by_port() {
        let tcp = TcpListener::bind("127.0.0.1:0").expect("bind tcp");
        let tcp_port = tcp.local_addr().unwrap().port();
        let udp = UdpSocket::bind("[::1]:0").expect("bind udp");
        let udp_port = udp.local_addr().unwrap().port();
        let mut diag = SockDiag::new().expect("sock_diag socket");

        let found = diag.bound_sockets(Some(tcp_port), None).unwrap();
        assert!(found.iter().any(|s| s.port == tcp_port
            && s.protocol == Protocol::Tcp
            && s.family == Family::Inet));
        assert!(found.iter().all(|s| s.port == tcp_port));
        assert!(found.iter().all(|s| s.cookie != 0 && s.inode != 0));

        let found = diag
            .bound_sockets(Some(udp_port), Some(Protocol::Udp))
            .unwrap();
        assert!(found
            .iter()
            .any(|s| s.port == udp_port && s.family == Family::Inet6));

        let all = diag.bound_sockets(None, None).unwrap();
        assert!(diag
            .connection_ports()
            .unwrap()
            .binary_search(&tcp_port)
            .is_err());
        assert!(all.iter().any(|s| s.port == tcp_port));
        assert!(all.iter().any(|s| s.port == udp_port));
        drop(tcp);
        assert!(diag
            .bound_sockets(Some(tcp_port), Some(Protocol::Tcp))
            .unwrap()
            .is_empty());
    }
}
