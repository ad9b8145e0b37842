//! Port blocks for the tests: ranges of ports below the ephemeral range, each handed to one test
//! (one daemon) at a time, machine-wide, and checked free the way the tests bind.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Mutex;

/// Ports below the ephemeral range, handed out in blocks so tests running at once never share ports.
pub const BLOCK: u16 = 300;
const FIRST_BLOCK_PORT: u16 = 20000;
const BLOCKS: u16 = (32768 - FIRST_BLOCK_PORT) / BLOCK;
/// Blocks this process holds, each with its lock file open.
static HELD: Mutex<BTreeMap<u16, File>> = Mutex::new(BTreeMap::new());
static NEXT_BLOCK: AtomicU16 = AtomicU16::new(0);

/// A block of `BLOCK` ports in which nothing can be bound now and that no live test holds — in
/// this process or any other: each block held has its lock file locked (`flock`), so test
/// binaries running at once, or two clones' test runs on one machine, never share a block. A
/// block goes back with [`give_back_port_block`] (a daemon's, when it drops), or when the process
/// ends.
pub fn port_block() -> u16 {
    port_blocks(1)
}

/// `count` consecutive blocks, as [`port_block`] hands out one; the first one's port. Each is
/// given back on its own.
///
/// When every block is held or unclean — a listener, or connections an earlier test closed first
/// waiting out TIME_WAIT (a minute), which a bind without SO_REUSEADDR runs into — it waits for
/// one to come clean (test binaries run back to back, or alongside each other, can use them all
/// up for a while) rather than hand out a block a test would fail on.
pub fn port_blocks(count: u16) -> u16 {
    let deadline = std::time::Instant::now() + BLOCK_WAIT;
    let mut said = false;
    loop {
        if let Some(first) = try_port_blocks(count) {
            return first;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "out of test port blocks for {} s: every block of 20000-32767 is held, has a listener \
             or old connections",
            BLOCK_WAIT.as_secs()
        );
        if !said {
            eprintln!("waiting for a clean test port block (old connections end within a minute)");
            said = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// How long [`port_blocks`] waits for a clean block: twice TIME_WAIT's minute.
const BLOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// One pass over the blocks: `count` consecutive ones, clean and held by nobody, now locked for
/// this process.
fn try_port_blocks(count: u16) -> Option<u16> {
    let start = NEXT_BLOCK.fetch_add(1, Ordering::SeqCst);
    for attempt in 0..BLOCKS {
        let n = start.wrapping_add(attempt) % BLOCKS;
        if n + count > BLOCKS {
            continue;
        }
        let bases: Vec<u16> = (n..n + count)
            .map(|n| FIRST_BLOCK_PORT + n * BLOCK)
            .collect();
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        if bases.iter().any(|base| held.contains_key(base)) {
            continue;
        }
        let Some(locks) = bases
            .iter()
            .map(|&base| lock_block(base))
            .collect::<Option<Vec<File>>>()
        else {
            continue;
        };
        let first = FIRST_BLOCK_PORT + n * BLOCK;
        if (first..first + count * BLOCK).all(bindable_as_the_tests_bind) {
            held.extend(bases.into_iter().zip(locks));
            NEXT_BLOCK.store(n + count, Ordering::SeqCst);
            return Some(first);
        }
    }
    None
}

/// The lock file of the block at `base`, locked for this process; `None` when another holds it.
/// The files live in one directory per user under the system's temporary directory.
fn lock_block(base: u16) -> Option<File> {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let dir = std::env::temp_dir().join(format!("styxy-test-port-blocks-{uid}"));
    std::fs::create_dir_all(&dir).ok()?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(base.to_string()))
        .ok()?;
    // SAFETY: flock on a descriptor of our own; it is released when the file is closed.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    locked.then_some(file)
}

/// Whether `port` can be bound the way the tests' own holders and servers bind it: without
/// `SO_REUSEADDR` (which std's `TcpListener` sets, and which would not see the TIME_WAIT
/// connections an earlier run or test binary left on it), over IPv4 and IPv6.
fn bindable_as_the_tests_bind(port: u16) -> bool {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
    [
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
    ]
    .into_iter()
    .all(|address| {
        let domain = if address.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        // SAFETY: a socket of our own, bound once (sockaddr built from a std address of the
        // same family) and closed; no other memory is touched.
        unsafe {
            let fd = libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return false;
            }
            if domain == libc::AF_INET6 {
                let one: libc::c_int = 1;
                libc::setsockopt(
                    fd,
                    libc::IPPROTO_IPV6,
                    libc::IPV6_V6ONLY,
                    (&raw const one).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
            let (storage, len) = socket_address(address);
            let bound = libc::bind(fd, (&raw const storage).cast(), len) == 0;
            libc::close(fd);
            bound
        }
    })
}

/// `address` as a C socket address.
fn socket_address(address: std::net::SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all zeroes is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match address {
        std::net::SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        std::net::SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// Gives a block from [`port_block`] back.
pub fn give_back_port_block(base: u16) {
    HELD.lock().unwrap_or_else(|e| e.into_inner()).remove(&base);
}
