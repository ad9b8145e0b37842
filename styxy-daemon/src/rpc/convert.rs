//! Input validation and conversions between `styxy.v1` messages and the broker's types.
//!
//! Every bad input becomes `InvalidArgument` with a message saying what was wrong and what is accepted.

use tonic::Status;

use crate::engine::{AskedHolder, EngineError};
use styxy_broker::ranges::is_valid_type_name;
use styxy_broker::BrokerError;
use styxy_broker::{AuditRecord, Held, Lease, Notice, Protocol, ViewEntry};
use styxy_proto::v1 as pb;

pub const MAX_SUGGEST: u32 = 1000;
pub const MAX_AUDIT: u32 = 10_000;
/// The longest lease a caller may ask for: 30 days.
pub const MAX_TTL_SECONDS: u64 = 30 * 24 * 3600;
const MAX_INSTANCE_ID: usize = 128;

pub fn port(value: u32, field: &str) -> Result<u16, Status> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "{field} must be a port from 1 to 65535, got {value}"
            ))
        })
}

/// How much of a refused input an error message quotes.
const QUOTED_PREFIX: usize = 40;

/// `value` for an error message: quoted, at most [`QUOTED_PREFIX`] characters of it, and its
/// length when it was cut — a 4 MB input never comes back as a 4 MB (or 34 MB, escaped) message.
pub fn quoted(value: &str) -> String {
    let mut chars = value.chars();
    let prefix: String = chars.by_ref().take(QUOTED_PREFIX).collect();
    let mut escaped = format!("{prefix:?}");
    let mut cut = chars.next().is_some();
    // Escapes (`\u{3347a}`) can make 40 characters long: the quote is bounded in bytes too.
    if escaped.len() > 2 * QUOTED_PREFIX {
        let mut end = 2 * QUOTED_PREFIX;
        while !escaped.is_char_boundary(end) {
            end -= 1;
        }
        escaped.truncate(end);
        cut = true;
    }
    if cut {
        format!("{escaped}… ({} bytes)", value.len())
    } else {
        escaped
    }
}

pub fn service_type(value: &str) -> Result<String, Status> {
    if is_valid_type_name(value) {
        Ok(value.to_string())
    } else {
        Err(Status::invalid_argument(format!(
            "service_type {} is invalid: use 1-64 characters of a-z, 0-9, '_', '.', '-' (e.g. \"api\")",
            quoted(value)
        )))
    }
}

pub fn instance_id(value: Option<String>) -> Result<Option<String>, Status> {
    match value {
        None => Ok(None),
        Some(id)
            if !id.is_empty()
                && id.len() <= MAX_INSTANCE_ID
                && id.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Ok(Some(id))
        }
        Some(id) => Err(Status::invalid_argument(format!(
            "instance_id {} is invalid: use 1-{MAX_INSTANCE_ID} printable ASCII characters, no spaces",
            quoted(&id)
        ))),
    }
}

/// A session's name as given: a DNS label (letters, digits, inner dashes, at most 63), since its
/// servers' names end in `<name>.localhost`.
pub fn session_name(value: Option<String>) -> Result<Option<String>, Status> {
    match value {
        None => Ok(None),
        Some(name) if styxy_broker::names::dns_label(&name).as_deref() == Some(name.as_str()) => {
            Ok(Some(name))
        }
        Some(name) => Err(Status::invalid_argument(format!(
            "session name {} is invalid: use 1-63 lowercase letters, digits and inner dashes \
             (it becomes part of a host name), e.g. {}",
            quoted(&name),
            styxy_broker::names::dns_label(&name).unwrap_or_else(|| "feature-x".into())
        ))),
    }
}

pub fn pid(value: u32) -> Result<u32, Status> {
    if value == 0 || value > i32::MAX as u32 {
        Err(Status::invalid_argument(format!(
            "pid must be a process id above 0, got {value}"
        )))
    } else {
        Ok(value)
    }
}

pub fn ttl_ms(value: Option<u64>) -> Result<Option<u64>, Status> {
    match value {
        None => Ok(None),
        Some(s) if (1..=MAX_TTL_SECONDS).contains(&s) => Ok(Some(s * 1000)),
        Some(s) => Err(Status::invalid_argument(format!(
            "ttl_seconds must be from 1 to {MAX_TTL_SECONDS} (30 days), got {s}"
        ))),
    }
}

pub fn count(value: u32, max: u32, default: u32, field: &str) -> Result<usize, Status> {
    match value {
        0 => Ok(default as usize),
        n if n <= max => Ok(n as usize),
        n => Err(Status::invalid_argument(format!(
            "{field} must be from 1 to {max}, got {n}"
        ))),
    }
}

pub fn protocol_opt(value: i32) -> Result<Option<Protocol>, Status> {
    match pb::Protocol::try_from(value) {
        Ok(known) => Ok(known.known()),
        Err(_) => Err(Status::invalid_argument(format!(
            "protocol {value} is unknown: use PROTOCOL_TCP (1) or PROTOCOL_UDP (2)"
        ))),
    }
}

pub fn protocol_required(value: i32) -> Result<Protocol, Status> {
    protocol_opt(value)?.ok_or_else(|| {
        Status::invalid_argument("protocol is required: PROTOCOL_TCP (1) or PROTOCOL_UDP (2)")
    })
}

/// The family of a bind (IPv4 when unspecified).
pub fn family(value: i32) -> Result<styxy_broker::Family, Status> {
    match pb::Family::try_from(value) {
        Ok(pb::Family::Inet6) => Ok(styxy_broker::Family::Inet6),
        Ok(_) => Ok(styxy_broker::Family::Inet),
        Err(_) => Err(Status::invalid_argument(format!(
            "family {value} is unknown: use FAMILY_INET or FAMILY_INET6"
        ))),
    }
}

/// Every live server's names, and the proxy's entry they are reached at (`https`,
/// `127.0.0.1:8443`).
pub struct ServedNames {
    pub names: std::sync::Arc<styxy_broker::Names>,
    pub scheme: &'static str,
    pub listen: String,
}

impl ServedNames {
    /// Where a browser reaches the server `pid` bound on `port`: one URL per name, most
    /// general first; none when it has no name.
    pub fn urls(&self, pid: u32, port: u16) -> Vec<String> {
        self.names
            .servers
            .iter()
            .find(|n| n.pid == pid && n.port == port)
            .map(|n| {
                n.names
                    .iter()
                    .map(|name| styxy_common::url::name_url(self.scheme, name, &self.listen))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A server of a session, with who held the port it asked for.
pub fn session_server(
    server: &styxy_broker::SessionServer,
    asked_holder: Option<&AskedHolder>,
) -> pb::SessionServer {
    pb::SessionServer {
        pid: server.pid,
        comm: server.comm.clone(),
        cmdline: server.cmdline.clone(),
        protocol: pb::Protocol::from(server.protocol) as i32,
        port: u32::from(server.port),
        asked_port: server.asked.map_or(0, u32::from),
        asked_holder_pid: asked_holder.map_or(0, |h| h.pid),
        asked_holder_comm: asked_holder.map(|h| h.comm.clone()).unwrap_or_default(),
        asked_holder_cmdline: asked_holder.map(|h| h.cmdline.clone()).unwrap_or_default(),
        asked_holder_instance_id: asked_holder
            .map(|h| h.instance_id.clone())
            .unwrap_or_default(),
        // Said by SessionReport, which knows the sessions' names.
        asked_holder_session_name: String::new(),
        addresses: server.addresses.clone(),
        urls: Vec::new(),
    }
}

pub fn holder(held: &Held) -> pb::Holder {
    let s = &held.socket;
    pb::Holder {
        pid: s.owner.as_ref().map_or(0, |o| o.id.pid),
        comm: s.owner.as_ref().map(|o| o.comm.clone()).unwrap_or_default(),
        cmdline: s
            .owner
            .as_ref()
            .map(|o| o.cmdline.clone())
            .unwrap_or_default(),
        service_type: held.service_type.clone(),
        uid: s.uid,
        protocol: pb::Protocol::from(s.protocol) as i32,
        addresses: vec![s.address.to_string()],
        since_ms: s.since_ms,
        port: u32::from(s.port),
        instance_id: held.instance_id.clone().unwrap_or_default(),
        orphan: false,
        // Said by the calls whose holders a person reads (ResolveBind, Observe, ListPorts).
        session_name: String::new(),
        urls: Vec::new(),
    }
}

pub fn lease(l: &Lease) -> pb::Lease {
    pb::Lease {
        lease_id: l.id.clone(),
        port: u32::from(l.port),
        service_type: l.service_type.clone(),
        owner_uid: l.owner_uid,
        pid: l.process.map_or(0, |p| p.pid),
        instance_id: l.instance_id.clone().unwrap_or_default(),
        created_at_ms: l.created_ms,
        expires_at_ms: l.expires_ms.unwrap_or(0),
        claim: l.is_claim(),
    }
}

pub fn view_entry(v: &ViewEntry) -> pb::ViewEntry {
    pb::ViewEntry {
        instance_id: v.instance_id.clone(),
        protocol: pb::Protocol::from(v.protocol) as i32,
        asked_port: u32::from(v.asked),
        bound_port: u32::from(v.bound),
        pid: v.pid,
        uid: v.uid,
    }
}

pub fn sticky_port(e: &styxy_broker::StickyPort) -> pb::StickyPort {
    pb::StickyPort {
        uid: e.key.uid,
        project: e.key.project.clone(),
        service_type: e.key.service_type.clone(),
        asked_port: u32::from(e.key.asked),
        port: u32::from(e.port),
        used_at_ms: e.used_ms,
    }
}

pub fn audit_entry(r: &AuditRecord) -> pb::AuditEntry {
    pb::AuditEntry {
        at_ms: r.at_ms,
        pid: r.pid,
        comm: r.comm.clone(),
        requested_port: u32::from(r.requested_port),
        assigned_port: u32::from(r.assigned_port),
        protocol: pb::Protocol::from(r.protocol) as i32,
        service_type: r.service_type.clone(),
        holder_pid: r.holder_pid.unwrap_or(0),
        holder_comm: r.holder_comm.clone().unwrap_or_default(),
        holder_cmdline: r.holder_cmdline.clone().unwrap_or_default(),
        holder_instance_id: r.holder_instance_id.clone().unwrap_or_default(),
        instance_id: r.instance_id.clone().unwrap_or_default(),
        uid: r.uid,
        // Said by ListAudit, which knows the live sessions' names.
        session_name: String::new(),
        holder_session_name: String::new(),
    }
}

fn socket_event(kind: pb::EventKind, held: &Held) -> pb::PortEvent {
    let s = &held.socket;
    pb::PortEvent {
        kind: kind as i32,
        port: u32::from(s.port),
        protocol: pb::Protocol::from(s.protocol) as i32,
        pid: s.owner.as_ref().map_or(0, |o| o.id.pid),
        comm: s.owner.as_ref().map(|o| o.comm.clone()).unwrap_or_default(),
        service_type: held.service_type.clone(),
        requested_port: 0,
        at_ms: s.since_ms,
        lease_id: String::new(),
        family: pb::Family::from(s.family) as i32,
        address: s.address.to_string(),
        instance_id: held.instance_id.clone().unwrap_or_default(),
    }
}

fn lease_event(kind: pb::EventKind, l: &Lease, at_ms: u64) -> pb::PortEvent {
    pb::PortEvent {
        kind: kind as i32,
        port: u32::from(l.port),
        protocol: l.protocol().map_or(0, |p| pb::Protocol::from(p) as i32),
        pid: l.process.map_or(0, |p| p.pid),
        service_type: l.service_type.clone(),
        requested_port: l.asked().map_or(0, u32::from),
        at_ms,
        lease_id: l.id.clone(),
        instance_id: l.instance_id.clone().unwrap_or_default(),
        ..Default::default()
    }
}

/// A notice as a `Watch` event.
pub fn event(notice: &Notice, now_ms: u64) -> pb::PortEvent {
    match notice {
        Notice::Bound(h) => socket_event(pb::EventKind::Bound, h),
        Notice::Released(h) => pb::PortEvent {
            at_ms: now_ms,
            ..socket_event(pb::EventKind::Released, h)
        },
        Notice::Reassigned(r) => pb::PortEvent {
            kind: pb::EventKind::Reassigned as i32,
            port: u32::from(r.assigned_port),
            protocol: pb::Protocol::from(r.protocol) as i32,
            pid: r.pid,
            comm: r.comm.clone(),
            service_type: r.service_type.clone(),
            requested_port: u32::from(r.requested_port),
            at_ms: r.at_ms,
            instance_id: r.instance_id.clone().unwrap_or_default(),
            ..Default::default()
        },
        Notice::Leased(l) => lease_event(pb::EventKind::Leased, l, l.created_ms),
        Notice::LeaseEnded(l) => lease_event(pb::EventKind::LeaseEnded, l, now_ms),
    }
}

/// A failed request as a gRPC status with the reason.
pub fn engine_error(e: EngineError) -> Status {
    match e {
        EngineError::Broker(e) => match e {
            BrokerError::NoFreePort { .. } | BrokerError::UserLimit { .. } => {
                Status::resource_exhausted(e.to_string())
            }
            BrokerError::UnknownServiceType(_) => Status::invalid_argument(e.to_string()),
            BrokerError::NoSuchLease(_)
            | BrokerError::NoLeaseOnPort(_)
            | BrokerError::NoSuchSession(_) => Status::not_found(e.to_string()),
            BrokerError::NotOwner { .. }
            | BrokerError::InstanceTaken { .. }
            | BrokerError::NotYourSession { .. } => Status::permission_denied(e.to_string()),
        },
        EngineError::Store(_) => Status::unavailable(e.to_string()),
        EngineError::Contended(_) => Status::unavailable(e.to_string()),
        EngineError::Unavailable(_) => Status::failed_precondition(e.to_string()),
        EngineError::Refused(_) => Status::permission_denied(e.to_string()),
        EngineError::NotFound(_) => Status::not_found(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Fuzzing request validation (a long run: `PROPTEST_CASES=100000 cargo test -p
        /// styxy-daemon fuzz_`): any input is accepted or refused with InvalidArgument and a
        /// short message, never a panic.
        #[test]
        fn fuzz_validation_refuses_cleanly(text in ".{0,300}", number in proptest::prelude::any::<u32>(), big in proptest::prelude::any::<u64>(), code in proptest::prelude::any::<i32>()) {
            let checks: Vec<Result<(), Status>> = vec![
                service_type(&text).map(drop),
                instance_id(Some(text.clone())).map(drop),
                port(number, "port").map(drop),
                pid(number).map(drop),
                ttl_ms(Some(big)).map(drop),
                count(number, MAX_SUGGEST, 1, "count").map(drop),
                protocol_opt(code).map(drop),
                family(code).map(drop),
            ];
            for check in checks {
                if let Err(status) = check {
                    proptest::prop_assert_eq!(status.code(), tonic::Code::InvalidArgument);
                    proptest::prop_assert!(status.message().len() < 300, "{}", status.message());
                }
            }
        }
    }

    #[test]
    fn refused_input_is_quoted_by_a_short_prefix() {
        assert_eq!(quoted("storybok"), "\"storybok\"");
        let huge = "x".repeat(4 << 20);
        let said = quoted(&huge);
        assert!(
            said.len() < 80 && said.ends_with("(4194304 bytes)"),
            "{said}"
        );
        let status = service_type(&huge).unwrap_err();
        assert!(status.message().len() < 200, "{}", status.message().len());
        let wide = "é".repeat(100);
        assert!(
            quoted(&wide).starts_with("\"éé"),
            "cut on characters, not bytes"
        );
    }

    #[test]
    fn bad_inputs_get_messages_that_say_what_is_accepted() {
        assert!(port(0, "port")
            .unwrap_err()
            .message()
            .contains("1 to 65535"));
        assert_eq!(
            port(70000, "port").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(port(8080, "port").unwrap(), 8080);
        assert!(service_type("Web App")
            .unwrap_err()
            .message()
            .contains("a-z"));
        assert!(ttl_ms(Some(0)).is_err());
        assert_eq!(ttl_ms(Some(2)).unwrap(), Some(2000));
        assert!(count(5000, MAX_SUGGEST, 1, "count")
            .unwrap_err()
            .message()
            .contains("1 to 1000"));
        assert_eq!(count(0, MAX_SUGGEST, 1, "count").unwrap(), 1);
        assert!(protocol_opt(9).is_err());
        assert!(protocol_required(0).is_err());
        assert!(instance_id(Some("has space".into())).is_err());
        assert!(instance_id(Some(String::new())).is_err());
        assert!(pid(0).is_err());
    }
}
