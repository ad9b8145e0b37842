//! Names for the person at the keyboard: every live server gets names that never contain the
//! port it is bound to, so a browser tab keeps working when the server moves or restarts.
//!
//! - A session's servers: `<session>.localhost` (its main web server), `<service>.<session>.localhost`
//!   (by service type: `storybook.`, `api.`, `dev.`), `<asked>.<session>.localhost` (by the port
//!   it asked for: always unambiguous).
//! - Servers outside every session: `<service>.localhost` and `<port>.localhost`.
//!
//! A session's name is the one its user gave it, else its project's (the git worktree or working
//! directory of the process that registered it first), else its id, as a DNS label. Two sessions
//! wanting one name: the one registered first keeps it, the next get `-2`, `-3`… (ties by id), and
//! a session name beats a service name outside sessions. Within a session, a service type or the
//! main name goes to the server with the lowest asked port; the main server is the first of a web
//! type (`dev`, `ui`, `docs`, `storybook`), else of any type. UDP servers and helper ports (see
//! `styxy_common::command_line::is_helper_port`) get no names.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::RangeInclusive;

use crate::{Broker, Protocol};

/// Every name ends so: browsers (and curl, and systemd-resolved) resolve `*.localhost` to
/// loopback by themselves.
pub const NAME_SUFFIX: &str = ".localhost";
/// The name no session gets: `styxy.localhost` is the daemon's dashboard.
pub const RESERVED_NAME: &str = styxy_common::url::DASHBOARD_LABEL;

/// Service types a person opens in a browser, most likely first: the main name goes to one.
const WEB_TYPES: [&str; 4] = ["dev", "ui", "docs", "storybook"];

/// A session and its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionName {
    /// The instance id (`STYXY_INSTANCE`).
    pub instance_id: String,
    /// Its name: a DNS label, unique among sessions.
    pub name: String,
    /// The name it wanted, when another session had it first.
    pub wanted: Option<String>,
}

/// A live server and its names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedServer {
    /// Its names, most specific last (`feature-x.localhost`, `dev.feature-x.localhost`,
    /// `5173.feature-x.localhost`).
    pub names: Vec<String>,
    /// The port it is bound to: where the proxy sends its requests.
    pub port: u16,
    /// The port it asked for (its bound port when it was not moved).
    pub asked: u16,
    /// The addresses it listens on.
    pub addresses: Vec<String>,
    /// The process.
    pub pid: u32,
    /// Its command line.
    pub cmdline: String,
    /// Its user.
    pub uid: u32,
    /// Its service type.
    pub service_type: String,
    /// Its session's instance id.
    pub instance_id: Option<String>,
    /// Its session's name.
    pub session: Option<String>,
}

/// Every name of every live server, as one reading.
#[derive(Clone, Debug, Default)]
pub struct Names {
    /// The sessions with a name.
    pub sessions: Vec<SessionName>,
    /// The named servers, by session then asked port.
    pub servers: Vec<NamedServer>,
    by_host: HashMap<String, usize>,
}

impl Names {
    /// The server a `Host` header names (any case, with or without a port or a trailing dot).
    pub fn resolve(&self, host: &str) -> Option<&NamedServer> {
        self.resolve_name(&host_name(host))
    }

    /// The server a name ([`host_name`]'s form of a `Host`) names.
    pub fn resolve_name(&self, name: &str) -> Option<&NamedServer> {
        self.by_host.get(name).and_then(|i| self.servers.get(*i))
    }
}

/// A `Host` value as a name: lowercase, without its port and trailing dot (copied only when
/// it has capitals: the proxy asks this on every request).
pub fn host_name(host: &str) -> Cow<'_, str> {
    let host = host.trim();
    let name = if let Some(literal) = host.strip_prefix('[') {
        // An IPv6 literal, `[::1]:8080`: never a name, but kept whole.
        let end = literal.find(']').map_or(host.len(), |i| i + 2);
        &host[..end]
    } else {
        let without_port = match host.rsplit_once(':') {
            Some((name, port))
                if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) =>
            {
                name
            }
            _ => host,
        };
        without_port.trim_end_matches('.')
    };
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    }
}

pub use styxy_common::label::dns_label;

impl Broker {
    /// Every live server's names. `ephemeral` is the kernel's ephemeral port range (helper ports
    /// are found there); the sockets of process `proxy` (the daemon serving the names) get none,
    /// as a name for the proxy's own port would send its requests back to itself, forever.
    pub fn names(&self, ephemeral: &RangeInclusive<u16>, proxy: u32) -> Names {
        let sessions = self.session_names();
        let session_of: HashMap<&str, &str> = sessions
            .iter()
            .map(|s| (s.instance_id.as_str(), s.name.as_str()))
            .collect();
        // The servers: one per (instance, pid, asked port), TCP, not helpers.
        let mut servers: BTreeMap<(Option<String>, u16, u32), NamedServer> = BTreeMap::new();
        let views: HashMap<(u32, u16), u16> = self
            .views()
            .into_iter()
            .filter(|e| e.protocol == Protocol::Tcp)
            .map(|e| ((e.pid, e.bound), e.asked))
            .collect();
        for held in self.held_sockets() {
            let socket = &held.socket;
            if socket.protocol != Protocol::Tcp {
                continue;
            }
            let Some(owner) = socket.owner.as_ref().filter(|o| o.id.pid != proxy) else {
                continue;
            };
            let instance = held
                .instance_id
                .clone()
                .filter(|i| session_of.contains_key(i.as_str()));
            let asked = views
                .get(&(owner.id.pid, socket.port))
                .copied()
                .unwrap_or(socket.port);
            let moved = asked != socket.port;
            if !moved
                && styxy_common::command_line::is_helper_port(
                    &owner.cmdline,
                    socket.port,
                    ephemeral,
                )
            {
                continue;
            }
            let service_type = self
                .ranges
                .type_of_port(asked)
                .map(|t| t.name.clone())
                .unwrap_or_else(|| held.service_type.clone());
            let address = socket.address.to_string();
            let server = servers
                .entry((instance.clone(), asked, owner.id.pid))
                .or_insert_with(|| NamedServer {
                    names: Vec::new(),
                    port: socket.port,
                    asked,
                    addresses: Vec::new(),
                    pid: owner.id.pid,
                    cmdline: owner.cmdline.clone(),
                    uid: socket.uid,
                    service_type,
                    session: instance
                        .as_deref()
                        .and_then(|i| session_of.get(i))
                        .map(|n| n.to_string()),
                    instance_id: instance,
                });
            if !server.addresses.contains(&address) {
                server.addresses.push(address);
            }
        }
        let mut servers: Vec<NamedServer> = servers.into_values().collect();
        give_names(&mut servers);
        let mut by_host = HashMap::new();
        for (i, server) in servers.iter().enumerate() {
            for name in &server.names {
                by_host.entry(name.clone()).or_insert(i);
            }
        }
        Names {
            sessions,
            servers,
            by_host,
        }
    }

    /// Every registered session's name, unique: the one registered first keeps a wanted name.
    pub fn session_names(&self) -> Vec<SessionName> {
        let mut by_age: Vec<(&crate::Instance, String)> = self
            .instances
            .values()
            .map(|i| (i, wanted_name(i)))
            .collect();
        by_age.sort_by(|(a, _), (b, _)| {
            (a.since_ms(), a.id.as_str()).cmp(&(b.since_ms(), b.id.as_str()))
        });
        let mut taken: HashSet<String> = HashSet::from([RESERVED_NAME.to_string()]);
        let mut out = Vec::with_capacity(by_age.len());
        for (instance, wanted) in by_age {
            let mut name = wanted.clone();
            let mut n = 1;
            while taken.contains(&name) {
                n += 1;
                name = format!("{wanted}-{n}");
            }
            taken.insert(name.clone());
            out.push(SessionName {
                instance_id: instance.id.clone(),
                wanted: (name != wanted).then_some(wanted),
                name,
            });
        }
        out.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        out
    }
}

/// The name a session wants: its given name, else its project's, else its id, as a DNS label.
fn wanted_name(instance: &crate::Instance) -> String {
    let project = instance
        .project
        .as_deref()
        .and_then(|p| p.trim_end_matches('/').rsplit('/').next());
    instance
        .name
        .as_deref()
        .and_then(dns_label)
        .or_else(|| project.and_then(dns_label))
        .or_else(|| dns_label(&instance.id))
        .unwrap_or_else(|| "session".to_string())
}

/// Gives each server its names (`servers` sorted by instance id, then asked port, then pid).
fn give_names(servers: &mut [NamedServer]) {
    let mut taken: HashSet<String> = HashSet::new();
    let mut claim = |server: &mut NamedServer, name: String| {
        if taken.insert(name.clone()) {
            server.names.push(name);
        }
    };
    // Session names first (they beat service names outside sessions): each session's main
    // server, by web type, then by asked port.
    let web_rank = |s: &NamedServer| {
        WEB_TYPES
            .iter()
            .position(|t| *t == s.service_type)
            .unwrap_or(WEB_TYPES.len())
    };
    let mut order: Vec<usize> = (0..servers.len()).collect();
    order.sort_by_key(|&i| {
        let s = &servers[i];
        (
            s.session.is_none(),
            s.session.clone(),
            web_rank(s),
            s.asked,
            s.pid,
        )
    });
    for i in order {
        if let Some(session) = servers[i].session.clone() {
            claim(&mut servers[i], format!("{session}{NAME_SUFFIX}"));
        }
    }
    // Then by service type and by asked port, the lowest asked port first within a session
    // (the order `servers` is in); these never meet another session's names.
    for server in servers.iter_mut() {
        let within = server
            .session
            .as_ref()
            .map_or(String::new(), |n| format!(".{n}"));
        if let Some(service) = dns_label(&server.service_type) {
            claim(server, format!("{service}{within}{NAME_SUFFIX}"));
        }
        let asked = server.asked;
        claim(server, format!("{asked}{within}{NAME_SUFFIX}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_become_names() {
        assert_eq!(host_name("Feature-X.localhost:8080"), "feature-x.localhost");
        assert_eq!(host_name("app.localhost."), "app.localhost");
        assert_eq!(host_name("[::1]:80"), "[::1]");
        assert_eq!(host_name(" api.localhost "), "api.localhost");
    }
}
