//! Lingering ports: a port where an earlier server's connections sit in TIME_WAIT refuses a plain
//! `bind()` (no SO_REUSEADDR) for up to a minute, though nothing is bound there. Moves pass such
//! ports over, by the shim (the broker's pick) and by the kernel programs (their spare ports), so
//! a program that binds without SO_REUSEADDR still starts.

use std::process::Command;

use anyhow::{Context, Result};
use styxy_tests::v1 as pb;
use styxy_tests::{ebpf_ready, eventually, port_holder, Daemon, Spawned};

/// Listens on a port (SO_REUSEADDR, as servers do) until told, then serves one connection and
/// closes its side first — which leaves that side in TIME_WAIT on the port — and its listener.
const LEAVE_TIME_WAIT: &str = "import socket, sys\n\
    port = int(sys.argv[1])\n\
    l = socket.socket()\n\
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
    l.bind(('127.0.0.1', port))\n\
    l.listen(8)\n\
    print('listening', flush=True)\n\
    sys.stdin.readline()\n\
    c = socket.create_connection(('127.0.0.1', port))\n\
    s, _ = l.accept()\n\
    s.close()\n\
    c.recv(1)\n\
    c.close()\n\
    l.close()\n\
    print('closed', flush=True)\n\
    sys.stdin.read()\n";

/// A server that binds without SO_REUSEADDR (Python's plain `socket`): `bound PORT`, or
/// `failed ERRNO`.
const PLAIN_SERVER: &str = "import socket, sys\n\
    s = socket.socket()\n\
    try:\n    \
        s.bind(('127.0.0.1', int(sys.argv[1])))\n\
    except OSError as e:\n    \
        print('failed', e.errno, flush=True)\n    \
        sys.exit(1)\n\
    s.listen(8)\n\
    print('bound', s.getsockname()[1], flush=True)\n\
    sys.stdin.read()\n";

/// Leaves `port` in TIME_WAIT after the daemon has seen a server listen there, and waits until
/// the daemon counts it lingering (`Suggest` offers lingering ports after the others of the
/// `api` range).
async fn leave_time_wait(daemon: &Daemon, port: u16) -> Result<Spawned> {
    let mut server =
        Spawned::start(Command::new("python3").args(["-c", LEAVE_TIME_WAIT, &port.to_string()]))?;
    server.line_where(15, |l| l == "listening")?;
    let mut client = daemon.client().await?;
    // Observe reads the kernel at call time: the daemon knows the server from here on.
    let seen = client
        .observe(pb::ObserveRequest {
            port: u32::from(port),
            protocol: 0,
        })
        .await?
        .into_inner();
    anyhow::ensure!(seen.bound, "the daemon sees the server: {seen:?}");
    server.send_line("close")?;
    server.line_where(15, |l| l == "closed")?;
    let out = Command::new("ss")
        .args(["-Htan", "state", "time-wait", &format!("sport = :{port}")])
        .output()
        .context("running ss")?;
    anyhow::ensure!(
        !out.stdout.is_empty(),
        "no TIME_WAIT on {port}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually(10, "the daemon to count the port lingering", || async {
        let ports = daemon
            .client()
            .await
            .ok()?
            .suggest(pb::SuggestRequest {
                service_type: "api".into(),
                count: 100,
            })
            .await
            .ok()?
            .into_inner()
            .ports;
        // Offered after a higher port: lingering (other ports may linger too, from earlier
        // tests on this block, so not necessarily last).
        let at = ports.iter().position(|p| *p == u32::from(port))?;
        ports[..at]
            .iter()
            .any(|p| *p > u32::from(port))
            .then_some(())
    })
    .await?;
    Ok(server)
}

/// The shim: the move of a held port skips the lingering port right after it, and the plain
/// server starts. (Before, the broker answered that port, the bind failed, and every question
/// again got the same answer: the server failed.)
#[tokio::test(flavor = "multi_thread")]
async fn the_shim_moves_a_plain_bind_past_a_port_in_time_wait() -> Result<()> {
    let daemon = Daemon::start().await?;
    let asked = daemon.base + 150;
    let lingering = asked + 1;
    let _holder = port_holder(&[asked])?;
    let _time_wait = leave_time_wait(&daemon, lingering).await?;

    let mut server =
        Spawned::start(&mut daemon.shimmed("python3", &["-c", PLAIN_SERVER, &asked.to_string()]))?;
    let line = server.line_where(20, |l| l.starts_with("bound ") || l.starts_with("failed "))?;
    let port: u16 = line
        .strip_prefix("bound ")
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("the plain server failed: {:?}", server.seen))?;
    assert!(
        port > lingering && port <= daemon.base + 199,
        "moved past the lingering port: {port}"
    );
    Ok(())
}

/// The kernel programs: plain binds in a kernel session (no shim) of a held port move to spare
/// ports, and the spares leave out the lingering port. The port is the range's lowest: the first
/// move's refill would add it to the spares (the lowest free ports), and the second move, finding
/// no spare above the asked port, would take the lowest, and fail there.
#[tokio::test(flavor = "multi_thread")]
async fn the_kernel_moves_a_plain_bind_past_a_port_in_time_wait() -> Result<()> {
    let Some(setup) = ebpf_ready() else {
        return Ok(());
    };
    let object = setup.object.to_str().context("utf-8 path")?;
    let daemon = Daemon::start_with(&["--observer", "ebpf", "--ebpf-object", object]).await?;
    let asked = daemon.base + 150;
    let lingering = daemon.base + 100;
    let _holder = port_holder(&[asked])?;
    let _time_wait = leave_time_wait(&daemon, lingering).await?;

    let mut servers = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..2 {
        let mut server = Spawned::start(&mut daemon.unshimmed_in(
            "plain",
            "python3",
            &["-c", PLAIN_SERVER, &asked.to_string()],
        ))?;
        let line =
            server.line_where(20, |l| l.starts_with("bound ") || l.starts_with("failed "))?;
        let port: u16 = line
            .strip_prefix("bound ")
            .and_then(|p| p.parse().ok())
            .with_context(|| {
                format!(
                    "a plain server failed: {:?} (before: {ports:?})",
                    server.seen
                )
            })?;
        ports.push(port);
        servers.push(server);
    }
    for port in &ports {
        assert!(
            *port != asked
                && *port != lingering
                && (daemon.base + 100..=daemon.base + 199).contains(port),
            "moved by the kernel past the lingering port: {ports:?}"
        );
    }
    assert_ne!(ports[0], ports[1]);
    Ok(())
}
