//! `libstyxy_shim_client.so`: the gRPC client behind the preload shim.
//!
//! The shim `dlopen()`s this library on the first bind that needs the daemon and calls
//! [`styxy_client_resolve_bind`]. The call runs on the calling thread, in a single-threaded tokio
//! runtime of this library's own, with one connection to the daemon per process: no hand-off to
//! another thread (each costs a wake-up and a context switch, which dominated the cost of a call).
//! This library carries its own copy of tokio, loaded `RTLD_LOCAL`, so a host that is itself a
//! tokio program never sees this runtime, and its threads may call in from inside theirs. Several
//! threads may call at once: tokio lets one drive the runtime while the others wait for their
//! answers. The runtime is per process: after `fork()` the child starts its own.

use std::ffi::{c_int, CStr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use styxy_common::shim::{
    BindAnswer, BindQuery, ABI_VERSION, ACTION_KEEP, ACTION_REASSIGN, FAMILY_INET, FAMILY_INET6,
    PROTO_TCP, PROTO_UDP, RESOLVE_BAD_QUERY, RESOLVE_INTERNAL, RESOLVE_OK, RESOLVE_REFUSED,
    RESOLVE_TIMEOUT, RESOLVE_UNREACHABLE,
};
use styxy_proto::v1 as pb;
use tonic::transport::{Channel, Endpoint};

/// The ABI version this library implements; the shim refuses a library with another.
#[no_mangle]
pub extern "C" fn styxy_client_abi_version() -> u32 {
    ABI_VERSION
}

/// Ask the daemon about one bind. Returns one of the `RESOLVE_*` codes; fills `answer` on
/// `RESOLVE_OK`. Never panics across the boundary and never blocks much longer than the query's
/// deadline.
///
/// # Safety
/// `query` and `answer` are null or valid for reads / writes of their types; the strings in the
/// query are null or NUL-terminated and live for the duration of the call.
#[no_mangle]
pub unsafe extern "C" fn styxy_client_resolve_bind(
    query: *const BindQuery,
    answer: *mut BindAnswer,
) -> c_int {
    if query.is_null() || answer.is_null() {
        return RESOLVE_BAD_QUERY;
    }
    std::panic::catch_unwind(|| {
        // SAFETY: non-null and valid per the caller's contract.
        let query = unsafe { &*query };
        // SAFETY: as above.
        let answer = unsafe { &mut *answer };
        // SAFETY: the query's strings are valid per the caller's contract.
        match unsafe { OwnedQuery::from_abi(query) } {
            Some(query) => resolve(query, answer),
            None => RESOLVE_BAD_QUERY,
        }
    })
    .unwrap_or(RESOLVE_INTERNAL)
}

/// A [`BindQuery`] copied out of the caller's memory: the request owns its strings.
struct OwnedQuery {
    request: pb::ResolveBindRequest,
    timeout: Duration,
    socket: PathBuf,
}

impl OwnedQuery {
    /// # Safety
    /// The query's string pointers are null or NUL-terminated.
    unsafe fn from_abi(query: &BindQuery) -> Option<OwnedQuery> {
        let protocol = match query.protocol {
            PROTO_TCP => pb::Protocol::Tcp,
            PROTO_UDP => pb::Protocol::Udp,
            _ => return None,
        };
        let family = match query.family {
            FAMILY_INET => pb::Family::Inet,
            FAMILY_INET6 => pb::Family::Inet6,
            _ => return None,
        };
        if query.port == 0 || query.pid == 0 {
            return None;
        }
        let string = |ptr: *const std::ffi::c_char| {
            // SAFETY: null or NUL-terminated per the contract.
            (!ptr.is_null()).then(|| {
                unsafe { CStr::from_ptr(ptr) }
                    .to_string_lossy()
                    .into_owned()
            })
        };
        let socket = string(query.socket_path)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(styxy_common::paths::find_socket);
        let instance_id = string(query.instance_id).filter(|s| !s.is_empty());
        Some(OwnedQuery {
            request: pb::ResolveBindRequest {
                pid: query.pid,
                port: u32::from(query.port),
                protocol: protocol as i32,
                family: family as i32,
                reuseport: false,
                instance_id,
            },
            timeout: Duration::from_millis(u64::from(query.timeout_ms.max(1))),
            socket,
        })
    }
}

enum Reply {
    Answer(pb::ResolveBindResponse),
    /// The daemon answered with an error status.
    Refused,
    /// No daemon: no socket, or nobody accepting on it.
    Unreachable,
    /// The daemon did not answer in time.
    Slow,
}

fn resolve(query: OwnedQuery, answer: &mut BindAnswer) -> c_int {
    let Some(client) = client() else {
        return RESOLVE_INTERNAL;
    };
    let channel = client.channel(&query.socket);
    match client.runtime.block_on(ask(channel, query)) {
        Reply::Answer(response) => fill_answer(&response, answer),
        Reply::Refused => RESOLVE_REFUSED,
        Reply::Unreachable => RESOLVE_UNREACHABLE,
        Reply::Slow => RESOLVE_TIMEOUT,
    }
}

fn fill_answer(response: &pb::ResolveBindResponse, answer: &mut BindAnswer) -> c_int {
    let Ok(port) = u16::try_from(response.port) else {
        return RESOLVE_REFUSED;
    };
    *answer = BindAnswer::empty();
    answer.port = port;
    answer.action = if response.action == pb::BindAction::Reassign as i32 {
        ACTION_REASSIGN
    } else {
        ACTION_KEEP
    };
    if let Some(holder) = &response.holder {
        answer.holder_pid = holder.pid;
        let name = if holder.service_type.is_empty() {
            &holder.comm
        } else {
            &holder.service_type
        };
        answer.set_holder_name(name);
    }
    RESOLVE_OK
}

/// The runtime and the connection of one process.
struct Client {
    pid: u32,
    runtime: tokio::runtime::Runtime,
    channel: Mutex<Option<(PathBuf, Channel)>>,
}

impl Client {
    /// The channel to `socket`, created on first use (it connects lazily, and again after a failure).
    fn channel(&self, socket: &Path) -> Channel {
        let mut slot = self.channel.lock().unwrap_or_else(|e| e.into_inner());
        match &*slot {
            Some((path, channel)) if path == socket => channel.clone(),
            _ => {
                // Creating a channel spawns its connection task: inside the runtime.
                let _inside = self.runtime.enter();
                let channel = unix_channel(socket.to_path_buf());
                *slot = Some((socket.to_path_buf(), channel.clone()));
                channel
            }
        }
    }
}

/// The current process's client. An atomic, not a lock: after a `fork()` the child must not
/// find a lock that a thread of the parent held.
static CLIENT: AtomicPtr<Client> = AtomicPtr::new(std::ptr::null_mut());

fn client() -> Option<&'static Client> {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() } as u32;
    let current = CLIENT.load(Ordering::Acquire);
    // SAFETY: CLIENT only ever holds leaked (never freed) clients.
    if let Some(existing) = unsafe { current.as_ref() } {
        if existing.pid == pid {
            return Some(existing);
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    let fresh = Box::into_raw(Box::new(Client {
        pid,
        runtime,
        channel: Mutex::new(None),
    }));
    match CLIENT.compare_exchange(current, fresh, Ordering::AcqRel, Ordering::Acquire) {
        // The replaced client, if any, was the parent's before a fork: it is left as it is
        // (leaked), never dropped, since its runtime's state is not this process's to tear down.
        // SAFETY: fresh was just leaked from a Box and is never freed.
        Ok(_) => Some(unsafe { &*fresh }),
        Err(winner) => {
            // Another thread of this process made one first: use it, drop ours (unused).
            // SAFETY: fresh came from Box::into_raw above and was never shared.
            drop(unsafe { Box::from_raw(fresh) });
            // SAFETY: winner is a leaked client (never freed).
            unsafe { winner.as_ref() }.filter(|c| c.pid == pid)
        }
    }
}

/// A channel that dials the daemon's Unix socket when first used, and again after a failure.
fn unix_channel(path: PathBuf) -> Channel {
    // The URI is required by the API but unused: the connector dials the socket.
    Endpoint::from_static("http://localhost").connect_with_connector_lazy(tower::service_fn(
        move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        },
    ))
}

async fn ask(channel: Channel, query: OwnedQuery) -> Reply {
    let mut client = pb::port_broker_client::PortBrokerClient::new(channel);
    match tokio::time::timeout(query.timeout, client.resolve_bind(query.request)).await {
        Ok(Ok(response)) => Reply::Answer(response.into_inner()),
        Ok(Err(status)) => match status.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown => Reply::Unreachable,
            tonic::Code::DeadlineExceeded => Reply::Slow,
            _ => Reply::Refused,
        },
        Err(_elapsed) => Reply::Slow,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(socket: &CStr) -> BindQuery {
        BindQuery {
            pid: std::process::id(),
            port: 8000,
            protocol: PROTO_TCP,
            family: FAMILY_INET,
            timeout_ms: 50,
            socket_path: socket.as_ptr(),
            instance_id: std::ptr::null(),
        }
    }

    #[test]
    fn no_daemon_means_unreachable_within_the_deadline() {
        let q = query(c"/nonexistent/styxy.sock");
        let mut answer = BindAnswer::empty();
        let started = std::time::Instant::now();
        // SAFETY: valid pointers for the call.
        let rc = unsafe { styxy_client_resolve_bind(&q, &mut answer) };
        assert_eq!(rc, RESOLVE_UNREACHABLE);
        // A generous bound: the point is that it does not hang.
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn malformed_queries_are_refused_without_touching_the_daemon() {
        let mut q = query(c"/nonexistent/styxy.sock");
        q.protocol = 99;
        let mut answer = BindAnswer::empty();
        // SAFETY: valid pointers for the call.
        assert_eq!(
            unsafe { styxy_client_resolve_bind(&q, &mut answer) },
            RESOLVE_BAD_QUERY
        );
        // SAFETY: null pointers are checked first.
        let rc = unsafe { styxy_client_resolve_bind(std::ptr::null(), &mut answer) };
        assert_eq!(rc, RESOLVE_BAD_QUERY);
    }
}
