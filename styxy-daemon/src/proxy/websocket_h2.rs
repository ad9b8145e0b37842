//! WebSockets over HTTP/2 (RFC 8441): a browser that holds an HTTP/2 connection to a name opens
//! its WebSocket on it as an extended CONNECT (`:method CONNECT`, `:protocol websocket`) once
//! the proxy allows it (`SETTINGS_ENABLE_CONNECT_PROTOCOL`). Dev servers speak WebSocket over
//! HTTP/1.1 only, so the proxy opens an HTTP/1.1 upgrade to the named server (with a key of its
//! own: RFC 8441 has none), answers the client 200 when the server answers 101, and joins the
//! two streams.

use std::net::SocketAddr;

use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;

use super::forward::{self, ProxyBody, Route, Upstream};
use super::pages;

/// Whether `request` opens a WebSocket by RFC 8441's extended CONNECT.
pub fn is_websocket_connect<B>(request: &Request<B>) -> bool {
    request.method() == Method::CONNECT
        && request
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_ref().eq_ignore_ascii_case(b"websocket"))
}

/// Opens the WebSocket upstream and joins it to the client's stream: the answer for the client,
/// and whether the WebSocket opened.
pub async fn tunnel(
    request: Request<Incoming>,
    route: &Route<'_>,
    upstream: &Upstream,
) -> (Response<ProxyBody>, bool) {
    match open(request, route, upstream).await {
        Ok(accepted) => (accepted, true),
        Err(refused) => (refused, false),
    }
}

/// The client's 200 once the server switched protocols, else the answer that says why not.
async fn open(
    mut request: Request<Incoming>,
    route: &Route<'_>,
    upstream: &Upstream,
) -> Result<Response<ProxyBody>, Response<ProxyBody>> {
    let Route {
        host,
        server,
        target,
        peer,
        html,
    } = *route;
    let client_stream = hyper::upgrade::on(&mut request);
    let upgrade = match upgrade_request(&request, host, target, peer, upstream) {
        Ok(upgrade) => upgrade,
        Err(why) => return Err(pages::bad_request(&why, html)),
    };
    let answer = async {
        let stream = tokio::net::TcpStream::connect(target).await?;
        let _ = stream.set_nodelay(true);
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(cause = %e, "a WebSocket's upstream connection ended");
            }
        });
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(sender.send_request(upgrade).await?)
    };
    let Ok(answer) = tokio::time::timeout(upstream.head_timeout(), answer).await else {
        return Err(pages::upstream_silent(
            host,
            server,
            target,
            upstream.head_timeout(),
            html,
        ));
    };
    let mut response = match answer {
        Ok(response) => response,
        Err(e) => {
            return Err(pages::upstream_failed(
                host,
                server,
                target,
                e.as_ref(),
                html,
            ))
        }
    };
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        // The server refused the WebSocket (a wrong path, a token it did not like): its answer.
        forward::strip_hop_by_hop(response.headers_mut());
        return Err(response.map(BodyExt::boxed));
    }
    let upstream_stream = hyper::upgrade::on(&mut response);
    let mut accepted = Response::new(
        Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed(),
    );
    for name in [
        header::SEC_WEBSOCKET_PROTOCOL,
        header::SEC_WEBSOCKET_EXTENSIONS,
    ] {
        if let Some(value) = response.headers().get(&name) {
            accepted.headers_mut().insert(name, value.clone());
        }
    }
    tokio::spawn(forward::tunnel(client_stream, upstream_stream));
    Ok(accepted)
}

/// The HTTP/1.1 upgrade the named server gets for an extended CONNECT.
fn upgrade_request(
    request: &Request<Incoming>,
    host: &str,
    target: SocketAddr,
    peer: &forward::Peer,
    upstream: &Upstream,
) -> Result<Request<Empty<Bytes>>, String> {
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let mut upgrade = Request::builder()
        .method(Method::GET)
        .uri(path)
        .version(Version::HTTP_11)
        .body(Empty::new())
        .map_err(|e| format!("the WebSocket's path cannot be forwarded: {e}"))?;
    let headers = upgrade.headers_mut();
    for (name, value) in request.headers() {
        headers.append(name.clone(), value.clone());
    }
    forward::strip_hop_by_hop(headers);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::SEC_WEBSOCKET_KEY, websocket_key()?);
    if !headers.contains_key(header::SEC_WEBSOCKET_VERSION) {
        headers.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
    }
    forward::set_host_and_forwarded(headers, host, target, peer, upstream.host_header())?;
    Ok(upgrade)
}

/// A fresh `Sec-WebSocket-Key`: 16 random bytes, base64.
fn websocket_key() -> Result<HeaderValue, String> {
    use base64::Engine as _;
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| "the system's random source failed".to_string())?;
    HeaderValue::from_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
        .map_err(|e| e.to_string())
}
