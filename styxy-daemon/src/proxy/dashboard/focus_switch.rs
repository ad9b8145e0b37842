//! The dashboard's focus switch: `POST /focus` with `session=ID` (or `clear=1`), as the page's
//! forms send it, gives the focus to that session for the user whose browser sent it (see
//! `engine::focus`), then sends the browser back to the page.
//!
//! Who asks: on loopback TCP there is no `SO_PEERCRED`, but the kernel knows whose the client's
//! socket is — the connection's other end, found through sock_diag by its address and port. A
//! request another site makes the browser send carries that site's `Origin`, so only a request
//! whose `Origin` is the dashboard's own is taken (a page elsewhere cannot switch your focus).

use std::net::SocketAddr;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use netlink_packet_sock_diag::inet::StateFlags;

use super::{full, text};
use crate::engine::Engine;
use crate::observe::sockets::SockDiag;
use crate::proxy::forward::ProxyBody;
use crate::proxy::Scheme;

/// The longest form body taken.
const BODY_MAX: usize = 4096;

/// What the form asks.
#[derive(Debug, PartialEq, Eq)]
pub enum Asked {
    Focus(String),
    Clear,
}

/// Reads the form (`application/x-www-form-urlencoded`).
pub fn asked(body: &[u8]) -> Option<Asked> {
    let mut session = None;
    let mut clear = false;
    for (key, value) in form_urlencoded::parse(body) {
        match key.as_ref() {
            "session" if !value.trim().is_empty() => session = Some(value.trim().to_string()),
            "clear" => clear = value == "1",
            _ => {}
        }
    }
    match (session, clear) {
        (Some(session), false) => Some(Asked::Focus(session)),
        (None, true) => Some(Asked::Clear),
        _ => None,
    }
}

/// The uid owning the client's end of the connection from `peer` (a loopback connection of
/// this machine), if exactly one socket is that end.
fn uid_of_peer(peer: SocketAddr) -> Option<u32> {
    let mut diag = SockDiag::new().ok()?;
    let ends: Vec<u32> = diag
        .tcp_connections(StateFlags::ESTABLISHED)
        .ok()?
        .into_iter()
        .filter(|c| {
            c.is_loopback()
                && c.id.source_port == peer.port()
                && same_address(c.id.source_address, peer.ip())
        })
        .map(|c| c.uid)
        .collect();
    match ends.as_slice() {
        [uid] => Some(*uid),
        _ => None,
    }
}

/// IPv4 and its IPv6-mapped form are one address.
fn same_address(a: std::net::IpAddr, b: std::net::IpAddr) -> bool {
    a.to_canonical() == b.to_canonical()
}

/// The answer to `POST /focus`.
pub async fn answer(
    request: Request<Incoming>,
    host: &str,
    scheme: Scheme,
    peer: SocketAddr,
    engine: &Engine,
) -> Response<ProxyBody> {
    let origin = format!("{}://{host}", scheme.as_str());
    let from_the_page = request
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .is_some_and(|o| o.eq_ignore_ascii_case(&origin));
    if !from_the_page {
        return text(
            StatusCode::FORBIDDEN,
            &format!(
                "The focus is switched from the dashboard's own page ({origin}/), whose requests \
                 carry Origin: {origin}; or with `styxy focus SESSION`.\n"
            ),
        );
    }
    let body = match http_body_util::Limited::new(request.into_body(), BODY_MAX)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                "The focus form is a few bytes: session=ID or clear=1.\n",
            )
        }
    };
    let Some(asked) = asked(&body) else {
        return text(
            StatusCode::BAD_REQUEST,
            "Send session=ID (the session to focus) or clear=1.\n",
        );
    };
    let Some(uid) = tokio::task::spawn_blocking(move || uid_of_peer(peer))
        .await
        .ok()
        .flatten()
    else {
        return text(
            StatusCode::FORBIDDEN,
            "Whose request this is could not be told (the connection's other end is not a \
             loopback socket of this machine): use `styxy focus SESSION`.\n",
        );
    };
    let handle = match &asked {
        Asked::Focus(session) => Some(session.as_str()),
        Asked::Clear => None,
    };
    match engine.set_focus(handle, uid).await {
        Ok(outcome) => {
            tracing::info!(uid, focus = ?outcome.after, closed = outcome.closed, "focus switched from the dashboard");
            let mut response = full(StatusCode::SEE_OTHER, String::new(), "text/plain");
            response
                .headers_mut()
                .insert(header::LOCATION, HeaderValue::from_static("/"));
            response
        }
        Err(e) => {
            let status = crate::rpc::convert::engine_error(e);
            let code = match status.code() {
                tonic::Code::NotFound => StatusCode::NOT_FOUND,
                tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
                tonic::Code::FailedPrecondition => StatusCode::CONFLICT,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            text(code, &format!("{}\n", status.message()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_form_asks_for_one_session_or_a_clear() {
        assert_eq!(
            asked(b"session=claude-1%2Dx"),
            Some(Asked::Focus("claude-1-x".into()))
        );
        assert_eq!(asked(b"clear=1"), Some(Asked::Clear));
        for bad in [
            &b""[..],
            b"session=",
            b"session=a&clear=1",
            b"clear=0",
            b"\xff\xfe",
        ] {
            assert_eq!(asked(bad), None, "{bad:?}");
        }
    }

    proptest::proptest! {
        /// Any body: an answer or none, never a panic.
        #[test]
        fn fuzz_any_form_body(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = asked(&body);
        }
    }
}
