//! Real processes the tests start: servers, port holders, and any command whose output lines
//! are collected as they come.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A child process that is killed when this is dropped: a test that fails half-way never leaves
/// the daemon it started running.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
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

/// Runs `command` to its end: its stdout, or an error with both its outputs when it failed.
pub fn run_ok(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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
    let mut server = Server { child, port };
    wait_for_listener(port)?;
    // What answered must be this server: one that died on a taken port would leave the test
    // talking to whoever holds it.
    if let Some(status) = server.child.try_wait()? {
        bail!("python3 -m http.server {port} exited ({status}): the port was taken by another");
    }
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

/// A process whose stdout and stderr lines are collected as they come; killed when dropped.
pub struct Spawned {
    pub child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    pub seen: Vec<String>,
    /// Started as the leader of its own process group, which is killed whole when dropped.
    group: bool,
}

impl Spawned {
    /// Starts `command` as [`Spawned::start`] does, in a process group of its own: dropping it
    /// kills the whole group (an autoreloader's children, a server's workers), not only the
    /// process started.
    pub fn start_group(command: &mut Command) -> Result<Spawned> {
        use std::os::unix::process::CommandExt;
        let mut spawned = Spawned::start(command.process_group(0))?;
        spawned.group = true;
        Ok(spawned)
    }

    /// Kills the process (its whole group, when started with [`Spawned::start_group`]).
    pub fn kill(&mut self) -> Result<()> {
        if self.group {
            if let Ok(group) = libc::pid_t::try_from(self.child.id()) {
                // SAFETY: sends a signal to the group this process leads; no memory involved.
                unsafe { libc::kill(-group, libc::SIGKILL) };
            }
        }
        let _ = self.child.kill();
        self.child
            .wait()
            .context("waiting for the killed process")?;
        Ok(())
    }

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
            group: false,
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
        let _ = self.kill();
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

/// The CPU time the threads of `pid` whose name (`comm`) `counted` accepts have had
/// (`/proc/PID/task/*/schedstat`, in ns); a thread that ends while read is left out.
pub fn cpu_time(pid: u32, counted: impl Fn(&str) -> bool) -> Result<Duration> {
    let mut ns = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?.path();
        let Ok(comm) = std::fs::read_to_string(task.join("comm")) else {
            continue;
        };
        if !counted(comm.trim_end()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(task.join("schedstat")) else {
            continue;
        };
        ns += stat
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .context("schedstat's run time")?;
    }
    Ok(Duration::from_nanos(ns))
}
