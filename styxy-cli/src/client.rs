//! Connecting to the daemon: over its Unix socket (the default) or loopback TCP.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

use styxy_proto::v1::port_broker_client::PortBrokerClient;

/// Where the daemon is.
#[derive(Clone, Debug)]
pub enum Target {
    Unix(PathBuf),
    Tcp(String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Unix(p) => write!(f, "{}", p.display()),
            Target::Tcp(a) => write!(f, "{a}"),
        }
    }
}

/// A channel to the daemon, with a message that says how to fix it when the daemon is not there.
pub async fn channel(target: &Target) -> Result<Channel> {
    let hint = |e: tonic::transport::Error| {
        // The innermost cause says it all ("No such file or directory"); the layers above repeat it.
        let mut cause: &dyn std::error::Error = &e;
        while let Some(inner) = cause.source() {
            cause = inner;
        }
        anyhow::anyhow!(
            "cannot reach the Styxy daemon at {target} ({cause}). Is it running? Start it with `styxy daemon` \
             (or `sudo systemctl start styxy`), or point to it with --socket PATH / STYXY_SOCKET"
        )
    };
    match target {
        Target::Unix(path) => {
            let path = path.clone();
            // The URI is required by the API but unused: the connector below dials the socket.
            Endpoint::from_static("http://styxy.local")
                .connect_timeout(Duration::from_secs(2))
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                }))
                .await
                .map_err(hint)
        }
        Target::Tcp(addr) => Endpoint::from_shared(format!("http://{addr}"))
            .with_context(|| format!("{addr} is not a valid address (expected HOST:PORT)"))?
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
            .map_err(hint),
    }
}

pub async fn connect(target: &Target) -> Result<PortBrokerClient<Channel>> {
    Ok(PortBrokerClient::new(channel(target).await?))
}

/// Registers `pid` in the session `instance` (a new one when `None`), waiting at most `within`:
/// the daemon's answer or its refusal, or an error when no daemon answered in time.
pub async fn register_instance(
    target: &Target,
    instance: Option<String>,
    name: Option<String>,
    pid: u32,
    within: std::time::Duration,
) -> Result<Result<styxy_proto::v1::RegisterInstanceResponse, tonic::Status>> {
    let call = async {
        let mut client = connect(target).await?;
        let answer = client
            .register_instance(styxy_proto::v1::RegisterInstanceRequest {
                instance_id: instance,
                pid,
                name,
            })
            .await;
        Ok(answer.map(tonic::Response::into_inner))
    };
    tokio::time::timeout(within, call)
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {} s", within.as_secs())))
}
