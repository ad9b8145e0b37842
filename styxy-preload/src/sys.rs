//! Small helpers over libc, for a library with no std: errno, the environment, decimal numbers,
//! bytes gathered on the stack, the port field of an inet address and integer socket options.

use core::ffi::{c_char, c_int, c_void, CStr};

use libc::{sockaddr, socklen_t};

use styxy_common::env;

/// Where the port is in both sockaddr_in and sockaddr_in6: the two bytes right after the family.
pub(crate) const PORT_OFFSET: usize = core::mem::offset_of!(libc::sockaddr_in, sin_port);
const _: () = assert!(PORT_OFFSET == core::mem::offset_of!(libc::sockaddr_in6, sin6_port));

/// The port of an AF_INET or AF_INET6 address.
///
/// # Safety
/// `addr` points to at least `PORT_OFFSET + 2` readable bytes.
pub(crate) unsafe fn port_of(addr: *const sockaddr) -> u16 {
    // SAFETY: the port is two bytes at PORT_OFFSET, readable per the caller's contract.
    let bytes = unsafe {
        addr.cast::<u8>()
            .add(PORT_OFFSET)
            .cast::<[u8; 2]>()
            .read_unaligned()
    };
    u16::from_be_bytes(bytes)
}

/// Writes `port` (in network order) into an AF_INET or AF_INET6 address.
///
/// # Safety
/// `addr` points to at least `PORT_OFFSET + 2` writable bytes.
pub(crate) unsafe fn set_port_of(addr: *mut sockaddr, port: u16) {
    // SAFETY: as in `port_of`, writable per the caller's contract.
    unsafe {
        addr.cast::<u8>()
            .add(PORT_OFFSET)
            .cast::<[u8; 2]>()
            .write_unaligned(port.to_be_bytes());
    }
}

/// An integer socket option of `fd` (`None` when the kernel refuses to tell).
pub(crate) fn getsockopt_int(fd: c_int, level: c_int, name: c_int) -> Option<c_int> {
    let mut value: c_int = 0;
    let mut len = core::mem::size_of::<c_int>() as socklen_t;
    // SAFETY: value and len are valid for writes of the sizes given.
    let rc =
        unsafe { libc::getsockopt(fd, level, name, (&raw mut value).cast::<c_void>(), &mut len) };
    (rc == 0).then_some(value)
}

/// Default deadline for one `ResolveBind`, connect included (`STYXY_TIMEOUT_MS` overrides).
pub(crate) const DEFAULT_TIMEOUT_MS: u32 = 50;
/// Bytes gathered on the stack, up to `N`: the shim allocates nothing.
pub(crate) struct StackBuf<const N: usize> {
    bytes: [u8; N],
    len: usize,
}

impl<const N: usize> StackBuf<N> {
    pub(crate) const fn new() -> Self {
        StackBuf {
            bytes: [0; N],
            len: 0,
        }
    }

    /// Appends what fits of `more`; false when it did not fit whole.
    pub(crate) fn push(&mut self, more: &[u8]) -> bool {
        let room = self.bytes.get_mut(self.len..).unwrap_or_default();
        let n = more.len().min(room.len());
        if let (Some(to), Some(from)) = (room.get_mut(..n), more.get(..n)) {
            to.copy_from_slice(from);
            self.len += n;
        }
        n == more.len()
    }

    /// Appends `value` in decimal.
    pub(crate) fn push_decimal(&mut self, mut value: u32) -> bool {
        let mut digits = [0u8; 10];
        let mut used = 0;
        for slot in digits.iter_mut().rev() {
            *slot = b'0' + (value % 10) as u8;
            value /= 10;
            used += 1;
            if value == 0 {
                break;
            }
        }
        let first = digits.len().saturating_sub(used);
        self.push(digits.get(first..).unwrap_or_default())
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or_default()
    }
}

pub(crate) fn errno() -> c_int {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() }
}

pub(crate) fn set_errno(value: c_int) {
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = value }
}

/// libc's getenv: lock-free, so it is safe to call in a child after `fork()`.
pub(crate) fn getenv(name: &CStr) -> *const c_char {
    // SAFETY: name is NUL-terminated.
    unsafe { libc::getenv(name.as_ptr()) }
}

pub(crate) fn env_str(name: &CStr) -> Option<&'static [u8]> {
    let value = getenv(name);
    // SAFETY: getenv returns null or a NUL-terminated string that lives as long as the environment.
    (!value.is_null()).then(|| unsafe { CStr::from_ptr(value) }.to_bytes())
}

pub(crate) fn env_flag(name: &CStr) -> bool {
    matches!(env_str(name), Some(b"1") | Some(b"true") | Some(b"yes"))
}

pub(crate) fn timeout_ms() -> u32 {
    env_str(env::TIMEOUT_MS.c_name)
        .and_then(parse_decimal)
        .map(|v| v.clamp(1, 10_000))
        .unwrap_or(DEFAULT_TIMEOUT_MS)
}

/// A decimal number, surrounding whitespace allowed; `None` for anything else or an overflow.
pub(crate) fn parse_decimal(text: &[u8]) -> Option<u32> {
    let digits = text.trim_ascii();
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u32, |value, &digit| {
        if !digit.is_ascii_digit() {
            return None;
        }
        value.checked_mul(10)?.checked_add(u32::from(digit - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stack_buffers_keep_what_fits() {
        let mut buf = StackBuf::<4>::new();
        assert!(buf.push(b"ab"));
        assert!(!buf.push(b"cde"));
        assert_eq!(buf.as_bytes(), b"abcd");
        assert!(!buf.push(b"f"));
        assert!(buf.push(b""));
        let mut digits = StackBuf::<10>::new();
        assert!(digits.push_decimal(0));
        assert_eq!(digits.as_bytes(), b"0");
        let mut digits = StackBuf::<10>::new();
        assert!(digits.push_decimal(u32::MAX));
        assert_eq!(digits.as_bytes(), b"4294967295");
    }

    #[test]
    fn timeouts_are_plain_decimal_numbers() {
        assert_eq!(parse_decimal(b"50"), Some(50));
        assert_eq!(parse_decimal(b" 7\n"), Some(7));
        assert_eq!(parse_decimal(b"4294967295"), Some(u32::MAX));
        assert_eq!(parse_decimal(b"4294967296"), None);
        assert_eq!(parse_decimal(b""), None);
        assert_eq!(parse_decimal(b"-5"), None);
        assert_eq!(parse_decimal(b"5ms"), None);
    }
}
