//! The focus (`styxy focus`), tried as the person at the keyboard would, on the default set-up
//! (the root daemon with its eBPF programs, the shim in every session): two sessions serve on
//! "the same" port, and everything outside the sessions — headless Chromium, curl over
//! 127.0.0.1 and ::1, a UDP client, a static Go client, a kept-alive connection — reaches the
//! focused session's server, while each session keeps reaching its own. Another user can neither
//! focus nor clear someone else's session, and does not follow it. The focus survives a daemon
//! restart and ends with its session. Without the kernel programs the command says why.
//!
//! Needs root, cgroup v2 and the eBPF object (each test says why when it skips; CI provides them
//! and fails instead); Chromium tests need playwright-core and Debian's Chromium. One test at a
//! time: they attach at the cgroup root.

use std::path::Path;
use std::process::{Command, Output};

use anyhow::{bail, Context, Result};
use styxy_tests::{
    can_act_as_another_user, chromium, eventually, playwright_core, static_programs, Daemon,
    Spawned, OTHER_USER,
};

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A server answering its name: HTTP/1.1 with keep-alive on `::` (IPv4 too) and UDP on
/// 127.0.0.1, both on the port asked (`node -e SERVE NAME PORT`); prints where each listens.
const SERVE: &str = r#"
const http = require('http'), dgram = require('dgram');
const [name, port] = process.argv.slice(1);
const server = http.createServer((req, res) => {
  res.setHeader('content-type', 'text/plain');
  res.end(name);
});
server.keepAliveTimeout = 120000;
server.listen(Number(port), '::', () => {
  console.log('http', server.address().port);
  const udp = dgram.createSocket('udp4');
  udp.on('message', (m, from) => udp.send(name, from.port, from.address));
  udp.bind(Number(port), '127.0.0.1', () => console.log('udp', udp.address().port));
});
"#;

/// Headless Chromium (playwright-core) on one page: loads `URL`, prints `page BODY`, and reloads
/// on each line read (the browser's connections kept alive in between), until `quit`; `switch
/// NAME` first presses session NAME's focus button on the dashboard at `DASHBOARD`.
const BROWSE: &str = r#"
const { chromium } = require(process.argv[1]);
const [url, dashboard] = process.argv.slice(2);
(async () => {
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--disable-background-networking',
           '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
  });
  const page = await browser.newPage();
  const show = async () => console.log('page', (await page.textContent('body')).trim());
  await page.goto(url);
  await show();
  const lines = require('readline').createInterface({ input: process.stdin });
  for await (const line of lines) {
    if (line === 'quit') break;
    if (line.startsWith('switch ')) {
      await page.goto(dashboard);
      await page.click(`article[data-session="${line.slice(7)}"] form.focus button`);
      await page.waitForLoadState();
      console.log('dashboard', (await page.locator('strong.focus').count()), 'focused');
      await page.goto(url);
    } else {
      await page.reload();
    }
    await show();
  }
  await browser.close();
})().catch(e => { console.log('Error', e.message); process.exit(1); });
"#;

/// One HTTP/1.1 connection kept alive: `first BODY`, then on a line, the same request on the
/// same connection: `second BODY`, or `closed ERROR` when the connection was aborted.
const KEEP_ALIVE: &str = r#"
import socket, sys
s = socket.create_connection(('127.0.0.1', int(sys.argv[1])))
def ask():
    s.sendall(b'GET / HTTP/1.1\r\nHost: localhost\r\n\r\n')
    buf = b''
    while b'\r\n\r\n' not in buf:
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError('closed by the peer')
        buf += chunk
    head, body = buf.split(b'\r\n\r\n', 1)
    length = [int(l.split(b':')[1]) for l in head.split(b'\r\n') if l.lower().startswith(b'content-length')][0]
    while len(body) < length:
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError('closed by the peer')
        body += chunk
    return body.decode()
print('first', ask(), flush=True)
sys.stdin.readline()
try:
    print('second', ask(), flush=True)
except OSError as e:
    print('closed', type(e).__name__, flush=True)
"#;

/// A session's server: its HTTP and UDP ports.
struct Served {
    _process: Spawned,
    http: u16,
    udp: u16,
}

/// Starts [`SERVE`] as `name` in session `session`, in a directory called `name` (the session's
/// project, so its name is `name`).
fn serve_in(daemon: &Daemon, work: &Path, session: &str, name: &str, port: u16) -> Result<Served> {
    let dir = work.join(name);
    std::fs::create_dir_all(&dir)?;
    let mut command = daemon.shimmed_in(session, "node", &["-e", SERVE, name, &port.to_string()]);
    command.current_dir(&dir);
    let mut process = Spawned::start(&mut command)?;
    let port_of = |line: String| -> Result<u16> {
        line.split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("a port in {line:?}"))
    };
    let http = port_of(process.line_where(20, |l| l.starts_with("http "))?)?;
    let udp = port_of(process.line_where(20, |l| l.starts_with("udp "))?)?;
    styxy_tests::wait_for_listener(http)?;
    Ok(Served {
        _process: process,
        http,
        udp,
    })
}

/// `curl` of `http://HOST:PORT/` from outside every session (as root, or as `uid`).
fn curl_as(host: &str, port: u16, uid: Option<u32>) -> Result<String> {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new("curl");
    command.args(["-sS", "-g", "-m", "10", &format!("http://{host}:{port}/")]);
    if let Some(uid) = uid {
        command.uid(uid);
    }
    let out = command.output()?;
    if !out.status.success() {
        bail!(
            "curl {host}:{port}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn curl(host: &str, port: u16) -> Result<String> {
    curl_as(host, port, None)
}

/// `curl` from inside `session`.
fn curl_in(daemon: &Daemon, session: &str, port: u16) -> Result<String> {
    let url = format!("http://127.0.0.1:{port}/");
    let out = daemon
        .shimmed_in(session, "curl", &["-sS", "-m", "10", &url])
        .output()?;
    if !out.status.success() {
        bail!(
            "curl in {session}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A UDP datagram to 127.0.0.1:`port` from outside the sessions: `REPLY from PORT` (the port
/// `recvfrom` shows).
fn udp_ask(port: u16) -> Result<String> {
    udp_ask_by(Command::new("python3"), port)
}

/// [`udp_ask`] from inside `session`.
fn udp_ask_in(daemon: &Daemon, session: &str, port: u16) -> Result<String> {
    udp_ask_by(daemon.shimmed_in(session, "python3", &[]), port)
}

fn udp_ask_by(mut command: Command, port: u16) -> Result<String> {
    let script = "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(10)\ns.sendto(b'who',('127.0.0.1',int(sys.argv[1])))\nd,a=s.recvfrom(100)\nprint(d.decode(),'from',a[1])";
    let out = command.args(["-c", script, &port.to_string()]).output()?;
    if !out.status.success() {
        bail!("udp to {port}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn focus(daemon: &Daemon, args: &[&str]) -> Result<String> {
    let mut all = vec!["focus"];
    all.extend_from_slice(args);
    let out = daemon.cli(&all);
    if !out.status.success() {
        bail!(
            "styxy focus {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout_of(&out))
}

/// The page Chromium shows, after each step.
fn page(browser: &mut Spawned) -> Result<String> {
    browser.line_where(60, |l| l.starts_with("page") || l.starts_with("Error"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_focus_sends_the_browser_and_every_client_outside_the_sessions_to_that_session(
) -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(daemon) = Daemon::start_root_ebpf_with(&["--proxy", "127.0.0.1:0"]).await? else {
        return Ok(());
    };
    let proxy = daemon.proxy_port().await?;
    let browser_tools = match (playwright_core(), chromium()) {
        (Some(playwright), Some(_)) => Some(playwright),
        _ => None,
    };
    let work = tempfile::tempdir()?;
    let asked = daemon.base + 10;
    let a = serve_in(&daemon, work.path(), "focus-a", "feature-a", asked)?;
    let b = serve_in(&daemon, work.path(), "focus-b", "feature-b", asked)?;
    assert_eq!((a.http, a.udp), (asked, asked), "A was first");
    assert_ne!(b.http, asked, "B moved (TCP)");
    assert_ne!(b.udp, asked, "B moved (UDP)");
    assert_eq!(
        focus(&daemon, &[])?,
        "no focus: localhost:PORT reaches whatever is bound to PORT"
    );

    let mut browser = match &browser_tools {
        Some(playwright) => Some(Spawned::start(
            Command::new("node")
                .args(["-e", BROWSE])
                .arg(playwright)
                .arg(format!("http://localhost:{asked}/"))
                .arg(format!("http://styxy.localhost:{proxy}/")),
        )?),
        None => None,
    };
    match &mut browser {
        Some(browser) => assert_eq!(page(browser)?, "page feature-a", "the first holder's"),
        None => eprintln!("SKIP: the browser's part (playwright-core or Chromium missing)"),
    }
    let mut kept =
        Spawned::start(Command::new("python3").args(["-c", KEEP_ALIVE, &asked.to_string()]))?;
    assert_eq!(
        kept.line_where(20, |l| l.starts_with("first"))?,
        "first feature-a"
    );
    assert_eq!(curl("127.0.0.1", asked)?, "feature-a");

    // B gets the focus: by its name.
    let said = focus(&daemon, &["feature-b"])?;
    assert!(said.starts_with("focus: feature-b (focus-b)"), "{said}");
    assert!(
        said.contains(&format!("localhost:{asked}: {asked} → {}", b.http)),
        "{said}"
    );
    assert!(
        said.contains("closed"),
        "the kept-alive connections: {said}"
    );
    kept.send_line("")?;
    let second = kept.line_where(20, |l| l.starts_with("second") || l.starts_with("closed"))?;
    assert!(
        second.starts_with("closed"),
        "the connection kept alive to A was closed by the switch: {second}"
    );
    if let Some(browser) = &mut browser {
        browser.send_line("reload")?;
        assert_eq!(page(browser)?, "page feature-b", "a reload shows B");
    }
    assert_eq!(curl("127.0.0.1", asked)?, "feature-b");
    assert_eq!(curl("[::1]", asked)?, "feature-b");
    assert_eq!(curl("localhost", asked)?, "feature-b");
    assert_eq!(udp_ask(asked)?, format!("feature-b from {asked}"));
    // The real ports stay themselves, and names reach their own server whatever the focus (the
    // daemon's proxy never follows one).
    assert_eq!(curl("127.0.0.1", b.http)?, "feature-b");
    assert_eq!(curl("feature-a.localhost", proxy)?, "feature-a");
    assert_eq!(curl("feature-b.localhost", proxy)?, "feature-b");
    // Inside each session: its own server, whatever the focus.
    assert_eq!(curl_in(&daemon, "focus-a", asked)?, "feature-a");
    assert_eq!(curl_in(&daemon, "focus-b", asked)?, "feature-b");
    assert_eq!(
        udp_ask_in(&daemon, "focus-a", asked)?,
        format!("feature-a from {asked}")
    );
    assert_eq!(
        udp_ask_in(&daemon, "focus-b", asked)?,
        format!("feature-b from {asked}")
    );
    // A third session with no server of its own on the port follows the focus too.
    assert_eq!(curl_in(&daemon, "focus-c", asked)?, "feature-b");
    // A static Go client (no shim anywhere): the kernel alone, and getpeername shows the port
    // it asked.
    if let Some(programs) = static_programs() {
        let out = Command::new(&programs.netprobe)
            .args(["get", &asked.to_string()])
            .output()?;
        assert_eq!(stdout_of(&out), format!("feature-b peer {asked}"));
        let out = Command::new(&programs.netprobe)
            .args(["udp-connected", &asked.to_string()])
            .output()?;
        assert_eq!(stdout_of(&out), format!("feature-b from {asked}"));
    }
    // The agent of B is told once (its PostToolUse hook reads this report).
    let mut client = daemon.client().await?;
    let request = || styxy_tests::v1::SessionReportRequest {
        instance_id: "focus-b".into(),
        peek: false,
        pid: 0,
    };
    let told = client.session_report(request()).await?.into_inner();
    assert_eq!((told.focused_by, told.focus_changed), (vec![0], true));
    let again = client.session_report(request()).await?.into_inner();
    assert!(!again.focus_changed, "told once");
    // Visible: `styxy focus`, `styxy status`.
    let shown = focus(&daemon, &[])?;
    assert!(shown.starts_with("focus: feature-b (focus-b)"), "{shown}");
    assert!(
        shown.contains(&format!("localhost:{asked} → {}", b.http)),
        "{shown}"
    );
    let status = stdout_of(&daemon.cli(&["status"]));
    assert!(
        status.contains("focus:      feature-b (focus-b)"),
        "{status}"
    );

    // Back to A (its server holds the port itself), then cleared: A's, as the first holder.
    let said = focus(&daemon, &["focus-a"])?;
    assert!(
        said.starts_with("focus: feature-a (focus-a) (was feature-b (focus-b))"),
        "{said}"
    );
    if let Some(browser) = &mut browser {
        browser.send_line("reload")?;
        assert_eq!(page(browser)?, "page feature-a");
    }
    assert_eq!(curl("127.0.0.1", asked)?, "feature-a");
    focus(&daemon, &["feature-b"])?;
    assert_eq!(curl("127.0.0.1", asked)?, "feature-b");
    let said = focus(&daemon, &["--clear"])?;
    assert!(
        said.starts_with("focus cleared (was feature-b (focus-b))"),
        "{said}"
    );
    assert!(
        said.contains(&format!("localhost:{asked}: {} → {asked}", b.http)),
        "{said}"
    );
    if let Some(browser) = &mut browser {
        browser.send_line("reload")?;
        assert_eq!(page(browser)?, "page feature-a", "the first holder's again");
        // The dashboard's switch: its button, pressed in the browser.
        browser.send_line("switch feature-b")?;
        let pressed =
            browser.line_where(30, |l| l.starts_with("dashboard") || l.starts_with("Error"))?;
        assert_eq!(pressed, "dashboard 1 focused");
        assert_eq!(
            page(browser)?,
            "page feature-b",
            "focused from the dashboard"
        );
        assert!(focus(&daemon, &[])?.starts_with("focus: feature-b (focus-b)"));
        browser.send_line("quit")?;
    }
    // The switch as a script would press it: only with the dashboard's own Origin.
    let dashboard = format!("http://styxy.localhost:{proxy}");
    let post = |origin: Option<&str>, form: &str| -> Result<String> {
        let mut command = Command::new("curl");
        command.args([
            "-sS",
            "-m",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-d",
            form,
        ]);
        if let Some(origin) = origin {
            command.args(["-H", &format!("Origin: {origin}")]);
        }
        let out = command.arg(format!("{dashboard}/focus")).output()?;
        Ok(stdout_of(&out))
    };
    assert_eq!(post(Some(&dashboard), "session=focus-b")?, "303");
    assert_eq!(curl("127.0.0.1", asked)?, "feature-b");
    assert_eq!(post(None, "clear=1")?, "403", "no Origin");
    assert_eq!(
        post(Some("http://evil.localhost"), "clear=1")?,
        "403",
        "another site's page"
    );
    assert_eq!(curl("127.0.0.1", asked)?, "feature-b", "still focused");
    assert_eq!(post(Some(&dashboard), "session=nowhere")?, "404");
    assert_eq!(post(Some(&dashboard), "clear=1")?, "303");
    assert_eq!(curl("[::1]", asked)?, "feature-a");
    assert_eq!(udp_ask(asked)?, format!("feature-a from {asked}"));
    assert_eq!(curl_in(&daemon, "focus-b", asked)?, "feature-b");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn another_user_can_neither_focus_nor_clear_someone_elses_session() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    if !can_act_as_another_user() {
        eprintln!("SKIP: needs root and a second user");
        return Ok(());
    }
    let Some(daemon) = Daemon::start_root_ebpf().await? else {
        return Ok(());
    };
    let work = tempfile::tempdir()?;
    // Readable by the other user (its curl runs from anywhere; the sessions' dirs are root's).
    let asked = daemon.base + 11;
    let _a = serve_in(&daemon, work.path(), "users-a", "users-a", asked)?;
    let b = serve_in(&daemon, work.path(), "users-b", "users-b", asked)?;
    assert_ne!(b.http, asked);

    let refused = daemon.cli_as_other_user(&["focus", "users-b"]);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains("belongs to uid 0") && why.contains("only that user or root may focus it"),
        "{why}"
    );
    focus(&daemon, &["users-b"])?;
    // The other user's clear is about their own focus: root's stands.
    let cleared = daemon.cli_as_other_user(&["focus", "--clear"]);
    assert!(cleared.status.success(), "{cleared:?}");
    assert_eq!(stdout_of(&cleared), "no focus to clear");
    assert!(focus(&daemon, &[])?.starts_with("focus: users-b"));
    // Root's focus is root's: the other user's processes reach the real port.
    assert_eq!(curl("127.0.0.1", asked)?, "users-b");
    assert_eq!(curl_as("127.0.0.1", asked, Some(OTHER_USER))?, "users-a");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_focus_survives_a_daemon_restart_and_ends_with_its_session() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(mut daemon) = Daemon::start_root_ebpf().await? else {
        return Ok(());
    };
    let work = tempfile::tempdir()?;
    let asked = daemon.base + 12;
    let _a = serve_in(&daemon, work.path(), "restart-a", "restart-a", asked)?;
    let b = serve_in(&daemon, work.path(), "restart-b", "restart-b", asked)?;
    assert_ne!(b.http, asked);
    focus(&daemon, &["restart-b"])?;
    assert_eq!(curl("127.0.0.1", asked)?, "restart-b");

    // Stopped (SIGTERM) and started again, then killed and started again.
    daemon.signal(libc::SIGTERM)?;
    daemon.restart().await?;
    assert!(
        focus(&daemon, &[])?.starts_with("focus: restart-b"),
        "{}",
        daemon.log()
    );
    assert_eq!(curl("127.0.0.1", asked)?, "restart-b");
    daemon.kill9_and_restart().await?;
    assert_eq!(curl("127.0.0.1", asked)?, "restart-b");

    // The session ends (Claude Code's SessionEnd): so does its focus, and a connection it lent
    // (kept alive to B's server) is closed with it.
    let mut kept =
        Spawned::start(Command::new("python3").args(["-c", KEEP_ALIVE, &asked.to_string()]))?;
    assert_eq!(
        kept.line_where(20, |l| l.starts_with("first"))?,
        "first restart-b"
    );
    let mut client = daemon.client().await?;
    client
        .end_instance(styxy_tests::v1::EndInstanceRequest {
            instance_id: "restart-b".into(),
            stop_servers: false,
        })
        .await?;
    assert_eq!(
        focus(&daemon, &[])?,
        "no focus: localhost:PORT reaches whatever is bound to PORT"
    );
    kept.send_line("")?;
    let second = kept.line_where(20, |l| l.starts_with("second") || l.starts_with("closed"))?;
    assert!(second.starts_with("closed"), "{second}");
    eventually(5, "the real port again", || async {
        (curl("127.0.0.1", asked).ok()? == "restart-a").then_some(())
    })
    .await?;
    Ok(())
}

/// Without the kernel programs (a daemon of the socket tables): the command says why and what
/// to use instead; showing works.
#[tokio::test(flavor = "multi_thread")]
async fn without_the_kernel_programs_the_focus_says_why_and_points_to_the_names() -> Result<()> {
    let daemon = Daemon::start_with(&["--observer", "sockets"]).await?;
    let out = daemon.cli(&["focus", "anything"]);
    assert!(!out.status.success());
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(
        why.contains("the focus needs the kernel programs") && why.contains(".localhost"),
        "{why}"
    );
    let shown = daemon.cli(&["focus"]);
    assert!(shown.status.success(), "{shown:?}");
    assert!(stdout_of(&shown).contains("not followed here"), "{shown:?}");
    // Bad input: a clear error, nothing changed.
    let both = daemon.cli(&["focus", "x", "--clear"]);
    assert!(!both.status.success());
    Ok(())
}
