//! Lingering ports: TCP ports nothing is bound on that the kernel would still refuse to a plain
//! `bind()` — connections an earlier server left behind (TIME_WAIT for up to a minute, or accepted
//! connections that outlive their listener). A program that binds without SO_REUSEADDR fails
//! there with EADDRINUSE, and the kernel's bind program cannot try again, so moves, allocations,
//! suggestions and the kernel's spare ports pass such ports over while any other port of the
//! range is free.
//!
//! The daemon reads them from the socket tables (outside the broker lock): it says when a reading
//! begins ([`Broker::begin_lingering_reading`]) and hands its result in ([`Broker::set_lingering`]).
//! Between a TCP server's release and the end of a reading begun after it, its port counts as
//! lingering too (its connections may be closing right then), so nothing is given a port that
//! has not been looked at since. Everything is a 65,536-bit bitmap: a release sets a bit, and a
//! reading costs a few passes over 8 KiB under the broker lock, however many ports were released
//! (a map of release times, emptied by each reading, held the observer up: bind → broker p99
//! 2–4 ms at 200,000 binds a second, against 0.3–0.7 ms without the reader).

use crate::portset::PortSet;
use crate::{Broker, Held, Protocol};

/// The lingering ports.
#[derive(Debug, Default)]
pub(crate) struct LingeringPorts {
    /// TCP ports released since the reading in progress began (since the last one, if none is).
    released_since: PortSet,
    /// TCP ports released before the reading in progress began: its result settles them.
    released_before: PortSet,
    /// The ports the last reading showed connections on.
    seen: PortSet,
    /// All of them: what every free-port search and the kernel's spare-port refill test.
    bits: PortSet,
    /// Counts every change of which ports linger (for those who copy the set elsewhere).
    generation: u64,
}

impl Broker {
    /// A reading of the socket tables begins: releases from now on are not covered by it.
    pub fn begin_lingering_reading(&mut self) {
        let lingering = &mut self.lingering;
        let since = std::mem::take(&mut lingering.released_since);
        lingering.released_before.add_all(&since);
    }

    /// The reading begun last: the ports with TCP connections on them (the daemon leaves out the
    /// kernel's ephemeral ports outside every service range, where clients' connections are).
    /// Replaces what the last reading said; a port released after the reading began stays
    /// lingering until the next one. A port a TCP socket is bound on (a server and its
    /// connections) is taken anyway, and not counted: its release starts its lingering.
    pub fn set_lingering(&mut self, ports: impl IntoIterator<Item = u16>) {
        let mut seen = PortSet::default();
        for port in ports {
            if !self.is_bound(port, Some(Protocol::Tcp)) {
                seen.set(port, true);
            }
        }
        let lingering = &mut self.lingering;
        lingering.released_before.clear();
        let mut bits = seen.clone();
        bits.add_all(&lingering.released_since);
        lingering.seen = seen;
        if bits != lingering.bits {
            lingering.bits = bits;
            lingering.generation += 1;
        }
    }

    /// Changes whenever the set of lingering ports does.
    pub fn lingering_generation(&self) -> u64 {
        self.lingering.generation
    }

    /// Whether `port` may still refuse a plain bind (see the module comment).
    pub fn is_lingering(&self, port: u16) -> bool {
        self.lingering.bits.contains(port)
    }

    /// Ports of `start..=end` neither taken nor lingering, lowest first (64 ports a step past
    /// the others, however many linger).
    pub fn settled_free_in(&self, start: u16, end: u16) -> impl Iterator<Item = u16> + '_ {
        self.taken.free_of_both(&self.lingering.bits, start, end)
    }

    /// How many ports are lingering: while any are, the daemon reads again now and then, to see
    /// them free.
    pub fn lingering_count(&self) -> usize {
        self.lingering.bits.len()
    }

    /// A TCP socket left `held`'s port: the port lingers until a reading begun after now ends.
    pub(crate) fn note_release(&mut self, held: &Held) {
        if held.socket.protocol == Protocol::Tcp {
            let port = held.socket.port;
            let lingering = &mut self.lingering;
            lingering.released_since.set(port, true);
            if !lingering.bits.contains(port) {
                lingering.bits.set(port, true);
                lingering.generation += 1;
            }
        }
    }
}
