//! The ring buffer's records as broker events: a bind (with its process, found once per burst),
//! a release, or a move the kernel made for a session.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use styxy_broker::{BoundSocket, Family, PortEvent, ProcessInfo, Protocol};
use styxy_common::event::{BindEvent, FLAG_REWRITTEN, KIND_BOUND, KIND_RELEASED};

use crate::clock::monotonic_ns;
use crate::procs;

/// Process details by pid, so a burst of binds from one process reads `/proc` once. An entry is
/// trusted for [`OwnerCache::FRESH_NS`] and only while the record's comm matches (an `exec`
/// changes it), so a reused pid or a new program is looked up again.
#[derive(Default)]
pub struct OwnerCache {
    by_pid: HashMap<u32, CachedOwner>,
}

struct CachedOwner {
    info: Option<ProcessInfo>,
    comm: [u8; 16],
    fetched_ns: u64,
}

impl OwnerCache {
    const FRESH_NS: u64 = 1_000_000_000;
    const MAX_ENTRIES: usize = 4096;

    fn owner(&mut self, event: &BindEvent) -> Option<ProcessInfo> {
        let now = monotonic_ns();
        if let Some(cached) = self.by_pid.get(&event.tgid) {
            if cached.comm == event.comm && now.saturating_sub(cached.fetched_ns) < Self::FRESH_NS {
                return cached.info.clone();
            }
        }
        if self.by_pid.len() >= Self::MAX_ENTRIES {
            self.by_pid.clear();
        }
        let info = procs::process_info(event.tgid);
        self.by_pid.insert(
            event.tgid,
            CachedOwner {
                info: info.clone(),
                comm: event.comm,
                fetched_ns: now,
            },
        );
        info
    }
}

/// A kernel record as a broker event; `None` for what the broker does not track.
pub fn port_event(
    event: &BindEvent,
    owners: &mut OwnerCache,
    instance_of: &dyn Fn(u32) -> Option<String>,
) -> Option<PortEvent> {
    match event.kind {
        KIND_RELEASED => Some(PortEvent::Released {
            cookie: event.cookie,
        }),
        KIND_BOUND => {
            let protocol = Protocol::from_ipproto(event.protocol)?;
            let family = Family::from_af(event.family)?;
            let address = match family {
                Family::Inet => {
                    let mut v4 = [0u8; 4];
                    v4.copy_from_slice(&event.addr[..4]);
                    IpAddr::V4(Ipv4Addr::from(v4))
                }
                Family::Inet6 => IpAddr::V6(Ipv6Addr::from(event.addr)),
            };
            let socket = BoundSocket {
                cookie: event.cookie,
                protocol,
                family,
                address,
                port: event.port,
                uid: event.uid,
                owner: owners.owner(event),
                since_ms: crate::clock::now_ms(),
            };
            let moved = event.flags & FLAG_REWRITTEN != 0 && event.requested_port != event.port;
            match instance_of(event.session).filter(|_| moved) {
                Some(instance_id) => Some(PortEvent::MovedByKernel {
                    project: socket
                        .owner
                        .as_ref()
                        .and_then(|o| procs::project_of(o.id.pid)),
                    socket,
                    asked: event.requested_port,
                    instance_id,
                }),
                None => Some(PortEvent::Bound(socket)),
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_records_become_broker_events() {
        let mut record = BindEvent::zeroed();
        record.kind = KIND_BOUND;
        record.family = Family::Inet6.af();
        record.protocol = Protocol::Udp.ipproto();
        record.port = 5353;
        record.cookie = 42;
        record.tgid = u32::MAX; // no such process: no owner
        record.addr[15] = 1; // ::1
        let mut owners = OwnerCache::default();
        let none = |_: u32| None;
        let Some(PortEvent::Bound(socket)) = port_event(&record, &mut owners, &none) else {
            panic!("a bound record gives a Bound event");
        };
        assert_eq!(
            (socket.port, socket.protocol, socket.family, socket.cookie),
            (5353, Protocol::Udp, Family::Inet6, 42)
        );
        assert_eq!(socket.address, IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert!(socket.owner.is_none());

        record.kind = KIND_RELEASED;
        assert_eq!(
            port_event(&record, &mut owners, &none),
            Some(PortEvent::Released { cookie: 42 })
        );
        record.kind = KIND_BOUND;
        record.protocol = 132; // SCTP: not tracked
        assert_eq!(port_event(&record, &mut owners, &none), None);
    }

    #[test]
    fn a_kernel_move_becomes_a_moved_by_kernel_event_of_its_session() {
        let mut record = BindEvent::zeroed();
        record.kind = KIND_BOUND;
        record.family = Family::Inet.af();
        record.protocol = Protocol::Tcp.ipproto();
        record.tgid = u32::MAX;
        record.port = 8001;
        record.requested_port = 8000;
        record.flags = FLAG_REWRITTEN;
        record.session = 3;
        let mut owners = OwnerCache::default();
        let sessions = |n: u32| (n == 3).then(|| "run-7".to_string());
        let Some(PortEvent::MovedByKernel {
            socket,
            asked,
            instance_id,
            ..
        }) = port_event(&record, &mut owners, &sessions)
        else {
            panic!("a rewritten bind of a known session is a kernel move");
        };
        assert_eq!(
            (socket.port, asked, instance_id.as_str()),
            (8001, 8000, "run-7")
        );
        // A session the daemon does not know (or no rewrite): a plain bind.
        record.session = 4;
        assert!(matches!(
            port_event(&record, &mut owners, &sessions),
            Some(PortEvent::Bound(_))
        ));
    }
}
