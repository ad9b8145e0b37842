//! The environment variables Styxy reads, named once for every component: the daemon, the CLI,
//! the shim (which needs them as C strings, hence [`Var::c_name`]) and the tests.

use core::ffi::CStr;

/// An environment variable's name, as a Rust string and as a NUL-terminated C string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Var {
    /// The name, e.g. `STYXY_SOCKET`.
    pub name: &'static str,
    /// The same name, NUL-terminated, for `getenv`.
    pub c_name: &'static CStr,
}

macro_rules! var {
    ($(#[$doc:meta])* $ident:ident = $name:literal) => {
        $(#[$doc])*
        pub const $ident: Var = Var {
            name: $name,
            c_name: match CStr::from_bytes_with_nul(concat!($name, "\0").as_bytes()) {
                Ok(c) => c,
                Err(_) => panic!("an environment variable name has no NUL inside"),
            },
        };
    };
}

var!(
    /// The daemon's Unix socket (clients, the shim).
    SOCKET = "STYXY_SOCKET"
);
var!(
    /// A loopback TCP address the CLI talks to instead of the Unix socket.
    TCP = "STYXY_TCP"
);
var!(
    /// The agent session a process belongs to (set by the SessionStart hook and `styxy run --instance`).
    INSTANCE = "STYXY_INSTANCE"
);
var!(
    /// `1`: the shim leaves every bind alone.
    DISABLE = "STYXY_DISABLE"
);
var!(
    /// `off`: the shim redirects no connection through the session's view.
    VIEW = "STYXY_VIEW"
);
var!(
    /// Where the shim writes its notice: `stderr` (default), `stdout` or `off`.
    NOTIFY = "STYXY_NOTIFY"
);
var!(
    /// The shim's deadline for one question to the daemon, in milliseconds.
    TIMEOUT_MS = "STYXY_TIMEOUT_MS"
);
var!(
    /// Where the shim loads its client library from.
    CLIENT_LIB = "STYXY_CLIENT_LIB"
);
var!(
    /// Where `styxy run`, `styxy env` and the hook find the shim.
    PRELOAD_LIB = "STYXY_PRELOAD_LIB"
);
var!(
    /// Where the daemon finds its eBPF object.
    EBPF_OBJECT = "STYXY_EBPF_OBJECT"
);
var!(
    /// The daemon's log filter (`tracing` syntax, e.g. `debug` or `styxy_daemon=debug`).
    LOG = "STYXY_LOG"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_spellings_agree() {
        for var in [
            SOCKET,
            TCP,
            INSTANCE,
            DISABLE,
            NOTIFY,
            TIMEOUT_MS,
            CLIENT_LIB,
            PRELOAD_LIB,
            EBPF_OBJECT,
            LOG,
        ] {
            assert_eq!(var.c_name.to_bytes(), var.name.as_bytes());
            assert!(var.name.starts_with("STYXY_"));
        }
    }
}
