//! Names for the human, through the daemon's proxy (`styxy daemon --proxy`): two sessions in two
//! git worktrees each run a server on the same asked port, and each is reached by its name —
//! with curl (which resolves `*.localhost` itself), python's urllib and node's http (by `Host`,
//! since glibc does not resolve `*.localhost` here) — over HTTP/1.1 and h2c; a name follows its
//! server to another port; bodies stream (server-sent events); Vite's HMR WebSocket works through
//! the name (of a session named with `styxy run --name`); an unknown name lists the live ones; a server that drops the connection gets a 502
//! naming it and its session; the named server is told the name asked for and who asked
//! (`X-Forwarded-*`, `Forwarded`), never the client's hop-by-hop headers; the proxy's threads
//! poll after traffic and sleep when idle.
//!
//! On the default install (the root daemon's eBPF programs and the shim) when eBPF can be used
//! here, else on the socket tables (saying so). Tests here run one at a time.

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use styxy_tests::names::{
    bound_port, curl, daemon_with_proxy, http_server_in, vite_in_shop, worktrees,
};
use styxy_tests::{eventually, styxy_bin, vite, Daemon, Spawned, Wrapper};

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread")]
async fn two_worktrees_on_one_port_are_each_reached_by_name() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let (daemon, proxy) = daemon_with_proxy().await?;
    let work = tempfile::tempdir()?;
    worktrees(work.path())?;
    let asked = daemon.base + 10;
    let _x = http_server_in(&daemon, "wt-x", &work.path().join("feature-x"), asked)?;
    let mut y = http_server_in(&daemon, "wt-y", &work.path().join("feature-y"), asked)?;
    let y_port = eventually(10, "Y moved", || async {
        bound_port(&daemon, "wt-y", asked)
            .await
            .ok()
            .filter(|p| *p != asked)
    })
    .await?;

    // curl, by every name; HTTP/1.1 and HTTP/2 (h2c).
    let names = eventually(10, "both names served", || async {
        let x = curl(&format!("http://feature-x.localhost:{proxy}/"), &[]).ok()?;
        let y = curl(&format!("http://feature-y.localhost:{proxy}/"), &[]).ok()?;
        (x.0 == 200 && y.0 == 200).then_some((x.1, y.1))
    })
    .await?;
    assert_eq!(
        names,
        ("I am feature-x\n".into(), "I am feature-y\n".into())
    );
    for (name, whose) in [
        (format!("{asked}.feature-y"), "feature-y"),
        (format!("{asked}.feature-x"), "feature-x"),
        // The test daemon's storybook range holds the asked port.
        ("storybook.feature-y".to_string(), "feature-y"),
    ] {
        let (code, body) = curl(&format!("http://{name}.localhost:{proxy}/"), &[])?;
        assert_eq!(
            (code, body.trim()),
            (200, format!("I am {whose}").as_str()),
            "{name}"
        );
    }
    let (code, body) = curl(
        &format!("http://feature-y.localhost:{proxy}/"),
        &["--http2-prior-knowledge"],
    )?;
    assert_eq!((code, body.as_str()), (200, "I am feature-y\n"), "h2c");
    // What the session's agent sees: each server's URL by name, next to its ports (`styxy
    // session`, and its JSON, which the MCP tool session_ports answers with).
    let listed = daemon.cli(&["session", "--instance", "wt-y"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains("session wt-y (named feature-y)")
            && listed.contains(&format!("http://feature-y.localhost:{proxy}/")),
        "{listed}"
    );
    let json = daemon.cli(&["--json", "session", "--instance", "wt-y"]);
    let value: serde_json::Value = serde_json::from_slice(&json.stdout)?;
    assert_eq!(value["sessionName"], "feature-y", "{value}");
    assert_eq!(
        value["running"][0]["urls"][0],
        format!("http://feature-y.localhost:{proxy}/"),
        "{value}"
    );
    // What the person sees in `styxy ports`: each server's session by its name and its URL by
    // name, not an instance id; `--instance` takes the name too. `styxy audit` names both
    // sessions of Y's move, `styxy observe` the session of the asked port's holder.
    let ports = String::from_utf8(daemon.cli(&["ports"]).stdout)?;
    for (port, whose) in [(asked, "feature-x"), (y_port, "feature-y")] {
        let row = ports
            .lines()
            .find(|l| l.starts_with(&format!("{port} ")))
            .with_context(|| format!("port {port} in {ports}"))?;
        assert!(
            row.contains(&format!(" {whose} "))
                && row.ends_with(&format!("http://{whose}.localhost:{proxy}/")),
            "{row}"
        );
    }
    let only_y: serde_json::Value = serde_json::from_slice(
        &daemon
            .cli(&["--json", "ports", "--instance", "feature-y"])
            .stdout,
    )?;
    let holders = only_y["holders"].as_array().context("holders")?;
    assert!(
        !holders.is_empty()
            && holders
                .iter()
                .all(|h| h["instanceId"] == "wt-y" && h["sessionName"] == "feature-y"),
        "{only_y}"
    );
    assert_eq!(
        holders[0]["urls"][0],
        format!("http://feature-y.localhost:{proxy}/"),
        "{only_y}"
    );
    let audit = String::from_utf8(daemon.cli(&["audit"]).stdout)?;
    let line = audit
        .lines()
        .find(|l| l.contains(&format!(": {asked} → {y_port}")))
        .with_context(|| format!("Y's move in {audit}"))?;
    assert!(
        line.contains("[feature-y]") && line.contains("session feature-x)"),
        "{line}"
    );
    let observed = String::from_utf8(daemon.cli(&["observe", &asked.to_string()]).stdout)?;
    assert!(observed.contains(", session feature-x — "), "{observed}");
    // No name carries the bound port.
    let (code, _) = curl(
        &format!("http://{y_port}.feature-y.localhost:{proxy}/"),
        &[],
    )?;
    assert_eq!(code, 404);

    // python's urllib and node's http, by Host.
    let python = Command::new("python3")
        .args([
            "-c",
            "import sys, urllib.request as u; r = u.Request(f'http://127.0.0.1:{sys.argv[1]}/', \
             headers={'Host': sys.argv[2]}); print(u.urlopen(r, timeout=10).read().decode(), end='')",
            &proxy.to_string(),
            "feature-x.localhost",
        ])
        .output()?;
    assert_eq!(
        String::from_utf8_lossy(&python.stdout),
        "I am feature-x\n",
        "{python:?}"
    );
    let node = Command::new("node")
        .args([
            "-e",
            "require('http').get({host: '127.0.0.1', port: +process.argv[1], path: '/', \
             headers: {host: process.argv[2]}}, r => r.pipe(process.stdout))",
            &proxy.to_string(),
            "feature-y.localhost",
        ])
        .output()?;
    assert_eq!(
        String::from_utf8_lossy(&node.stdout),
        "I am feature-y\n",
        "{node:?}"
    );

    // Y restarts on another port (someone outside every session took its old one meanwhile):
    // its names follow it.
    y.kill()?;
    let squatter = Spawned::start_group(Command::new("python3").args([
        "-c",
        "import socket, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); \
         s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); print('ready', flush=True); sys.stdin.read()",
        &y_port.to_string(),
    ]));
    let mut squatter = squatter?;
    squatter.line_where(10, |l| l == "ready")?;
    let _y = http_server_in(&daemon, "wt-y", &work.path().join("feature-y"), asked)?;
    let again = eventually(10, "Y back elsewhere", || async {
        bound_port(&daemon, "wt-y", asked)
            .await
            .ok()
            .filter(|p| *p != asked && *p != y_port)
    })
    .await?;
    let body = eventually(10, "Y by its name again", || async {
        curl(&format!("http://feature-y.localhost:{proxy}/"), &[])
            .ok()
            .filter(|(code, _)| *code == 200)
            .map(|(_, body)| body)
    })
    .await?;
    assert_eq!(body, "I am feature-y\n", "on {again} now");

    // An unknown name: 404, with the live names.
    let (code, body) = curl(&format!("http://feature-z.localhost:{proxy}/"), &[])?;
    assert_eq!(code, 404, "{body}");
    assert!(
        body.contains("feature-z.localhost") && body.contains("feature-x.localhost, "),
        "{body}"
    );
    Ok(())
}

/// A server-sent event reaches the client while the response is still open, and a server that
/// drops the connection gets a 502 naming it and its session.
#[tokio::test(flavor = "multi_thread")]
async fn bodies_stream_and_a_failing_server_gets_a_502_that_names_it() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let (daemon, proxy) = daemon_with_proxy().await?;
    let work = tempfile::tempdir()?;
    let go = work.path().join("go");
    // One event, then (once `go` exists) a second, and the end.
    let sse = r#"
import http.server, os, sys, time
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/drop":
            self.close_connection = True
            self.connection.close()
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        self.wfile.write(b"data: first\n\n"); self.wfile.flush()
        while not os.path.exists(sys.argv[2]):
            time.sleep(0.05)
        self.wfile.write(b"data: second\n\n"); self.wfile.flush()
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;
    let asked = daemon.base + 12;
    let dir = work.path().join("events");
    std::fs::create_dir_all(&dir)?;
    let _server = Spawned::start_group(
        daemon
            .shimmed_in(
                "sse",
                "python3",
                &["-c", sse, &asked.to_string(), go.to_str().context("utf-8")?],
            )
            .current_dir(&dir),
    )?;
    eventually(10, "the server named", || async {
        curl(
            &format!("http://{asked}.events.localhost:{proxy}/drop"),
            &[],
        )
        .ok()
        .filter(|(code, _)| *code != 404)
    })
    .await?;
    let mut stream = Spawned::start(Command::new("curl").args([
        "-sS",
        "-N",
        "-m",
        "30",
        &format!("http://events.localhost:{proxy}/"),
    ]))?;
    stream.line_where(10, |l| l == "data: first")?;
    std::fs::write(&go, "")?;
    stream.line_where(10, |l| l == "data: second")?;

    let (code, body) = curl(&format!("http://events.localhost:{proxy}/drop"), &[])?;
    assert_eq!(code, 502, "{body}");
    assert!(
        body.contains("events.localhost")
            && body.contains("session events")
            && body.contains("did not answer"),
        "{body}"
    );
    let (_, html) = curl(
        &format!("http://events.localhost:{proxy}/drop"),
        &["-H", "Accept: text/html"],
    )?;
    assert!(html.starts_with("<!doctype html>"), "{html}");
    Ok(())
}

/// Vite's HMR WebSocket through the name, as Vite's page script opens it: the token from
/// `/@vite/client`, then the `vite-hmr` upgrade; an edit arrives.
const WS_CLIENT: &str = r#"
import base64, json, os, re, socket, sys, urllib.request
port, name = int(sys.argv[1]), sys.argv[2]
def get(path):
    r = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Host": name})
    return urllib.request.urlopen(r, timeout=10).read().decode()
token = re.search(r'const wsToken = "([^"]*)"', get("/@vite/client")).group(1)
print("main:", re.search(r'console\.log\("([^"]*)"\)', get("/main.js")).group(1), flush=True)
s = socket.create_connection(("127.0.0.1", port), timeout=30)
key = base64.b64encode(os.urandom(16)).decode()
s.sendall((f"GET /?token={token} HTTP/1.1\r\nHost: {name}\r\nUpgrade: websocket\r\n"
           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
           "Sec-WebSocket-Protocol: vite-hmr\r\n\r\n").encode())
buf = b""
while b"\r\n\r\n" not in buf:
    more = s.recv(4096)
    if not more: sys.exit("closed before the upgrade")
    buf += more
head, buf = buf.split(b"\r\n\r\n", 1)
print("status:", head.split(b"\r\n")[0].decode(), flush=True)
def take(n):
    global buf
    while len(buf) < n:
        more = s.recv(65536)
        if not more: sys.exit("closed")
        buf += more
    out, buf = buf[:n], buf[n:]
    return out
while True:
    b0, b1 = take(2)
    n = b1 & 0x7f
    if n == 126: n = int.from_bytes(take(2), "big")
    elif n == 127: n = int.from_bytes(take(8), "big")
    payload = take(n)
    if b0 & 0x0f != 1: continue
    kind = json.loads(payload).get("type")
    if kind == "connected": print("connected", flush=True)
    if kind in ("update", "full-reload"):
        print("hmr", kind, flush=True)
        break
"#;

#[tokio::test(flavor = "multi_thread")]
async fn vites_hmr_works_through_its_name() -> Result<()> {
    let Some(vite) = vite() else {
        return Ok(());
    };
    let vite = vite.to_str().context("utf-8 path")?.to_string();
    let _one = ONE_AT_A_TIME.lock().await;
    let (daemon, proxy) = daemon_with_proxy().await?;
    let work = tempfile::tempdir()?;
    let app = work.path().join("storefront");
    std::fs::create_dir_all(&app)?;
    std::fs::write(
        app.join("index.html"),
        "<!doctype html><html><body><script type=\"module\" src=\"/main.js\"></script></body></html>\n",
    )?;
    std::fs::write(app.join("main.js"), "console.log(\"storefront\");\n")?;
    let _server = vite_in_shop(&daemon, &vite, &app, daemon.base + 14)?;
    let name = "shop.localhost";
    eventually(10, "Vite by its name", || async {
        curl(&format!("http://{name}:{proxy}/"), &[])
            .ok()
            .filter(|(code, body)| *code == 200 && body.contains("/@vite/client"))
    })
    .await?;
    let mut client =
        Spawned::start(Command::new("python3").args(["-c", WS_CLIENT, &proxy.to_string(), name]))?;
    let main = client.line_where(20, |l| l.starts_with("main:") || l.contains("Error"))?;
    assert_eq!(main, "main: storefront");
    let status = client.line_where(20, |l| l.starts_with("status:") || l.contains("Error"))?;
    assert!(status.contains(" 101 "), "{status}");
    client.line_where(20, |l| l == "connected" || l.contains("Error"))?;
    std::fs::write(
        app.join("main.js"),
        "console.log(\"storefront, edited\");\n",
    )?;
    let hmr = client.line_where(20, |l| l.starts_with("hmr ") || l.contains("Error"))?;
    assert!(hmr.starts_with("hmr "), "{hmr}");
    Ok(())
}

/// A session name that cannot be part of a host name is refused before anything runs, with a
/// name that can.
#[test]
fn a_name_that_cannot_be_a_host_name_is_refused_with_one_that_can() -> Result<()> {
    let out = Command::new(styxy_bin())
        .args([
            "run",
            "--name",
            "My Shop!",
            "--",
            "touch",
            "/nonexistent-dir/ran",
        ])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr.contains("--name \"My Shop!\" cannot be part of a host name")
            && stderr.contains("--name my-shop"),
        "{stderr}"
    );
    Ok(())
}

/// Runs `styxy hook HOOK` with `input` on stdin, from a python process in `dir` (the "agent" the
/// hook registers: the nearest non-shell ancestor), as Claude Code would: what it printed.
fn hook_from(
    dir: &Path,
    daemon: &Daemon,
    hook: &str,
    input: &str,
    env_file: &Path,
) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import subprocess, sys; r = subprocess.run(sys.argv[1:], input=sys.stdin.buffer.read(), \
             stdout=subprocess.PIPE); sys.stdout.buffer.write(r.stdout)",
        ])
        .arg(styxy_bin())
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["hook", hook])
        .env("CLAUDE_ENV_FILE", env_file)
        .current_dir(dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "{out:?}");
    Ok(String::from_utf8(out.stdout)?)
}

/// The agent learns its session's names: SessionStart says how the person reaches the
/// session's servers (and the dashboard), and PostToolUse gives a started server's URL next to
/// its ports.
#[tokio::test(flavor = "multi_thread")]
async fn the_agent_is_told_its_sessions_names() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let (daemon, proxy) = daemon_with_proxy().await?;
    let work = tempfile::tempdir()?;
    worktrees(work.path())?;
    let tree = work.path().join("feature-x");
    let env_file = work.path().join("claude-env.sh");
    let start = r#"{"session_id":"names-1","hook_event_name":"SessionStart","source":"startup"}"#;
    let said = hook_from(&tree, &daemon, "session-start", start, &env_file)?;
    assert!(
        said.contains(&format!(
            "http://feature-x.localhost:{proxy}/ (its main web server)"
        )) && said.contains(&format!("listed live at http://styxy.localhost:{proxy}/")),
        "{said}"
    );
    let asked = daemon.base + 16;
    let _server = http_server_in(&daemon, "claude-names-1", &tree, asked)?;
    let input = r#"{"session_id":"names-1","hook_event_name":"PostToolUse","tool_name":"Bash"}"#;
    let told = eventually(10, "the server told", || async {
        let out = hook_from(&tree, &daemon, "post-tool-use", input, &env_file).ok()?;
        out.contains("started").then_some(out)
    })
    .await?;
    assert!(
        told.contains(&format!("or by name: http://feature-x.localhost:{proxy}/")),
        "{told}"
    );
    // Another project directory named feature-x, in a later session: a name of its own, and
    // `styxy session` says why.
    let clash = work.path().join("elsewhere").join("feature-x");
    std::fs::create_dir_all(&clash)?;
    let _other = http_server_in(&daemon, "clash", &clash, daemon.base + 17)?;
    let listed = daemon.cli(&["session", "--instance", "clash"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains("session clash (named feature-x-2: an older session is named feature-x)"),
        "{listed}"
    );
    Ok(())
}

/// Bad input at the proxy: an oversized head is refused (431), a malformed one too (400), a
/// request without a host gets a page saying so, a client that sends half a head is cut off
/// after the head timeout, and two thousand idle connections neither hang nor starve a request.
/// (The proxy does not depend on the observer: the socket tables here.)
#[tokio::test(flavor = "multi_thread")]
async fn bad_input_at_the_proxy_gets_an_answer_and_never_a_hang() -> Result<()> {
    let daemon = Daemon::start_with(&["--proxy", "127.0.0.1:0"]).await?;
    let proxy = daemon.proxy_port().await?;
    let big = format!("X-Big: {}", "a".repeat(70 * 1024));
    let (code, _) = curl(&format!("http://any.localhost:{proxy}/"), &["-H", &big])?;
    assert_eq!(code, 431, "an oversized head");
    let raw = |bytes: &[u8]| -> Result<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", proxy))?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(15)))?;
        s.write_all(bytes)?;
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        Ok(answer)
    };
    let malformed = raw(b"GARBAGE\x01 / HTTP/9\r\n\r\n")?;
    assert!(malformed.starts_with("HTTP/1.1 400"), "{malformed:?}");
    let hostless = raw(b"GET / HTTP/1.0\r\n\r\n")?;
    assert!(
        hostless.starts_with("HTTP/1.0 400") && hostless.contains("names no host"),
        "{hostless:?}"
    );
    // Half a head, then nothing: closed once the head timeout passes (no answer, no hang).
    let started = std::time::Instant::now();
    let half = raw(b"GET / HTTP/1.1\r\nHost: any.loc")?;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(14),
        "closed after {:?}: {half:?}",
        started.elapsed()
    );
    // Two thousand idle connections, then a request: answered.
    let idle: Vec<std::net::TcpStream> = (0..2000)
        .filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", proxy)).ok())
        .collect();
    assert!(idle.len() > 1900, "{} idle connections opened", idle.len());
    let (code, body) = curl(&format!("http://nothing.localhost:{proxy}/"), &[])?;
    assert_eq!(code, 404, "{body}");
    drop(idle);
    Ok(())
}

/// The installed units' way (`styxy-http.socket`, `styxy-https.socket`): systemd binds the
/// loopback ports, IPv4 and IPv6, and passes them to the daemon (`--proxy systemd`); here
/// `systemd-socket-activate` passes them as systemd does. Without them the daemon runs on,
/// and its status says why the names are not served.
#[tokio::test(flavor = "multi_thread")]
async fn the_proxy_serves_the_sockets_systemd_passes() -> Result<()> {
    if Command::new("systemd-socket-activate")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "systemd-socket-activate is required in CI (apt-get install systemd)"
        );
        eprintln!("SKIP: systemd-socket-activate not found (apt-get install systemd)");
        return Ok(());
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let daemon = Daemon::start_under(
        |base| {
            let (http, https) = (base + 20, base + 21);
            Wrapper {
                command: [
                    "systemd-socket-activate",
                    "-l",
                    &format!("127.0.0.1:{http}"),
                    "-l",
                    &format!("[::1]:{http}"),
                    "-l",
                    &format!("127.0.0.1:{https}"),
                    "--fdname=proxy-http:proxy-http:proxy-https",
                ]
                .map(String::from)
                .to_vec(),
                // It starts the daemon at the first connection, as systemd would.
                wake: Some(std::net::SocketAddr::from(([127, 0, 0, 1], http))),
            }
        },
        &["--proxy", "systemd", "--proxy-tls", "systemd"],
    )
    .await?;
    let (http, https) = (daemon.base + 20, daemon.base + 21);
    let status = daemon.status().await?;
    assert_eq!(
        (
            status.proxy_listen.as_str(),
            status.proxy_tls_listen.as_str(),
            status.proxy_detail.as_str()
        ),
        (
            format!("127.0.0.1:{http}").as_str(),
            format!("127.0.0.1:{https}").as_str(),
            ""
        )
    );
    let work = tempfile::tempdir()?;
    let dir = work.path().join("activated");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("index.html"), "activated\n")?;
    let _server = http_server_in(&daemon, "sa", &dir, daemon.base + 12)?;
    let url = format!("http://activated.localhost:{http}/");
    for family in ["-4", "-6"] {
        let body = eventually(10, "served by name", || async {
            curl(&url, &[family])
                .ok()
                .filter(|(code, _)| *code == 200)
                .map(|(_, body)| body)
        })
        .await?;
        assert_eq!(body, "activated\n", "{family}");
    }
    let (code, body) = curl(
        &format!("https://activated.localhost:{https}/"),
        &["--insecure"],
    )?;
    assert_eq!((code, body.as_str()), (200, "activated\n"));

    // Asked to take systemd's sockets, given none: it serves the broker all the same.
    let bare = Daemon::start_with(&["--proxy", "systemd"]).await?;
    let status = bare.status().await?;
    assert!(status.proxy_listen.is_empty(), "{status:?}");
    assert!(
        status
            .proxy_detail
            .contains("systemd passed no socket named proxy-http")
            && status.proxy_detail.contains("styxy-http.socket"),
        "{status:?}"
    );
    let said = bare.cli(&["status"]);
    assert!(
        String::from_utf8_lossy(&said.stdout).contains("names:      not served: systemd passed"),
        "{said:?}"
    );
    Ok(())
}

/// A named server that takes a request and never answers gets a 504 naming it once the head
/// timeout passes; one that answers at once and streams its body for longer is not cut.
#[tokio::test(flavor = "multi_thread")]
async fn a_silent_server_gets_a_504_and_a_slow_body_is_not_cut() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let (daemon, proxy) =
        styxy_tests::names::daemon_with_proxy_and(&["--proxy-upstream-timeout-secs", "1"]).await?;
    let server = r#"
import http.server, sys, time
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path == "/silent":
            time.sleep(30)
            return
        self.send_response(200)
        self.send_header("Content-Length", "10")
        self.end_headers()
        self.wfile.write(b"first"); self.wfile.flush()
        time.sleep(2.5)
        self.wfile.write(b"-last"); self.wfile.flush()
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;
    let work = tempfile::tempdir()?;
    let dir = work.path().join("slowpoke");
    std::fs::create_dir_all(&dir)?;
    let asked = daemon.base + 13;
    let _server = Spawned::start_group(
        daemon
            .shimmed_in("slow", "python3", &["-c", server, &asked.to_string()])
            .current_dir(&dir),
    )?;
    let name = format!("http://slowpoke.localhost:{proxy}");
    // Named from its bind on (502 until it listens, a moment later).
    let (code, body) = eventually(10, "the server named and listening", || async {
        curl(&format!("{name}/"), &[])
            .ok()
            .filter(|(code, _)| *code != 404 && *code != 502)
    })
    .await?;
    assert_eq!(
        (code, body.as_str()),
        (200, "first-last"),
        "a body slower than the timeout"
    );
    let (code, body) = curl(&format!("{name}/silent"), &[])?;
    assert_eq!(code, 504, "{body}");
    assert!(
        body.contains(&format!("slowpoke.localhost:{proxy} is `python3"))
            && body.contains("session slowpoke")
            && body.contains("within 1 s"),
        "{body}"
    );
    Ok(())
}

/// What a named server is told about a request: the name asked for (`Host` kept, or
/// `127.0.0.1:PORT` with `--proxy-host upstream`), who asked and how (`X-Forwarded-*` and
/// `Forwarded`, appended to what an earlier proxy wrote), and none of the headers of the
/// client's own connection. Three requests over one client connection ask for two names:
/// nothing of one request's name is left on the next.
#[tokio::test(flavor = "multi_thread")]
async fn the_named_server_is_told_which_name_was_asked_and_by_whom() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    for host_header in ["keep", "upstream"] {
        let (daemon, proxy) =
            styxy_tests::names::daemon_with_proxy_and(&["--proxy-host", host_header]).await?;
        let work = tempfile::tempdir()?;
        let dir = work.path().join("echo-h");
        std::fs::create_dir_all(&dir)?;
        let asked = daemon.base + 14;
        let _server = Spawned::start_group(
            daemon
                .shimmed_in("echo", "python3", &["-c", HEADER_ECHO, &asked.to_string()])
                .current_dir(&dir),
        )?;
        eventually(10, "the echo server named and listening", || async {
            curl(&format!("http://echo-h.localhost:{proxy}/"), &[])
                .ok()
                .filter(|(code, _)| *code == 200)
        })
        .await?;
        let bound = bound_port(&daemon, "echo", asked).await?;
        let first = format!("echo-h.localhost:{proxy}");
        let second = format!("{asked}.echo-h.localhost:{proxy}");
        let out = Command::new("python3")
            .args(["-c", ONE_CONNECTION, &proxy.to_string(), &first, &second])
            .output()?;
        ensure!(out.status.success(), "the client: {out:?}");
        let answers: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
        ensure!(answers.len() == 3, "{answers:?}");
        let client_ends: Vec<&serde_json::Value> = answers.iter().map(|a| &a["client"]).collect();
        assert!(
            client_ends.iter().all(|c| *c == client_ends[0]),
            "one connection for the three: {client_ends:?}"
        );
        let seen = |n: usize, name: &str| -> Vec<String> {
            answers[n]["headers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|pair| pair[0] == name)
                .filter_map(|pair| pair[1].as_str().map(str::to_string))
                .collect()
        };
        for (n, asked_for, earlier) in [
            (0, &first, None),
            (1, &second, Some("10.1.2.3")),
            (2, &first, None),
        ] {
            let host = match host_header {
                "keep" => asked_for.clone(),
                _ => format!("127.0.0.1:{bound}"),
            };
            let (for_, forwarded) = match earlier {
                None => (
                    "127.0.0.1".to_string(),
                    format!("for=127.0.0.1;host=\"{asked_for}\";proto=http"),
                ),
                Some(earlier) => (
                    format!("{earlier}, 127.0.0.1"),
                    format!("for={earlier}, for=127.0.0.1;host=\"{asked_for}\";proto=http"),
                ),
            };
            let context = format!("request {n} ({host_header}): {:?}", answers[n]);
            assert_eq!(seen(n, "host"), [host], "{context}");
            assert_eq!(
                seen(n, "x-forwarded-host"),
                [asked_for.as_str()],
                "{context}"
            );
            assert_eq!(seen(n, "x-forwarded-proto"), ["http"], "{context}");
            assert_eq!(seen(n, "x-forwarded-for"), [for_], "{context}");
            assert_eq!(seen(n, "forwarded"), [forwarded], "{context}");
            for hop in ["x-drop", "keep-alive", "proxy-connection", "te"] {
                assert!(seen(n, hop).is_empty(), "{hop} forwarded: {context}");
            }
            assert_eq!(seen(n, "x-kept"), ["yes"], "{context}");
        }
    }
    Ok(())
}

/// A server (port in argv[1]) answering each GET with the headers it got, as JSON pairs in
/// their order, over kept-alive connections.
const HEADER_ECHO: &str = r#"
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = json.dumps([[k.lower(), v] for k, v in self.headers.items()]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

/// A client sending three GETs over one connection to the proxy (port argv[1]): for name
/// argv[2], for argv[3] as if through an earlier proxy, for argv[2] again; each with headers of
/// its own connection that must not be forwarded. Prints each answer's headers and the
/// connection's local address.
const ONE_CONNECTION: &str = r#"
import http.client, json, sys
connection = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=10)
answers = []
for host, earlier in [(sys.argv[2], None), (sys.argv[3], "10.1.2.3"), (sys.argv[2], None)]:
    headers = {"Host": host, "Connection": "keep-alive, X-Drop", "X-Drop": "1",
               "Keep-Alive": "timeout=5", "Proxy-Connection": "keep-alive", "TE": "trailers",
               "X-Kept": "yes"}
    if earlier:
        headers["X-Forwarded-For"] = earlier
        headers["Forwarded"] = "for=" + earlier
    connection.request("GET", "/", headers=headers)
    response = connection.getresponse()
    body = response.read()
    assert response.status == 200, (response.status, body)
    answers.append({"client": list(connection.sock.getsockname()), "headers": json.loads(body)})
print(json.dumps(answers))
"#;

/// The proxy's threads keep polling after traffic for their window (`--proxy-spin-us`, here the
/// largest, 10 ms) and sleep once it has passed: the 40 ms after each answer cost them CPU time
/// (a thread that slept would spend next to none there: the answer was already sent), a quiet
/// second costs them none.
#[tokio::test(flavor = "multi_thread")]
async fn the_proxy_polls_after_traffic_and_sleeps_when_idle() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let metrics = format!("127.0.0.1:{}", styxy_tests::port_block() + 1);
    let (daemon, proxy) = styxy_tests::names::daemon_with_proxy_and(&[
        "--proxy-spin-us",
        "10000",
        "--metrics",
        &metrics,
    ])
    .await?;
    let work = tempfile::tempdir()?;
    let dir = work.path().join("poller");
    std::fs::create_dir_all(&dir)?;
    let _server = http_server_in(&daemon, "poll", &dir, daemon.base + 14)?;
    let url = format!("http://poller.localhost:{proxy}/");
    eventually(10, "the server named", || async {
        curl(&url, &[]).ok().filter(|(code, _)| *code == 200)
    })
    .await?;
    let pid = daemon.pid();
    // Polling is told by the wall time the proxy's threads spent in their windows (the daemon's
    // `proxy_polled_seconds`), not by their CPU time: a polling thread yields its core to
    // whatever else wants it, so beside four busy loops on the two cores it got 10-13 ms of CPU
    // after 30 answers — as much as a sleeping proxy took then to see its clients hang up.
    let polled_before = polled_seconds(&metrics)?;
    let cpu_before = proxy_threads_cpu(pid)?;
    for _ in 0..30 {
        let (code, body) = curl(&url, &[])?;
        ensure!(code == 200, "{code}: {body}");
        tokio::time::sleep(std::time::Duration::from_millis(40)).await;
    }
    let polled = polled_seconds(&metrics)? - polled_before;
    let cpu = proxy_threads_cpu(pid)? - cpu_before;
    // Idle: no window opens, and the threads, asleep, take no CPU.
    let quiet = proxy_threads_cpu(pid)?;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let idle = proxy_threads_cpu(pid)? - quiet;
    let polled_idle = polled_seconds(&metrics)? - polled_before - polled;
    eprintln!(
        "proxy threads: polled {polled:.3} s over 30 answers ({cpu:?} of CPU), then {polled_idle:.3} s \
         and {idle:?} of CPU idle for a second"
    );
    // A window of 10 ms after each of 30 answers (each counted from when the thread's poller
    // runs, a little after the answer: half asked).
    ensure!(
        polled >= 0.15,
        "the proxy's threads polled for only {polled:.3} s after 30 answers with a 10 ms window"
    );
    ensure!(
        polled_idle == 0.0,
        "the proxy's threads polled {polled_idle:.3} s in a second without traffic"
    );
    ensure!(
        idle < std::time::Duration::from_millis(30),
        "the proxy's threads took {idle:?} of CPU in a second without traffic"
    );
    Ok(())
}

/// The daemon's `proxy_polled_seconds` (its metrics at `metrics`).
fn polled_seconds(metrics: &str) -> Result<f64> {
    let (code, text) = curl(&format!("http://{metrics}/metrics"), &[])?;
    ensure!(code == 200, "metrics: {code}");
    text.lines()
        .find_map(|l| l.strip_prefix("styxy_proxy_polled_seconds_total "))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("styxy_proxy_polled_seconds_total in {text}"))
}

/// The CPU time the daemon's proxy threads (`styxy-proxy-N`) have had.
fn proxy_threads_cpu(pid: u32) -> Result<std::time::Duration> {
    styxy_tests::cpu_time(pid, |name| name.starts_with("styxy-proxy-"))
}
