//! The `styxy.v1` gRPC API: generated messages, client and server, shared by the daemon, the CLI, the shim
//! and the tests, plus the encoded file descriptor set that the daemon serves through gRPC reflection.

/// Generated types of package `styxy.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("styxy.v1");
}

/// The encoded `FileDescriptorSet` of `styxy.proto`, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/styxy_descriptor.bin"));
