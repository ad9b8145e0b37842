//! The kernel path: statically linked servers (Go with `CGO_ENABLED=0`, C linked against static
//! musl), which no `LD_PRELOAD` shim reaches, moved off held ports by the eBPF programs of a daemon
//! attached at the cgroup root, and reached by their session at the port they asked for.
//!
//! Needs root, cgroup v2, the eBPF object, Go and musl-gcc; each test says why when it skips (CI
//! provides them all, and fails instead). Tests here run one at a time: one of them kills its
//! daemon and checks by program id that nothing of it stays attached.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use styxy_tests::v1 as pb;
use styxy_tests::{
    ebpf_ready, eventually, helper_bin, static_programs, styxy_bin, Daemon, EbpfSetup, Spawned,
    StaticPrograms,
};

/// One test at a time (see the module doc).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A daemon with the eBPF programs at the cgroup root (the default): kernel sessions on.
async fn root_daemon(_setup: &EbpfSetup) -> Result<Daemon> {
    let daemon = Daemon::start_root_ebpf()
        .await?
        .context("eBPF is ready: the caller checked")?;
    let status = daemon.status().await?;
    assert!(
        status.kernel_sessions_enforced
            && status.observer_reason.contains("kernel sessions enforced"),
        "kernel sessions are on at the root: {status:?}"
    );
    Ok(daemon)
}

fn ready() -> Option<(EbpfSetup, StaticPrograms)> {
    Some((ebpf_ready()?, static_programs()?))
}

/// `styxy run --instance SESSION -- PROGRAM ARGS…` against `daemon`.
fn in_session(daemon: &Daemon, session: &str, program: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(styxy_bin());
    command
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["run", "--instance", session, "--"])
        .arg(program)
        .args(args);
    command
}

/// `bind-probe ARGS…` in the session `ks-native` without the shim, so only the kernel acts:
/// what it printed.
fn kernel_only_probe(daemon: &Daemon, args: &[&str]) -> Result<String> {
    let probe = helper_bin("bind-probe");
    let mut probe = daemon.unshimmed_in("ks-native", probe.to_str().context("utf-8")?, args);
    Ok(String::from_utf8_lossy(&probe.output()?.stdout).to_string())
}

/// The port in a `listening PORT` line.
fn listening_port(server: &mut Spawned) -> Result<u16> {
    let line = server.line_where(15, |l| {
        l.starts_with("listening ") || l.starts_with("error") || l.contains("bind")
    })?;
    line.strip_prefix("listening ")
        .and_then(|p| p.trim().parse().ok())
        .with_context(|| format!("the server did not listen: {line:?}"))
}

/// Runs a client to the end; its stdout's first line.
fn client_line(mut command: Command) -> Result<String> {
    let out = command.output().context("running the client")?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    anyhow::ensure!(
        out.status.success(),
        "client failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(text)
}

/// An HTTP GET of `ADDRESS:PORT` (`python3 -c CLIENT PORT [ADDRESS]`, 127.0.0.1 by default; an
/// IPv6 address such as `::ffff:127.0.0.1` over an AF_INET6 socket); prints `BODY peer PEERPORT`.
const CLIENT: &str = "import socket, sys\n\
    address = sys.argv[2] if len(sys.argv) > 2 else '127.0.0.1'\n\
    s = socket.socket(socket.AF_INET6 if ':' in address else socket.AF_INET)\n\
    s.settimeout(3)\n\
    s.connect((address, int(sys.argv[1])))\n\
    peer = s.getpeername()[1]\n\
    s.sendall(b'GET / HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n')\n\
    reply = b''\n\
    while True:\n    \
        chunk = s.recv(4096)\n    \
        if not chunk: break\n    \
        reply += chunk\n\
    print(reply.split(b'\\r\\n\\r\\n', 1)[1].decode(), 'peer', peer)\n";

#[tokio::test(flavor = "multi_thread")]
async fn static_go_and_musl_servers_move_and_their_session_reaches_them_at_the_asked_port(
) -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some((setup, programs)) = ready() else {
        return Ok(());
    };
    let daemon = root_daemon(&setup).await?;
    let api = daemon.base + 100;
    for (label, program, args_first, args_second, asked) in [
        (
            "go",
            &programs.netprobe,
            vec!["serve", "tcp", "PORT", "first"],
            vec!["serve", "tcp", "PORT", "second"],
            api + 10,
        ),
        (
            "musl",
            &programs.musl_server,
            vec!["PORT", "first"],
            vec!["PORT", "second"],
            api + 20,
        ),
    ] {
        let port = asked.to_string();
        let fill = |args: &[&str]| -> Vec<String> {
            args.iter()
                .map(|a| {
                    if *a == "PORT" {
                        port.clone()
                    } else {
                        a.to_string()
                    }
                })
                .collect()
        };
        let first_args = fill(&args_first);
        let second_args = fill(&args_second);
        // The first copy, outside every session, holds the port.
        let mut first = Spawned::start(Command::new(program).args(&first_args))?;
        assert_eq!(
            listening_port(&mut first)?,
            asked,
            "{label}: the first copy gets its port"
        );
        // The second copy, in a session: the kernel moves it within the range.
        let session = format!("ks-{label}");
        let second_args: Vec<&str> = second_args.iter().map(String::as_str).collect();
        let mut second = Spawned::start(&mut in_session(&daemon, &session, program, &second_args))?;
        let moved = listening_port(&mut second)
            .with_context(|| format!("{label}: {:?}\n{}", second.seen, daemon.log()))?;
        assert_ne!(moved, asked, "{label}: moved off the held port");
        assert!(
            (api..=api + 99).contains(&moved),
            "{label}: {moved} stays in the api range"
        );

        // In the session, the asked port reaches the session's own server, and looks like it.
        let inside = client_line(in_session(
            &daemon,
            &session,
            &programs.netprobe,
            &["get", &port],
        ))?;
        assert_eq!(
            inside,
            format!("second peer {asked}"),
            "{label}: the session's view"
        );
        // The same through an IPv4-mapped IPv6 address, from a dynamically linked client without
        // the shim: the kernel alone redirects it.
        let mapped = daemon.unshimmed_in(
            &session,
            "python3",
            &["-c", CLIENT, &port, "::ffff:127.0.0.1"],
        );
        assert_eq!(
            client_line(mapped)?,
            format!("second peer {asked}"),
            "{label}: IPv4-mapped IPv6"
        );
        // Outside, nothing changed: the asked port is the first copy's, the moved one the second's.
        let mut outside = Command::new(&programs.netprobe);
        outside.args(["get", &port]);
        assert_eq!(
            client_line(outside)?,
            format!("first peer {asked}"),
            "{label}: outside"
        );
        let mut direct = Command::new(&programs.netprobe);
        direct.args(["get", &moved.to_string()]);
        assert_eq!(client_line(direct)?, format!("second peer {moved}"));

        // The daemon knows the move as it knows a shim's: the audit entry and the view.
        eventually(10, "the kernel's move audited", || async {
            let audit = daemon.audit().await.ok()?;
            audit
                .iter()
                .any(|e| {
                    e.requested_port == u32::from(asked)
                        && e.assigned_port == u32::from(moved)
                        && e.instance_id == session
                })
                .then_some(())
        })
        .await
        .with_context(|| label.to_string())?;
        let ports = daemon.cli(&["--json", "ports"]);
        let text = String::from_utf8_lossy(&ports.stdout);
        assert!(
            text.contains(&session),
            "{label}: the view is listed: {text}"
        );
        let status = daemon.status().await?;
        assert!(status.kernel_sessions >= 1, "{label}: {status:?}");
        let shown = String::from_utf8_lossy(&daemon.cli(&["status"]).stdout).to_string();
        assert!(shown.contains("managed in the kernel"), "{label}: {shown}");
    }
    assert!(
        daemon.log().contains("moved to"),
        "the kernel's log line is forwarded:\n{}",
        daemon.log()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_static_udp_server_moves_and_its_session_reaches_it_connected_and_not() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some((setup, programs)) = ready() else {
        return Ok(());
    };
    let daemon = root_daemon(&setup).await?;
    let asked = daemon.base + 130;
    let port = asked.to_string();
    let mut first =
        Spawned::start(Command::new(&programs.netprobe).args(["serve", "udp", &port, "first"]))?;
    assert_eq!(listening_port(&mut first)?, asked);
    let mut second = Spawned::start(&mut in_session(
        &daemon,
        "ks-udp",
        &programs.netprobe,
        &["serve", "udp", &port, "second"],
    ))?;
    let moved = listening_port(&mut second)?;
    assert_ne!(moved, asked);
    for mode in ["udp-connected", "udp-unconnected"] {
        let inside = client_line(in_session(
            &daemon,
            "ks-udp",
            &programs.netprobe,
            &[mode, &port],
        ))?;
        assert_eq!(
            inside,
            format!("second from {asked}"),
            "{mode} in the session"
        );
        let mut outside = Command::new(&programs.netprobe);
        outside.args([mode, &port]);
        assert_eq!(
            client_line(outside)?,
            format!("first from {asked}"),
            "{mode} outside"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn outside_sessions_and_for_reuseport_binds_behave_natively_and_dual_stack_moves_once(
) -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some((setup, programs)) = ready() else {
        return Ok(());
    };
    let daemon = root_daemon(&setup).await?;
    let asked = daemon.base + 140;
    let port = asked.to_string();
    let mut first = Spawned::start(Command::new(&programs.musl_server).args([&port, "first"]))?;
    assert_eq!(listening_port(&mut first)?, asked);

    // Outside every session: the bind fails as it would without Styxy.
    let out = Command::new(&programs.musl_server)
        .args([&port, "third"])
        .output()?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Address in use"),
        "EADDRINUSE: {out:?}"
    );

    // In a session, without the shim, so only the kernel acts:
    // - SO_REUSEPORT is intended sharing: never moved, so it fails as natively;
    let text = kernel_only_probe(&daemon, &["reuseport", &port, "--exit"])?;
    assert_eq!(text.lines().count(), 2, "two binds reported: {text}");
    assert!(
        text.lines()
            .all(|l| l == format!("failed {asked} {}", libc::EADDRINUSE)),
        "reuseport binds are left alone: {text}"
    );
    // - IPv4 and IPv6 of one process end on one new port.
    let text = kernel_only_probe(&daemon, &["dual", &port, "--exit"])?;
    let bound: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("bound {asked} ")))
        .collect();
    assert_eq!(bound.len(), 2, "both families bound: {text}");
    assert_eq!(bound[0], bound[1], "on one port: {text}");
    assert_ne!(bound[0], port, "moved: {text}");
    Ok(())
}

/// The ids of the programs attached at the cgroup root whose names are Styxy's.
fn styxy_programs_at_root(root: &Path) -> Result<Vec<String>> {
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(root)
        .output()
        .context("running bpftool (apt-get install bpftool)")?;
    anyhow::ensure!(out.status.success(), "bpftool: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("styxy_"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect())
}

/// A kernel move gets its project's sticky port back: the port that project's last move of the
/// asked port got, while it is free — not the first spare port.
#[tokio::test(flavor = "multi_thread")]
async fn a_kernel_move_gets_its_projects_sticky_port_back() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some((setup, programs)) = ready() else {
        return Ok(());
    };
    let daemon = root_daemon(&setup).await?;
    let held = daemon.base + 150;
    let _holder = styxy_tests::port_holder(&[held])?;
    let project = tempfile::tempdir()?;
    let port = held.to_string();
    let server = |session: &str, name: &str| -> Result<Spawned> {
        Spawned::start(
            in_session(&daemon, session, &programs.musl_server, &[&port, name])
                .current_dir(project.path()),
        )
    };
    // Two servers of the project, moved one after the other: the second's port is the sticky one.
    let mut a = server("ks-sticky-a", "a")?;
    let first = listening_port(&mut a)?;
    let mut b = server("ks-sticky-b", "b")?;
    let second = listening_port(&mut b)?;
    assert!(first != held && second != held && first != second);
    // The daemon records a move (and its sticky port) once it knows the process: before the
    // servers stop.
    eventually(10, "both moves in the audit", || async {
        let audit = daemon.audit().await.ok()?;
        [first, second]
            .iter()
            .all(|p| audit.iter().any(|e| e.assigned_port == u32::from(*p)))
            .then_some(())
    })
    .await?;
    drop((a, b));
    let client = daemon.client().await?;
    for port in [first, second] {
        eventually(10, "the daemon to see the servers gone", || {
            let mut client = client.clone();
            async move {
                let seen = client
                    .observe(styxy_tests::v1::ObserveRequest {
                        port: u32::from(port),
                        protocol: 0,
                    })
                    .await
                    .ok()?
                    .into_inner();
                // Gone, and so are the sessions (their last process was the server): nothing
                // is held for them any more (a live session keeps its port between two lives
                // of its server).
                (!seen.bound && seen.lease.is_none()).then_some(())
            }
        })
        .await?;
    }
    let sticky = String::from_utf8_lossy(&daemon.cli(&["ports"]).stdout).to_string();
    assert!(
        sticky.contains(&format!("{held} → {second}")),
        "the project's sticky port: {sticky}\naudit: {:#?}\n{}",
        daemon.audit().await,
        daemon.log()
    );
    // A new session of the same project: the kernel sends it to the sticky port.
    let mut c = server("ks-sticky-c", "c")?;
    assert_eq!(
        listening_port(&mut c)?,
        second,
        "the sticky port, not a spare"
    );
    Ok(())
}

/// The programs only sessions need are attached while one is live: with none, the machine's
/// binds, connects and UDP receives run only the bind observer's three programs.
#[tokio::test(flavor = "multi_thread")]
async fn session_programs_attach_for_the_first_session_and_detach_after_the_last() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some((setup, _)) = ready() else {
        return Ok(());
    };
    let before = styxy_programs_at_root(&setup.cgroup_root)?;
    let daemon = root_daemon(&setup).await?;
    let ours = || -> Result<Vec<String>> {
        Ok(styxy_programs_at_root(&setup.cgroup_root)?
            .into_iter()
            .filter(|id| !before.contains(id))
            .collect())
    };
    assert_eq!(ours()?.len(), 3, "post_bind4|6 and sock_release only");
    let detail = daemon.status().await?.kernel_sessions_detail;
    assert!(
        detail.contains("detached while no session is live"),
        "{detail}"
    );

    // A session: attached before its command starts, so its first bind is moved.
    let held = daemon.base + 160;
    let _holder = styxy_tests::port_holder(&[held])?;
    let mut session = Spawned::start(&mut in_session(
        &daemon,
        "ks-attach",
        &helper_bin("bind-probe"),
        &["stdin"],
    ))?;
    session.send_line(&held.to_string())?;
    let line = session.line_where(10, |l| l.starts_with("bound ") || l.starts_with("failed "))?;
    assert!(
        line.starts_with(&format!("bound {held} ")) && !line.ends_with(&format!(" {held}")),
        "moved: {line}"
    );
    assert_eq!(ours()?.len(), 13, "every program while a session is live");
    let detail = daemon.status().await?.kernel_sessions_detail;
    assert!(detail.contains("session programs are attached"), "{detail}");

    // Its last process ends: a few seconds later the session programs go.
    drop(session);
    eventually(20, "the session programs to detach", || async {
        (ours().ok()?.len() == 3).then_some(())
    })
    .await?;
    let detail = daemon.status().await?.kernel_sessions_detail;
    assert!(
        detail.contains("detached while no session is live"),
        "{detail}"
    );
    Ok(())
}

/// What a daemon leaves attached when it is killed: nothing while no session is live; with one
/// live, every program, still moving the session's binds with no daemon; and removing its pins
/// (what `styxy uninstall` does, or a clean stop of the next daemon once no session is live)
/// detaches them, binds native again.
#[tokio::test(flavor = "multi_thread")]
async fn after_kill_9_only_a_live_session_keeps_the_programs_attached() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some((setup, programs)) = ready() else {
        return Ok(());
    };
    let before = styxy_programs_at_root(&setup.cgroup_root)?;
    let ours = || -> Result<Vec<String>> {
        Ok(styxy_programs_at_root(&setup.cgroup_root)?
            .into_iter()
            .filter(|id| !before.contains(id))
            .collect())
    };
    let mut daemon = root_daemon(&setup).await?;
    let observer = ours()?;
    assert_eq!(
        observer.len(),
        3,
        "post_bind4|6 and sock_release: {observer:?}"
    );
    // No session live: nothing stays.
    daemon.kill9()?;
    eventually(10, "the observer's programs to detach", || async {
        ours().ok()?.is_empty().then_some(())
    })
    .await?;
    daemon.restart().await?;
    let asked = daemon.base + 150;
    let port = asked.to_string();
    let mut first = Spawned::start(Command::new(&programs.musl_server).args([&port, "first"]))?;
    assert_eq!(listening_port(&mut first)?, asked);
    // A session whose shell outlives the daemon: a server on "go", another on the next line.
    // In a group of its own: the background server goes with the shell when the test ends.
    let mut shell = Spawned::start_group(&mut in_session(
        &daemon,
        "ks-kill",
        Path::new("sh"),
        &[
            "-c",
            "read line; \"$0\" \"$1\" second & read line; exec \"$0\" \"$1\" third",
            programs.musl_server.to_str().context("utf-8")?,
            &port,
        ],
    ))?;
    // With a session live, every program is attached.
    let attached: Vec<String> = eventually(10, "the session programs to attach", || async {
        let attached = ours().ok()?;
        (attached.len() == 13).then_some(attached)
    })
    .await
    .context("bind4|6, post_bind4|6, sock_release and the eight view programs")?;
    daemon.kill9()?;
    // They stay, and the session's next bind of the held port is still moved, by the kernel.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let after = ours()?;
    assert!(
        attached.iter().all(|id| after.contains(id)),
        "a live session keeps its programs: {attached:?} → {after:?}"
    );
    shell.send_line("go")?;
    let moved = listening_port(&mut shell)?;
    assert_ne!(moved, asked, "moved with no daemon");
    // Its pins removed, they detach: the session's next bind fails as it would without Styxy.
    let pins = daemon.pin_dir().context("the pin directory")?;
    std::fs::remove_dir_all(&pins).with_context(|| format!("removing {}", pins.display()))?;
    eventually(10, "the daemon's programs to detach", || async {
        let attached_now = ours().ok()?;
        (!attached_now.iter().any(|id| attached.contains(id))).then_some(())
    })
    .await?;
    shell.send_line("go")?;
    let line = shell.line_where(10, |l| l.contains("bind") || l.starts_with("listening"))?;
    assert!(
        line.contains("Address in use"),
        "native once unpinned: {line}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn without_ebpf_styxy_run_says_once_that_static_binaries_stay_and_the_shim_still_moves(
) -> Result<()> {
    let daemon = Daemon::start_with(&["--observer", "sockets"]).await?;
    let held = daemon.base + 160;
    let _holder = styxy_tests::port_holder(&[held])?;
    let out = Command::new(styxy_bin())
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["run", "--instance", "no-kernel", "--"])
        .arg(helper_bin("bind-probe"))
        .args(["stdin", "--exit"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            if let Some(mut stdin) = child.stdin.take() {
                writeln!(stdin, "{held}")?;
            }
            child.wait_with_output()
        })?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let notes: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("static binaries"))
        .collect();
    assert_eq!(notes.len(), 1, "said once: {stderr}");
    assert!(notes[0].contains("without eBPF"), "and why: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with(&format!("bound {held} ")) && !l.ends_with(&format!(" {held}"))),
        "the shim moved the dynamically linked server: {stdout} {stderr}"
    );
    let status = daemon.status().await?;
    assert_eq!(
        (status.kernel_sessions, status.kernel_sessions_enforced),
        (0, false)
    );
    assert!(
        status.kernel_sessions_detail.contains("without eBPF"),
        "{status:?}"
    );
    let shown = String::from_utf8_lossy(&daemon.cli(&["status"]).stdout).to_string();
    assert!(
        shown.contains("sessions:   none in the kernel: the daemon runs without eBPF"),
        "{shown}"
    );
    Ok(())
}

/// An agent (here a Python process standing in for Claude Code) runs the SessionStart hook; from
/// then on the kernel moves the static servers it starts, though they never source the hook's
/// environment file and no shim reaches them.
#[tokio::test(flavor = "multi_thread")]
async fn the_session_start_hook_puts_the_agent_and_what_it_starts_in_a_kernel_session() -> Result<()>
{
    let _one = ONE_AT_A_TIME.lock().await;
    let Some((setup, programs)) = ready() else {
        return Ok(());
    };
    let daemon = root_daemon(&setup).await?;
    let asked = daemon.base + 170;
    let port = asked.to_string();
    let mut first = Spawned::start(Command::new(&programs.musl_server).args([&port, "first"]))?;
    assert_eq!(listening_port(&mut first)?, asked);
    let env_file = daemon.dir.join("claude-env");
    // The agent becomes the server (exec), so dropping it stops the server too.
    let agent = "import json, os, subprocess, sys\n\
        styxy, socket, env_file, server, port = sys.argv[1:6]\n\
        hook = subprocess.run([styxy, '--socket', socket, 'hook', 'session-start'],\n\
            input=json.dumps({'session_id': 'agent-1', 'hook_event_name': 'SessionStart'}),\n\
            capture_output=True, text=True, env={'CLAUDE_ENV_FILE': env_file, 'PATH': '/usr/bin:/bin'})\n\
        print('hook:', hook.stdout.replace('\\n', ' '), flush=True)\n\
        os.execv(server, [server, port, 'second'])\n";
    let mut agent = Spawned::start(Command::new("python3").args([
        "-c",
        agent,
        styxy_bin().to_str().context("utf-8")?,
        daemon.socket.to_str().context("utf-8")?,
        env_file.to_str().context("utf-8")?,
        programs.musl_server.to_str().context("utf-8")?,
        &port,
    ]))?;
    let hook = agent.line_where(15, |l| l.starts_with("hook:"))?;
    assert!(
        hook.contains("moved and redirected by the kernel"),
        "{hook}"
    );
    let moved = listening_port(&mut agent)?;
    assert_ne!(
        moved, asked,
        "the agent's static server moved: {:?}",
        agent.seen
    );
    // The move reaches the daemon through the ring buffer, a moment after the bind.
    eventually(10, "the kernel's move audited", || async {
        let audit = daemon.audit().await.ok()?;
        audit
            .iter()
            .any(|e| e.instance_id == "claude-agent-1" && e.assigned_port == u32::from(moved))
            .then_some(())
    })
    .await?;
    Ok(())
}

/// "Who holds this port" is decided in three places (the kernel's bind programs, the spare
/// ports the daemon keeps ready for them, and the broker the shim asks): on the same cases, the
/// kernel's answer and the broker's agree. For each case a process of a kernel session (without
/// the shim, so only the kernel acts) is asked about through `ResolveBind` first — the broker's
/// answer — then binds the port itself — the kernel's.
#[tokio::test(flavor = "multi_thread")]
async fn the_kernel_and_the_broker_agree_on_who_holds_a_port() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(setup) = ebpf_ready() else {
        return Ok(());
    };
    let daemon = root_daemon(&setup).await?;
    let api = daemon.base + 100;
    let mut client = daemon.client().await?;
    let probe = helper_bin("bind-probe");
    let mut session = Spawned::start(&mut daemon.unshimmed_in(
        "ks-agree",
        probe.to_str().context("utf-8")?,
        &["stdin"],
    ))?;
    let me = session.child.id();
    // A port another process listens on.
    let bound_by_other = api + 30;
    let _holder = styxy_tests::port_holder(&[bound_by_other])?;
    // A port leased for another process (it lives with that process).
    let leased_for_other = api + 31;
    let mut other = Command::new("sleep").arg("600").spawn()?;
    let lease = |port: u16, pid: Option<u32>, instance: Option<&str>| pb::AllocateRequest {
        service_type: "api".into(),
        preferred_port: Some(u32::from(port)),
        pid,
        instance_id: instance.map(str::to_string),
        ttl_seconds: None,
    };
    let got = client
        .allocate(lease(leased_for_other, Some(other.id()), None))
        .await?
        .into_inner();
    anyhow::ensure!(got.port == u32::from(leased_for_other), "leased: {got:?}");
    // A port leased for this session (by its instance).
    let leased_for_us = api + 32;
    let got = client
        .allocate(lease(leased_for_us, Some(me), Some("ks-agree")))
        .await?
        .into_inner();
    anyhow::ensure!(got.port == u32::from(leased_for_us), "leased: {got:?}");
    // A port this process holds itself in the other family (IPv4; it binds IPv6 next).
    let own_other_family = api + 33;
    session.send_line(&own_other_family.to_string())?;
    session.line_where(10, |l| l.starts_with(&format!("bound {own_other_family} ")))?;
    let free = api + 34;

    let cases = [
        ("free", free, "127.0.0.1", pb::Family::Inet, false),
        (
            "bound by another process",
            bound_by_other,
            "127.0.0.1",
            pb::Family::Inet,
            true,
        ),
        (
            "leased for another process",
            leased_for_other,
            "127.0.0.1",
            pb::Family::Inet,
            true,
        ),
        (
            "leased for this session",
            leased_for_us,
            "127.0.0.1",
            pb::Family::Inet,
            false,
        ),
        (
            "its own, other family",
            own_other_family,
            "::1",
            pb::Family::Inet6,
            false,
        ),
    ];
    let mut answers = Vec::new();
    for (case, port, address, family, taken) in cases {
        // The broker's answer first: asking leaves a claim, which the kernel then honours as
        // this session's own (a bind made first would put this process's socket in the way).
        let mut ask = styxy_tests::resolve_bind_request(me, port, pb::Protocol::Tcp);
        ask.family = family as i32;
        let broker = client.resolve_bind(ask).await?.into_inner();
        let broker_moves = broker.action == pb::BindAction::Reassign as i32;
        session.send_line(&format!("{address} {port}"))?;
        let line = session.line_where(10, |l| {
            l.starts_with(&format!("bound {port} ")) || l.starts_with(&format!("failed {port} "))
        })?;
        let kernel_moves = line.starts_with("bound ") && !line.ends_with(&format!(" {port}"));
        answers.push(format!(
            "{case}: broker {}, kernel {} ({line})",
            if broker_moves { "moves" } else { "keeps" },
            if kernel_moves { "moves" } else { "keeps" },
        ));
        assert_eq!(
            (broker_moves, kernel_moves),
            (taken, taken),
            "{}\n{}",
            answers.join("\n"),
            daemon.log()
        );
    }
    other.kill()?;
    other.wait()?;
    Ok(())
}

/// `STYXY_VIEW=off` and `STYXY_DISABLE=1` mean on the kernel path what they mean in the shim.
/// The view off: a process of the session reaches the real port — a static client started by
/// `styxy run` with it set (placed with it), and a shimmed client whose environment says it
/// though its session's first process did not (its shim tells the kernel in its question).
/// Moves off: a held port's bind fails with `EADDRINUSE`, as a program using a fixed port as a
/// single-instance lock needs — static or shimmed.
#[tokio::test(flavor = "multi_thread")]
async fn view_off_and_disable_mean_on_the_kernel_path_what_they_mean_in_the_shim() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some((setup, programs)) = ready() else {
        return Ok(());
    };
    let daemon = root_daemon(&setup).await?;
    let asked = daemon.base + 145;
    let port = asked.to_string();
    let netprobe = programs.netprobe.to_str().context("utf-8")?;
    let mut first = Spawned::start(Command::new(netprobe).args(["serve", "tcp", &port, "first"]))?;
    assert_eq!(listening_port(&mut first)?, asked);
    let mut second = Spawned::start(&mut daemon.shimmed_in(
        "ks-off",
        netprobe,
        &["serve", "tcp", &port, "second"],
    ))?;
    let moved = listening_port(&mut second)?;
    assert_ne!(moved, asked, "the session's server moved");

    // The control: the session's clients reach its own server at the asked port.
    assert_eq!(
        client_line(daemon.shimmed_in("ks-off", netprobe, &["get", &port]))?,
        format!("second peer {asked}")
    );
    assert_eq!(
        client_line(daemon.shimmed_in("ks-off", "python3", &["-c", CLIENT, &port]))?,
        format!("second peer {asked}")
    );
    // The view off, static: placed with it.
    let mut static_off = daemon.shimmed_in("ks-off", netprobe, &["get", &port]);
    static_off.env("STYXY_VIEW", "off");
    assert_eq!(client_line(static_off)?, format!("first peer {asked}"));
    // The view off, shimmed, set after the session's first process started.
    let script = format!("STYXY_VIEW=off exec python3 -c \"$0\" {port}");
    assert_eq!(
        client_line(daemon.shimmed_in("ks-off", "sh", &["-c", &script, CLIENT]))?,
        format!("first peer {asked}")
    );
    // And the one after it, without: redirected again (its own question clears it).
    assert_eq!(
        client_line(daemon.shimmed_in(
            "ks-off",
            "sh",
            &["-c", "exec python3 -c \"$0\" \"$1\"", CLIENT, &port]
        ))?,
        format!("second peer {asked}")
    );

    // Moves off, static: the held port's bind fails as without Styxy.
    let mut static_disabled =
        daemon.shimmed_in("ks-off", netprobe, &["serve", "tcp", &port, "third"]);
    static_disabled.env("STYXY_DISABLE", "1");
    let out = static_disabled.output()?;
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stdout).contains("address already in use"),
        "EADDRINUSE, static: {out:?}"
    );
    // Moves off, shimmed, set inside the session.
    let bind = "import socket, sys\ns = socket.socket()\ns.bind(('127.0.0.1', int(sys.argv[1])))\nprint('bound', s.getsockname()[1])\n";
    let script = format!("STYXY_DISABLE=1 exec python3 -c \"$0\" {port}");
    let out = daemon
        .shimmed_in("ks-off", "sh", &["-c", &script, bind])
        .output()?;
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("Address already in use"),
        "EADDRINUSE, shimmed: {out:?}"
    );
    // The control: without it, the same bind moves.
    let out = daemon
        .shimmed_in("ks-off", "python3", &["-c", bind, &port])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.starts_with("bound ") && !text.trim().ends_with(&port),
        "moved: {out:?}"
    );
    Ok(())
}
