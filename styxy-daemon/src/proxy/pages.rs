//! The answers the proxy gives itself, as HTML for a browser and plain text for curl: a name no
//! live server has (with the names there are), a named server that does not answer (with its
//! command and session), a request without a host.

use std::fmt::Write as _;
use std::net::SocketAddr;

use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Response, StatusCode};
use styxy_broker::{NamedServer, Names};

use super::forward::ProxyBody;

/// Whether the client reads HTML (a browser says so in `Accept`).
pub fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/html"))
}

/// A name no live server has: 404, and every name there is.
pub fn unknown_name(host: &str, names: &Names, html: bool) -> Response<ProxyBody> {
    let mut text = format!("No live server is named {host}.\n");
    if names.servers.is_empty() {
        text.push_str("No server is running that has a name.\n");
    } else {
        text.push_str("Live names:\n");
        for server in &names.servers {
            let _ = writeln!(
                text,
                "  {}  → port {}{} ({})",
                server.names.join(", "),
                server.port,
                server
                    .session
                    .as_ref()
                    .map_or(String::new(), |s| format!(", session {s}")),
                command(server),
            );
        }
    }
    text.push_str("`styxy ports` lists every port; names end in .localhost.\n");
    page(StatusCode::NOT_FOUND, "Unknown name", &text, html)
}

/// A named server that did not answer: 502, naming it.
pub fn upstream_failed(
    host: &str,
    server: &NamedServer,
    target: SocketAddr,
    error: &dyn std::error::Error,
    html: bool,
) -> Response<ProxyBody> {
    let text = format!(
        "{}, which did not answer: {}.\n\
         Is it still running? `styxy ports` shows what listens now.\n",
        named_server(host, server, target),
        error_chain(error),
    );
    page(
        StatusCode::BAD_GATEWAY,
        "The server did not answer",
        &text,
        html,
    )
}

/// `HOST is `COMMAND` (pid N, session S), on ADDR`: which server a failed request went to.
fn named_server(host: &str, server: &NamedServer, target: SocketAddr) -> String {
    format!(
        "{host} is {} (pid {}{}), on {target}",
        command(server),
        server.pid,
        server
            .session
            .as_ref()
            .map_or(String::new(), |s| format!(", session {s}")),
    )
}

/// A named server that took the request and did not start its answer in time: 504, naming it.
pub fn upstream_silent(
    host: &str,
    server: &NamedServer,
    target: SocketAddr,
    waited: std::time::Duration,
    html: bool,
) -> Response<ProxyBody> {
    let text = format!(
        "{}, which took the request but sent no answer within {} s. A server that holds \
         requests longer: give the daemon --proxy-upstream-timeout-secs N.\n",
        named_server(host, server, target),
        waited.as_secs(),
    );
    page(
        StatusCode::GATEWAY_TIMEOUT,
        "The server did not answer in time",
        &text,
        html,
    )
}

/// A named server that listens on no loopback address: the proxy does not reach it.
pub fn not_on_loopback(host: &str, server: &NamedServer, html: bool) -> Response<ProxyBody> {
    let text = format!(
        "{host} is {} (pid {}), which listens on {} only: the proxy reaches servers on loopback \
         (127.0.0.1, ::1, or every address).\n",
        command(server),
        server.pid,
        server.addresses.join(", "),
    );
    page(StatusCode::BAD_GATEWAY, "Not on loopback", &text, html)
}

/// A request without `Host` (HTTP/1.0, or a hand-made request).
pub fn no_host(html: bool) -> Response<ProxyBody> {
    page(
        StatusCode::BAD_REQUEST,
        "No host",
        "The request names no host: the proxy routes by name (Host: feature-x.localhost).\n",
        html,
    )
}

/// A request that cannot be forwarded as it is.
pub fn bad_request(why: &str, html: bool) -> Response<ProxyBody> {
    page(
        StatusCode::BAD_REQUEST,
        "Bad request",
        &format!("{why}\n"),
        html,
    )
}

fn command(server: &NamedServer) -> String {
    let ports = [server.asked, server.port];
    format!(
        "`{}`",
        styxy_common::command_line::shown(&server.cmdline, "", 80, &ports)
    )
}

/// An error and its causes, `a: b: c`.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

fn page(status: StatusCode, title: &str, text: &str, html: bool) -> Response<ProxyBody> {
    let (body, content_type) = if html {
        (
            format!(
                "<!doctype html><html><head><meta charset=\"utf-8\"><title>Styxy: {}</title></head>\
                 <body><h1>{}</h1><pre>{}</pre></body></html>\n",
                escape(title),
                escape(title),
                escape(text)
            ),
            "text/html; charset=utf-8",
        )
    } else {
        (format!("styxy: {text}"), "text/plain; charset=utf-8")
    };
    let mut response = Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Text made safe for HTML, attribute values included.
pub(super) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_is_escaped_and_text_is_plain() {
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        let names = Names::default();
        let response = unknown_name("nope.localhost", &names, false);
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/plain; charset=utf-8"
        );
        let response = unknown_name("<script>.localhost", &names, true);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
    }
}
