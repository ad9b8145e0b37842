//! One request through the proxy: its name resolved to a server, the request rewritten for it
//! (loopback target, HTTP/1.1, hop-by-hop headers dropped, `X-Forwarded-*` and `Forwarded`
//! added, `Host` kept or set to the upstream's), sent over a keep-alive connection (`pool`), and
//! the answer streamed back; a WebSocket upgrade becomes a tunnel between the two connections.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
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

/// The client of one connection and the scheme it speaks, and the forwarding headers' values
/// for it, made once per connection (its address) or once per name it asks for (a browser's connection asks for
/// one). Formatting them on each request had cost 6,000 of the proxy's 58,000 instructions per
/// keep-alive GET, and making them for each request again 1,900 of 43,000 (callgrind over
/// 2,000 through a release daemon).
#[derive(Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    /// Whether the connection is TLS (`proto=` and `X-Forwarded-Proto`).
    pub scheme: Scheme,
    /// `X-Forwarded-For`'s element: `127.0.0.1`, `::1`.
    forwarded_for: HeaderValue,
    /// `Forwarded`'s `for=` node: `127.0.0.1`, or IPv6 quoted in brackets (RFC 7239 §6).
    forwarded_node: String,
    /// The values for the name this connection asked for last.
    last_name: Mutex<Option<NameValues>>,
}

/// The header values one name asked for over one connection gets.
#[derive(Debug)]
struct NameValues {
    /// The name as the client wrote it (`Host`, `:authority`).
    host: Box<str>,
    /// It as a header value: `Host` (kept) and `X-Forwarded-Host`.
    host_value: HeaderValue,
    /// `Forwarded`'s element for this client and name.
    forwarded: HeaderValue,
}

impl Peer {
    pub fn new(addr: SocketAddr, scheme: Scheme) -> Peer {
        let forwarded_for = addr.ip().to_string();
        let forwarded_node = match addr.ip() {
            IpAddr::V4(_) => forwarded_for.clone(),
            IpAddr::V6(_) => format!("\"[{forwarded_for}]\""),
        };
        Peer {
            addr,
            scheme,
            // An address is digits, dots, colons and hex: always a valid value.
            forwarded_for: HeaderValue::from_str(&forwarded_for)
                .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            forwarded_node,
            last_name: Mutex::new(None),
        }
    }

    /// The values for `host` (`Host`, `Forwarded`): those made for the last request when it
    /// asked for the same name, else new ones (kept for the next).
    fn values_for(&self, host: &str) -> Result<(HeaderValue, HeaderValue), String> {
        // A poisoned lock only means a panic elsewhere mid-update: the values are remade.
        let mut last = self.last_name.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(values) = last.as_ref() {
            if &*values.host == host {
                return Ok((values.host_value.clone(), values.forwarded.clone()));
            }
        }
        let invalid = || format!("the host {host:?} is not valid");
        let host_value = HeaderValue::from_str(host).map_err(|_| invalid())?;
        let element = [
            "for=",
            &self.forwarded_node,
            ";host=\"",
            host,
            "\";proto=",
            self.scheme.as_str(),
        ]
        .concat();
        let forwarded = HeaderValue::from_str(&element).map_err(|_| invalid())?;
        *last = Some(NameValues {
            host: host.into(),
            host_value: host_value.clone(),
            forwarded: forwarded.clone(),
        });
        Ok((host_value, forwarded))
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
    /// Whether the client reads the proxy's own pages as HTML.
    pub html: bool,
}

/// The answer to one request: the named server's, or a page saying why there is none.
pub async fn answer(
    mut request: Request<Incoming>,
    peer: &Peer,
    engine: &Engine,
    upstream: &Upstream,
) -> Response<ProxyBody> {
    super::spin::activity();
    let html = pages::wants_html(request.headers());
    let Some(host) = requested_host(&request) else {
        return pages::no_host(html);
    };
    let Ok(host) = host.to_str() else {
        return pages::no_host(html);
    };
    let name = styxy_broker::names::host_name(host);
    if name == super::dashboard::HOST {
        if request.method() == hyper::Method::POST && request.uri().path() == "/focus" {
            return super::dashboard::focus_switch(request, host, peer.scheme, peer.addr, engine)
                .await;
        }
        return super::dashboard::answer(&request, host, peer.scheme, engine);
    }
    // Held for the whole request (a page may need the server's details): a reading, not a lock.
    let names = engine.names();
    let Some(server) = names.resolve_name(&name) else {
        return pages::unknown_name(&name, &names, html);
    };
    let Some(target) = loopback_target(server) else {
        return pages::not_on_loopback(host, server, html);
    };
    if super::websocket_h2::is_websocket_connect(&request) {
        let route = Route {
            host,
            server,
            target,
            peer,
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
    let upgrade = upgrade_of(request.headers());
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));
    let forwarded = match rewrite(request, upgrade, host, target, peer, upstream.host_header) {
        Ok(forwarded) => forwarded,
        Err(why) => return pages::bad_request(&why, html),
    };
    let answered =
        tokio::time::timeout(upstream.head_timeout, super::pool::send(target, forwarded));
    let Ok(answered) = answered.await else {
        return pages::upstream_silent(host, server, target, upstream.head_timeout, html);
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
        Err(e) => pages::upstream_failed(host, server, target, e.as_ref(), html),
    }
}

/// The name asked for: HTTP/2's `:authority`, else HTTP/1.1's `Host` (as received: a share
/// of the request's buffer, not a copy).
fn requested_host<B>(request: &Request<B>) -> Option<HeaderValue> {
    let host = match request.uri().authority() {
        Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
        None => request.headers().get(header::HOST).cloned(),
    };
    host.filter(|h| !h.is_empty())
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

/// The request as the named server gets it, asking for `upgrade` (`upgrade_of` its headers)
/// when the client did.
fn rewrite(
    request: Request<Incoming>,
    upgrade: Option<HeaderValue>,
    host: &str,
    target: SocketAddr,
    peer: &Peer,
    host_header: HostHeader,
) -> Result<Request<Incoming>, String> {
    let (mut parts, body) = request.into_parts();
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
    set_host_and_forwarded(&mut parts.headers, host, target, peer, host_header)?;
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

/// `Host` as the named server gets it, and `X-Forwarded-For` (appended to), `X-Forwarded-Host`,
/// `X-Forwarded-Proto` and RFC 7239's `Forwarded` (appended to).
pub fn set_host_and_forwarded(
    headers: &mut HeaderMap,
    host: &str,
    target: SocketAddr,
    peer: &Peer,
    host_header: HostHeader,
) -> Result<(), String> {
    let (name_value, forwarded) = peer.values_for(host)?;
    let host_value = match host_header {
        HostHeader::Keep => name_value.clone(),
        HostHeader::Upstream => HeaderValue::from_str(&authority_of(target))
            .map_err(|_| format!("the address {target} is not a valid host"))?,
    };
    // Room for what comes, at once rather than by growing.
    headers.reserve(5);
    headers.insert(header::HOST, host_value);
    append(headers, X_FORWARDED_FOR, &peer.forwarded_for);
    headers.insert(X_FORWARDED_HOST, name_value);
    headers.insert(
        X_FORWARDED_PROTO,
        HeaderValue::from_static(peer.scheme.as_str()),
    );
    append(headers, header::FORWARDED, &forwarded);
    Ok(())
}

/// Sets `name` to `element`, after what earlier proxies wrote there, in one field (`a, b, c`,
/// however many fields they came in); earlier values that are not text are dropped.
fn append(headers: &mut HeaderMap, name: HeaderName, element: &HeaderValue) {
    match headers.entry(name) {
        header::Entry::Vacant(vacant) => {
            vacant.insert(element.clone());
        }
        header::Entry::Occupied(mut occupied) => {
            let mut joined: Vec<&[u8]> = occupied
                .iter()
                .filter(|v| v.to_str().is_ok())
                .map(HeaderValue::as_bytes)
                .collect();
            joined.push(element.as_bytes());
            let joined = HeaderValue::from_bytes(&joined.join(&b", "[..]))
                .unwrap_or_else(|_| element.clone());
            occupied.insert(joined);
        }
    }
}

/// Drops the headers that concern one connection only (RFC 9110 §7.6.1), those the
/// `Connection` header names included. Most requests carry none: one look over their names
/// finds that, where removing each of the nine by name hashed it (3,400 instructions a request
/// and its answer). Most answers carry `Connection: keep-alive` and `Keep-Alive`: tokens naming
/// what is dropped anyway are not parsed as names, and nothing is collected (parsing and
/// collecting them had cost 1,000 instructions an answer more).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // What `Connection` names beyond those: rare (`Connection: x-secret`), parsed only then.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|token| !token.eq_ignore_ascii_case("close") && !is_hop_by_hop_token(token))
        .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
        .collect();
    // A handful of headers, a few to drop: looking again after each removal costs less than
    // a list of them.
    while let Some(doomed) = headers
        .keys()
        .find(|name| is_hop_by_hop(name) || named.contains(name))
        .cloned()
    {
        headers.remove(doomed);
    }
}

/// Whether `name` is a header of one connection only, whatever `Connection` says.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    is_hop_by_hop_lowercase(name.as_str())
}

/// The same for a name in lowercase (a `HeaderName`'s): one comparison of lengths, then of the
/// few names that long.
fn is_hop_by_hop_lowercase(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authorization"
            | "proxy-authenticate"
            | "keep-alive"
            | "proxy-connection"
    )
}

/// Whether a `Connection` token names a header of one connection only, in any case.
fn is_hop_by_hop_token(token: &str) -> bool {
    if token.bytes().any(|b| b.is_ascii_uppercase()) {
        is_hop_by_hop_lowercase(&token.to_ascii_lowercase())
    } else {
        is_hop_by_hop_lowercase(token)
    }
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
        let peer = Peer::new("[::1]:50000".parse().unwrap(), Scheme::Https);
        let target = "127.0.0.1:5174".parse().unwrap();
        let forward = |headers: &mut HeaderMap, peer: &Peer, host: &str, host_header| {
            set_host_and_forwarded(headers, host, target, peer, host_header).unwrap()
        };
        forward(&mut headers, &peer, "app.localhost", HostHeader::Keep);
        assert_eq!(headers[header::HOST], "app.localhost");
        assert_eq!(headers["x-forwarded-for"], "10.0.0.1, ::1");
        assert_eq!(headers["x-forwarded-host"], "app.localhost");
        assert_eq!(headers["x-forwarded-proto"], "https");
        assert_eq!(
            headers[header::FORWARDED],
            "for=\"[::1]\";host=\"app.localhost\";proto=https"
        );
        // The next request on the connection asks for another name: nothing of the first is
        // kept.
        let mut next = HeaderMap::new();
        forward(&mut next, &peer, "api.app.localhost", HostHeader::Upstream);
        assert_eq!(next[header::HOST], "127.0.0.1:5174");
        assert_eq!(next["x-forwarded-for"], "::1");
        assert_eq!(next["x-forwarded-host"], "api.app.localhost");
        assert_eq!(next["x-forwarded-proto"], "https");
        assert_eq!(
            next[header::FORWARDED],
            "for=\"[::1]\";host=\"api.app.localhost\";proto=https"
        );
        // Another client's connection, over plain HTTP.
        let plain = Peer::new("127.0.0.1:40000".parse().unwrap(), Scheme::Http);
        let mut other = HeaderMap::new();
        forward(&mut other, &plain, "api.app.localhost", HostHeader::Keep);
        assert_eq!(other["x-forwarded-for"], "127.0.0.1");
        assert_eq!(other["x-forwarded-proto"], "http");
        assert_eq!(
            other[header::FORWARDED],
            "for=127.0.0.1;host=\"api.app.localhost\";proto=http"
        );
        // And one more for the first name, behind another proxy: appended to.
        let mut again = HeaderMap::new();
        again.insert(header::FORWARDED, HeaderValue::from_static("for=10.0.0.1"));
        again.append("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        again.append(
            "x-forwarded-for",
            HeaderValue::from_static("10.0.0.2, 10.0.0.3"),
        );
        forward(&mut again, &peer, "app.localhost", HostHeader::Keep);
        assert_eq!(
            again[header::FORWARDED],
            "for=10.0.0.1, for=\"[::1]\";host=\"app.localhost\";proto=https"
        );
        assert_eq!(
            again["x-forwarded-for"],
            "10.0.0.1, 10.0.0.2, 10.0.0.3, ::1"
        );
        assert_eq!(again.get_all("x-forwarded-for").iter().count(), 1);
    }

    #[test]
    fn connection_names_what_goes_in_any_case_and_over_several_fields() {
        let mut headers = HeaderMap::new();
        headers.append(header::CONNECTION, HeaderValue::from_static("Keep-Alive"));
        headers.append(
            header::CONNECTION,
            HeaderValue::from_static(" X-Secret ,Close,, "),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        headers.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type", "x-kept"], "{headers:?}");
        // Nothing of one connection: nothing changes.
        let before = headers.clone();
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers, before);
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
