//! `libstyxy_preload.so`: an `LD_PRELOAD` shim around `bind()`, and the session's view.
//!
//! For an AF_INET/AF_INET6 TCP or UDP bind of a non-zero port (not set up to share it: SO_REUSEPORT,
//! or SO_REUSEADDR on UDP), it looks the port up in the session table the daemon publishes
//! ([`table`]): a port nobody holds is bound straight away, with no call to the daemon. For a port
//! the table shows taken, or one the kernel refused with EADDRINUSE, whoever enforces the
//! process's session decides ([`enforcer`]): the kernel's programs, or the daemon, asked through
//! the client library ([`client`], `ResolveBind`, tight deadline). KEEP → bind as asked;
//! REASSIGN → bind the port the daemon picked and print one `✓ STYXY:` line ([`notice`]).
//! Everything else, and every bind while the daemon is unreachable, goes straight to the real
//! `bind()` (fail-open, [`failure`]). [`bind`] holds that path; [`moves`] what this process moved.
//!
//! [`listen`] catches the one refusal a free bind can still meet (two SO_REUSEADDR sockets bound
//! to one port before either listened) and moves the server instead of letting it fail.
//!
//! [`redirect`] applies the session's view to loopback traffic: inside the session, a port it was
//! moved off reaches the moved server.
//!
//! This library is loaded into every process of an agent's session, so it stays tiny: `no_std`,
//! no allocation, libc alone (not even libgcc_s: it is built with panic = "abort"). The gRPC client
//! (its own small HTTP/2 framing, prost, an HPACK decoder) is `libstyxy_shim_client.so`,
//! `dlopen()`ed by the first bind that needs the daemon, and catches its own panics.
//!
//! Rules kept here: no panic, ever — a release build that contains a reachable panic does not link
//! (see [`on_panic`]); `errno` is what the real `bind()` left; re-entry is guarded ([`reentry`]); and
//! all shared state is atomics so a `fork()` cannot leave a lock held.
#![cfg_attr(not(test), no_std)]

mod bind;
mod client;
mod enforcer;
mod failure;
mod listen;
mod moves;
mod notice;
mod redirect;
mod reentry;
mod sys;
mod table;

/// The panic handler of a library that must never panic.
///
/// In a release build it calls a function that exists nowhere, and the library is linked with
/// `-z defs` (build.rs): if the optimiser cannot prove every panic unreachable, the build fails to
/// link, naming this symbol. A debug build keeps its panic paths (overflow and bounds checks), so
/// there a panic aborts.
#[cfg(not(test))]
#[panic_handler]
fn on_panic(_: &core::panic::PanicInfo) -> ! {
    #[cfg(not(debug_assertions))]
    {
        extern "C" {
            fn styxy_preload_release_build_has_a_reachable_panic() -> !;
        }
        // SAFETY: never linked; see above.
        unsafe { styxy_preload_release_build_has_a_reachable_panic() }
    }
    #[cfg(debug_assertions)]
    // SAFETY: abort has no preconditions.
    unsafe {
        libc::abort()
    }
}
