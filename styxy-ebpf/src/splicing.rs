//! A tunnel spliced in the kernel: once a tunnel's two sockets (a client's connection to a relay
//! and the relay's to the server) are in `SPLICED`, each under the other's cookie, the bytes
//! that arrive on one are sent on the other by the kernel, without waking the relay.
//!
//! Only `styxy-bench proxy` loads it, as the kernel's floor for the names' proxy's WebSocket
//! tunnels. The daemon does not: the kernel sends a redirected segment from a workqueue, a
//! wake-up per hop like a sleeping relay's, and on the machines measured the spliced tunnel's
//! round trip was slower than the proxy's own polling one (the README's benchmark section).
//!
//! A socket whose peer is not (or no longer) in the map keeps its bytes for its reader.

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
