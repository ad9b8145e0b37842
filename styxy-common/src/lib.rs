//! Types that cross Styxy's internal boundaries, kept `no_std` so the eBPF programs can use them:
//! the kernel → daemon bind event record ([`event`]) and the C ABI between the preload shim and the
//! lazily loaded gRPC client library ([`shim`]). With the `std` feature, also the default paths
//! that the daemon, the CLI and the shim must agree on ([`paths`]).
#![cfg_attr(not(feature = "std"), no_std)]

pub mod event;
#[cfg(feature = "std")]
pub mod paths;
pub mod shim;
