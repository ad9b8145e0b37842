//! The `styxy.v1.PortBroker` gRPC service: identifies the caller, validates and translates each request,
//! and hands it to the [`Engine`]. No decisions are made here.
//!
//! Callers on the Unix socket are identified with `SO_PEERCRED`. Callers on loopback TCP cannot be, so the
//! calls that change state are refused there unless the operator opted in (`--tcp-allow-writes`).
//!
//! The short blocking work of a request (a filtered sock_diag query, a few `/proc` reads) runs in
//! place, on the server thread: handing it to `block_in_place` or a blocking pool cost more (a
//! thread hand-off per call, seen in `cargo xtask bench broker`) than the work itself. A rare long
//! `/proc` scan delays only the other connections of the thread it runs on.

pub mod convert;

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::{wrappers::BroadcastStream, Stream, StreamExt};
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use crate::clock::now_ms;
use crate::engine::{AskedHolder, Engine, StopRequest, DEFAULT_GRACE};
use crate::procs;
use styxy_broker::{AllocateRequest, BindDecision, BindRequest, Caller, HolderView, StopTarget};
use styxy_proto::v1 as pb;
use styxy_proto::v1::port_broker_server::PortBroker;

/// The gRPC service.
#[derive(Clone)]
pub struct BrokerService {
    engine: Arc<Engine>,
    /// Lets unidentified (TCP) callers change state, acting as the daemon's own user.
    tcp_allow_writes: bool,
    /// Where to tell TCP callers to go instead.
    socket_hint: String,
}

impl BrokerService {
    pub fn new(engine: Arc<Engine>, tcp_allow_writes: bool, socket_hint: String) -> Self {
        BrokerService {
            engine,
            tcp_allow_writes,
            socket_hint,
        }
    }

    /// The caller of a request that changes state.
    fn caller<T>(&self, request: &Request<T>, call: &str) -> Result<Caller, Status> {
        if let Some(cred) = request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred)
        {
            return Ok(Caller {
                uid: cred.uid(),
                pid: cred.pid().and_then(|p| u32::try_from(p).ok()),
            });
        }
        if self.tcp_allow_writes {
            // SAFETY: geteuid has no preconditions and cannot fail.
            let uid = unsafe { libc::geteuid() };
            return Ok(Caller { uid, pid: None });
        }
        Err(Status::permission_denied(format!(
            "{call} changes state and needs a caller the daemon can identify; call it over the Unix socket \
             (grpcurl -plaintext -unix -authority localhost {} styxy.v1.PortBroker/{call}) or start the daemon with --tcp-allow-writes",
            self.socket_hint
        )))
    }
}

impl BrokerService {
    /// Counts `answer` (its status code) for the metrics, and hands it on.
    fn counted<T>(&self, method: &'static str, answer: Result<T, Status>) -> Result<T, Status> {
        let code = answer
            .as_ref()
            .map_or_else(Status::code, |_| tonic::Code::Ok);
        self.engine.metrics().count_rpc(method, code);
        answer
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::PortEvent, Status>> + Send>>;

/// The calls themselves; [`PortBroker`] below counts each answer for the metrics.
impl BrokerService {
    async fn suggest_call(
        &self,
        request: Request<pb::SuggestRequest>,
    ) -> Result<Response<pb::SuggestResponse>, Status> {
        let req = request.into_inner();
        let service_type = convert::service_type(&req.service_type)?;
        let count = convert::count(req.count, convert::MAX_SUGGEST, 1, "count")?;
        let s = self
            .engine
            .suggest(&service_type, count)
            .map_err(|e| convert::engine_error(e.into()))?;
        Ok(Response::new(pb::SuggestResponse {
            service_type: s.service_type,
            ports: s.ports.into_iter().map(u32::from).collect(),
            range_start: u32::from(s.start),
            range_end: u32::from(s.end),
        }))
    }

    async fn allocate_call(
        &self,
        request: Request<pb::AllocateRequest>,
    ) -> Result<Response<pb::AllocateResponse>, Status> {
        let caller = self.caller(&request, "Allocate")?;
        let req = request.into_inner();
        let service_type = convert::service_type(&req.service_type)?;
        let preferred_port = req
            .preferred_port
            .map(|p| convert::port(p, "preferred_port"))
            .transpose()?;
        if let Some(port) = preferred_port.filter(|p| *p < 1024 && !caller.is_root()) {
            return Err(Status::permission_denied(format!(
                "port {port} is below 1024: only root may lease a privileged port (uid {} asked)",
                caller.uid
            )));
        }
        let process = match req.pid {
            None => None,
            Some(pid) => {
                let pid = convert::pid(pid)?;
                // A lease tied to a process lives as long as it: only its own user (or root)
                // may tie one to it, or anyone could hold a range for the life of pid 1.
                may_act_for(caller, pid)?;
                Some(procs::process_id(pid).ok_or_else(|| unreadable_process(pid))?)
            }
        };
        let lease = self
            .engine
            .allocate(AllocateRequest {
                service_type,
                preferred_port,
                process,
                uid: caller.uid,
                instance_id: convert::instance_id(req.instance_id)?,
                // The project of the process the lease is for, else of the caller.
                project: process
                    .map(|p| p.pid)
                    .or(caller.pid)
                    .and_then(procs::project_of),
                ttl_ms: convert::ttl_ms(req.ttl_seconds)?,
            })
            .await
            .map_err(convert::engine_error)?;
        Ok(Response::new(pb::AllocateResponse {
            port: u32::from(lease.port),
            lease_id: lease.id,
            service_type: lease.service_type,
            expires_at_ms: lease.expires_ms.unwrap_or(0),
        }))
    }

    async fn release_call(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let caller = self.caller(&request, "Release")?;
        let lease = match request.into_inner().target {
            Some(pb::release_request::Target::LeaseId(id)) if !id.is_empty() && id.len() <= 128 => {
                self.engine.release_id(&id, caller).await
            }
            Some(pb::release_request::Target::Port(port)) => {
                let port = convert::port(port, "port")?;
                self.engine.release_port(port, caller).await
            }
            _ => {
                return Err(Status::invalid_argument(
                    "give the lease to release: lease_id (e.g. \"lease-3\") or port",
                ))
            }
        }
        .map_err(convert::engine_error)?;
        Ok(Response::new(pb::ReleaseResponse {
            released_lease_ids: vec![lease.id],
        }))
    }

    async fn observe_call(
        &self,
        request: Request<pb::ObserveRequest>,
    ) -> Result<Response<pb::ObserveResponse>, Status> {
        let req = request.into_inner();
        let port = convert::port(req.port, "port")?;
        let protocol = convert::protocol_opt(req.protocol)?;
        let view = self.engine.observe(port, protocol);
        Ok(Response::new(pb::ObserveResponse {
            port: u32::from(port),
            bound: !view.holders.is_empty(),
            holders: view
                .holders
                .iter()
                .map(|held| self.with_session_name(convert::holder(held)))
                .collect(),
            lease: view.lease.as_ref().map(convert::lease),
            range_service_type: view.range_type.unwrap_or_default(),
        }))
    }

    async fn list_ports_call(
        &self,
        _: Request<pb::ListPortsRequest>,
    ) -> Result<Response<pb::ListPortsResponse>, Status> {
        let list = self.engine.list();
        let orphans: std::collections::HashMap<u32, String> = self
            .engine
            .orphans()
            .into_iter()
            .map(|c| (c.pid, c.instance_id.unwrap_or_default()))
            .collect();
        let named = self.served_names();
        Ok(Response::new(pb::ListPortsResponse {
            holders: list
                .holders
                .iter()
                .map(|held| {
                    let mut holder = self.with_session_name(convert::holder(held));
                    if let Some(ended) = orphans.get(&holder.pid) {
                        holder.orphan = true;
                        holder.instance_id.clone_from(ended);
                        holder.session_name.clear();
                    }
                    if let (Some(named), Ok(port)) = (&named, u16::try_from(holder.port)) {
                        holder.urls = named.urls(holder.pid, port);
                    }
                    holder
                })
                .collect(),
            leases: list.leases.iter().map(convert::lease).collect(),
            views: list.views.iter().map(convert::view_entry).collect(),
            sticky: list.sticky.iter().map(convert::sticky_port).collect(),
            focuses: self.user_focuses(None),
        }))
    }

    async fn watch_call(
        &self,
        _: Request<pb::WatchRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let stream = BroadcastStream::new(self.engine.subscribe()).filter_map(|item| match item {
            Ok(notice) => Some(Ok(convert::event(&notice, now_ms()))),
            Err(lagged) => {
                tracing::warn!("a Watch subscriber fell behind: {lagged}");
                None
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn register_instance_call(
        &self,
        request: Request<pb::RegisterInstanceRequest>,
    ) -> Result<Response<pb::RegisterInstanceResponse>, Status> {
        let caller = self.caller(&request, "RegisterInstance")?;
        let req = request.into_inner();
        let pid = convert::pid(req.pid)?;
        let instance_id = convert::instance_id(req.instance_id)?;
        let process = procs::process_id(pid).ok_or_else(|| unreadable_process(pid))?;
        let uid = may_act_for(caller, pid)?;
        let label = styxy_broker::InstanceLabel {
            project: procs::project_of(pid),
            name: convert::session_name(req.name)?,
        };
        let (id, placed) = self
            .engine
            .register_instance(instance_id, process, uid, label)
            .await
            .map_err(convert::engine_error)?;
        let session_name = self
            .engine
            .session_name(&id)
            .map(|s| s.name)
            .unwrap_or_default();
        let (http, https) = self.engine.proxy_listen();
        Ok(Response::new(pb::RegisterInstanceResponse {
            kernel_session: placed.is_ok(),
            kernel_session_detail: placed.err().unwrap_or_default(),
            session_name,
            proxy_listen: http.unwrap_or_default(),
            proxy_tls_listen: https.unwrap_or_default(),
            focused_by: self
                .engine
                .focuses()
                .into_iter()
                .filter(|f| f.instance_id == id)
                .map(|f| f.uid)
                .collect(),
            instance_id: id,
        }))
    }

    async fn resolve_bind_call(
        &self,
        request: Request<pb::ResolveBindRequest>,
    ) -> Result<Response<pb::ResolveBindResponse>, Status> {
        let caller = self.caller(&request, "ResolveBind")?;
        let req = request.into_inner();
        let pid = convert::pid(req.pid)?;
        let port = convert::port(req.port, "port")?;
        let protocol = convert::protocol_required(req.protocol)?;
        let family = convert::family(req.family)?;
        let instance_id = convert::instance_id(req.instance_id)?;
        let uid = may_act_for(caller, pid)?;
        let asker = procs::process_info(pid).ok_or_else(|| unreadable_process(pid))?;
        let bind = BindRequest {
            asker,
            uid,
            port,
            protocol,
            family,
            reuseport: req.reuseport,
            instance_id,
            project: procs::project_of(pid),
        };
        let decision = self
            .engine
            .resolve_bind(&bind)
            .map_err(|e| convert::engine_error(e.into()))?;
        let requested_type = self.engine.range_type_of(port);
        let response = match decision {
            BindDecision::Keep { port } => pb::ResolveBindResponse {
                action: pb::BindAction::Keep as i32,
                port: u32::from(port),
                holder: None,
                service_type: requested_type,
            },
            BindDecision::Reassign { port, holder } => pb::ResolveBindResponse {
                action: pb::BindAction::Reassign as i32,
                port: u32::from(port),
                holder: holder.map(|h| match h {
                    HolderView::Socket(held) => self.with_session_name(convert::holder(&held)),
                    // A lease has no command: the shim names it as a lease (of its session).
                    HolderView::Lease(lease) => self.with_session_name(pb::Holder {
                        pid: lease.process.map_or(0, |p| p.pid),
                        service_type: lease.service_type,
                        uid: lease.owner_uid,
                        port: u32::from(lease.port),
                        instance_id: lease.instance_id.unwrap_or_default(),
                        ..Default::default()
                    }),
                }),
                service_type: requested_type,
            },
        };
        Ok(Response::new(response))
    }

    async fn status_call(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let s = self.engine.status();
        // The caller's focus, when the transport says who calls.
        let focus = self
            .caller(&request, "Status")
            .ok()
            .and_then(|c| self.engine.focus_of(c.uid).after)
            .unwrap_or_default();
        let focus_name = self.session_name_of(&focus);
        let kill_protection = self.engine.kill_protection();
        Ok(Response::new(pb::StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            observer: s.observer.kind.to_string(),
            observer_reason: s.observer.reason,
            uptime_seconds: s.uptime_seconds,
            bound_ports: s.bound_ports as u32,
            leases: s.leases as u32,
            instances: s.instances as u32,
            dropped_events: s.dropped_events,
            reassignments: s.reassignments,
            state_dir: s.state_dir.display().to_string(),
            socket_path: s
                .endpoints
                .socket_path
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            tcp_listen: s.endpoints.tcp_listen.unwrap_or_default(),
            proxy_listen: s.endpoints.proxy_listen.unwrap_or_default(),
            proxy_tls_listen: s.endpoints.proxy_tls_listen.unwrap_or_default(),
            local_ca_fingerprint: s
                .endpoints
                .local_ca
                .map(|ca| ca.fingerprint().to_string())
                .unwrap_or_default(),
            proxy_detail: s.endpoints.proxy_detail.unwrap_or_default(),
            observed_events: s.observed_events,
            resolve_bind_calls: s.resolve_bind_calls,
            processes_unchecked: procs::UNCHECKED.load(std::sync::atomic::Ordering::Relaxed),
            state_damage: self.engine.state_damage(),
            refused_connections: self.engine.metrics().refused_connections.get(),
            kernel_sessions: s
                .kernel_sessions
                .0
                .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX)),
            kernel_sessions_enforced: s.kernel_sessions.0.is_some(),
            kernel_sessions_detail: s.kernel_sessions.1,
            observer_delay_p50_us: s.observer_delay.0,
            observer_delay_p99_us: s.observer_delay.1,
            observer_delay_samples: s.observer_delay.2,
            focus_instance_id: focus,
            focus_session_name: focus_name,
            kill_protection: kill_protection.0,
            kill_protection_detail: kill_protection.1,
            refused_signals: self.engine.refused_signal_count(),
            heap_live_bytes: crate::heap::live_bytes().map(|b| b as u64),
        }))
    }

    async fn stop_server_call(
        &self,
        request: Request<pb::StopServerRequest>,
    ) -> Result<Response<pb::StopServerResponse>, Status> {
        let caller = self.caller(&request, "StopServer")?;
        let Some(caller_pid) = caller.pid else {
            return Err(Status::permission_denied(format!(
                "StopServer acts in the caller's own session, which the daemon finds from the \
                 caller's process: call it over the Unix socket ({})",
                self.socket_hint
            )));
        };
        let req = request.into_inner();
        use pb::stop_server_request::Target;
        let target = match req.target {
            Some(Target::Port(port)) => {
                StopRequest::Target(StopTarget::Port(convert::port(port, "port")?))
            }
            Some(Target::Name(name)) => {
                let name = name.trim();
                if name.is_empty() || name.len() > 64 || name.chars().any(|c| c.is_control()) {
                    return Err(Status::invalid_argument(
                        "name: a server's name in the session (its service, e.g. storybook), at \
                         most 64 printable characters",
                    ));
                }
                StopRequest::Target(StopTarget::Name(name.to_string()))
            }
            Some(Target::Pid(pid)) => StopRequest::Pid(convert::pid(pid)?),
            Some(Target::All(true)) => StopRequest::Target(StopTarget::All),
            Some(Target::All(false)) | None => {
                return Err(Status::invalid_argument(
                    "say what to stop: a port, a name, a pid, or all of the session's servers",
                ))
            }
        };
        if req.session.len() > 512 || req.session.chars().any(char::is_control) {
            return Err(Status::invalid_argument(
                "session: an id or name of at most 512 printable characters",
            ));
        }
        let grace = grace_period(req.grace_ms)?;
        let outcome = self
            .engine
            .stop_servers(
                caller.uid,
                caller_pid,
                Some(req.session.as_str()),
                target,
                grace,
                req.dry_run,
            )
            .await
            .map_err(convert::engine_error)?;
        Ok(Response::new(pb::StopServerResponse {
            session_name: self.session_name_of(&outcome.instance_id),
            instance_id: outcome.instance_id,
            stopped: outcome.stopped.into_iter().map(stopped_server).collect(),
        }))
    }

    async fn prune_call(
        &self,
        request: Request<pb::PruneRequest>,
    ) -> Result<Response<pb::PruneResponse>, Status> {
        let caller = self.caller(&request, "Prune")?;
        let req = request.into_inner();
        let grace = grace_period(req.grace_ms)?;
        let stopped = self.engine.prune(caller.uid, grace, req.dry_run).await;
        let instance_ids = stopped
            .iter()
            .map(|s| s.candidate.instance_id.clone().unwrap_or_default())
            .collect();
        Ok(Response::new(pb::PruneResponse {
            stopped: stopped.into_iter().map(stopped_server).collect(),
            instance_ids,
        }))
    }

    async fn process_sessions_call(
        &self,
        request: Request<pb::ProcessSessionsRequest>,
    ) -> Result<Response<pb::ProcessSessionsResponse>, Status> {
        let req = request.into_inner();
        if req.pids.len() > 4096 {
            return Err(Status::invalid_argument("pids: at most 4,096"));
        }
        let pids = req
            .pids
            .into_iter()
            .map(convert::pid)
            .collect::<Result<Vec<u32>, Status>>()?;
        let processes = self
            .engine
            .process_sessions(&pids)
            .into_iter()
            .map(|p| {
                let instance_id = p.instance_id.unwrap_or_default();
                pb::ProcessSession {
                    pid: p.pid,
                    comm: p.comm,
                    session_name: self.session_name_of(&instance_id),
                    instance_id,
                    ports: p.ports.into_iter().map(u32::from).collect(),
                }
            })
            .collect();
        Ok(Response::new(pb::ProcessSessionsResponse { processes }))
    }

    /// Every user's focus (only `uid`'s, when given).
    fn user_focuses(&self, uid: Option<u32>) -> Vec<pb::UserFocus> {
        self.engine
            .focuses()
            .into_iter()
            .filter(|f| uid.is_none_or(|uid| f.uid == uid))
            .map(|f| pb::UserFocus {
                uid: f.uid,
                session_name: self.session_name_of(&f.instance_id),
                instance_id: f.instance_id,
            })
            .collect()
    }

    /// `holder` with its session's name, for what a person or agent reads of it (the notice a
    /// moved bind prints, `styxy ports`, `styxy observe`): an instance id means nothing to them.
    fn with_session_name(&self, mut holder: pb::Holder) -> pb::Holder {
        holder.session_name = self.session_name_of(&holder.instance_id);
        holder
    }

    /// Every live server's names, and the proxy's entry they are reached at; `None` when the
    /// proxy does not run (the names are then read for nothing).
    fn served_names(&self) -> Option<convert::ServedNames> {
        let (http, https) = self.engine.proxy_listen();
        let (http, https) = (http.unwrap_or_default(), https.unwrap_or_default());
        let (scheme, listen) = styxy_common::url::proxy_entry(&http, &https)?;
        Some(convert::ServedNames {
            names: self.engine.names(),
            scheme,
            listen: listen.to_string(),
        })
    }

    /// The name of session `instance` (empty for none, or once it has ended).
    fn session_name_of(&self, instance: &str) -> String {
        if instance.is_empty() {
            return String::new();
        }
        self.engine
            .session_name(instance)
            .map(|n| n.name)
            .unwrap_or_default()
    }

    async fn focus_call(
        &self,
        request: Request<pb::FocusRequest>,
    ) -> Result<Response<pb::FocusResponse>, Status> {
        let caller = self.caller(&request, "Focus")?;
        let req = request.into_inner();
        let session = req.session.trim();
        if req.clear && !session.is_empty() {
            return Err(Status::invalid_argument(
                "name a session to focus, or clear the focus: not both",
            ));
        }
        if session.len() > 512 || session.chars().any(char::is_control) {
            return Err(Status::invalid_argument(
                "session: an id or name of at most 512 printable characters",
            ));
        }
        let outcome = if req.clear {
            self.engine.set_focus(None, caller.uid).await
        } else if session.is_empty() {
            Ok(self.engine.focus_of(caller.uid))
        } else {
            self.engine.set_focus(Some(session), caller.uid).await
        }
        .map_err(convert::engine_error)?;
        let (mut available, mut unavailable_reason) = match self.engine.kernel_session_status() {
            (Some(_), _) => (true, String::new()),
            (None, why) => (false, why),
        };
        if let Some(focused) = outcome.after.as_deref() {
            if available && !self.engine.has_kernel_session(focused) {
                available = false;
                unavailable_reason = format!(
                    "session {focused} has no process in the kernel yet (none was started with \
                     `styxy run` or under its agent since the daemon started): the focus applies \
                     once one is"
                );
            }
        }
        let focuses = self.user_focuses((!caller.is_root()).then_some(caller.uid));
        let instance_id = outcome.after.unwrap_or_default();
        let previous = outcome.before.unwrap_or_default();
        Ok(Response::new(pb::FocusResponse {
            uid: caller.uid,
            session_name: self.session_name_of(&instance_id),
            instance_id,
            previous_session_name: self.session_name_of(&previous),
            previous_instance_id: previous,
            ports: outcome
                .retargets
                .iter()
                .map(|r| pb::FocusPort {
                    asked: u32::from(r.asked),
                    from: u32::from(r.from),
                    to: u32::from(r.to),
                })
                .collect(),
            closed_connections: u32::try_from(outcome.closed).unwrap_or(u32::MAX),
            available,
            unavailable_reason,
            focuses,
        }))
    }

    async fn list_audit_call(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        let req = request.into_inner();
        let limit = convert::count(req.limit, convert::MAX_AUDIT, 100, "limit")?;
        let entries = self.engine.audit(req.since_ms, limit);
        Ok(Response::new(pb::ListAuditResponse {
            entries: entries
                .iter()
                .map(|record| {
                    let mut entry = convert::audit_entry(record);
                    entry.session_name = self.session_name_of(&entry.instance_id);
                    entry.holder_session_name = self.session_name_of(&entry.holder_instance_id);
                    entry
                })
                .collect(),
        }))
    }
}

#[tonic::async_trait]
impl PortBroker for BrokerService {
    type WatchStream = EventStream;

    async fn suggest(
        &self,
        request: Request<pb::SuggestRequest>,
    ) -> Result<Response<pb::SuggestResponse>, Status> {
        let answer = self.suggest_call(request).await;
        self.counted("Suggest", answer)
    }

    async fn allocate(
        &self,
        request: Request<pb::AllocateRequest>,
    ) -> Result<Response<pb::AllocateResponse>, Status> {
        let answer = self.allocate_call(request).await;
        self.counted("Allocate", answer)
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let answer = self.release_call(request).await;
        self.counted("Release", answer)
    }

    async fn observe(
        &self,
        request: Request<pb::ObserveRequest>,
    ) -> Result<Response<pb::ObserveResponse>, Status> {
        let answer = self.observe_call(request).await;
        self.counted("Observe", answer)
    }

    async fn list_ports(
        &self,
        request: Request<pb::ListPortsRequest>,
    ) -> Result<Response<pb::ListPortsResponse>, Status> {
        let answer = self.list_ports_call(request).await;
        self.counted("ListPorts", answer)
    }

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let answer = self.watch_call(request).await;
        self.counted("Watch", answer)
    }

    async fn register_instance(
        &self,
        request: Request<pb::RegisterInstanceRequest>,
    ) -> Result<Response<pb::RegisterInstanceResponse>, Status> {
        let answer = self.register_instance_call(request).await;
        self.counted("RegisterInstance", answer)
    }

    async fn end_instance(
        &self,
        request: Request<pb::EndInstanceRequest>,
    ) -> Result<Response<pb::EndInstanceResponse>, Status> {
        let answer = async {
            let caller = self.caller(&request, "EndInstance")?;
            let req = request.into_inner();
            let id = convert::instance_id(Some(req.instance_id))?.ok_or_else(|| {
                Status::invalid_argument("instance_id is empty: name the session to end")
            })?;
            let ended = self
                .engine
                .end_instance(&id, caller.uid)
                .await
                .map_err(convert::engine_error)?;
            let stopped = if req.stop_servers {
                self.engine.stop_servers_of_ended(&id, caller.uid).await
            } else {
                Vec::new()
            };
            Ok(Response::new(pb::EndInstanceResponse {
                leases_ended: u32::try_from(ended).unwrap_or(u32::MAX),
                stopped: stopped.into_iter().map(stopped_server).collect(),
            }))
        }
        .await;
        self.counted("EndInstance", answer)
    }

    async fn resolve_bind(
        &self,
        request: Request<pb::ResolveBindRequest>,
    ) -> Result<Response<pb::ResolveBindResponse>, Status> {
        let started = std::time::Instant::now();
        let answer = self.resolve_bind_call(request).await;
        self.engine
            .metrics()
            .resolve_bind_seconds
            .observe(started.elapsed().as_secs_f64());
        self.counted("ResolveBind", answer)
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let answer = self.status_call(request).await;
        self.counted("Status", answer)
    }

    async fn session_report(
        &self,
        request: Request<pb::SessionReportRequest>,
    ) -> Result<Response<pb::SessionReportResponse>, Status> {
        let answer = async {
            let caller = self.caller(&request, "SessionReport")?;
            let req = request.into_inner();
            let named = Some(req.instance_id).filter(|id| !id.is_empty());
            let id = match convert::instance_id(named)? {
                Some(id) => id,
                None if req.pid != 0 => {
                    let pid = convert::pid(req.pid)?;
                    may_act_for(caller, pid)?;
                    self.engine.instance_of_pid(pid).ok_or_else(|| {
                        Status::not_found(format!(
                            "pid {pid} is in no session: no instance is registered for it or an \
                             ancestor (`styxy run`, the SessionStart hook) and STYXY_INSTANCE is not in \
                             its environment"
                        ))
                    })?
                }
                None => {
                    return Err(Status::invalid_argument(
                        "name the session: instance_id (STYXY_INSTANCE) or the pid of one of its processes",
                    ))
                }
            };
            // Signals refused a moment ago (the kill this report follows) are told now, not a
            // report later: the ring is read here too, not only once a second.
            self.engine.collect_refused_signals();
            let report = self.engine.session_report(&id, caller.uid, req.peek)
                .map_err(convert::engine_error)?;
            let named = self.served_names();
            let session = self.engine.session_name(&id);
            let servers = |list: &[(styxy_broker::SessionServer, Option<AskedHolder>)]| {
                list.iter()
                    .map(|(s, holder)| {
                        let mut server = convert::session_server(s, holder.as_ref());
                        server.asked_holder_session_name =
                            self.session_name_of(&server.asked_holder_instance_id);
                        if let Some(named) = &named {
                            server.urls = named.urls(s.pid, s.port);
                        }
                        server
                    })
                    .collect()
            };
            Ok(Response::new(pb::SessionReportResponse {
                started: servers(&report.started),
                stopped: servers(&report.stopped),
                running: servers(&report.running),
                session_name_wanted: session
                    .as_ref()
                    .and_then(|s| s.wanted.clone())
                    .unwrap_or_default(),
                session_name: session.map(|s| s.name).unwrap_or_default(),
                instance_id: id.clone(),
                focused_by: report.focused_by,
                focus_changed: report.focus_changed,
                refused_signals: self
                    .engine
                    .take_refused_signals(&id, req.peek)
                    .into_iter()
                    .map(|r| pb::RefusedSignal {
                        target_session_name: self.session_name_of(&r.target_instance_id),
                        at_ms: r.at_ms,
                        signal: r.signal,
                        sender_pid: r.sender_pid,
                        sender_comm: r.sender_comm,
                        target_pid: r.target_pid,
                        target_comm: r.target_comm,
                        target_instance_id: r.target_instance_id,
                        target_ports: r.target_ports.into_iter().map(u32::from).collect(),
                    })
                    .collect(),
            }))
        }
        .await;
        self.counted("SessionReport", answer)
    }

    async fn forget(
        &self,
        request: Request<pb::ForgetRequest>,
    ) -> Result<Response<pb::ForgetResponse>, Status> {
        let answer = async {
            let caller = self.caller(&request, "Forget")?;
            let req = request.into_inner();
            let port = req.port.map(|p| convert::port(p, "port")).transpose()?;
            let project = match req.project {
                Some(p) if p.is_empty() || p.len() > 4096 || !p.starts_with('/') => {
                    return Err(Status::invalid_argument(format!(
                        "project must be an absolute directory path (at most 4096 bytes), got {}",
                        convert::quoted(&p)
                    )))
                }
                other => other,
            };
            if project.is_none() && port.is_none() && !req.all {
                return Err(Status::invalid_argument(
                    "say what to forget: a project, a port, or all (set `all` to forget every sticky port of yours)",
                ));
            }
            let forgotten = self
                .engine
                .forget(caller.uid, project, port)
                .await
                .map_err(convert::engine_error)?;
            Ok(Response::new(pb::ForgetResponse {
                forgotten: forgotten.iter().map(convert::sticky_port).collect(),
            }))
        }
        .await;
        self.counted("Forget", answer)
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        let answer = self.list_audit_call(request).await;
        self.counted("ListAudit", answer)
    }

    async fn focus(
        &self,
        request: Request<pb::FocusRequest>,
    ) -> Result<Response<pb::FocusResponse>, Status> {
        let answer = self.focus_call(request).await;
        self.counted("Focus", answer)
    }

    async fn stop_server(
        &self,
        request: Request<pb::StopServerRequest>,
    ) -> Result<Response<pb::StopServerResponse>, Status> {
        let answer = self.stop_server_call(request).await;
        self.counted("StopServer", answer)
    }

    async fn prune(
        &self,
        request: Request<pb::PruneRequest>,
    ) -> Result<Response<pb::PruneResponse>, Status> {
        let answer = self.prune_call(request).await;
        self.counted("Prune", answer)
    }

    async fn process_sessions(
        &self,
        request: Request<pb::ProcessSessionsRequest>,
    ) -> Result<Response<pb::ProcessSessionsResponse>, Status> {
        let answer = self.process_sessions_call(request).await;
        self.counted("ProcessSessions", answer)
    }

    async fn local_ca(
        &self,
        _: Request<pb::LocalCaRequest>,
    ) -> Result<Response<pb::LocalCaResponse>, Status> {
        let answer = match self.engine.local_ca() {
            Some(ca) => Ok(Response::new(pb::LocalCaResponse {
                certificate_pem: ca.certificate_pem().to_string(),
                fingerprint_sha256: ca.fingerprint().to_string(),
                path: ca.path().display().to_string(),
            })),
            None => Err(Status::failed_precondition(
                "the daemon's proxy serves no HTTPS, so it has no certificate authority: start \
                 the daemon with --proxy-tls ADDR (e.g. 127.0.0.1:443)",
            )),
        };
        self.counted("LocalCa", answer)
    }
}

/// `grace_ms` of StopServer and Prune: 0 for the default, at most ten minutes.
fn grace_period(grace_ms: u32) -> Result<std::time::Duration, Status> {
    match grace_ms {
        0 => Ok(DEFAULT_GRACE),
        ms if ms > 600_000 => Err(Status::invalid_argument(
            "grace_ms: at most 600,000 (ten minutes)",
        )),
        ms => Ok(std::time::Duration::from_millis(u64::from(ms))),
    }
}

/// A stopped server as the calls answer it.
fn stopped_server(s: crate::engine::Stopped) -> pb::StoppedServer {
    pb::StoppedServer {
        pid: s.candidate.pid,
        comm: s.candidate.comm,
        cmdline: s.candidate.cmdline,
        ports: s.candidate.ports.into_iter().map(u32::from).collect(),
        asked_port: s.candidate.asked.map_or(0, u32::from),
        ended_by: s.ended_by.to_string(),
    }
}

/// A caller may act for itself, for its own user's processes, or (root) for anyone. Returns the uid the
/// request is made as: the target process's.
fn may_act_for(caller: Caller, pid: u32) -> Result<u32, Status> {
    if caller.pid == Some(pid) {
        return Ok(caller.uid);
    }
    let target_uid = procs::process_uid(pid).ok_or_else(|| unreadable_process(pid))?;
    if caller.is_root() || caller.uid == target_uid {
        Ok(target_uid)
    } else {
        Err(Status::permission_denied(format!(
            "pid {pid} belongs to uid {target_uid}; uid {} may only act for its own processes",
            caller.uid
        )))
    }
}

/// Why a process could not be read from `/proc`: it does not run (an invalid argument), or it
/// runs and the daemon cannot read it now — out of descriptors, say (a resource exhausted, worth
/// trying again) — told apart with `kill(pid, 0)`, which needs no descriptor.
fn unreadable_process(pid: u32) -> Status {
    let Ok(id) = libc::pid_t::try_from(pid) else {
        return Status::invalid_argument(format!("pid {pid} is not a running process"));
    };
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let exists = unsafe { libc::kill(id, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    if exists {
        Status::resource_exhausted(format!(
            "pid {pid} runs, but the daemon could not read /proc/{pid} just now (out of file \
             descriptors?); try again"
        ))
    } else {
        Status::invalid_argument(format!("pid {pid} is not a running process"))
    }
}
