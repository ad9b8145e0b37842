//! The `styxy.v1` gRPC API: generated messages (with their canonical proto3 JSON mapping), client and
//! server, shared by the daemon, the CLI, the shim and the tests, plus the encoded file descriptor set that the daemon serves through gRPC reflection.

/// Generated types of package `styxy.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("styxy.v1");
    include!(concat!(env!("OUT_DIR"), "/styxy.v1.serde.rs"));
}

/// The encoded `FileDescriptorSet` of `styxy.proto`, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/styxy_descriptor.bin"));

use styxy_common::net::{Family, Protocol};

impl From<Protocol> for v1::Protocol {
    fn from(protocol: Protocol) -> Self {
        match protocol {
            Protocol::Tcp => v1::Protocol::Tcp,
            Protocol::Udp => v1::Protocol::Udp,
        }
    }
}

impl v1::Protocol {
    /// The protocol this value names; `None` for `PROTOCOL_UNSPECIFIED`.
    pub fn known(self) -> Option<Protocol> {
        match self {
            v1::Protocol::Unspecified => None,
            v1::Protocol::Tcp => Some(Protocol::Tcp),
            v1::Protocol::Udp => Some(Protocol::Udp),
        }
    }
}

impl From<Family> for v1::Family {
    fn from(family: Family) -> Self {
        match family {
            Family::Inet => v1::Family::Inet,
            Family::Inet6 => v1::Family::Inet6,
        }
    }
}
