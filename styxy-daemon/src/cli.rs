//! The `styxy` client commands: readable tables for people, `--json` for scripts.

use std::time::Duration;

use anyhow::{anyhow, Result};
use serde_json::{json, Value};
use tokio_stream::StreamExt;

use crate::client::{connect, Target};
use crate::engine::now_ms;
use styxy_proto::v1 as pb;

/// A client command, parsed.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum Command {
    /// Daemon version, observer in use and why, counters.
    Status,
    /// Every bound port and lease.
    Ports {
        /// Only the ports of this agent session (its STYXY_INSTANCE), e.g. `--instance "$STYXY_INSTANCE"`.
        #[arg(long)]
        instance: Option<String>,
    },
    /// Who holds a port.
    Observe {
        port: u16,
        /// Only this protocol (default: TCP and UDP).
        #[arg(long, value_enum)]
        protocol: Option<ProtocolArg>,
    },
    /// Free ports for a service type (dev, api, storybook, …), lowest first.
    Suggest {
        service_type: String,
        #[arg(short = 'n', long, default_value_t = 1)]
        count: u32,
    },
    /// Lease a free port for a service type.
    Allocate {
        service_type: String,
        /// Take this port when it is free.
        #[arg(long)]
        port: Option<u16>,
        /// Tie the lease to this process: it ends when the process exits.
        #[arg(long)]
        pid: Option<u32>,
        /// Lease lifetime in seconds (default without --pid: one hour).
        #[arg(long)]
        ttl: Option<u64>,
        /// Group the lease with an agent session.
        #[arg(long)]
        instance: Option<String>,
    },
    /// End a lease, by port or lease id.
    Release {
        /// A port number or a lease id such as lease-3.
        target: String,
    },
    /// Stream bind, release, reassign and lease events.
    Watch,
    /// Reassigned binds, newest last.
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum ProtocolArg {
    Tcp,
    Udp,
}

/// Runs a client command against the daemon at `target`.
pub async fn run(command: Command, target: &Target, as_json: bool) -> Result<()> {
    let mut client = connect(target).await?;
    match command {
        Command::Status => {
            let s = call(client.status(pb::StatusRequest {}).await)?;
            if as_json {
                return print_json(json!({
                    "version": s.version, "observer": s.observer, "observer_reason": s.observer_reason,
                    "uptime_seconds": s.uptime_seconds, "bound_ports": s.bound_ports, "leases": s.leases,
                    "instances": s.instances, "dropped_events": s.dropped_events,
                    "observed_events": s.observed_events, "reassignments": s.reassignments,
                    "state_dir": s.state_dir, "socket_path": s.socket_path, "tcp_listen": s.tcp_listen,
                    "observer_delay_p50_us": s.observer_delay_p50_us, "observer_delay_p99_us": s.observer_delay_p99_us,
                    "observer_delay_samples": s.observer_delay_samples,
                }));
            }
            println!(
                "Styxy {} — up {}",
                s.version,
                human_duration(s.uptime_seconds)
            );
            println!("observer:   {} ({})", s.observer, s.observer_reason);
            println!("socket:     {}", s.socket_path);
            println!(
                "tcp:        {}",
                if s.tcp_listen.is_empty() {
                    "off"
                } else {
                    &s.tcp_listen
                }
            );
            println!("state dir:  {}", s.state_dir);
            println!(
                "bound ports {} · leases {} · instances {} · reassignments {} · events {} ({} dropped)",
                s.bound_ports, s.leases, s.instances, s.reassignments, s.observed_events, s.dropped_events
            );
            if s.observer_delay_samples > 0 {
                println!(
                    "bind → broker: p50 {} µs · p99 {} µs (last {} events)",
                    s.observer_delay_p50_us,
                    s.observer_delay_p99_us,
                    s.observer_delay_samples.min(65_536)
                );
            }
        }
        Command::Ports { instance } => {
            let mut r = call(client.list_ports(pb::ListPortsRequest {}).await)?;
            if let Some(instance) = &instance {
                r.holders.retain(|h| &h.instance_id == instance);
                r.leases.retain(|l| &l.instance_id == instance);
            }
            if as_json {
                return print_json(json!({
                    "holders": r.holders.iter().map(holder_json).collect::<Vec<_>>(),
                    "leases": r.leases.iter().map(lease_json).collect::<Vec<_>>(),
                }));
            }
            print_holders(&r.holders);
            if !r.leases.is_empty() {
                println!();
                print_leases(&r.leases);
            }
        }
        Command::Observe { port, protocol } => {
            let protocol = match protocol {
                Some(ProtocolArg::Tcp) => pb::Protocol::Tcp,
                Some(ProtocolArg::Udp) => pb::Protocol::Udp,
                None => pb::Protocol::Unspecified,
            };
            let r = call(
                client
                    .observe(pb::ObserveRequest {
                        port: u32::from(port),
                        protocol: protocol as i32,
                    })
                    .await,
            )?;
            if as_json {
                return print_json(json!({
                    "port": r.port, "bound": r.bound, "range_service_type": r.range_service_type,
                    "holders": r.holders.iter().map(holder_json).collect::<Vec<_>>(),
                    "lease": r.lease.as_ref().map(lease_json),
                }));
            }
            let range = if r.range_service_type.is_empty() {
                String::new()
            } else {
                format!(" ({} range)", r.range_service_type)
            };
            match (&r.holders[..], &r.lease) {
                ([], None) => println!("port {port}{range} is free"),
                (holders, lease) => {
                    println!("port {port}{range}:");
                    for h in holders {
                        println!("  bound by {}", describe_holder(h));
                    }
                    if let Some(l) = lease {
                        println!("  leased: {}", describe_lease(l));
                    }
                }
            }
        }
        Command::Suggest {
            service_type,
            count,
        } => {
            let r = call(
                client
                    .suggest(pb::SuggestRequest {
                        service_type,
                        count,
                    })
                    .await,
            )?;
            if as_json {
                return print_json(json!({
                    "service_type": r.service_type, "ports": r.ports,
                    "range_start": r.range_start, "range_end": r.range_end,
                }));
            }
            let ports: Vec<String> = r.ports.iter().map(u32::to_string).collect();
            if ports.is_empty() {
                println!(
                    "{} ({}-{}): no free port",
                    r.service_type, r.range_start, r.range_end
                );
            } else {
                println!(
                    "{} ({}-{}): {}",
                    r.service_type,
                    r.range_start,
                    r.range_end,
                    ports.join(" ")
                );
            }
        }
        Command::Allocate {
            service_type,
            port,
            pid,
            ttl,
            instance,
        } => {
            let r = call(
                client
                    .allocate(pb::AllocateRequest {
                        service_type,
                        preferred_port: port.map(u32::from),
                        pid,
                        instance_id: instance,
                        ttl_seconds: ttl,
                    })
                    .await,
            )?;
            if as_json {
                return print_json(json!({
                    "port": r.port, "lease_id": r.lease_id, "service_type": r.service_type,
                    "expires_at_ms": r.expires_at_ms,
                }));
            }
            println!(
                "{} ({}) leased as {}, {}",
                r.port,
                r.service_type,
                r.lease_id,
                expiry(r.expires_at_ms)
            );
        }
        Command::Release { target: what } => {
            let target = match what.parse::<u32>() {
                Ok(port) => pb::release_request::Target::Port(port),
                Err(_) => pb::release_request::Target::LeaseId(what),
            };
            let r = call(
                client
                    .release(pb::ReleaseRequest {
                        target: Some(target),
                    })
                    .await,
            )?;
            if as_json {
                return print_json(json!({ "released_lease_ids": r.released_lease_ids }));
            }
            println!("released {}", r.released_lease_ids.join(", "));
        }
        Command::Watch => {
            let mut stream = call(client.watch(pb::WatchRequest {}).await)?;
            // The daemon has subscribed us once the call returns: from here no event is missed.
            eprintln!("watching {target} — Ctrl-C to stop");
            while let Some(event) = stream.next().await {
                let event =
                    event.map_err(|s| anyhow!("the event stream ended: {}", s.message()))?;
                if as_json {
                    println!("{}", event_json(&event));
                } else {
                    println!("{}", describe_event(&event));
                }
            }
        }
        Command::Audit { limit } => {
            let r = call(
                client
                    .list_audit(pb::ListAuditRequest {
                        since_ms: None,
                        limit,
                    })
                    .await,
            )?;
            if as_json {
                return print_json(Value::Array(r.entries.iter().map(audit_json).collect()));
            }
            if r.entries.is_empty() {
                println!("no reassigned binds yet");
            }
            for e in &r.entries {
                let holder = match (e.holder_pid, e.holder_comm.as_str()) {
                    (0, _) => String::new(),
                    (pid, "") => format!(" (held by pid {pid})"),
                    (pid, comm) => format!(" (held by {comm}, pid {pid})"),
                };
                println!(
                    "{}  {} pid {}: {} → {}{}",
                    clock(e.at_ms),
                    e.comm,
                    e.pid,
                    e.requested_port,
                    e.assigned_port,
                    holder
                );
            }
        }
    }
    Ok(())
}

/// A gRPC answer, or an error that carries the daemon's message.
fn call<T>(result: Result<tonic::Response<T>, tonic::Status>) -> Result<T> {
    result
        .map(tonic::Response::into_inner)
        .map_err(|s| match s.code() {
            tonic::Code::Unavailable => anyhow!("the Styxy daemon is unreachable: {}", s.message()),
            _ => anyhow!("{}", s.message()),
        })
}

fn print_json(value: Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}

fn protocol_name(p: i32) -> &'static str {
    match pb::Protocol::try_from(p) {
        Ok(pb::Protocol::Tcp) => "tcp",
        Ok(pb::Protocol::Udp) => "udp",
        _ => "-",
    }
}

fn holder_json(h: &pb::Holder) -> Value {
    json!({
        "port": h.port, "protocol": protocol_name(h.protocol), "pid": h.pid, "comm": h.comm,
        "cmdline": h.cmdline, "service_type": h.service_type, "uid": h.uid, "addresses": h.addresses,
        "since_ms": h.since_ms, "instance_id": h.instance_id,
    })
}

fn lease_json(l: &pb::Lease) -> Value {
    json!({
        "lease_id": l.lease_id, "port": l.port, "service_type": l.service_type, "owner_uid": l.owner_uid,
        "pid": l.pid, "instance_id": l.instance_id, "created_at_ms": l.created_at_ms,
        "expires_at_ms": l.expires_at_ms, "claim": l.claim,
    })
}

fn audit_json(e: &pb::AuditEntry) -> Value {
    json!({
        "at_ms": e.at_ms, "pid": e.pid, "comm": e.comm, "uid": e.uid, "requested_port": e.requested_port,
        "assigned_port": e.assigned_port, "protocol": protocol_name(e.protocol),
        "service_type": e.service_type, "holder_pid": e.holder_pid, "holder_comm": e.holder_comm,
        "instance_id": e.instance_id,
    })
}

fn event_kind(kind: i32) -> &'static str {
    match pb::EventKind::try_from(kind) {
        Ok(pb::EventKind::Bound) => "bound",
        Ok(pb::EventKind::Released) => "released",
        Ok(pb::EventKind::Reassigned) => "reassigned",
        Ok(pb::EventKind::Leased) => "leased",
        Ok(pb::EventKind::LeaseEnded) => "lease-ended",
        _ => "unknown",
    }
}

fn event_json(e: &pb::PortEvent) -> Value {
    json!({
        "kind": event_kind(e.kind), "port": e.port, "protocol": protocol_name(e.protocol), "pid": e.pid,
        "comm": e.comm, "service_type": e.service_type, "requested_port": e.requested_port,
        "at_ms": e.at_ms, "lease_id": e.lease_id, "address": e.address,
    })
}

fn describe_event(e: &pb::PortEvent) -> String {
    let who = if e.pid == 0 {
        String::new()
    } else {
        format!(" pid {} {}", e.pid, e.comm)
    };
    match pb::EventKind::try_from(e.kind) {
        Ok(pb::EventKind::Reassigned) => format!(
            "{}  reassigned {} → {}{} ({})",
            clock(e.at_ms),
            e.requested_port,
            e.port,
            who,
            e.service_type
        ),
        Ok(pb::EventKind::Leased | pb::EventKind::LeaseEnded) => format!(
            "{}  {} {} {}{}",
            clock(e.at_ms),
            event_kind(e.kind),
            e.port,
            e.lease_id,
            who
        ),
        _ => format!(
            "{}  {} {}/{}{} ({})",
            clock(e.at_ms),
            event_kind(e.kind),
            e.port,
            protocol_name(e.protocol),
            who,
            e.service_type
        ),
    }
}

fn describe_holder(h: &pb::Holder) -> String {
    let who = match (h.pid, h.comm.as_str()) {
        (0, _) => format!("uid {} (process not visible)", h.uid),
        (pid, comm) => format!("{comm}, pid {pid}"),
    };
    format!(
        "{who} — {} on {}/{} [{}]",
        h.service_type,
        h.addresses.join(","),
        protocol_name(h.protocol),
        h.cmdline
    )
}

fn describe_lease(l: &pb::Lease) -> String {
    let owner = if l.pid == 0 {
        format!("uid {}", l.owner_uid)
    } else {
        format!("pid {}", l.pid)
    };
    let kind = if l.claim { "claim" } else { "lease" };
    format!(
        "{kind} {} ({}) for {owner}, {}",
        l.lease_id,
        l.service_type,
        expiry(l.expires_at_ms)
    )
}

fn print_holders(holders: &[pb::Holder]) {
    if holders.is_empty() {
        println!("no bound ports seen");
        return;
    }
    println!(
        "{:<6} {:<5} {:<8} {:<16} {:<14} {:<16} ADDRESS",
        "PORT", "PROTO", "PID", "COMM", "TYPE", "INSTANCE"
    );
    for h in holders {
        let pid = if h.pid == 0 {
            "-".to_string()
        } else {
            h.pid.to_string()
        };
        println!(
            "{:<6} {:<5} {:<8} {:<16} {:<14} {:<16} {}",
            h.port,
            protocol_name(h.protocol),
            pid,
            if h.comm.is_empty() { "?" } else { &h.comm },
            h.service_type,
            if h.instance_id.is_empty() {
                "-"
            } else {
                &h.instance_id
            },
            h.addresses.join(",")
        );
    }
}

fn print_leases(leases: &[pb::Lease]) {
    println!(
        "{:<6} {:<12} {:<6} {:<14} {:<8} EXPIRES",
        "PORT", "LEASE", "KIND", "TYPE", "PID"
    );
    for l in leases {
        println!(
            "{:<6} {:<12} {:<6} {:<14} {:<8} {}",
            l.port,
            l.lease_id,
            if l.claim { "claim" } else { "lease" },
            l.service_type,
            if l.pid == 0 {
                "-".to_string()
            } else {
                l.pid.to_string()
            },
            expiry(l.expires_at_ms)
        );
    }
}

fn expiry(expires_at_ms: u64) -> String {
    if expires_at_ms == 0 {
        return "while its process runs".to_string();
    }
    let left = expires_at_ms.saturating_sub(now_ms()) / 1000;
    format!("expires in {}", human_duration(left))
}

fn human_duration(secs: u64) -> String {
    let d = Duration::from_secs(secs);
    match d.as_secs() {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// `HH:MM:SS` (UTC) of a Unix-milliseconds time.
fn clock(ms: u64) -> String {
    let s = ms / 1000;
    format!("{:02}:{:02}:{:02}", (s / 3600) % 24, (s / 60) % 60, s % 60)
}
