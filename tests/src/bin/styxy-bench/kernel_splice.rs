//! `styxy-bench proxy`'s third floor of a tunnel: a byte relay whose connections are spliced in
//! the kernel — each accepted connection and its own to the server put in a sockmap (`SPLICED`)
//! under the other's cookie, where `styxy-ebpf`'s `stream_verdict` program (`splicing`) sends
//! what arrives on one out of the other. No byte crosses into user space; the relay's thread
//! only waits for an end.
//!
//! The kernel does that send from a workqueue (the sockmap's backlog work, one per socket), not
//! in the context the bytes arrived in: a hop through a kernel thread instead of the proxy's.
//! This row says what that is worth against the two user-space floors (`relay`) on the machine
//! the bench runs on. Needs root and the built object; without them it says so and is left out.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Context, Result};
use aya::maps::{MapData, SockHash};
use aya::programs::SkSkb;
use aya::Ebpf;
use styxy_common::maps::SPLICED_MAP;

/// The verdict program's name in the object.
const PROGRAM: &str = "styxy_splice";

/// The loaded program and its map, for as long as the relay accepts.
struct Splicer {
    _ebpf: Ebpf,
    spliced: Mutex<SockHash<MapData, u64>>,
}

/// A spliced relay to `server` on a loopback port of its own, with the programs of `object`:
/// its address.
pub fn start(server: SocketAddr, object: &Path) -> Result<SocketAddr> {
    let mut ebpf = aya::EbpfLoader::new()
        .load_file(object)
        .with_context(|| format!("loading {}", object.display()))?;
    let map = ebpf
        .take_map(SPLICED_MAP)
        .ok_or_else(|| anyhow!("{} has no {SPLICED_MAP} map", object.display()))?;
    let spliced: SockHash<MapData, u64> = SockHash::try_from(map)?;
    let program: &mut SkSkb = ebpf
        .program_mut(PROGRAM)
        .ok_or_else(|| anyhow!("{} has no {PROGRAM} program", object.display()))?
        .try_into()?;
    program.load().context("loading the splice verdict")?;
    program
        .attach(spliced.fd())
        .context("attaching the splice verdict to its map")?;
    let splicer = Arc::new(Splicer {
        _ebpf: ebpf,
        spliced: Mutex::new(spliced),
    });
    crate::relay::relay_to(server, move |client, upstream| {
        if let Err(e) = splice(&splicer, &client, &upstream) {
            eprintln!("kernel splice: {e:#}");
            return;
        }
        std::thread::spawn(move || wait_for_an_end(client, upstream));
    })
}

/// Puts `a` and `b` in the map, each under the other's cookie, then has each look at what
/// arrived before (bytes that came while neither was in the map wait in its queue, in order,
/// until something wakes its verdict).
fn splice(splicer: &Splicer, a: &TcpStream, b: &TcpStream) -> Result<()> {
    a.set_nodelay(true)?;
    b.set_nodelay(true)?;
    {
        let mut spliced = splicer
            .spliced
            .lock()
            .map_err(|_| anyhow!("the map's lock is poisoned"))?;
        spliced.insert(cookie(b)?, a.as_raw_fd(), 0)?;
        spliced.insert(cookie(a)?, b.as_raw_fd(), 0)?;
    }
    for stream in [a, b] {
        // Setting SO_RCVLOWAT has TCP check its queue against it and call the socket's
        // data-ready hook, now the verdict: what is queued is sent on.
        set_int(stream, libc::SO_RCVLOWAT, 1)?;
    }
    Ok(())
}

/// Waits until either side hangs up or fails, then closes both (which takes them out of the
/// map). Only a hang-up wakes it: the kernel's data-ready wake-ups ask for `POLLIN`, which it
/// does not wait for.
fn wait_for_an_end(a: TcpStream, b: TcpStream) {
    let mut fds = [a.as_raw_fd(), b.as_raw_fd()].map(|fd| libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    });
    let ended = libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL;
    loop {
        // SAFETY: fds is a valid array of two pollfd for poll to fill in.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            break;
        }
        if fds.iter().any(|f| f.revents & ended != 0) {
            break;
        }
    }
}

/// The socket's cookie (`SO_COOKIE`).
fn cookie(stream: &TcpStream) -> Result<u64> {
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie and len are valid for the kernel to fill in, len saying cookie's size.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("SO_COOKIE");
    }
    Ok(cookie)
}

fn set_int(stream: &TcpStream, option: libc::c_int, value: libc::c_int) -> Result<()> {
    // SAFETY: value is a valid int for the kernel to read, its size given.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setsockopt {option}"));
    }
    Ok(())
}
