//! One request through the proxy: its name resolved to a server, the request rewritten for it
//! (loopback target, HTTP/1.1, hop-by-hop headers dropped, `X-Forwarded-*` and `Forwarded`
//! added, `Host` kept or set to the upstream's), sent over a keep-alive connection (`pool`), and
//! the answer streamed back; a WebSocket upgrade becomes a tunnel between the two connections.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use styxy_broker::NamedServer;

use super::{pages, Scheme};
use crate::engine::Engine;
use crate::metrics::WebSocketLabels;

/// What every answer's body is: the upstream's, streamed, or a page of the proxy's own.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// The `Host` header a named server gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HostHeader {
    /// The name the client asked for (`storybook.feature-x.localhost`): what most dev servers
    /// want (Vite and Django allow `*.localhost`), and what absolute URLs they build should say.
    #[default]
    Keep,
    /// `127.0.0.1:PORT`: for servers that check `Host` against a fixed list.
    Upstream,
}

/// The client of one connection, with its address as the forwarding headers write it: made
/// once per connection. Formatting the address, and the headers' other values, with `format!`
/// on each request had cost 6,000 of the proxy's 58,000 instructions per keep-alive GET
/// (callgrind over 2,000 through a release daemon).
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    /// `X-Forwarded-For`'s element: `127.0.0.1`, `::1`.
    forwarded_for: String,
    /// `Forwarded`'s `for=` node: `127.0.0.1`, or IPv6 quoted in brackets (RFC 7239 §6).
    forwarded_node: String,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Peer {
        let forwarded_for = addr.ip().to_string();
        let forwarded_node = match addr.ip() {
            IpAddr::V4(_) => forwarded_for.clone(),
            IpAddr::V6(_) => format!("\"[{forwarded_for}]\""),
        };
        Peer {
            addr,
            forwarded_for,
            forwarded_node,
        }
    }
}

/// The forwarding headers' names, made once.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// The client side of the proxy: how it asks the named servers (over keep-alive connections,
/// see `pool`).
#[derive(Clone, Copy)]
pub struct Upstream {
    host_header: HostHeader,
    /// How long a named server may take to answer a request's head (its body may stream on
    /// for as long as it likes: server-sent events, long polls).
    head_timeout: Duration,
}

impl Upstream {
    /// The `Host` header named servers get.
    pub fn host_header(&self) -> HostHeader {
        self.host_header
    }

    /// How long a named server may take to start its answer.
    pub fn head_timeout(&self) -> Duration {
        self.head_timeout
    }

    pub fn new(host_header: HostHeader, head_timeout: Duration) -> Self {
        Upstream {
            host_header,
            head_timeout,
        }
    }
}

/// Where one request goes, and how it came.
pub struct Route<'a> {
    /// The name asked for, as the client wrote it.
    pub host: &'a str,
    pub server: &'a NamedServer,
    /// The server on loopback.
    pub target: SocketAddr,
    /// The client.
    pub peer: &'a Peer,
    pub scheme: Scheme,
    /// Whether the client reads the proxy's own pages as HTML.
    pub html: bool,
}

/// The answer to one request: the named server's, or a page saying why there is none.
pub async fn answer(
    mut request: Request<Incoming>,
    peer: &Peer,
    scheme: Scheme,
    engine: &Engine,
    upstream: &Upstream,
) -> Response<ProxyBody> {
    super::spin::activity();
    let html = pages::wants_html(request.headers());
    let Some(host) = requested_host(&request) else {
        return pages::no_host(html);
    };
    let name = styxy_broker::names::host_name(&host);
    if name == super::dashboard::HOST {
        if request.method() == hyper::Method::POST && request.uri().path() == "/focus" {
            return super::dashboard::focus_switch(request, &host, scheme, peer.addr, engine).await;
        }
        return super::dashboard::answer(&request, &host, scheme, engine);
    }
    // Held for the whole request (a page may need the server's details): a reading, not a lock.
    let names = engine.names();
    let Some(server) = names.resolve_name(&name) else {
        return pages::unknown_name(&name, &names, html);
    };
    let Some(target) = loopback_target(server) else {
        return pages::not_on_loopback(&host, server, html);
    };
    if super::websocket_h2::is_websocket_connect(&request) {
        let route = Route {
            host: &host,
            server,
            target,
            peer,
            scheme,
            html,
        };
        let (response, opened) = super::websocket_h2::tunnel(request, &route, upstream).await;
        if opened {
            engine
                .metrics()
                .proxy_websockets
                .get_or_create(&WebSocketLabels { over: "h2" })
                .inc();
        }
        return response;
    }
    let client_upgrade = upgrade_of(request.headers()).map(|_| hyper::upgrade::on(&mut request));
    let forwarded = match rewrite(request, &host, target, peer, scheme, upstream.host_header) {
        Ok(forwarded) => forwarded,
        Err(why) => return pages::bad_request(&why, html),
    };
    let answered =
        tokio::time::timeout(upstream.head_timeout, super::pool::send(target, forwarded));
    let Ok(answered) = answered.await else {
        return pages::upstream_silent(&host, server, target, upstream.head_timeout, html);
    };
    super::spin::activity();
    match answered {
        Ok(mut response) => {
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                engine
                    .metrics()
                    .proxy_websockets
                    .get_or_create(&WebSocketLabels { over: "http/1.1" })
                    .inc();
                if let Some(client_upgrade) = client_upgrade {
                    let upstream_upgrade = hyper::upgrade::on(&mut response);
                    tokio::spawn(tunnel(client_upgrade, upstream_upgrade));
                }
                return response.map(BodyExt::boxed);
            }
            strip_hop_by_hop(response.headers_mut());
            response.map(BodyExt::boxed)
        }
        Err(e) => pages::upstream_failed(&host, server, target, e.as_ref(), html),
    }
}

/// The name asked for: HTTP/2's `:authority`, else HTTP/1.1's `Host`.
fn requested_host<B>(request: &Request<B>) -> Option<String> {
    request
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            request
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .filter(|h| !h.is_empty())
}

/// Where to reach `server` on loopback: IPv4 when it listens there (or on every address),
/// else IPv6; `None` when it listens only on other addresses (the proxy reaches loopback only).
pub fn loopback_target(server: &NamedServer) -> Option<SocketAddr> {
    let on = |wanted: &[&str]| {
        server
            .addresses
            .iter()
            .any(|a| wanted.contains(&a.as_str()))
    };
    let ip = if on(&["127.0.0.1", "0.0.0.0"]) {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else if on(&["::1", "::"]) {
        IpAddr::V6(Ipv6Addr::LOCALHOST)
    } else {
        return None;
    };
    Some(SocketAddr::new(ip, server.port))
}

/// The `Upgrade` protocol a request asks for (`websocket`), when it asks for one.
fn upgrade_of(headers: &HeaderMap) -> Option<HeaderValue> {
    let connection_says_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    connection_says_upgrade
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten()
}

/// The request as the named server gets it.
fn rewrite(
    request: Request<Incoming>,
    host: &str,
    target: SocketAddr,
    peer: &Peer,
    scheme: Scheme,
    host_header: HostHeader,
) -> Result<Request<Incoming>, String> {
    let (mut parts, body) = request.into_parts();
    let upgrade = upgrade_of(&parts.headers);
    // Origin-form, the path as it came (already parsed: not parsed again); the connection is
    // to the target already.
    parts.uri = match std::mem::take(&mut parts.uri).into_parts().path_and_query {
        Some(path) => Uri::from(path),
        None => Uri::from_static("/"),
    };
    parts.version = Version::HTTP_11;
    // HTTP/2 may split cookies over several fields; HTTP/1.1 wants one.
    let mut cookies = parts.headers.get_all(header::COOKIE).iter();
    if let (Some(_), Some(_)) = (cookies.next(), cookies.next()) {
        let joined: Vec<&str> = parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if let Ok(joined) = HeaderValue::from_str(&joined.join("; ")) {
            parts.headers.insert(header::COOKIE, joined);
        }
    }
    strip_hop_by_hop(&mut parts.headers);
    if let Some(upgrade) = upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, upgrade);
    }
    set_host_and_forwarded(&mut parts.headers, host, target, peer, scheme, host_header)?;
    Ok(Request::from_parts(parts, body))
}

/// `127.0.0.1:PORT` or `[::1]:PORT`: a loopback target as a `Host`, written without
/// the formatting machinery (`SocketAddr`'s `Display` cost 1,700 instructions a request).
fn authority_of(target: SocketAddr) -> String {
    let host = match target.ip() {
        IpAddr::V4(ip) if ip == Ipv4Addr::LOCALHOST => "127.0.0.1:",
        IpAddr::V6(ip) if ip == Ipv6Addr::LOCALHOST => "[::1]:",
        _ => return target.to_string(),
    };
    [host, itoa::Buffer::new().format(target.port())].concat()
}

/// `Host` as the named server gets it, and the `X-Forwarded-*` and `Forwarded` headers.
pub fn set_host_and_forwarded(
    headers: &mut HeaderMap,
    host: &str,
    target: SocketAddr,
    peer: &Peer,
    scheme: Scheme,
    host_header: HostHeader,
) -> Result<(), String> {
    let host_value = match host_header {
        HostHeader::Keep => HeaderValue::from_str(host),
        HostHeader::Upstream => HeaderValue::from_str(&authority_of(target)),
    }
    .map_err(|_| format!("the host {host:?} is not valid"))?;
    // Room for what comes, at once rather than by growing.
    headers.reserve(5);
    headers.insert(header::HOST, host_value);
    add_forwarded(headers, host, peer, scheme);
    Ok(())
}

/// `X-Forwarded-For` (appended), `X-Forwarded-Host`, `X-Forwarded-Proto` and RFC 7239's
/// `Forwarded` (appended).
fn add_forwarded(headers: &mut HeaderMap, host: &str, peer: &Peer, scheme: Scheme) {
    let appended = |earlier: Option<&HeaderValue>, element: &str| {
        let value = match earlier.and_then(|v| v.to_str().ok()) {
            Some(earlier) => [earlier, ", ", element].concat(),
            None => element.to_string(),
        };
        HeaderValue::from_str(&value).ok()
    };
    if let Some(value) = appended(headers.get(X_FORWARDED_FOR), &peer.forwarded_for) {
        headers.insert(X_FORWARDED_FOR, value);
    }
    if let Ok(value) = HeaderValue::from_str(host) {
        headers.insert(X_FORWARDED_HOST, value);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(scheme.as_str()));
    let element = [
        "for=",
        &peer.forwarded_node,
        ";host=\"",
        host,
        "\";proto=",
        scheme.as_str(),
    ]
    .concat();
    if let Some(value) = appended(headers.get(header::FORWARDED), &element) {
        headers.insert(header::FORWARDED, value);
    }
}

/// Drops the headers that concern one connection only (RFC 9110 §7.6.1), those the
/// `Connection` header names included. Most messages carry none: one look over their names
/// finds that, where removing each of the nine by name hashed it (3,400 instructions a request
/// and its answer).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_hop_by_hop(name) || named.contains(name))
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
}

/// Whether `name` is a header of one connection only, whatever `Connection` says.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ]
    .contains(name)
        || matches!(name.as_str(), "keep-alive" | "proxy-connection")
}

/// Copies bytes both ways between an upgraded client connection and its upstream's, until
/// either ends.
pub async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (client, upstream) = tokio::join!(client, upstream);
    let (Ok(client), Ok(upstream)) = (client, upstream) else {
        return;
    };
    let mut client = super::spin::Active(TokioIo::new(client));
    let mut upstream = super::spin::Active(TokioIo::new(upstream));
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(cause = %e, "a proxied WebSocket ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(addresses: &[&str]) -> NamedServer {
        NamedServer {
            names: vec!["app.localhost".into()],
            port: 5174,
            asked: 5173,
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            pid: 7,
            cmdline: "vite".into(),
            uid: 1000,
            service_type: "dev".into(),
            instance_id: None,
            session: None,
        }
    }

    #[test]
    fn the_target_is_always_loopback() {
        assert_eq!(
            loopback_target(&server(&["0.0.0.0"])),
            Some("127.0.0.1:5174".parse().unwrap())
        );
        assert_eq!(
            loopback_target(&server(&["::1"])),
            Some("[::1]:5174".parse().unwrap())
        );
        assert_eq!(
            loopback_target(&server(&["::", "127.0.0.1"])),
            Some("127.0.0.1:5174".parse().unwrap())
        );
        assert_eq!(loopback_target(&server(&["192.168.1.5"])), None);
    }

    #[test]
    fn hop_by_hop_headers_go_and_forwarded_ones_come() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        headers.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        add_forwarded(
            &mut headers,
            "app.localhost",
            &Peer::new("[::1]:50000".parse().unwrap()),
            Scheme::Https,
        );
        assert_eq!(headers["x-forwarded-for"], "10.0.0.1, ::1");
        assert_eq!(headers["x-forwarded-host"], "app.localhost");
        assert_eq!(headers["x-forwarded-proto"], "https");
        assert_eq!(
            headers[header::FORWARDED],
            "for=\"[::1]\";host=\"app.localhost\";proto=https"
        );
    }

    #[test]
    fn a_loopback_target_is_written_as_an_authority() {
        for target in [
            "127.0.0.1:5173",
            "127.0.0.1:0",
            "127.0.0.1:65535",
            "[::1]:8",
            "10.0.0.1:80",
        ] {
            let target: SocketAddr = target.parse().unwrap();
            assert_eq!(authority_of(target), target.to_string());
        }
    }

    #[test]
    fn an_upgrade_needs_both_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert_eq!(upgrade_of(&headers), None);
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert_eq!(
            upgrade_of(&headers),
            Some(HeaderValue::from_static("websocket"))
        );
    }
}
