//! The daemon through the real grpcurl binary, using server reflection only (no .proto at hand).

use std::process::Command;

use styxy_tests::{grpcurl, http_server, Daemon};

/// Calls `method` over plaintext TCP at `tcp` with grpcurl (`body` as `-d` when given) and returns
/// its answer, parsed; a failed call or an answer that is not JSON fails the test.
fn grpcurl_json(tcp: &str, method: &str, body: Option<&str>) -> serde_json::Value {
    let mut args = vec!["-plaintext"];
    if let Some(body) = body {
        args.extend(["-d", body]);
    }
    args.extend([tcp, method]);
    let (ok, out, err) = run(&args);
    assert!(ok, "grpcurl {method}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// Runs grpcurl; returns (success, stdout, stderr).
fn run(args: &[&str]) -> (bool, String, String) {
    let bin = grpcurl().expect("grpcurl");
    let out = Command::new(bin)
        .args(args)
        .output()
        .expect("running grpcurl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_lists_describes_and_calls_over_tcp_and_the_unix_socket() -> anyhow::Result<()> {
    if grpcurl().is_none() {
        return Ok(());
    }
    let daemon = Daemon::start().await?;
    let tcp = daemon.tcp.as_str();
    let socket = daemon.socket.display().to_string();

    let (ok, services, err) = run(&["-plaintext", tcp, "list"]);
    assert!(ok, "{err}");
    for name in ["styxy.v1.PortBroker", "grpc.health.v1.Health"] {
        assert!(services.contains(name), "{services}");
    }
    let (ok, described, err) = run(&["-plaintext", tcp, "describe", "styxy.v1.PortBroker"]);
    assert!(ok, "{err}");
    assert!(described.contains("rpc ResolveBind"), "{described}");

    let (ok, health, err) = run(&["-plaintext", tcp, "grpc.health.v1.Health/Check"]);
    assert!(ok && health.contains("SERVING"), "{health}{err}");

    let port = daemon.base + 2;
    let server = http_server(port)?;
    let body = format!("{{\"port\": {port}}}");
    let seen = grpcurl_json(tcp, "styxy.v1.PortBroker/Observe", Some(&body));
    assert_eq!(seen["bound"], true);
    assert_eq!(seen["holders"][0]["pid"], server.pid());
    assert_eq!(seen["holders"][0]["serviceType"], "api");

    let suggested = grpcurl_json(
        tcp,
        "styxy.v1.PortBroker/Suggest",
        Some(r#"{"service_type": "storybook", "count": 2}"#),
    );
    assert_eq!(
        suggested["ports"],
        serde_json::json!([daemon.base, daemon.base + 1])
    );

    // Changing state over TCP is refused, with the Unix-socket command to use instead.
    let (ok, _, err) = run(&[
        "-plaintext",
        "-d",
        r#"{"service_type": "api"}"#,
        tcp,
        "styxy.v1.PortBroker/Allocate",
    ]);
    assert!(!ok);
    assert!(
        err.contains("PermissionDenied") && err.contains("-unix"),
        "{err}"
    );

    // Over the Unix socket it works (grpcurl sends the socket path as :authority, which HTTP/2 refuses:
    // `-authority localhost` is the documented fix).
    let (ok, leased, err) = run(&[
        "-plaintext",
        "-unix",
        "-authority",
        "localhost",
        "-d",
        r#"{"service_type": "api"}"#,
        &socket,
        "styxy.v1.PortBroker/Allocate",
    ]);
    assert!(ok, "{err}");
    let leased: serde_json::Value = serde_json::from_str(&leased)?;
    assert_eq!(leased["port"], daemon.base + 100);
    assert!(leased["leaseId"]
        .as_str()
        .is_some_and(|id| id.starts_with("lease-")));

    let (ok, _, err) = run(&[
        "-plaintext",
        "-d",
        r#"{"port": 0}"#,
        tcp,
        "styxy.v1.PortBroker/Observe",
    ]);
    assert!(!ok);
    assert!(
        err.contains("InvalidArgument") && err.contains("1 to 65535"),
        "{err}"
    );

    let (ok, status, err) = run(&["-plaintext", tcp, "styxy.v1.PortBroker/Status"]);
    assert!(ok, "{err}");
    assert!(status.contains("\"observer\""), "{status}");
    Ok(())
}

/// Every `grpcurl` line of the README, with the documented address and socket replaced by the test
/// daemon's: what the README shows is what works.
#[tokio::test(flavor = "multi_thread")]
async fn every_grpcurl_example_in_the_readme_runs() -> anyhow::Result<()> {
    let Some(bin) = grpcurl() else {
        return Ok(());
    };
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))?;
    let mut in_code = false;
    let mut examples = Vec::new();
    for line in readme.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        } else if in_code && line.starts_with("grpcurl ") {
            examples.push(line);
        }
    }
    assert!(examples.len() >= 8, "README examples: {examples:?}");
    let daemon = Daemon::start().await?;
    let socket = daemon.socket.display().to_string();
    let bin_dir = bin
        .parent()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    for example in examples {
        let command = example
            .replace("127.0.0.1:9876", &daemon.tcp)
            .replace("/run/styxy/styxy.sock", &socket);
        let out = Command::new("sh")
            .args(["-c", &command])
            .env(
                "PATH",
                format!("{bin_dir}:{}", std::env::var("PATH").unwrap_or_default()),
            )
            .output()?;
        assert!(
            out.status.success(),
            "README example failed: {example}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// `styxy --json` prints the daemon's answer in its canonical proto3 JSON mapping: exactly what
/// grpcurl prints for the same call (field names, 64-bit numbers as strings, enums by name).
#[tokio::test(flavor = "multi_thread")]
async fn styxy_json_and_grpcurl_print_the_same_answer() -> anyhow::Result<()> {
    if grpcurl().is_none() {
        return Ok(());
    }
    let daemon = Daemon::start().await?;
    let tcp = daemon.tcp.as_str();
    let port = daemon.base + 5;
    let _server = http_server(port)?;
    let styxy = |args: &[&str]| -> serde_json::Value {
        let out = daemon.cli(args);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    };

    let body = format!("{{\"port\": {port}, \"protocol\": \"PROTOCOL_TCP\"}}");
    let observed = grpcurl_json(tcp, "styxy.v1.PortBroker/Observe", Some(&body));
    assert_eq!(
        styxy(&["--json", "observe", &port.to_string(), "--protocol", "tcp"]),
        observed
    );
    assert_eq!(
        observed["holders"][0]["protocol"], "PROTOCOL_TCP",
        "{observed}"
    );
    assert!(
        observed["holders"][0]["sinceMs"].is_string(),
        "uint64 as a string: {observed}"
    );

    let suggested = grpcurl_json(
        tcp,
        "styxy.v1.PortBroker/Suggest",
        Some(r#"{"service_type": "storybook", "count": 3}"#),
    );
    assert_eq!(
        styxy(&["--json", "suggest", "storybook", "-n", "3"]),
        suggested
    );

    let listed = grpcurl_json(tcp, "styxy.v1.PortBroker/ListPorts", None);
    let mine = |mut v: serde_json::Value| {
        // Other tests' servers come and go between the two calls: compare this test's port only.
        if let Some(holders) = v.get_mut("holders").and_then(|h| h.as_array_mut()) {
            holders.retain(|h| h["port"] == port);
        }
        v["holders"].clone()
    };
    assert_eq!(mine(styxy(&["--json", "ports"])), mine(listed));
    Ok(())
}

/// Python's grpcio on the Unix socket, as the README shows it: with `grpc.default_authority`
/// (without it, grpcio sends the socket's path as the HTTP/2 authority, which is refused).
#[tokio::test(flavor = "multi_thread")]
async fn python_grpcio_calls_the_daemon_over_the_unix_socket() -> anyhow::Result<()> {
    let has_grpcio = Command::new("python3")
        .args(["-c", "import grpc"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_grpcio {
        assert!(
            std::env::var_os("CI").is_none(),
            "grpcio is required in CI: pip install grpcio"
        );
        eprintln!("SKIP: Python grpcio is not installed (pip install grpcio)");
        return Ok(());
    }
    let daemon = Daemon::start().await?;
    let script = "import grpc, sys\n\
channel = grpc.insecure_channel('unix:' + sys.argv[1], options=[('grpc.default_authority', 'localhost')])\n\
status = channel.unary_unary('/styxy.v1.PortBroker/Status', request_serializer=lambda b: b, response_deserializer=lambda b: b)\n\
answer = status(b'', timeout=10)\n\
print('sockets-table' in answer.decode('utf-8', 'replace'))\n";
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(&daemon.socket)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "True");
    Ok(())
}
