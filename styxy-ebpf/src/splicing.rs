//! The names' proxy's WebSocket tunnels spliced in the kernel: once a tunnel's two sockets
//! (the client's connection to the proxy and the proxy's to the server) are in `SPLICED`, each
//! under the other's cookie, the bytes that arrive on one are sent on the other from the
//! kernel, without waking the proxy.
//!
//! Only the daemon puts sockets in `SPLICED`, and only its own; a socket whose peer is not (or no
//! longer) there keeps its bytes for the daemon to read as usual.

use aya_ebpf::bindings::sk_action::SK_PASS;
use aya_ebpf::helpers::bpf_get_socket_cookie;
use aya_ebpf::macros::stream_verdict;
use aya_ebpf::programs::SkBuffContext;

use crate::maps::SPLICED;

/// Every segment that arrives on a spliced socket: sent on its peer (the socket `SPLICED`
/// holds under this one's cookie), or, without one, passed to the socket's reader.
#[stream_verdict]
pub fn styxy_splice(ctx: SkBuffContext) -> u32 {
    // SAFETY: the helper takes the program's own sk_buff.
    let mut cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    // Redirected when the peer is found; when it is not, the helper says so and SK_PASS
    // leaves the bytes in this socket.
    let _ = SPLICED.redirect_skb(&ctx, &mut cookie, 0);
    SK_PASS
}
