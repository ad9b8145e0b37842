//! The dashboard as HTML: one page that reads whole without JavaScript, and its `<main>` alone,
//! which the page's script fetches again whenever the daemon says something changed.

use std::fmt::Write as _;

use super::view::{Dashboard, ServerView};
use crate::proxy::pages::escape;

/// How the page links to a name: the scheme and port the dashboard itself was reached by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkBase {
    pub scheme: &'static str,
    /// `:8080`, or empty for the scheme's own port.
    pub port_suffix: String,
}

impl LinkBase {
    fn url(&self, name: &str) -> String {
        format!("{}://{name}{}/", self.scheme, self.port_suffix)
    }
}

const STYLE: &str = include_str!("style.css");
const SCRIPT: &str = include_str!("live.js");

/// The whole page.
pub fn page(dashboard: &Dashboard, links: &LinkBase) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>Styxy</title><style>{STYLE}</style></head>\n<body>\n\
         <header><h1>Styxy</h1><p>Every session's servers, by name. Live: this page follows the \
         daemon as servers start, stop and move.</p></header>\n{}\n<script>{SCRIPT}</script>\n\
         </body></html>\n",
        main(dashboard, links)
    )
}

/// The page's `<main>`: everything that changes.
pub fn main(d: &Dashboard, links: &LinkBase) -> String {
    let mut out = String::from("<main id=\"live\">\n");
    let servers: usize =
        d.sessions.iter().map(|s| s.servers.len()).sum::<usize>() + d.outside.len();
    let _ = writeln!(
        out,
        "<p class=\"summary\">{} session{}, {} named server{}</p>",
        d.sessions.len(),
        plural(d.sessions.len()),
        servers,
        plural(servers)
    );
    out.push_str("<section><h2>Sessions</h2>\n");
    if d.sessions.is_empty() {
        out.push_str("<p class=\"none\">No session is registered.</p>\n");
    }
    for session in &d.sessions {
        let _ = writeln!(
            out,
            "<article class=\"session\" data-session=\"{}\"><h3><a href=\"{}\">{}</a></h3>",
            escape(&session.name),
            escape(&links.url(&format!("{}.localhost", session.name))),
            escape(&session.name)
        );
        let mut facts = Vec::new();
        if let Some(wanted) = &session.wanted {
            facts.push(format!(
                "wanted “{}”, which an older session has",
                escape(wanted)
            ));
        }
        if let Some(worktree) = &session.worktree {
            facts.push(format!("worktree <code>{}</code>", escape(worktree)));
        }
        facts.push(format!("agent {}", escape(&session.agent)));
        facts.push(format!("uid {}", session.uid));
        for uid in &session.focused_by {
            facts.push(format!(
                "<strong class=\"focus\">focused by uid {uid}</strong>: that user's localhost:PORT \
                 reaches this session's servers"
            ));
        }
        facts.push(format!("started {} ago", age(session.age_secs)));
        facts.push(format!("id <code>{}</code>", escape(&session.instance_id)));
        let _ = writeln!(out, "<p class=\"facts\">{}</p>", facts.join(" · "));
        // The focus switch (`styxy focus`): a plain form, so it works without JavaScript; the
        // daemon takes the user from the connection (see `focus_switch`).
        let (field, label) = if session.focused_by.is_empty() {
            (
                format!(
                    "<input type=\"hidden\" name=\"session\" value=\"{}\">",
                    escape(&session.instance_id)
                ),
                "Focus: my localhost:PORT reaches this session",
            )
        } else {
            (
                "<input type=\"hidden\" name=\"clear\" value=\"1\">".to_string(),
                "Clear my focus",
            )
        };
        let _ = writeln!(
            out,
            "<form class=\"focus\" method=\"post\" action=\"/focus\">{field}<button type=\"submit\">{label}</button></form>"
        );
        servers_table(&mut out, &session.servers, links);
        out.push_str("</article>\n");
    }
    out.push_str("</section>\n");
    if !d.outside.is_empty() {
        out.push_str("<section><h2>Outside every session</h2>\n");
        servers_table(&mut out, &d.outside, links);
        out.push_str("</section>\n");
    }
    if !d.orphans.is_empty() {
        out.push_str(
            "<section><h2>Orphans</h2>\n<p class=\"none\">Their session ended while they run on; \
             <code>styxy prune</code> stops them.</p>\n<table><tr><th>Ports</th><th>Command</th>\
             <th>PID</th><th>Ended session</th></tr>\n",
        );
        for o in &d.orphans {
            let ports: Vec<String> = o.ports.iter().map(u16::to_string).collect();
            let _ = writeln!(
                out,
                "<tr class=\"orphan\"><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td></tr>",
                ports.join(", "),
                escape(&o.command),
                o.pid,
                escape(&o.session)
            );
        }
        out.push_str("</table></section>\n");
    }
    out.push_str("<section><h2>Recent moves</h2>\n");
    if d.moves.is_empty() {
        out.push_str("<p class=\"none\">No bind was moved.</p>\n");
    } else {
        out.push_str(
            "<table><thead><tr><th>when</th><th>process</th><th>asked → bound</th>\
             <th>session</th><th>moved off</th></tr></thead><tbody>\n",
        );
        for m in &d.moves {
            let _ = writeln!(
                out,
                "<tr><td>{}</td><td><code>{}</code> (pid {})</td><td>{} → {}</td><td>{}</td><td>{}</td></tr>",
                clock(m.at_ms),
                escape(&m.command),
                m.pid,
                m.asked,
                m.port,
                escape(m.session.as_deref().unwrap_or("—")),
                escape(m.holder.as_deref().unwrap_or("—"))
            );
        }
        out.push_str("</tbody></table>\n");
    }
    out.push_str("</section>\n<section><h2>Leases and claims</h2>\n");
    if d.leases.is_empty() {
        out.push_str("<p class=\"none\">None.</p>\n");
    } else {
        out.push_str(
            "<table><thead><tr><th>port</th><th>kind</th><th>service</th><th>session</th>\
             <th>uid</th><th>expires</th></tr></thead><tbody>\n",
        );
        for l in &d.leases {
            let _ = writeln!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                l.port,
                l.kind,
                escape(&l.service_type),
                escape(l.session.as_deref().unwrap_or("—")),
                l.uid,
                l.expires_ms.map_or("with its process".to_string(), clock)
            );
        }
        out.push_str("</tbody></table>\n");
    }
    out.push_str("</section>\n<section><h2>Sticky ports</h2>\n");
    if d.sticky.is_empty() {
        out.push_str(
            "<p class=\"none\">None yet: a project's server gets its port back here.</p>\n",
        );
    } else {
        out.push_str(
            "<table><thead><tr><th>project</th><th>service</th><th>asked</th><th>gets</th>\
             <th>uid</th></tr></thead><tbody>\n",
        );
        for s in &d.sticky {
            let _ = writeln!(
                out,
                "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&s.project),
                escape(&s.service_type),
                if s.asked == 0 {
                    "—".to_string()
                } else {
                    s.asked.to_string()
                },
                s.port,
                s.uid
            );
        }
        out.push_str("</tbody></table>\n");
    }
    out.push_str("</section>\n</main>");
    out
}

fn servers_table(out: &mut String, servers: &[ServerView], links: &LinkBase) {
    if servers.is_empty() {
        out.push_str("<p class=\"none\">No server holds a port.</p>\n");
        return;
    }
    out.push_str(
        "<table><thead><tr><th>names</th><th>asked → bound</th><th>command</th><th>pid</th>\
         <th>moved off</th></tr></thead><tbody>\n",
    );
    for server in servers {
        let names: Vec<String> = server
            .names
            .iter()
            .map(|n| format!("<a href=\"{}\">{}</a>", escape(&links.url(n)), escape(n)))
            .collect();
        let ports = if server.asked == server.port {
            server.port.to_string()
        } else {
            format!("{} → {}", server.asked, server.port)
        };
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{ports}</td><td><code>{}</code></td><td>{}</td><td>{}</td></tr>",
            names.join("<br>"),
            escape(&server.command),
            server.pid,
            escape(server.moved_off.as_deref().unwrap_or("—"))
        );
    }
    out.push_str("</tbody></table>\n");
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// `42 s`, `5 min`, `3 h`, `2 d`.
fn age(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min", s / 60),
        s if s < 86_400 => format!("{} h", s / 3600),
        s => format!("{} d", s / 86_400),
    }
}

/// Unix ms as `HH:MM:SS` UTC.
fn clock(ms: u64) -> String {
    let secs = ms / 1000 % 86_400;
    format!(
        "{:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::dashboard::view::Records;
    use styxy_broker::Names;

    #[test]
    fn what_a_command_line_says_is_escaped_on_the_page() {
        let mut names = Names::default();
        let evil = styxy_broker::NamedServer {
            names: vec!["8000.localhost".into()],
            port: 8000,
            asked: 8000,
            addresses: vec!["127.0.0.1".into()],
            pid: 5,
            cmdline: "python3 -c '<script>alert(1)</script>' 8000".into(),
            uid: 1000,
            service_type: "api".into(),
            instance_id: None,
            session: None,
        };
        names.servers = vec![evil];
        // An orphan's command line is escaped as well.
        let orphan = styxy_broker::StopCandidate {
            pid: 77,
            comm: "node".into(),
            cmdline: "node -e '<img src=x onerror=alert(2)>' 9000".into(),
            ports: vec![9000],
            asked: None,
            instance_id: Some("claude-<b>".into()),
        };
        let d = Dashboard::build(
            &Records {
                sessions: &[],
                names: &names,
                audit: &[],
                leases: &[],
                sticky: &[],
                orphans: &[orphan],
                now_ms: 0,
            },
            |_| None,
        );
        let links = LinkBase {
            scheme: "http",
            port_suffix: ":8080".into(),
        };
        let page = page(&d, &links);
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(page.contains("href=\"http://8000.localhost:8080/\""));
        assert!(page.contains("<h2>Orphans</h2>"), "{page}");
        assert!(!page.contains("<img src=x"), "{page}");
        assert!(page.contains("claude-&lt;b&gt;"), "{page}");
    }
}
