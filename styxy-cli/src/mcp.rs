//! `styxy mcp`: an MCP server over stdio (built on `rmcp`, the official Rust SDK) through which an
//! agent asks Styxy what it would otherwise parse out of CLI tables: its session's servers and
//! views, every port, who holds a port, free ports of a type; and leases and releases ports.
//!
//! Each tool answers the daemon's reply as JSON, the same JSON `styxy --json` prints. A tool that
//! fails (no daemon, a bad argument, a refusal) answers a tool error saying why and what to do;
//! the server itself never exits over one. The session is the agent's: Claude Code starts this
//! server as its child, and the SessionStart hook registered the agent process with the daemon, so
//! the daemon finds the session from this process's ancestry (else from `STYXY_INSTANCE`).

use std::time::Duration;

use anyhow::Result;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::{schemars, tool, tool_handler, tool_router, ServerHandler, ServiceExt as _};
use serde::Deserialize;
use styxy_proto::v1 as pb;

use crate::client::Target;

/// How long one tool waits for the daemon.
const CALL_DEADLINE: Duration = Duration::from_secs(5);

/// The server: where the daemon is.
#[derive(Clone)]
pub struct StyxyMcp {
    target: Target,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct SessionArgs {
    /// The session (instance id); default: the calling agent's session.
    #[serde(default)]
    pub instance_id: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct PortArgs {
    /// The port number (1-65535).
    pub port: u32,
    /// "tcp" or "udp"; default: both.
    #[serde(default)]
    pub protocol: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct SuggestArgs {
    /// A service type: dev, api, storybook, database, … (an unknown one is answered with the known ones).
    pub service_type: String,
    /// How many ports (1-100); default 1.
    #[serde(default)]
    pub count: Option<u32>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct AllocateArgs {
    /// The service type whose range to lease from (dev, api, storybook, …).
    pub service_type: String,
    /// A port to take if it is free; otherwise the lowest free port of the range.
    #[serde(default)]
    pub preferred_port: Option<u32>,
    /// Tie the lease to this process: it ends when the process exits.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Lease lifetime in seconds (without a pid the default is one hour).
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ReleaseArgs {
    /// The leased port to release (give this or lease_id).
    #[serde(default)]
    pub port: Option<u32>,
    /// The lease id to release, e.g. "lease-3" (give this or port).
    #[serde(default)]
    pub lease_id: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct StopArgs {
    /// A port as this session uses it (the port its commands asked for): its server is stopped wherever it landed.
    #[serde(default)]
    pub port: Option<u32>,
    /// A server's name in this session (its service, e.g. "storybook").
    #[serde(default)]
    pub name: Option<String>,
    /// A process of this session.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Stop every server of this session.
    #[serde(default)]
    pub all: Option<bool>,
    /// Seconds between SIGTERM and SIGKILL (default 5, at most 60).
    #[serde(default)]
    pub grace_seconds: Option<u32>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct NoArgs {}

/// A tool's answer: the reply as the JSON `styxy --json` prints, or an error with the fix.
type ToolAnswer = Result<String, String>;

fn json_of(message: &impl serde::Serialize) -> ToolAnswer {
    serde_json::to_string_pretty(message).map_err(|e| format!("could not encode the answer: {e}"))
}

#[tool_router]
impl StyxyMcp {
    pub fn new(target: Target) -> Self {
        StyxyMcp { target }
    }

    /// Connects and runs one call within the deadline, turning every failure into a tool error.
    async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T, String>
    where
        F: FnOnce(crate::commands::Client) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call_within(what, CALL_DEADLINE, f).await
    }

    /// [`Self::call`] with a deadline of its own.
    async fn call_within<T, F, Fut>(
        &self,
        what: &str,
        deadline: Duration,
        f: F,
    ) -> Result<T, String>
    where
        F: FnOnce(crate::commands::Client) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let attempt = async {
            let client = crate::client::connect(&self.target)
                .await
                .map_err(|e| {
                    format!(
                        "the Styxy daemon is not answering at {}: {e:#}. Start it (`sudo systemctl start styxy` \
                         or `styxy daemon`) and call {what} again.",
                        self.target
                    )
                })?;
            f(client)
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| format!("{what} failed: {}", s.message()))
        };
        tokio::time::timeout(deadline, attempt)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "the Styxy daemon at {} did not answer {what} within {} s; it may be stopped or overloaded",
                    self.target,
                    deadline.as_secs()
                ))
            })
    }

    #[tool(
        description = "This session's servers: each one's bound port and, when Styxy moved it, the port it asked for (which this session's commands still use)."
    )]
    async fn session_ports(&self, Parameters(args): Parameters<SessionArgs>) -> ToolAnswer {
        json_of(
            &self
                .session_report("session_ports", args.instance_id)
                .await?,
        )
    }

    #[tool(
        description = "Every bound port on this machine with its process, every lease, and every session's moved ports (views)."
    )]
    async fn list_ports(&self, Parameters(_): Parameters<NoArgs>) -> ToolAnswer {
        let r = self
            .call("list_ports", |mut c| async move {
                c.list_ports(pb::ListPortsRequest {}).await
            })
            .await?;
        json_of(&r)
    }

    #[tool(
        description = "Who holds a port right now: processes bound to it, a lease on it, and its service range."
    )]
    async fn who_holds(&self, Parameters(args): Parameters<PortArgs>) -> ToolAnswer {
        let protocol = match args.protocol.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("") => pb::Protocol::Unspecified,
            Some("tcp") => pb::Protocol::Tcp,
            Some("udp") => pb::Protocol::Udp,
            Some(other) => {
                return Err(format!(
                    "protocol {other:?} is not known: give \"tcp\" or \"udp\", or leave it out for both"
                ))
            }
        };
        let request = pb::ObserveRequest {
            port: args.port,
            protocol: protocol as i32,
        };
        let r = self
            .call("who_holds", |mut c| async move { c.observe(request).await })
            .await?;
        json_of(&r)
    }

    #[tool(
        description = "Free ports of a service type's range (dev, api, storybook, …), lowest first; nothing is reserved."
    )]
    async fn suggest_ports(&self, Parameters(args): Parameters<SuggestArgs>) -> ToolAnswer {
        let count = args.count.unwrap_or(1);
        if !(1..=100).contains(&count) {
            return Err(format!(
                "count {count} is out of range: ask for 1 to 100 ports"
            ));
        }
        let request = pb::SuggestRequest {
            service_type: args.service_type,
            count,
        };
        let r = self
            .call(
                "suggest_ports",
                |mut c| async move { c.suggest(request).await },
            )
            .await?;
        json_of(&r)
    }

    #[tool(
        description = "Lease a free port of a service type for this session (for a pid, or for ttl_seconds); nobody else gets it until it is released."
    )]
    async fn allocate_port(&self, Parameters(args): Parameters<AllocateArgs>) -> ToolAnswer {
        let instance_id = self.session().await;
        let request = pb::AllocateRequest {
            service_type: args.service_type,
            preferred_port: args.preferred_port,
            pid: args.pid,
            instance_id,
            ttl_seconds: args.ttl_seconds,
        };
        let r = self
            .call(
                "allocate_port",
                |mut c| async move { c.allocate(request).await },
            )
            .await?;
        json_of(&r)
    }

    #[tool(description = "Release a lease, by its port or its lease id.")]
    async fn release_port(&self, Parameters(args): Parameters<ReleaseArgs>) -> ToolAnswer {
        let target = match (args.port, args.lease_id) {
            (Some(port), None) => pb::release_request::Target::Port(port),
            (None, Some(id)) => pb::release_request::Target::LeaseId(id),
            _ => return Err("give exactly one of port or lease_id".to_string()),
        };
        let request = pb::ReleaseRequest {
            target: Some(target),
        };
        let r = self
            .call(
                "release_port",
                |mut c| async move { c.release(request).await },
            )
            .await?;
        json_of(&r)
    }

    #[tool(
        description = "Stop servers of this session only: by the port this session uses (its server is found wherever Styxy moved it), by name, by pid, or all. SIGTERM, then SIGKILL after the grace period. Another session's server (or a process of no session) is refused with whose it is. Use this instead of pkill, killall, fuser -k or kill $(lsof -t -i:PORT), which reach other sessions' servers on the same port."
    )]
    async fn stop_server(&self, Parameters(args): Parameters<StopArgs>) -> ToolAnswer {
        use pb::stop_server_request::Target;
        let target = match (args.port, args.name, args.pid, args.all.unwrap_or(false)) {
            (Some(port), None, None, false) => Target::Port(port),
            (None, Some(name), None, false) => Target::Name(name),
            (None, None, Some(pid), false) => Target::Pid(pid),
            (None, None, None, true) => Target::All(true),
            _ => return Err("give exactly one of port, name, pid or all: true".to_string()),
        };
        let grace = args.grace_seconds.unwrap_or(5);
        if grace > 60 {
            return Err("grace_seconds: at most 60".to_string());
        }
        let request = pb::StopServerRequest {
            target: Some(target),
            grace_ms: (grace * 1000).max(1),
            session: String::new(),
            dry_run: false,
        };
        let deadline = CALL_DEADLINE + Duration::from_secs(u64::from(grace) + 10);
        let r = self
            .call_within("stop_server", deadline, |mut c| async move {
                c.stop_server(request).await
            })
            .await?;
        json_of(&r)
    }

    #[tool(
        description = "The Styxy daemon's version, observer (eBPF or socket tables), counters, and the session the calling user focuses (`styxy focus`: that user's localhost:PORT outside the sessions reaches that session's servers)."
    )]
    async fn status(&self, Parameters(_): Parameters<NoArgs>) -> ToolAnswer {
        let r = self
            .call("status", |mut c| async move {
                c.status(pb::StatusRequest {}).await
            })
            .await?;
        json_of(&r)
    }
}

impl StyxyMcp {
    /// Session `instance`'s servers, or (`None`) those of the agent this process serves: the
    /// daemon finds its session from this process's ancestry. Peeks: no report is used up.
    async fn session_report(
        &self,
        what: &str,
        instance: Option<String>,
    ) -> Result<pb::SessionReportResponse, String> {
        let request = pb::SessionReportRequest {
            instance_id: instance.unwrap_or_default(),
            peek: true,
            pid: std::process::id(),
        };
        self.call(what, |mut c| async move { c.session_report(request).await })
            .await
    }

    /// The calling agent's session, if the daemon knows one for this process's ancestry.
    async fn session(&self) -> Option<String> {
        self.session_report("session", None)
            .await
            .ok()
            .map(|r| r.instance_id)
            .filter(|id| !id.is_empty())
    }
}

#[tool_handler(
    name = "styxy",
    instructions = "Styxy brokers ports on this machine: when a server asks for a port another process holds, it is moved to a free port of the same range. Use session_ports to see where this session's servers really listen, who_holds before assuming a port is yours, and allocate_port to reserve one."
)]
impl ServerHandler for StyxyMcp {}

/// Serves MCP on stdin/stdout until the client closes it.
pub async fn serve(target: Target) -> Result<()> {
    // Through the filter that answers lines that are not requests (rmcp would drop them).
    let (transport, pump) = crate::mcp_stdio::transport(tokio::io::stdin(), tokio::io::stdout());
    tokio::spawn(pump);
    let service = StyxyMcp::new(target)
        .serve(transport)
        .await
        .map_err(|e| anyhow::anyhow!("starting the MCP server on stdio: {e}"))?;
    service
        .waiting()
        .await
        .map_err(|e| anyhow::anyhow!("the MCP server stopped: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> StyxyMcp {
        StyxyMcp::new(Target::Unix("/nonexistent/styxy.sock".into()))
    }

    #[tokio::test]
    async fn a_missing_daemon_is_a_tool_error_with_the_fix() {
        let error = server()
            .status(Parameters(NoArgs {}))
            .await
            .expect_err("no daemon");
        assert!(
            error.contains("not answering") && error.contains("systemctl start styxy"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn bad_arguments_are_tool_errors_that_say_what_to_give() {
        let s = server();
        let count = s
            .suggest_ports(Parameters(SuggestArgs {
                service_type: "api".into(),
                count: Some(0),
            }))
            .await
            .expect_err("count 0");
        assert!(count.contains("1 to 100"), "{count}");
        let both = s
            .release_port(Parameters(ReleaseArgs {
                port: Some(8000),
                lease_id: Some("lease-1".into()),
            }))
            .await
            .expect_err("both");
        assert!(both.contains("exactly one of port or lease_id"), "{both}");
        let neither = s
            .release_port(Parameters(ReleaseArgs {
                port: None,
                lease_id: None,
            }))
            .await
            .expect_err("neither");
        assert!(neither.contains("exactly one"), "{neither}");
        let protocol = s
            .who_holds(Parameters(PortArgs {
                port: 8000,
                protocol: Some("sctp".into()),
            }))
            .await
            .expect_err("protocol");
        assert!(protocol.contains("\"tcp\" or \"udp\""), "{protocol}");
        let stop = |port, all| StopArgs {
            port,
            name: None,
            pid: None,
            all,
            grace_seconds: None,
        };
        let both = s
            .stop_server(Parameters(stop(Some(8000), Some(true))))
            .await
            .expect_err("two targets");
        assert!(both.contains("exactly one of port, name, pid"), "{both}");
        let none = s
            .stop_server(Parameters(stop(None, None)))
            .await
            .expect_err("no target");
        assert!(none.contains("exactly one"), "{none}");
    }

    #[test]
    fn every_tool_has_a_description_and_an_object_schema() {
        let tools = StyxyMcp::tool_router().list_all();
        assert_eq!(tools.len(), 8);
        for tool in tools {
            assert!(
                tool.description.as_deref().is_some_and(|d| !d.is_empty()),
                "{}",
                tool.name
            );
            assert_eq!(
                tool.input_schema.get("type").and_then(|t| t.as_str()),
                Some("object"),
                "{}",
                tool.name
            );
        }
    }
}
