//! `libstyxy_shim_client.so`: the gRPC client behind the preload shim.
//!
//! The shim `dlopen()`s this library on the first bind that needs the daemon and calls
//! [`styxy_client_resolve_bind`] (and, to name the holder in the notice of a move the kernel
//! made, [`styxy_client_who_holds`]). The call runs on the calling thread: a blocking HTTP/2 client of
//! this crate's own ([`http2`]) sends the `ResolveBind` request in one write and waits with
//! `poll()` against the query's deadline. No runtime and no threads: nothing a host program could
//! notice, a tokio host included. Connections are kept per process in a small pool, so threads
//! that bind at once each get one; after `fork()` the child starts with an empty pool of its own.

pub mod http2;

use std::ffi::{c_int, CStr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prost::Message;
use styxy_common::net::{Family, Protocol};
use styxy_common::shim::{
    BindAnswer, BindQuery, ABI_VERSION, ACTION_KEEP, ACTION_REASSIGN, RESOLVE_BAD_QUERY,
    RESOLVE_INTERNAL, RESOLVE_OK, RESOLVE_REFUSED, RESOLVE_TIMEOUT, RESOLVE_UNREACHABLE,
};
use styxy_proto::v1 as pb;

use crate::http2::{CallError, Connection};

/// The gRPC method the shim calls for a bind.
const RESOLVE_BIND_METHOD: &str = "/styxy.v1.PortBroker/ResolveBind";
/// The read-only method it calls to name who holds a port the kernel moved a bind off.
const OBSERVE_METHOD: &str = "/styxy.v1.PortBroker/Observe";
/// How many characters of the holder's command the notice shows.
const HOLDER_COMMAND_CHARS: usize = 72;
/// Idle connections kept per process: enough for the threads of a host that bind at once.
const POOL_SIZE: usize = 4;
/// gRPC status codes the shim tells apart (the others are refusals).
const GRPC_DEADLINE_EXCEEDED: u32 = 4;
const GRPC_UNAVAILABLE: u32 = 14;

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
    // SAFETY: forwarded from our caller's contract.
    unsafe { answer_with(query, answer, resolve) }
}

/// Runs `call` on the caller's query and answer: null pointers and malformed queries are
/// refused, and no panic crosses the boundary.
///
/// # Safety
/// As [`styxy_client_resolve_bind`].
unsafe fn answer_with(
    query: *const BindQuery,
    answer: *mut BindAnswer,
    call: fn(OwnedQuery, &mut BindAnswer) -> c_int,
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
            Some(query) => call(query, answer),
            None => RESOLVE_BAD_QUERY,
        }
    })
    .unwrap_or(RESOLVE_INTERNAL)
}

/// Who holds the query's port (protocol), for the notice of a move the kernel made: fills the
/// answer's holder (pid and description) with the first holder that is not the asking process.
/// Returns `RESOLVE_OK` also when nobody is found (the holder stays empty). Same contract as
/// [`styxy_client_resolve_bind`].
///
/// # Safety
/// As [`styxy_client_resolve_bind`].
#[no_mangle]
pub unsafe extern "C" fn styxy_client_who_holds(
    query: *const BindQuery,
    answer: *mut BindAnswer,
) -> c_int {
    // SAFETY: forwarded from our caller's contract.
    unsafe { answer_with(query, answer, who_holds) }
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
        let protocol = pb::Protocol::from(Protocol::from_ipproto(query.protocol)?);
        let family = pb::Family::from(Family::from_af(query.family)?);
        if query.port == 0 || query.pid == 0 {
            return None;
        }
        let string = |ptr: *const std::ffi::c_char| {
            (!ptr.is_null()).then(|| {
                // SAFETY: not null, so NUL-terminated per the contract.
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
    /// The daemon's answer message, still encoded.
    Answer(Vec<u8>),
    /// The daemon answered with an error status.
    Refused,
    /// No daemon: no socket, or nobody accepting on it.
    Unreachable,
    /// The daemon did not answer in time.
    Slow,
}

fn resolve(query: OwnedQuery, answer: &mut BindAnswer) -> c_int {
    let deadline = Instant::now() + query.timeout;
    let Some(client) = client() else {
        return RESOLVE_INTERNAL;
    };
    let message = query.request.encode_to_vec();
    let reply = client.call(&query.socket, &client.resolve_header, &message, deadline);
    match reply {
        Reply::Answer(bytes) => match pb::ResolveBindResponse::decode(bytes.as_slice()) {
            Ok(response) => fill_answer(&response, query.request.port, answer),
            Err(_) => RESOLVE_REFUSED,
        },
        Reply::Refused => RESOLVE_REFUSED,
        Reply::Unreachable => RESOLVE_UNREACHABLE,
        Reply::Slow => RESOLVE_TIMEOUT,
    }
}

fn who_holds(query: OwnedQuery, answer: &mut BindAnswer) -> c_int {
    let deadline = Instant::now() + query.timeout;
    let Some(client) = client() else {
        return RESOLVE_INTERNAL;
    };
    let request = pb::ObserveRequest {
        port: query.request.port,
        protocol: query.request.protocol,
    };
    let message = request.encode_to_vec();
    match client.call(&query.socket, &client.observe_header, &message, deadline) {
        Reply::Answer(bytes) => match pb::ObserveResponse::decode(bytes.as_slice()) {
            Ok(response) => {
                let asker = query.request.pid;
                if let Some(holder) = response.holders.iter().find(|h| h.pid != asker) {
                    answer.holder_pid = holder.pid;
                    answer.set_holder_name(&holder_description(holder, query.request.port));
                }
                RESOLVE_OK
            }
            Err(_) => RESOLVE_REFUSED,
        },
        Reply::Refused => RESOLVE_REFUSED,
        Reply::Unreachable => RESOLVE_UNREACHABLE,
        Reply::Slow => RESOLVE_TIMEOUT,
    }
}

/// How the notice names the holder of `asked`: its command in backticks (its port arguments
/// kept when cut) and its session's name — "`python3 -m http.server 8000`, session feature-x". A lease
/// or a hold has no command (and no address): "a lease", with its session.
fn holder_description(holder: &pb::Holder, asked: u32) -> String {
    let ports = u16::try_from(asked).map(|p| vec![p]).unwrap_or_default();
    let command = styxy_common::command_line::shown(
        &holder.cmdline,
        &holder.comm,
        HOLDER_COMMAND_CHARS,
        &ports,
    );
    let mut text = if !command.is_empty() {
        format!("`{command}`")
    } else if holder.addresses.is_empty() && holder.port != 0 {
        "a lease".to_string()
    } else {
        "another process".to_string()
    };
    // The session by its name (`feature-x`), by its id from a daemon that does not say the name.
    let session = if holder.session_name.is_empty() {
        &holder.instance_id
    } else {
        &holder.session_name
    };
    if !session.is_empty() {
        text.push_str(", session ");
        text.push_str(session);
    }
    text
}

fn fill_answer(response: &pb::ResolveBindResponse, asked: u32, answer: &mut BindAnswer) -> c_int {
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
        answer.set_holder_name(&holder_description(holder, asked));
    }
    RESOLVE_OK
}

/// The connections of one process.
struct Client {
    pid: u32,
    /// The request header blocks of `ResolveBind` and `Observe`, the same for every call.
    resolve_header: Vec<u8>,
    observe_header: Vec<u8>,
    idle: Mutex<Vec<Connection>>,
}

impl Client {
    /// One unary call (`header_block` names the method). A connection taken from the pool may
    /// have been closed by a daemon that restarted since: then the call is made once more on a
    /// fresh connection.
    fn call(&self, socket: &Path, header_block: &[u8], message: &[u8], deadline: Instant) -> Reply {
        let mut pooled = self.take_idle(socket);
        loop {
            let reused = pooled.is_some();
            let mut conn = match pooled.take() {
                Some(conn) => conn,
                None => match Connection::open(socket, deadline) {
                    Ok(conn) => conn,
                    Err(CallError::Timeout) => return Reply::Slow,
                    Err(_) => return Reply::Unreachable,
                },
            };
            match conn.unary(header_block, message, deadline) {
                Ok(reply) => {
                    self.put_idle(conn);
                    return match reply.grpc_status {
                        0 => Reply::Answer(reply.message),
                        GRPC_UNAVAILABLE => Reply::Unreachable,
                        GRPC_DEADLINE_EXCEEDED => Reply::Slow,
                        _ => Reply::Refused,
                    };
                }
                Err(CallError::Closed(_)) if reused => continue,
                Err(CallError::Timeout) => return Reply::Slow,
                // A daemon that breaks the protocol is treated as absent: bind as asked.
                Err(_) => return Reply::Unreachable,
            }
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Connection>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take_idle(&self, socket: &Path) -> Option<Connection> {
        let mut idle = self.idle();
        idle.retain(|c| c.path() == socket);
        idle.pop()
    }

    fn put_idle(&self, conn: Connection) {
        if !conn.reusable() {
            return;
        }
        let mut idle = self.idle();
        if idle.len() < POOL_SIZE {
            idle.push(conn);
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
    let fresh = Box::into_raw(Box::new(Client {
        pid,
        resolve_header: http2::request_header_block(RESOLVE_BIND_METHOD),
        observe_header: http2::request_header_block(OBSERVE_METHOD),
        idle: Mutex::new(Vec::new()),
    }));
    match CLIENT.compare_exchange(current, fresh, Ordering::AcqRel, Ordering::Acquire) {
        // The replaced client, if any, was the parent's before a fork: it is left as it is
        // (leaked), never dropped, since its lock may be held by a thread that does not exist
        // here. Its connections are the parent's; this process never uses them.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn query(socket: &CStr) -> BindQuery {
        BindQuery {
            pid: std::process::id(),
            port: 8000,
            protocol: Protocol::Tcp.ipproto(),
            family: Family::Inet.af(),
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
    fn the_holder_is_named_by_command_and_session() {
        let socket = pb::Holder {
            pid: 4121,
            comm: "python3".into(),
            cmdline: "/usr/bin/python3 -m http.server 8000".into(),
            addresses: vec!["127.0.0.1".into()],
            port: 8000,
            instance_id: "feature-x".into(),
            ..Default::default()
        };
        assert_eq!(
            holder_description(&socket, 8000),
            "`python3 -m http.server 8000`, session feature-x"
        );
        // Named: by its name, not its id.
        let named = pb::Holder {
            instance_id: "claude-5f0c2a".into(),
            session_name: "shop".into(),
            ..socket.clone()
        };
        assert_eq!(
            holder_description(&named, 8000),
            "`python3 -m http.server 8000`, session shop"
        );
        let outside = pb::Holder {
            instance_id: String::new(),
            ..socket.clone()
        };
        assert_eq!(
            holder_description(&outside, 8000),
            "`python3 -m http.server 8000`"
        );
        let long = pb::Holder {
            cmdline: format!("node {} --port 8000", "/very/long/path".repeat(10)),
            ..socket.clone()
        };
        let text = holder_description(&long, 8000);
        assert!(
            text.contains(" … --port 8000`, session feature-x"),
            "{text}"
        );
        let lease = pb::Holder {
            pid: 0,
            port: 8000,
            instance_id: "feature-x".into(),
            ..Default::default()
        };
        assert_eq!(
            holder_description(&lease, 8000),
            "a lease, session feature-x"
        );
        let unknown = pb::Holder {
            addresses: vec!["0.0.0.0".into()],
            port: 8000,
            ..Default::default()
        };
        assert_eq!(holder_description(&unknown, 8000), "another process");
    }

    #[test]
    fn malformed_queries_are_refused_without_touching_the_daemon() {
        let mut q = query(c"/nonexistent/styxy.sock");
        q.protocol = 99;
        let mut answer = BindAnswer::empty();
        // SAFETY: valid pointers for the call.
        let rc = unsafe { styxy_client_resolve_bind(&q, &mut answer) };
        assert_eq!(rc, RESOLVE_BAD_QUERY);
        // SAFETY: null pointers are checked first.
        let rc = unsafe { styxy_client_resolve_bind(std::ptr::null(), &mut answer) };
        assert_eq!(rc, RESOLVE_BAD_QUERY);
    }
}
