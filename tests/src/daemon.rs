//! A real `styxy` daemon on a private socket, state dir and port blocks, and what tests ask it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use styxy_cli::client::{connect, Target};
use styxy_proto::v1 as pb;
use styxy_proto::v1::port_broker_client::PortBrokerClient;
use tonic::transport::Channel;

use crate::binaries::styxy_bin;
use crate::ports::{self, give_back_port_block, BLOCK};
use crate::users::OTHER_USER;

/// A running daemon with its own socket, state dir and service ranges:
/// `storybook` = base..base+23, `api` = base+100..base+199, `bulk` = base+300.. (250 ports, spilling into
/// the next block, which this daemon also owns).
pub struct Daemon {
    child: Child,
    /// Removes `dir` when the daemon drops, a failed test included (its log is printed then).
    _temp: tempfile::TempDir,
    extra_args: Vec<String>,
    /// A command the daemon runs under (`systemd-socket-activate -l …`), or none.
    wrapper: Wrapper,
    pub dir: PathBuf,
    pub socket: PathBuf,
    state_dir: PathBuf,
    pub tcp: String,
    pub base: u16,
}

impl Daemon {
    pub async fn start() -> Result<Daemon> {
        Daemon::start_with(&[]).await
    }

    /// A daemon with extra `styxy daemon` arguments (e.g. `--observer ebpf --cgroup DIR`).
    pub async fn start_with(extra_args: &[&str]) -> Result<Daemon> {
        Daemon::start_under(|_| Wrapper::default(), extra_args).await
    }

    /// The default install: the daemon as root with its eBPF programs at the cgroup root (kernel
    /// sessions enforced; the shim in `styxy run`). `None` (after printing why) where root, cgroup
    /// v2 or the object is missing outside CI (see `ebpf_ready`).
    pub async fn start_root_ebpf() -> Result<Option<Daemon>> {
        Daemon::start_root_ebpf_with(&[]).await
    }

    /// [`Daemon::start_root_ebpf`] with `extra` arguments (`--proxy 127.0.0.1:0`, say).
    pub async fn start_root_ebpf_with(extra: &[&str]) -> Result<Option<Daemon>> {
        let Some(setup) = crate::ebpf::ebpf_ready() else {
            return Ok(None);
        };
        let object = setup.object.to_str().context("utf-8 path")?;
        let mut args = vec![
            "--observer",
            "ebpf",
            "--ebpf-object",
            object,
            "--ebpf-log",
            "info",
        ];
        args.extend_from_slice(extra);
        let daemon = Daemon::start_with(&args).await?;
        let status = daemon.status().await?;
        anyhow::ensure!(
            status.kernel_sessions_enforced,
            "kernel sessions are on at the root: {status:?}"
        );
        Ok(Some(daemon))
    }

    /// Where its names' proxy listens (`--proxy 127.0.0.1:0` picks the port): the port.
    pub async fn proxy_port(&self) -> Result<u16> {
        let status = self.status().await?;
        status
            .proxy_listen
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("the proxy's address in Status: {status:?}"))
    }

    /// A daemon run under the wrapper made for the daemon's port block (its first port), e.g.
    /// `systemd-socket-activate -l 127.0.0.1:PORT`, with extra arguments.
    pub async fn start_under(
        wrapper: impl FnOnce(u16) -> Wrapper,
        extra_args: &[&str],
    ) -> Result<Daemon> {
        let extra_args: Vec<String> = extra_args.iter().map(|a| a.to_string()).collect();
        // The bulk range spills into the next block: it must be this daemon's too.
        let base = ports::port_blocks(2);
        let wrapper = wrapper(base);
        // A dot in the path, as in `~/.local/state`: bpffs refuses names with one, so the pins'
        // directory name must escape it (every eBPF test then shows that it does).
        let temp = tempfile::Builder::new()
            .prefix(&format!("styxy-test.{base}-"))
            .tempdir()?;
        let dir = temp.path().to_path_buf();
        // Let other users reach the socket (tests that act as another uid).
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        std::fs::write(
            dir.join("config.toml"),
            format!(
                "[services.storybook]\nrange = [{}, {}]\n[services.api]\nrange = [{}, {}]\n\
                 [services.bulk]\nrange = [{}, {}]\n[services.bench]\nrange = [10000, 19999]\n",
                base,
                base + 23,
                base + 100,
                base + 199,
                base + 300,
                base + 549
            ),
        )?;
        let socket = dir.join("styxy.sock");
        let state_dir = dir.join("state");
        let (child, tcp) = launch(&wrapper, &dir, &socket, &state_dir, &extra_args).await?;
        Ok(Daemon {
            child,
            _temp: temp,
            extra_args,
            wrapper,
            dir,
            socket,
            state_dir,
            tcp,
            base,
        })
    }

    pub fn log(&self) -> String {
        read_log(&self.dir)
    }

    pub async fn client(&self) -> Result<PortBrokerClient<Channel>> {
        connect(&Target::Unix(self.socket.clone())).await
    }

    pub async fn tcp_client(&self) -> Result<PortBrokerClient<Channel>> {
        connect(&Target::Tcp(self.tcp.clone())).await
    }

    /// Where a root daemon with eBPF pins its programs and maps (see `styxy_common::pins`).
    pub fn pin_dir(&self) -> Option<PathBuf> {
        let state_dir = std::fs::canonicalize(&self.state_dir).ok()?;
        Some(styxy_common::pins::pin_dir_of(&state_dir))
    }

    /// Replaces argument `old` of the daemon's command line by `new`, for its next start.
    pub fn replace_arg(&mut self, old: &str, new: &str) {
        for arg in &mut self.extra_args {
            if arg == old {
                *arg = new.to_string();
            }
        }
    }

    /// The daemon's state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to the daemon process (e.g. `SIGSTOP` to stall it, `SIGCONT` to let it go on).
    pub fn signal(&self, signal: libc::c_int) -> Result<()> {
        let pid = libc::pid_t::try_from(self.pid()).context("pid out of range")?;
        // SAFETY: kill has no memory preconditions; the pid is our own child's.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(std::io::Error::last_os_error()).context("signalling the daemon");
        }
        Ok(())
    }

    /// Waits up to `limit` for the daemon to exit by itself: its status, `None` if it did not.
    pub fn wait_for_exit(&mut self, limit: Duration) -> Result<Option<std::process::ExitStatus>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `kill -9`, and wait until it is gone.
    pub fn kill9(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Starts the daemon again on the same state dir and socket, once the last one has exited.
    pub async fn restart(&mut self) -> Result<()> {
        self.child.wait()?;
        let (child, tcp) = launch(
            &self.wrapper,
            &self.dir,
            &self.socket,
            &self.state_dir,
            &self.extra_args,
        )
        .await?;
        self.child = child;
        self.tcp = tcp;
        Ok(())
    }

    /// `kill -9`, then start again on the same state dir and socket.
    pub async fn kill9_and_restart(&mut self) -> Result<()> {
        self.child.kill()?;
        self.restart().await
    }

    /// Runs the `styxy` CLI against this daemon as [`OTHER_USER`].
    pub fn cli_as_other_user(&self, args: &[&str]) -> Output {
        use std::os::unix::process::CommandExt;
        Command::new(styxy_bin())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .uid(OTHER_USER)
            .output()
            .expect("running the styxy CLI as another user")
    }

    /// Runs the `styxy` CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_command(args)
            .output()
            .expect("running the styxy CLI")
    }

    /// The `styxy` CLI against this daemon, to be given an environment and run.
    pub fn cli_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(styxy_bin());
        command.arg("--socket").arg(&self.socket).args(args);
        command
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A daemon killed with a kernel session live leaves its programs pinned, for a next
        // daemon that will not come: they go with the test.
        if let Some(pins) = self.pin_dir() {
            let _ = std::fs::remove_dir_all(pins);
        }
        give_back_port_block(self.base);
        give_back_port_block(self.base + BLOCK);
        // The directory goes with `_temp`; what the daemon said goes to the failed test's output.
        if std::thread::panicking() {
            eprintln!(
                "--- daemon log ({}) ---\n{}",
                self.dir.display(),
                self.log()
            );
        }
    }
}

fn read_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
}

/// Starts the daemon of a test dir and waits until it answers `Status`; returns it and its TCP address.
/// A daemon that does not come up is killed, and the error carries its log.
/// A command the daemon runs under, and an address to connect to once for it to start the
/// daemon (`systemd-socket-activate` starts its command at the first connection).
#[derive(Clone, Debug, Default)]
pub struct Wrapper {
    pub command: Vec<String>,
    pub wake: Option<std::net::SocketAddr>,
}

async fn launch(
    wrapper: &Wrapper,
    dir: &Path,
    socket: &Path,
    state_dir: &Path,
    extra_args: &[String],
) -> Result<(Child, String)> {
    let log = std::fs::File::create(dir.join("daemon.log"))?;
    let mut command = match wrapper.command.split_first() {
        Some((program, args)) => {
            let mut command = Command::new(program);
            command.args(args).arg(styxy_bin());
            command
        }
        None => Command::new(styxy_bin()),
    };
    let mut child = command
        .arg("daemon")
        .arg("--socket")
        .arg(socket)
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--config")
        .arg(dir.join("config.toml"))
        .args(["--listen", "127.0.0.1:0"])
        // Quick readings, unless a test asks for the installed daemon's interval.
        .args(if extra_args.iter().any(|a| a == "--scan-interval-ms") {
            &[][..]
        } else {
            &["--scan-interval-ms", "100"][..]
        })
        // The socket tables unless a test asks for another observer: `auto` would attach eBPF to
        // the root cgroup (as root), and every test daemon would see every other test's binds.
        .args(if extra_args.iter().any(|a| a == "--observer") {
            &[][..]
        } else {
            &["--observer", "sockets"][..]
        })
        .args(extra_args)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting styxy daemon")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    // Held until the daemon answers: it accepts this connection, and the peer's close ends it.
    let mut wakened = None;
    loop {
        if let (Some(wake), None) = (wrapper.wake, &wakened) {
            wakened = std::net::TcpStream::connect(wake).ok();
        }
        if let Ok(mut client) = connect(&Target::Unix(socket.to_path_buf())).await {
            if let Ok(status) = client.status(pb::StatusRequest {}).await {
                return Ok((child, status.into_inner().tcp_listen));
            }
        }
        if let Some(status) = child.try_wait()? {
            bail!("daemon exited with {status} at start:\n{}", read_log(dir));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("daemon did not answer within 20 s:\n{}", read_log(dir));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Daemon {
    /// `Status` over the Unix socket.
    pub async fn status(&self) -> Result<pb::StatusResponse> {
        Ok(self
            .client()
            .await?
            .status(pb::StatusRequest {})
            .await?
            .into_inner())
    }

    /// The newest audit entries (moved binds), up to 100.
    pub async fn audit(&self) -> Result<Vec<pb::AuditEntry>> {
        let request = pb::ListAuditRequest {
            since_ms: None,
            limit: 100,
        };
        Ok(self
            .client()
            .await?
            .list_audit(request)
            .await?
            .into_inner()
            .entries)
    }

    /// `styxy run -- python3 -u -m http.server PORT --bind 127.0.0.1` for this daemon.
    pub fn shimmed_http_server(&self, port: u16) -> Command {
        self.shimmed(
            "python3",
            &[
                "-u",
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ],
        )
    }

    /// `styxy --socket S run -- PROGRAM ARGS…` for this daemon.
    pub fn shimmed(&self, program: &str, args: &[&str]) -> Command {
        let mut command = Command::new(styxy_bin());
        command
            .arg("--socket")
            .arg(&self.socket)
            .args(["run", "--", program])
            .args(args);
        command
    }

    /// `styxy --socket S run --instance INSTANCE -- env -u LD_PRELOAD PROGRAM ARGS…`: a process
    /// of the session without the shim in it (as a static binary is), so only the kernel acts
    /// for it.
    pub fn unshimmed_in(&self, instance: &str, program: &str, args: &[&str]) -> Command {
        let mut with_env = vec!["-u", "LD_PRELOAD", program];
        with_env.extend_from_slice(args);
        self.shimmed_in(instance, "env", &with_env)
    }

    /// `styxy --socket S run --instance INSTANCE -- PROGRAM ARGS…`: in an agent session.
    pub fn shimmed_in(&self, instance: &str, program: &str, args: &[&str]) -> Command {
        let mut command = Command::new(styxy_bin());
        command
            .arg("--socket")
            .arg(&self.socket)
            .args(["run", "--instance", instance, "--", program])
            .args(args);
        command
    }
}

/// The next event from a Watch stream that `wanted` accepts, within 15 s.
pub async fn next_event(
    events: &mut tonic::Streaming<pb::PortEvent>,
    wanted: impl Fn(&pb::PortEvent) -> bool,
) -> Result<pb::PortEvent> {
    use tokio_stream::StreamExt;
    let found = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(event) = events.next().await {
            let event = event?;
            if wanted(&event) {
                return Ok(event);
            }
        }
        bail!("the event stream ended")
    })
    .await
    .context("no such event within 15 s")??;
    Ok(found)
}

/// A `ResolveBind` request for an IPv4 bind of `port` by `pid`, as the shim sends it.
pub fn resolve_bind_request(pid: u32, port: u16, protocol: pb::Protocol) -> pb::ResolveBindRequest {
    pb::ResolveBindRequest {
        pid,
        port: u32::from(port),
        protocol: protocol as i32,
        family: pb::Family::Inet as i32,
        reuseport: false,
        instance_id: None,
    }
}
