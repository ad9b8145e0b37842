//! Lingering ports: TCP ports nothing is bound on that the kernel would still refuse to a plain
//! `bind()` — connections an earlier server left behind (TIME_WAIT for up to a minute, or accepted
//! connections that outlive their listener). A program that binds without SO_REUSEADDR fails
//! there with EADDRINUSE, and the kernel's bind program cannot try again, so moves, allocations,
//! suggestions and the kernel's spare ports pass such ports over while any other port of the
//! range is free.
//!
//! The daemon reads them from the socket tables (outside the broker lock) and hands the reading
//! in with [`Broker::set_lingering`]. Between a TCP server's release and the next reading its
//! port counts as lingering too (its connections may be closing right then), so nothing is given
//! a port that has not been looked at since.

use std::collections::BTreeMap;

use crate::{Broker, Held, Protocol};

/// Why a port counts as lingering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Why {
    /// The last reading of the socket tables showed connections on it.
    Seen,
    /// A TCP socket was released from it at this time (Unix ms) and no reading started since.
    Released { at_ms: u64 },
}

/// The lingering ports, by port.
#[derive(Debug, Default)]
pub(crate) struct LingeringPorts {
    ports: BTreeMap<u16, Why>,
    /// Counts every change of which ports linger (for those who copy the set elsewhere).
    generation: u64,
}

impl Broker {
    /// A reading of the socket tables, started at `started_ms`: the ports with TCP connections
    /// on them (the daemon leaves out the kernel's ephemeral ports outside every service range,
    /// where clients' connections are). Replaces what the last reading said; a port released
    /// after the reading started stays lingering until the next one. A port a TCP socket is
    /// bound on (a server and its connections) is taken anyway, and not counted: its release
    /// starts its lingering.
    pub fn set_lingering(&mut self, ports: impl IntoIterator<Item = u16>, started_ms: u64) {
        let before: Vec<u16> = self.lingering.ports.keys().copied().collect();
        self.lingering
            .ports
            .retain(|_, why| matches!(why, Why::Released { at_ms } if *at_ms >= started_ms));
        for port in ports {
            if !self.is_bound(port, Some(Protocol::Tcp)) {
                self.lingering.ports.entry(port).or_insert(Why::Seen);
            }
        }
        if !self.lingering.ports.keys().copied().eq(before) {
            self.lingering.generation += 1;
        }
    }

    /// Changes whenever the set of lingering ports does.
    pub fn lingering_generation(&self) -> u64 {
        self.lingering.generation
    }

    /// Whether `port` may still refuse a plain bind (see the module comment).
    pub fn is_lingering(&self, port: u16) -> bool {
        self.lingering.ports.contains_key(&port)
    }

    /// How many ports are lingering: while any are, the daemon reads again now and then, to see
    /// them free.
    pub fn lingering_count(&self) -> usize {
        self.lingering.ports.len()
    }

    /// A TCP socket left `held`'s port: the port lingers until a reading started after now.
    pub(crate) fn note_release(&mut self, held: &Held, now_ms: u64) {
        if held.socket.protocol == Protocol::Tcp {
            let port = held.socket.port;
            if self
                .lingering
                .ports
                .insert(port, Why::Released { at_ms: now_ms })
                .is_none()
            {
                self.lingering.generation += 1;
            }
        }
    }
}
