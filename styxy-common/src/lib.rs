//! The vocabulary every Styxy component shares, kept `no_std` so the eBPF programs and the shim can
//! use it: protocols and families ([`net`]), environment variable names ([`env`]), the kernel →
//! daemon bind event record ([`event`]), the kernel session maps ([`session`]), the kill protection between sessions ([`protection`]), every map's
//! name, kind and size — the kernel contract — ([`maps`]), the session table the daemon publishes for the shim
//! ([`table`]) and the C ABI between the preload shim and the lazily
//! loaded client library ([`shim`]). With the `std` feature, also the default paths that the
//! daemon, the CLI and the shim must agree on ([`paths`]), where a daemon's kernel programs stay pinned ([`pins`]), how a command line is shown
//! ([`command_line`]), a name as a DNS label ([`label`]) and a name's URL ([`url`]); with `user`, the aya `Pod` impls the
//! daemon needs to read the kernel programs' maps; with `serde`, serde impls for [`net`]'s enums.
#![cfg_attr(not(any(feature = "std", test)), no_std)]

#[cfg(feature = "std")]
pub mod command_line;
pub mod env;
pub mod event;
#[cfg(feature = "std")]
pub mod label;
pub mod maps;
pub mod net;
pub mod paths;
#[cfg(feature = "std")]
pub mod pins;
pub mod protection;
pub mod session;
pub mod shim;
#[cfg(not(target_arch = "bpf"))]
pub mod table;
#[cfg(feature = "std")]
pub mod url;
