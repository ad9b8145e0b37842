//! The dashboard at `http://styxy.localhost/` (and `https://`, on whichever port the proxy
//! serves): the sessions and their servers with links to their names, recent moves, leases and
//! sticky ports (`view`), as one HTML page that reads whole without JavaScript (`render`) and
//! follows the daemon live: `/events` is a server-sent event stream fed by the same notices as
//! `Watch`, on which the page's script fetches its `<main>` again. `/state.json` is the same
//! data for scripts. `POST /focus` is the page's focus switch (`focus_switch`). Everything is
//! in the binary; there is no front-end build.

mod focus_switch;
mod render;
mod view;

pub use focus_switch::answer as focus_switch;

use std::time::Duration;

use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::broadcast::error::RecvError;

use super::forward::ProxyBody;
use super::Scheme;
use crate::engine::Engine;
use render::LinkBase;
use view::{Dashboard, Records};

/// The dashboard's name: no session gets it (`styxy_broker::RESERVED_NAME`).
pub const HOST: &str = styxy_common::url::DASHBOARD_HOST;
/// How often an idle event stream says it is alive (proxies and browsers drop silent ones).
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Moves read from the audit log for the page.
const AUDIT_READ: usize = 200;

/// The dashboard's answer to `request`, which asked for `host` (`styxy.localhost:8080`).
pub fn answer(
    request: &Request<Incoming>,
    host: &str,
    scheme: Scheme,
    engine: &Engine,
) -> Response<ProxyBody> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "The dashboard is read with GET (and its focus switch is POST /focus).\n",
        );
    }
    let links = LinkBase {
        scheme: scheme.as_str(),
        port_suffix: host
            .rsplit_once(':')
            .filter(|(_, port)| port.parse::<u16>().is_ok())
            .map_or(String::new(), |(_, port)| format!(":{port}")),
    };
    match request.uri().path() {
        "/" => {
            let dashboard = read(engine);
            let (body, content_type) = if request.uri().query() == Some("part=main") {
                (render::main(&dashboard, &links), "text/html; charset=utf-8")
            } else {
                (render::page(&dashboard, &links), "text/html; charset=utf-8")
            };
            full(StatusCode::OK, body, content_type)
        }
        "/state.json" => match serde_json::to_string_pretty(&read(engine)) {
            Ok(json) => full(StatusCode::OK, json, "application/json"),
            Err(e) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("the dashboard's state could not be written as JSON: {e}\n"),
            ),
        },
        "/events" => events(engine),
        other => text(
            StatusCode::NOT_FOUND,
            &format!(
                "The dashboard has no {other}: it serves / (the page), /events (server-sent \
                 events), /state.json and POST /focus.\n"
            ),
        ),
    }
}

/// The dashboard's data, read now.
fn read(engine: &Engine) -> Dashboard {
    let sessions = engine.sessions();
    let names = engine.names();
    let audit = engine.audit(None, AUDIT_READ);
    let list = engine.list();
    let orphans = engine.orphans();
    Dashboard::build(
        &Records {
            sessions: &sessions,
            names: &names,
            audit: &audit,
            leases: &list.leases,
            sticky: &list.sticky,
            orphans: &orphans,
            now_ms: crate::clock::now_ms(),
        },
        |pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .ok()
                .map(|c| c.trim().to_string())
        },
    )
}

/// `event: change` each time the daemon changes — a notice (bind, release, move, lease) or a change
/// of its state (a session, a focus) — (changes that come together are one event), and
/// a comment every [`KEEP_ALIVE`]; it ends when the client goes.
fn events(engine: &Engine) -> Response<ProxyBody> {
    let mut notices = engine.subscribe();
    let mut state = engine.watch_state();
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        let mut keep_alive = tokio::time::interval(KEEP_ALIVE);
        keep_alive.tick().await;
        loop {
            let message = tokio::select! {
                notice = notices.recv() => match notice {
                    Ok(_) | Err(RecvError::Lagged(_)) => {
                        // The rest of a burst goes with this event.
                        while notices.try_recv().is_ok() {}
                        Bytes::from_static(b"event: change\ndata: {}\n\n")
                    }
                    Err(RecvError::Closed) => return,
                },
                // A focus switched with `styxy focus`, a session registered or ended.
                changed = state.changed() => match changed {
                    Ok(()) => Bytes::from_static(b"event: change\ndata: {}\n\n"),
                    Err(_) => return,
                },
                _ = keep_alive.tick() => Bytes::from_static(b": alive\n\n"),
                () = tx.closed() => return,
            };
            if tx.send(message).await.is_err() {
                return;
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let stream = tokio_stream::StreamExt::map(stream, |b| Ok::<_, hyper::Error>(Frame::data(b)));
    let mut response = Response::new(StreamBody::new(stream).boxed());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn full(status: StatusCode, body: String, content_type: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn text(status: StatusCode, body: &str) -> Response<ProxyBody> {
    full(status, body.to_string(), "text/plain; charset=utf-8")
}
