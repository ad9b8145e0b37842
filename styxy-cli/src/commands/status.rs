//! `styxy status`: the daemon's version, which observer it uses and why, and its counters.

use anyhow::Result;
use styxy_proto::v1 as pb;

use super::Client;
use crate::output::{call, human_duration, print_json};

pub(super) async fn run(client: &mut Client, as_json: bool) -> Result<()> {
    let s = call(client.status(pb::StatusRequest {}).await)?;
    if as_json {
        return print_json(&s);
    }
    outln!(
        "Styxy {} — up {}",
        s.version,
        human_duration(s.uptime_seconds)
    );
    outln!("observer:   {} ({})", s.observer, s.observer_reason);
    outln!("socket:     {}", s.socket_path);
    let tcp = if s.tcp_listen.is_empty() {
        "off"
    } else {
        &s.tcp_listen
    };
    outln!("tcp:        {tcp}");
    outln!("names:      {}", names_line(&s));
    outln!("state dir:  {}", s.state_dir);
    if s.kernel_sessions_enforced {
        outln!(
            "sessions:   {} managed in the kernel ({})",
            s.kernel_sessions,
            s.kernel_sessions_detail
        );
    } else {
        outln!(
            "sessions:   none in the kernel: {}",
            s.kernel_sessions_detail
        );
    }
    if s.kernel_sessions_enforced {
        match (s.focus_session_name.as_str(), s.focus_instance_id.as_str()) {
            (_, "") => {
                outln!("focus:      none (`styxy focus SESSION` lends you a session's ports)")
            }
            (name, id) if name.is_empty() || name == id => outln!("focus:      {id}"),
            (name, id) => outln!("focus:      {name} ({id})"),
        }
    }
    if s.kernel_sessions_enforced {
        let refused = if s.refused_signals > 0 {
            format!(" · {} refused since start", s.refused_signals)
        } else {
            String::new()
        };
        outln!(
            "kills:      {}{refused}",
            if s.kill_protection {
                "refused between sessions in the kernel (lsm/task_kill)".to_string()
            } else {
                s.kill_protection_detail.clone()
            }
        );
    }
    outln!(
        "bound ports {} · leases {} · instances {} · reassignments {} · events {} ({} dropped) · ResolveBind calls {}",
        s.bound_ports,
        s.leases,
        s.instances,
        s.reassignments,
        s.observed_events,
        s.dropped_events,
        s.resolve_bind_calls
    );
    if let Some(bytes) = s.heap_live_bytes {
        outln!(
            "heap:       {:.1} MB live (what the daemon holds, not what its allocator keeps for reuse)",
            bytes as f64 / 1e6
        );
    }
    if s.refused_connections > 0 {
        outln!(
            "refused connections: {} (a user, or everyone, held as many as the daemon takes)",
            s.refused_connections
        );
    }
    for damage in &s.state_damage {
        outln!("damaged state found at start: {damage}");
    }
    if s.processes_unchecked > 0 {
        outln!(
            "warning: {} process check(s) could not read /proc (out of file descriptors?); those processes kept what they hold",
            s.processes_unchecked
        );
    }
    if s.observer_delay_samples > 0 {
        outln!(
            "bind → broker: p50 {} µs · p99 {} µs (last {} events)",
            s.observer_delay_p50_us,
            s.observer_delay_p99_us,
            s.observer_delay_samples.min(65_536)
        );
    }
    Ok(())
}

/// Where the names' proxy serves, and whether browsers can trust its HTTPS.
fn names_line(s: &pb::StatusResponse) -> String {
    let mut parts = Vec::new();
    if !s.proxy_listen.is_empty() {
        parts.push(format!("http on {}", s.proxy_listen));
    }
    if !s.proxy_tls_listen.is_empty() {
        parts.push(format!(
            "https on {} (local CA {}…; `styxy trust` makes browsers trust it)",
            s.proxy_tls_listen,
            s.local_ca_fingerprint
                .get(..16)
                .unwrap_or(&s.local_ca_fingerprint)
        ));
    }
    if !s.proxy_detail.is_empty() {
        parts.push(format!("not served: {}", s.proxy_detail));
    }
    if parts.is_empty() {
        "off (start the daemon with --proxy 127.0.0.1:80 and --proxy-tls 127.0.0.1:443 to reach \
         servers as http(s)://NAME.localhost/)"
            .to_string()
    } else {
        parts.join(" · ")
    }
}
