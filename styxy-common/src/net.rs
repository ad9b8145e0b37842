//! Transport protocols and address families, defined once: the kernel's numbers (used by the eBPF
//! record, the shim's ABI and sock_diag) and the enums the daemon and its clients reason with.

/// `AF_INET`, as the kernel numbers it.
pub const AF_INET: u8 = 2;
/// `AF_INET6`, as the kernel numbers it.
pub const AF_INET6: u8 = 10;
/// `IPPROTO_TCP`.
pub const IPPROTO_TCP: u8 = 6;
/// `IPPROTO_UDP`.
pub const IPPROTO_UDP: u8 = 17;

/// The kernel's ephemeral ports (`/proc/sys/net/ipv4/ip_local_port_range`): where a port-0 bind
/// lands; Linux's default 32768–60999 when it cannot be read.
#[cfg(feature = "std")]
pub fn ephemeral_ports() -> core::ops::RangeInclusive<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut words = text.split_whitespace().map(|w| w.parse::<u16>().ok());
            Some(words.next()??..=words.next()??)
        })
        .unwrap_or(32_768..=60_999)
}

/// Transport protocol of a socket. TCP and UDP ports are separate name spaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "lowercase")
)]
pub enum Protocol {
    /// `IPPROTO_TCP`.
    Tcp,
    /// `IPPROTO_UDP`.
    Udp,
}

impl Protocol {
    /// Both protocols, TCP first.
    pub const ALL: [Protocol; 2] = [Protocol::Tcp, Protocol::Udp];

    /// The protocol of an IP protocol number; `None` for anything but TCP and UDP.
    pub const fn from_ipproto(number: u8) -> Option<Protocol> {
        match number {
            IPPROTO_TCP => Some(Protocol::Tcp),
            IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }

    /// The IP protocol number.
    pub const fn ipproto(self) -> u8 {
        match self {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        }
    }

    /// `tcp` or `udp`, as the CLI prints it.
    pub const fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// Address family of a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "lowercase")
)]
pub enum Family {
    /// `AF_INET`.
    Inet,
    /// `AF_INET6`.
    Inet6,
}

impl Family {
    /// The family of an `AF_*` number; `None` for anything but IPv4 and IPv6.
    pub const fn from_af(number: u8) -> Option<Family> {
        match number {
            AF_INET => Some(Family::Inet),
            AF_INET6 => Some(Family::Inet6),
            _ => None,
        }
    }

    /// The `AF_*` number.
    pub const fn af(self) -> u8 {
        match self {
            Family::Inet => AF_INET,
            Family::Inet6 => AF_INET6,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_round_trip() {
        for p in Protocol::ALL {
            assert_eq!(Protocol::from_ipproto(p.ipproto()), Some(p));
        }
        for f in [Family::Inet, Family::Inet6] {
            assert_eq!(Family::from_af(f.af()), Some(f));
        }
        assert_eq!(Protocol::from_ipproto(1), None);
        assert_eq!(Family::from_af(1), None);
    }
}
