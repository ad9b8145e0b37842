//! The daemon as a library: `styxy_daemon::run(options, shutdown)` started inside the test's own
//! process and stopped by completing its shutdown future, as the binary does on SIGTERM.

use std::time::Duration;

use styxy_cli::client::{connect, Target};
use styxy_daemon::{ObserverChoice, Options};
use styxy_tests::v1 as pb;

/// Starts the daemon in this process; returns its task and the sender that stops it.
fn start(
    options: &Options,
) -> (
    tokio::task::JoinHandle<anyhow::Result<()>>,
    tokio::sync::oneshot::Sender<()>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(styxy_daemon::run(options.clone(), async move {
        let _ = stopped.await;
    }));
    (task, stop)
}

async fn client_when_up(
    socket: &std::path::Path,
) -> anyhow::Result<pb::port_broker_client::PortBrokerClient<tonic::transport::Channel>> {
    for _ in 0..200 {
        if let Ok(client) = connect(&Target::Unix(socket.to_path_buf())).await {
            return Ok(client);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::bail!(
        "the in-process daemon never answered on {}",
        socket.display()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_runs_in_process_and_stops_when_its_shutdown_completes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let options = Options {
        socket: dir.path().join("styxy.sock"),
        listen: None,
        state_dir: dir.path().join("state"),
        config: None,
        observer: ObserverChoice::Sockets,
        scan_interval: Duration::from_millis(200),
        tcp_allow_writes: false,
        cgroup: None,
        ebpf_object: None,
        metrics: None,
        proxy: None,
        proxy_tls: None,
        proxy_upstream_timeout: std::time::Duration::from_secs(60),
        proxy_spin: std::time::Duration::ZERO,
        proxy_host_header: styxy_daemon::HostHeader::Keep,
        ebpf_log: styxy_daemon::KernelLogLevel::Warn,
        kill_protection: true,
        idle_timeout: std::time::Duration::from_secs(120),
    };

    let (task, stop) = start(&options);
    let mut client = client_when_up(&options.socket).await?;
    let status = client.status(pb::StatusRequest {}).await?.into_inner();
    assert_eq!(status.observer, "sockets-table");
    let lease = client
        .allocate(pb::AllocateRequest {
            service_type: "ai".into(),
            ttl_seconds: Some(600),
            ..Default::default()
        })
        .await?
        .into_inner();
    drop(client);

    stop.send(())
        .map_err(|()| anyhow::anyhow!("the daemon task is gone"))?;
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .map_err(|_| anyhow::anyhow!("the daemon did not stop within 10 s of its shutdown"))???;
    assert!(
        !options.socket.exists(),
        "the socket is removed on the way out"
    );

    // Every task was joined and the store closed: a second daemon on the same state dir has the lease.
    let (task, stop) = start(&options);
    let mut client = client_when_up(&options.socket).await?;
    let seen = client
        .observe(pb::ObserveRequest {
            port: lease.port,
            protocol: 0,
        })
        .await?
        .into_inner();
    assert_eq!(
        seen.lease.map(|l| l.lease_id),
        Some(lease.lease_id),
        "the lease survived the stop"
    );
    drop(client);
    stop.send(())
        .map_err(|()| anyhow::anyhow!("the daemon task is gone"))?;
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .map_err(|_| anyhow::anyhow!("the daemon did not stop"))???;
    Ok(())
}
