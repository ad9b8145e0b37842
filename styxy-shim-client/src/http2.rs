//! A small blocking HTTP/2 client that makes one gRPC unary call at a time over a Unix socket.
//!
//! Why not tonic: a call through tonic, hyper and h2 cost the shim about 130 µs of CPU on a
//! 2-core VM, and its request went out in two writes (HEADERS, then DATA), so the daemon woke up
//! twice per call. This client sends a request — HEADERS, DATA and any control frames it owes —
//! in one `send()`, waits with `poll()` against one deadline, and keeps nothing but the
//! connection state HTTP/2 requires: stream ids, flow-control windows, the HPACK decoder's table
//! (decoding is `loona-hpack`'s), and the acknowledgements of SETTINGS and PING.
//!
//! Why it stays once the shim's calls become rare (a bind asks the daemon only when the published
//! table says its port is taken, or the kernel said EADDRINUSE): the call it makes is still made
//! from inside some program's `bind()`, and tonic cannot make it without an async runtime in that
//! program — a thread of ours, started in a host that may fork, set signal masks or count its
//! threads, which the shim's rules forbid (a per-call runtime would cost a thread spawn per call,
//! slower still). Rarity changes neither that nor the cost of the calls that remain: a moved bind
//! waits for exactly one of them. `cargo xtask bench broker` measures both clients side by side
//! (Allocate through tonic and through this client; figures in the README's performance section).
//!
//! It speaks only what a gRPC unary call over h2c needs. Anything unexpected is an error that
//! drops the connection; the caller opens a new one. The socket is non-blocking and every wait is
//! bounded by the caller's deadline, so a daemon that hangs costs the deadline, never more.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What went wrong with a call.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Nobody is listening: no socket file, or connection refused.
    #[error("cannot connect to {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    /// The deadline passed.
    #[error("no answer before the deadline")]
    Timeout,
    /// The connection ended (EOF, reset, GOAWAY) before the call was answered. Worth one retry on
    /// a fresh connection when the old one had been idle in the pool.
    #[error("connection closed: {0}")]
    Closed(String),
    /// The peer broke HTTP/2 or gRPC framing.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
}

/// The parts of a gRPC response the caller needs.
#[derive(Debug, Default)]
pub struct UnaryReply {
    /// `grpc-status` (0 is OK).
    pub grpc_status: u32,
    /// The response message (protobuf bytes), when the status is OK.
    pub message: Vec<u8>,
}

// Frame types (RFC 9113 §6).
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

// Flags.
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY_FLAG: u8 = 0x20;

// Settings identifiers.
const SETTINGS_ENABLE_PUSH: u16 = 0x2;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;

const FRAME_HEADER_LEN: usize = 9;
/// The largest frame payload we accept: the protocol default, which we never raise.
const MAX_FRAME_PAYLOAD: usize = 16_384;
/// The protocol's initial flow-control window.
const DEFAULT_WINDOW: i64 = 65_535;
/// Our receive window, per stream and for the connection: room for any answer we expect.
const RECEIVE_WINDOW: u32 = 1 << 20;
/// The largest response message we accept.
const MAX_MESSAGE: usize = 1 << 20;
/// HPACK dynamic table size: the protocol default, which we advertise by not changing it.
const HPACK_TABLE_SIZE: usize = 4096;
/// Stream ids are 31 bits; a connection that used them all is replaced.
const MAX_STREAM_ID: u32 = (1 << 31) - 1;

/// How long a call waits for its answer by polling the socket (yielding the CPU each time) before
/// it sleeps in `poll()`, when the connection's last answer came that fast. The daemon answers in
/// well under this when it is idle; a thread that sleeps instead pays for being woken on another
/// CPU, which on a VM is the largest part of a call (measured on 2 vCPUs: p50 ~125 µs sleeping,
/// ~60 µs polling first). Bounded: a bind costs at most this much extra CPU; a first call, or one
/// after a slow answer, sleeps at once and leaves the CPU to a busy daemon.
const POLL_BEFORE_SLEEP: std::time::Duration = std::time::Duration::from_micros(100);
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One HTTP/2 connection to the daemon.
pub struct Connection {
    socket: OwnedFd,
    path: PathBuf,
    next_stream: u32,
    decoder: loona_hpack::Decoder<'static>,
    /// How much DATA we may still send on the connection / on a new stream.
    send_window: i64,
    stream_initial_window: i64,
    /// DATA received since we last granted the connection more window.
    received_unacknowledged: u32,
    /// Control frames owed to the peer, sent with the next request.
    owed: Vec<u8>,
    /// Bytes read but not yet parsed.
    input: Vec<u8>,
    /// Set once the connection must not be used for another call.
    spent: bool,
    /// The last answer came within [`POLL_BEFORE_SLEEP`]: worth polling for the next one. A
    /// daemon that is slow (a loaded machine) is waited for asleep, leaving it the CPU.
    answers_fast: bool,
}

/// One parsed frame.
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Connection {
    /// Connect to the Unix socket at `path` and send the connection preface and our settings.
    /// The server's settings are read with the first answer.
    pub fn open(path: &Path, deadline: Instant) -> Result<Connection, CallError> {
        let socket = connect_unix(path, deadline)?;
        let mut conn = Connection {
            socket,
            path: path.to_path_buf(),
            next_stream: 1,
            decoder: loona_hpack::Decoder::new(),
            send_window: DEFAULT_WINDOW,
            stream_initial_window: DEFAULT_WINDOW,
            received_unacknowledged: 0,
            owed: Vec::with_capacity(256),
            input: Vec::with_capacity(4096),
            spent: false,
            answers_fast: false,
        };
        conn.decoder.set_max_allowed_table_size(HPACK_TABLE_SIZE);
        let mut hello = PREFACE.to_vec();
        let mut settings = Vec::with_capacity(12);
        for (id, value) in [
            (SETTINGS_ENABLE_PUSH, 0),
            (SETTINGS_INITIAL_WINDOW_SIZE, RECEIVE_WINDOW),
        ] {
            settings.extend_from_slice(&id.to_be_bytes());
            settings.extend_from_slice(&value.to_be_bytes());
        }
        push_frame(&mut hello, SETTINGS, 0, 0, &settings);
        let grow = RECEIVE_WINDOW - DEFAULT_WINDOW as u32;
        push_frame(&mut hello, WINDOW_UPDATE, 0, 0, &grow.to_be_bytes());
        // Sent with the first request: one write, one wake-up of the daemon.
        conn.owed = hello;
        Ok(conn)
    }

    /// The socket this connection talks to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether another call may be made on this connection.
    pub fn reusable(&self) -> bool {
        !self.spent && self.next_stream < MAX_STREAM_ID
    }

    /// One unary call: `header_block` from [`request_header_block`] names the method, `message`
    /// is the encoded request. An error answer from the daemon is an `Ok` with its `grpc_status`;
    /// an `Err` means no answer, and the connection is spent.
    pub fn unary(
        &mut self,
        header_block: &[u8],
        message: &[u8],
        deadline: Instant,
    ) -> Result<UnaryReply, CallError> {
        let result = self.unary_inner(header_block, message, deadline);
        if result.is_err() {
            self.spent = true;
        }
        result
    }

    fn unary_inner(
        &mut self,
        header_block: &[u8],
        message: &[u8],
        deadline: Instant,
    ) -> Result<UnaryReply, CallError> {
        if !self.reusable() {
            return Err(CallError::Closed("connection already spent".into()));
        }
        let stream = self.next_stream;
        self.next_stream += 2;
        let body_len = 5 + message.len();
        if body_len > MAX_FRAME_PAYLOAD || header_block.len() > MAX_FRAME_PAYLOAD {
            return Err(CallError::Protocol("request larger than one frame"));
        }
        // Flow control: wait for the peer to open its window if our request does not fit.
        while self.send_window < body_len as i64 || self.stream_initial_window < body_len as i64 {
            let frame = self.read_frame(deadline)?;
            self.handle_connection_frame(&frame, stream, deadline)?;
        }
        let mut out = std::mem::take(&mut self.owed);
        push_frame(&mut out, HEADERS, END_HEADERS, stream, header_block);
        let mut body = Vec::with_capacity(body_len);
        body.push(0); // not compressed
        body.extend_from_slice(&(message.len() as u32).to_be_bytes());
        body.extend_from_slice(message);
        push_frame(&mut out, DATA, END_STREAM, stream, &body);
        self.send_all(&out, deadline)?;
        let sent = Instant::now();
        self.send_window -= body_len as i64;
        let reply = self.read_reply(stream, deadline)?;
        self.answers_fast = sent.elapsed() < POLL_BEFORE_SLEEP;
        Ok(reply)
    }

    /// Read frames until `stream` ends, answering control frames on the way.
    fn read_reply(&mut self, stream: u32, deadline: Instant) -> Result<UnaryReply, CallError> {
        let mut header_blocks = 0;
        let mut grpc_status: Option<u32> = None;
        let mut http_ok = false;
        let mut body = Vec::new();
        loop {
            let frame = self.read_frame(deadline)?;
            match frame.kind {
                DATA => {
                    if frame.stream != stream {
                        return Err(CallError::Protocol("DATA on an unknown stream"));
                    }
                    self.received_unacknowledged = self
                        .received_unacknowledged
                        .saturating_add(frame.payload.len() as u32);
                    let data = unpad(&frame)?;
                    if body.len() + data.len() > MAX_MESSAGE + 5 {
                        return Err(CallError::Protocol("response too large"));
                    }
                    body.extend_from_slice(data);
                    if frame.flags & END_STREAM != 0 {
                        // A gRPC response ends with trailers, not with DATA.
                        return Err(CallError::Protocol("response without trailers"));
                    }
                }
                HEADERS => {
                    if frame.stream != stream {
                        return Err(CallError::Protocol("HEADERS on an unknown stream"));
                    }
                    let ends_stream = frame.flags & END_STREAM != 0;
                    let block = self.header_block(frame, deadline)?;
                    header_blocks += 1;
                    let mut decode_error = false;
                    let result = self
                        .decoder
                        .decode_with_cb(&block, |name, value| match &*name {
                            b":status" => http_ok = &*value == b"200",
                            b"grpc-status" => {
                                grpc_status = std::str::from_utf8(&value)
                                    .ok()
                                    .and_then(|s| s.parse().ok());
                                decode_error |= grpc_status.is_none();
                            }
                            _ => {}
                        });
                    if result.is_err() || decode_error {
                        return Err(CallError::Protocol("undecodable header block"));
                    }
                    if header_blocks == 1 && !http_ok {
                        return Err(CallError::Protocol("HTTP status is not 200"));
                    }
                    if ends_stream {
                        self.grant_connection_window();
                        let grpc_status =
                            grpc_status.ok_or(CallError::Protocol("no grpc-status"))?;
                        let message = if grpc_status == 0 {
                            grpc_message(&body)?
                        } else {
                            Vec::new()
                        };
                        return Ok(UnaryReply {
                            grpc_status,
                            message,
                        });
                    }
                    if header_blocks > 1 {
                        return Err(CallError::Protocol("trailers that do not end the stream"));
                    }
                }
                RST_STREAM if frame.stream == stream => {
                    return Err(CallError::Closed("stream reset by the daemon".into()));
                }
                _ => self.handle_connection_frame(&frame, stream, deadline)?,
            }
        }
    }

    /// Frames that are about the connection rather than our stream.
    fn handle_connection_frame(
        &mut self,
        frame: &Frame,
        stream: u32,
        deadline: Instant,
    ) -> Result<(), CallError> {
        match frame.kind {
            SETTINGS if frame.flags & ACK == 0 => {
                if frame.stream != 0 || !frame.payload.len().is_multiple_of(6) {
                    return Err(CallError::Protocol("malformed SETTINGS"));
                }
                for setting in frame.payload.chunks_exact(6) {
                    let id = u16::from_be_bytes([setting[0], setting[1]]);
                    let value =
                        u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
                    if id == SETTINGS_INITIAL_WINDOW_SIZE {
                        if value > MAX_STREAM_ID {
                            return Err(CallError::Protocol("window too large"));
                        }
                        self.stream_initial_window = i64::from(value);
                    }
                }
                // Acknowledged at once: the peer may be waiting for it.
                let mut ack = Vec::with_capacity(FRAME_HEADER_LEN);
                push_frame(&mut ack, SETTINGS, ACK, 0, &[]);
                self.send_now(&ack, deadline)
            }
            PING if frame.flags & ACK == 0 => {
                if frame.payload.len() != 8 {
                    return Err(CallError::Protocol("malformed PING"));
                }
                let mut pong = Vec::with_capacity(FRAME_HEADER_LEN + 8);
                push_frame(&mut pong, PING, ACK, 0, &frame.payload);
                self.send_now(&pong, deadline)
            }
            WINDOW_UPDATE => {
                let increment = frame
                    .payload
                    .get(..4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & MAX_STREAM_ID)
                    .ok_or(CallError::Protocol("malformed WINDOW_UPDATE"))?;
                if frame.stream == 0 {
                    self.send_window += i64::from(increment);
                }
                Ok(())
            }
            GOAWAY => {
                self.spent = true;
                let last = frame
                    .payload
                    .get(..4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & MAX_STREAM_ID)
                    .ok_or(CallError::Protocol("malformed GOAWAY"))?;
                if stream > last {
                    // Our stream will not be processed: the caller may try a fresh connection.
                    return Err(CallError::Closed("daemon is going away".into()));
                }
                Ok(())
            }
            PUSH_PROMISE => Err(CallError::Protocol("PUSH_PROMISE although push is off")),
            CONTINUATION => Err(CallError::Protocol("CONTINUATION without HEADERS")),
            DATA | HEADERS => Err(CallError::Protocol("unexpected frame")),
            // SETTINGS and PING acknowledgements, PRIORITY, resets of other streams and frame
            // types this client does not know are ignored, as the protocol asks.
            _ => Ok(()),
        }
    }

    /// The whole header block of a HEADERS frame and its CONTINUATION frames, unpadded and
    /// without priority fields.
    fn header_block(&mut self, frame: Frame, deadline: Instant) -> Result<Vec<u8>, CallError> {
        let mut block = unpad(&frame)?.to_vec();
        if frame.flags & PRIORITY_FLAG != 0 {
            if block.len() < 5 {
                return Err(CallError::Protocol("malformed HEADERS priority"));
            }
            block.drain(..5);
        }
        let mut ended = frame.flags & END_HEADERS != 0;
        while !ended {
            let next = self.read_frame(deadline)?;
            if next.kind != CONTINUATION || next.stream != frame.stream {
                return Err(CallError::Protocol("header block interrupted"));
            }
            if block.len() + next.payload.len() > MAX_MESSAGE {
                return Err(CallError::Protocol("header block too large"));
            }
            block.extend_from_slice(&next.payload);
            ended = next.flags & END_HEADERS != 0;
        }
        Ok(block)
    }

    /// Once half the connection window is used, owe the peer a WINDOW_UPDATE (sent with the next
    /// request, which is before the peer could need it).
    fn grant_connection_window(&mut self) {
        if self.received_unacknowledged >= RECEIVE_WINDOW / 2 {
            push_frame(
                &mut self.owed,
                WINDOW_UPDATE,
                0,
                0,
                &self.received_unacknowledged.to_be_bytes(),
            );
            self.received_unacknowledged = 0;
        }
    }

    /// Send what we owe together with `frames`.
    fn send_now(&mut self, frames: &[u8], deadline: Instant) -> Result<(), CallError> {
        let mut out = std::mem::take(&mut self.owed);
        out.extend_from_slice(frames);
        self.send_all(&out, deadline)
    }

    fn read_frame(&mut self, deadline: Instant) -> Result<Frame, CallError> {
        loop {
            if self.input.len() >= FRAME_HEADER_LEN {
                let h = &self.input[..FRAME_HEADER_LEN];
                let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                if len > MAX_FRAME_PAYLOAD {
                    return Err(CallError::Protocol("frame larger than allowed"));
                }
                if self.input.len() >= FRAME_HEADER_LEN + len {
                    let kind = h[3];
                    let flags = h[4];
                    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & MAX_STREAM_ID;
                    let payload = self.input[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len].to_vec();
                    self.input.drain(..FRAME_HEADER_LEN + len);
                    return Ok(Frame {
                        kind,
                        flags,
                        stream,
                        payload,
                    });
                }
            }
            self.fill(deadline)?;
        }
    }

    /// Read what the socket has, waiting (up to the deadline) until it has something: first by
    /// polling for [`POLL_BEFORE_SLEEP`], then asleep in `poll()`.
    fn fill(&mut self, deadline: Instant) -> Result<(), CallError> {
        let poll_until = if self.answers_fast {
            (Instant::now() + POLL_BEFORE_SLEEP).min(deadline)
        } else {
            Instant::now()
        };
        let mut chunk = [0u8; 4096];
        loop {
            // SAFETY: reading into a stack buffer of the given length from a socket we own.
            let n = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    chunk.as_mut_ptr().cast(),
                    chunk.len(),
                    0,
                )
            };
            if n > 0 {
                self.input.extend_from_slice(&chunk[..n as usize]);
                return Ok(());
            }
            if n == 0 {
                return Err(CallError::Closed("daemon closed the connection".into()));
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::WouldBlock => {
                    if Instant::now() < poll_until {
                        // Let whatever else this CPU has run meanwhile (the daemon, maybe).
                        // SAFETY: no preconditions.
                        unsafe { libc::sched_yield() };
                        continue;
                    }
                    wait(&self.socket, libc::POLLIN, deadline)?
                }
                io::ErrorKind::Interrupted => {}
                _ => return Err(CallError::Closed(err.to_string())),
            }
        }
    }

    fn send_all(&mut self, mut bytes: &[u8], deadline: Instant) -> Result<(), CallError> {
        while !bytes.is_empty() {
            // SAFETY: sending from a live slice on a socket we own. MSG_NOSIGNAL: a closed peer
            // must be an error here, never a SIGPIPE that kills the host program.
            let n = unsafe {
                libc::send(
                    self.socket.as_raw_fd(),
                    bytes.as_ptr().cast(),
                    bytes.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                bytes = &bytes[n as usize..];
                continue;
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::WouldBlock => wait(&self.socket, libc::POLLOUT, deadline)?,
                io::ErrorKind::Interrupted => {}
                _ => return Err(CallError::Closed(err.to_string())),
            }
        }
        Ok(())
    }
}

/// The header block of a gRPC request for `method` (e.g. `/styxy.v1.PortBroker/ResolveBind`):
/// the same for every call, so built once. Literal fields without indexing and without Huffman
/// coding keep the peer's decoder table untouched.
pub fn request_header_block(method: &str) -> Vec<u8> {
    let mut block = Vec::with_capacity(96);
    block.push(0x83); // :method POST (static index 3)
    block.push(0x86); // :scheme http (static index 6)
    literal_with_indexed_name(&mut block, 4, method.as_bytes()); // :path
    literal_with_indexed_name(&mut block, 1, b"localhost"); // :authority
    literal_with_indexed_name(&mut block, 31, b"application/grpc"); // content-type
    block.push(0x00); // literal, new name, not indexed
    hpack_string(&mut block, b"te");
    hpack_string(&mut block, b"trailers");
    block
}

/// A "literal header field without indexing" whose name is static table entry `index`.
fn literal_with_indexed_name(block: &mut Vec<u8>, index: usize, value: &[u8]) {
    hpack_integer(block, 0x00, 4, index);
    hpack_string(block, value);
}

/// A string literal, not Huffman coded.
fn hpack_string(block: &mut Vec<u8>, value: &[u8]) {
    hpack_integer(block, 0x00, 7, value.len());
    block.extend_from_slice(value);
}

/// An HPACK integer with an `prefix_bits`-bit prefix (RFC 7541 §5.1); `first` holds the bits
/// above the prefix.
fn hpack_integer(block: &mut Vec<u8>, first: u8, prefix_bits: u32, mut value: usize) {
    let max_prefix = (1usize << prefix_bits) - 1;
    if value < max_prefix {
        block.push(first | value as u8);
        return;
    }
    block.push(first | max_prefix as u8);
    value -= max_prefix;
    while value >= 128 {
        block.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    block.push(value as u8);
}

fn push_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = (payload.len() as u32).to_be_bytes();
    out.extend_from_slice(&len[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// The payload of a DATA or HEADERS frame without its padding.
fn unpad(frame: &Frame) -> Result<&[u8], CallError> {
    if frame.flags & PADDED == 0 {
        return Ok(&frame.payload);
    }
    let (&pad, rest) = frame
        .payload
        .split_first()
        .ok_or(CallError::Protocol("malformed padding"))?;
    rest.len()
        .checked_sub(usize::from(pad))
        .map(|end| &rest[..end])
        .ok_or(CallError::Protocol("malformed padding"))
}

/// The one message of a unary response body (gRPC length-prefixed framing).
fn grpc_message(body: &[u8]) -> Result<Vec<u8>, CallError> {
    let (prefix, rest) = body
        .split_at_checked(5)
        .ok_or(CallError::Protocol("no response message"))?;
    if prefix[0] != 0 {
        return Err(CallError::Protocol(
            "compressed message although none was offered",
        ));
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if len != rest.len() {
        return Err(CallError::Protocol("response message length mismatch"));
    }
    Ok(rest.to_vec())
}

/// A non-blocking, close-on-exec Unix stream socket connected to `path`.
fn connect_unix(path: &Path, deadline: Instant) -> Result<OwnedFd, CallError> {
    let connect_error = |source: io::Error| CallError::Connect {
        path: path.to_path_buf(),
        source,
    };
    // SAFETY: sockaddr_un is plain data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(connect_error(io::Error::from(io::ErrorKind::InvalidInput)));
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: plain socket creation.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(connect_error(io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor we own.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len()) as libc::socklen_t;
    loop {
        // SAFETY: addr is a valid sockaddr_un of at least `len` bytes.
        let rc = unsafe { libc::connect(fd, (&raw const addr).cast(), len) };
        if rc == 0 {
            return Ok(socket);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => {}
            // The daemon's accept queue is full: it is there but not keeping up. Unix sockets do
            // not complete a connect in the background, so try again until the deadline.
            Some(libc::EAGAIN) => {
                if Instant::now() >= deadline {
                    return Err(CallError::Timeout);
                }
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            _ => return Err(connect_error(err)),
        }
    }
}

/// Wait until `socket` is ready for `events`, or the deadline passes.
fn wait(socket: &OwnedFd, events: libc::c_short, deadline: Instant) -> Result<(), CallError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(CallError::Timeout);
        }
        // Round up so a sub-millisecond remainder still waits instead of spinning.
        let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        let mut pfd = libc::pollfd {
            fd: socket.as_raw_fd(),
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc > 0 {
            // Readiness, hang-up or error: the next recv/send says which.
            return Ok(());
        }
        if rc < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return Err(CallError::Closed(io::Error::last_os_error().to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hpack_integers_follow_rfc_7541_examples() {
        // C.1.1: 10 with a 5-bit prefix.
        let mut out = Vec::new();
        hpack_integer(&mut out, 0, 5, 10);
        assert_eq!(out, [0x0a]);
        // C.1.2: 1337 with a 5-bit prefix.
        out.clear();
        hpack_integer(&mut out, 0, 5, 1337);
        assert_eq!(out, [0x1f, 0x9a, 0x0a]);
        // C.1.3: 42 at an octet boundary.
        out.clear();
        hpack_integer(&mut out, 0, 8, 42);
        assert_eq!(out, [0x2a]);
    }

    #[test]
    fn request_headers_decode_to_a_grpc_request() {
        let block = request_header_block("/styxy.v1.PortBroker/ResolveBind");
        let mut decoder = loona_hpack::Decoder::new();
        let mut fields = Vec::new();
        decoder
            .decode_with_cb(&block, |n, v| fields.push((n.to_vec(), v.to_vec())))
            .expect("our own block decodes");
        let fields: Vec<(&str, &str)> = fields
            .iter()
            .map(|(n, v)| {
                (
                    std::str::from_utf8(n).expect("utf-8"),
                    std::str::from_utf8(v).expect("utf-8"),
                )
            })
            .collect();
        assert_eq!(
            fields,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/styxy.v1.PortBroker/ResolveBind"),
                (":authority", "localhost"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ]
        );
    }

    #[test]
    fn padding_and_message_framing_are_checked() {
        let padded = Frame {
            kind: DATA,
            flags: PADDED,
            stream: 1,
            payload: vec![2, b'a', b'b', 0, 0],
        };
        assert_eq!(unpad(&padded).expect("valid padding"), b"ab");
        let overpadded = Frame {
            payload: vec![9, b'a'],
            ..padded
        };
        assert!(unpad(&overpadded).is_err());
        assert_eq!(
            grpc_message(&[0, 0, 0, 0, 2, 7, 8]).expect("one message"),
            [7, 8]
        );
        assert!(grpc_message(&[0, 0, 0, 0, 3, 7, 8]).is_err());
        assert!(grpc_message(&[1, 0, 0, 0, 0]).is_err());
        assert!(grpc_message(&[0, 0]).is_err());
    }
}

/// Fuzzing the frame reader, as a property test (it runs on this toolchain, in CI, like any
/// test): a "daemon" answers with a random sequence of well-framed and broken HTTP/2 frames, and
/// the call must end — `Ok` or `Err` — before its deadline, never panic and never hang. A short
/// run in `cargo test`; a long one: `PROPTEST_CASES=100000 cargo test -p styxy-shim-client fuzz_`.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;
    use std::time::Duration;

    /// One frame of a reply: type, flags, stream, payload; or raw bytes (a broken frame).
    #[derive(Clone, Debug)]
    enum Piece {
        Frame {
            kind: u8,
            flags: u8,
            stream: u32,
            payload: Vec<u8>,
        },
        Raw(Vec<u8>),
    }

    fn piece() -> impl Strategy<Value = Piece> {
        prop_oneof![
            6 => (0u8..=10, any::<u8>(), prop_oneof![Just(0u32), Just(1), Just(3), any::<u32>()],
                  proptest::collection::vec(any::<u8>(), 0..64))
                .prop_map(|(kind, flags, stream, payload)| Piece::Frame { kind, flags, stream, payload }),
            1 => proptest::collection::vec(any::<u8>(), 0..32).prop_map(Piece::Raw),
        ]
    }

    fn encode(pieces: &[Piece]) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in pieces {
            match piece {
                Piece::Frame {
                    kind,
                    flags,
                    stream,
                    payload,
                } => push_frame(&mut out, *kind, *flags, *stream & 0x7fff_ffff, payload),
                Piece::Raw(bytes) => out.extend_from_slice(bytes),
            }
        }
        out
    }

    proptest! {
        // 64 cases unless PROPTEST_CASES says otherwise: a case that holds its connection open
        // waits out the deadline, so each costs up to ~80 ms.
        #![proptest_config(ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(64),
            ..ProptestConfig::default()
        })]

        #[test]
        fn fuzz_replies_end_before_the_deadline_without_a_panic(
            pieces in proptest::collection::vec(piece(), 0..12),
            close in any::<bool>(),
        ) {
            let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
            let path = dir.path().join("fuzz.sock");
            let listener = std::os::unix::net::UnixListener::bind(&path)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let reply = encode(&pieces);
            let server = std::thread::spawn(move || {
                if let Ok((mut peer, _)) = listener.accept() {
                    let _ = peer.write_all(&reply);
                    if !close {
                        // Hold the connection open: the client must give up at its deadline.
                        std::thread::sleep(Duration::from_millis(80));
                    }
                }
            });
            let started = Instant::now();
            let deadline = started + Duration::from_millis(50);
            if let Ok(mut connection) = Connection::open(&path, deadline) {
                let _ = connection.unary(&request_header_block("/styxy.v1.PortBroker/Status"), &[], deadline);
            }
            prop_assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
            let _ = server.join();
        }
    }
}
