//! The C ABI between `libstyxy_preload.so` (tiny, loaded into every process) and
//! `libstyxy_shim_client.so` (the gRPC client, `dlopen`ed on the first bind that needs the daemon).
//!
//! Keeping the two apart is what keeps the shim cheap for processes that never bind: the client
//! library carries the HTTP/2 and protobuf code (most of the shim's code by size), and only
//! processes that bind a named port load it.

use core::ffi::c_char;

/// Bumped on every incompatible change of [`BindQuery`], [`BindAnswer`] or the entry points.
pub const ABI_VERSION: u32 = 3;

/// Exported by the client library: returns [`ABI_VERSION`].
pub const ABI_VERSION_SYMBOL: &core::ffi::CStr = c"styxy_client_abi_version";
/// Exported by the client library: `extern "C" fn(*const BindQuery, *mut BindAnswer) -> i32`.
pub const RESOLVE_BIND_SYMBOL: &core::ffi::CStr = c"styxy_client_resolve_bind";
/// Exported by the client library, with [`ResolveBindFn`]'s signature: who holds the query's
/// port (a read-only question, for the notice of a move the kernel made); fills only the
/// answer's holder.
pub const WHO_HOLDS_SYMBOL: &core::ffi::CStr = c"styxy_client_who_holds";

/// File name of the client library, looked up next to the shim.
pub const CLIENT_LIBRARY: &str = "libstyxy_shim_client.so";

pub type AbiVersionFn = unsafe extern "C" fn() -> u32;
pub type ResolveBindFn = unsafe extern "C" fn(*const BindQuery, *mut BindAnswer) -> i32;

/// One bind the shim asks about.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BindQuery {
    pub pid: u32,
    pub port: u16,
    /// [`IPPROTO_TCP`](crate::net::IPPROTO_TCP) or [`IPPROTO_UDP`](crate::net::IPPROTO_UDP).
    pub protocol: u8,
    /// [`AF_INET`](crate::net::AF_INET) or [`AF_INET6`](crate::net::AF_INET6), as the kernel numbers them.
    pub family: u8,
    /// The whole call, connect included, must finish within this.
    pub timeout_ms: u32,
    /// NUL-terminated path of the daemon's Unix socket; null for the default.
    pub socket_path: *const c_char,
    /// NUL-terminated instance id (`STYXY_INSTANCE`); null when unset.
    pub instance_id: *const c_char,
}

/// Keep the asked port.
pub const ACTION_KEEP: u8 = 0;
/// Bind [`BindAnswer::port`] instead.
pub const ACTION_REASSIGN: u8 = 1;

/// Room for the holder's description (its command and session), NUL-terminated.
pub const HOLDER_NAME_LEN: usize = 128;

/// The daemon's answer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BindAnswer {
    /// [`ACTION_KEEP`] or [`ACTION_REASSIGN`].
    pub action: u8,
    pub port: u16,
    /// Pid of the process holding the asked port; 0 when it is held by a lease with no process.
    pub holder_pid: u32,
    /// NUL-terminated: what holds the asked port — its command in backticks and its session,
    /// as the notice shows it.
    pub holder_name: [u8; HOLDER_NAME_LEN],
}

impl BindAnswer {
    pub const fn empty() -> Self {
        BindAnswer {
            action: ACTION_KEEP,
            port: 0,
            holder_pid: 0,
            holder_name: [0; HOLDER_NAME_LEN],
        }
    }

    /// The holder's name up to its NUL (or the whole buffer), as bytes.
    pub fn holder_name_bytes(&self) -> &[u8] {
        let end = self
            .holder_name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(HOLDER_NAME_LEN);
        &self.holder_name[..end]
    }

    /// Store `name`, cut to fit (on a UTF-8 boundary) and NUL-terminated. Panic-free (no
    /// slicing): this crate is linked into the shim, which must contain no reachable panic.
    pub fn set_holder_name(&mut self, name: &str) {
        let mut end = name.len().min(HOLDER_NAME_LEN - 1);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        self.holder_name = [0; HOLDER_NAME_LEN];
        for (slot, byte) in self.holder_name.iter_mut().zip(name.bytes().take(end)) {
            *slot = byte;
        }
    }
}

/// Results of [`ResolveBindFn`].
pub const RESOLVE_OK: i32 = 0;
/// The daemon could not be reached (no socket, connection refused).
pub const RESOLVE_UNREACHABLE: i32 = 1;
/// The daemon answered with an error (e.g. permission denied).
pub const RESOLVE_REFUSED: i32 = 2;
/// The query itself was malformed (null pointers, bad values).
pub const RESOLVE_BAD_QUERY: i32 = 3;
/// The client library failed inside (a caught panic).
pub const RESOLVE_INTERNAL: i32 = 4;
/// The daemon was reached but did not answer within the deadline (busy machine or hung daemon).
pub const RESOLVE_TIMEOUT: i32 = 5;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holder_name_is_cut_on_a_char_boundary_and_terminated() {
        let mut answer = BindAnswer::empty();
        answer.set_holder_name("storybook");
        assert_eq!(answer.holder_name_bytes(), b"storybook");
        let long = "é".repeat(40); // 80 bytes
        answer.set_holder_name(&long);
        let stored = answer.holder_name_bytes();
        assert!(stored.len() < HOLDER_NAME_LEN);
        assert!(core::str::from_utf8(stored).is_ok());
        assert_eq!(answer.holder_name[HOLDER_NAME_LEN - 1], 0);
    }
}
