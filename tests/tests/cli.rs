//! The `styxy` command-line client: readable output for people, `--json` for scripts, clear errors.

use std::process::{Command, Output, Stdio};

use anyhow::Context;
use styxy_tests::v1 as pb;
use styxy_tests::{http_server, styxy_bin, Daemon};

fn text(out: &Output) -> String {
    assert!(
        out.status.success(),
        "styxy failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_str(&text(out)).expect("valid JSON")
}

#[tokio::test(flavor = "multi_thread")]
async fn human_and_json_output_of_every_command() -> anyhow::Result<()> {
    let daemon = Daemon::start().await?;
    let held = daemon.base + 4;
    let server = http_server(held)?;
    let b = daemon.base;

    let status = text(&daemon.cli(&["status"]));
    assert!(
        status.contains("observer:") && status.contains("sockets-table"),
        "{status}"
    );
    let status = json(&daemon.cli(&["--json", "status"]));
    assert_eq!(status["observer"], "sockets-table");

    let observed = text(&daemon.cli(&["observe", &held.to_string()]));
    assert!(
        observed.contains(&format!("pid {}", server.pid())) && observed.contains("storybook range"),
        "{observed}"
    );
    let observed =
        json(&daemon.cli(&["--json", "observe", &held.to_string(), "--protocol", "tcp"]));
    assert_eq!(observed["holders"][0]["pid"], server.pid());
    let free = text(&daemon.cli(&["observe", &(b + 20).to_string()]));
    assert!(free.contains("is free"), "{free}");

    let suggested = text(&daemon.cli(&["suggest", "storybook", "-n", "5"]));
    assert!(
        suggested.starts_with(&format!(
            "storybook ({b}-{}): {b} {} {} {} {}",
            b + 23,
            b + 1,
            b + 2,
            b + 3,
            b + 5
        )),
        "{suggested}"
    );
    let suggested = json(&daemon.cli(&["--json", "suggest", "storybook", "-n", "2"]));
    assert_eq!(suggested["ports"], serde_json::json!([b, b + 1]));

    let leased = text(&daemon.cli(&["allocate", "api", "--ttl", "120"]));
    assert!(
        leased.starts_with(&format!("{} (api) leased as lease-", b + 100)),
        "{leased}"
    );
    let leased = json(&daemon.cli(&[
        "--json",
        "allocate",
        "api",
        "--port",
        &(b + 150).to_string(),
    ]));
    assert_eq!(leased["port"], b + 150);
    let lease_id = leased["leaseId"].as_str().expect("lease id").to_string();

    let ports = text(&daemon.cli(&["ports"]));
    assert!(
        ports.contains("PORT") && ports.contains(&held.to_string()) && ports.contains(&lease_id),
        "{ports}"
    );
    let ports = json(&daemon.cli(&["--json", "ports"]));
    assert_eq!(ports["leases"].as_array().map(Vec::len), Some(2));

    assert!(text(&daemon.cli(&["release", &lease_id])).contains(&lease_id));
    let released = json(&daemon.cli(&["--json", "release", &(b + 100).to_string()]));
    assert_eq!(
        released["releasedLeaseIds"].as_array().map(Vec::len),
        Some(1)
    );

    assert!(text(&daemon.cli(&["audit"])).contains("no reassigned binds yet"));
    // proto3 JSON leaves out empty fields: no entries, no "entries".
    assert_eq!(
        json(&daemon.cli(&["--json", "audit"])),
        serde_json::json!({})
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_say_what_to_do() -> anyhow::Result<()> {
    let out = Command::new(styxy_bin())
        .args(["--socket", "/nonexistent/styxy.sock", "status"])
        .output()?;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Is it running?") && stderr.contains("styxy daemon"),
        "{stderr}"
    );

    let daemon = Daemon::start().await?;
    let out = daemon.cli(&["suggest", "Not Valid"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("a-z, 0-9"));
    let out = daemon.cli(&["suggest", "storybok"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("did you mean \"storybook\"?") && stderr.contains("known types:"),
        "{stderr}"
    );
    let out = daemon.cli(&["release", "lease-404"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no lease lease-404"));
    let out = daemon.cli(&["observe", "99999"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "clap rejects a port above 65535"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_streams_binds_as_lines() -> anyhow::Result<()> {
    let daemon = Daemon::start().await?;
    let mut watch = styxy_tests::Spawned::start(
        Command::new(styxy_tests::styxy_bin())
            .arg("--socket")
            .arg(&daemon.socket)
            .arg("watch"),
    )?;
    // Once it says it is watching, it is subscribed: no event can be missed.
    watch.line_where(15, |l| l.starts_with("watching "))?;
    let port = daemon.base + 9;
    let server = http_server(port)?;
    let line = watch.line_where(15, |l| l.contains(&format!("bound {port}/tcp")))?;
    assert!(line.contains(&format!("pid {}", server.pid())), "{line}");
    drop(server);
    watch.line_where(15, |l| l.contains(&format!("released {port}/tcp")))?;
    Ok(())
}

#[test]
fn env_prints_lines_a_shell_can_eval() -> anyhow::Result<()> {
    let script = format!(
        "eval \"$('{}' env --instance agent-7)\"; echo \"$LD_PRELOAD|$STYXY_INSTANCE\"",
        styxy_tests::styxy_bin().display()
    );
    let out = Command::new("sh")
        .args(["-c", &script])
        .env("LD_PRELOAD", "/opt/other/libother.so")
        .output()?;
    let printed = text(&out);
    let (preload, instance) = printed.trim().split_once('|').expect("two values");
    assert!(
        preload.ends_with("libstyxy_preload.so:/opt/other/libother.so"),
        "the shim first, the rest kept: {preload}"
    );
    assert_eq!(instance, "agent-7");
    Ok(())
}

#[test]
fn run_without_a_daemon_warns_and_still_runs_the_command() -> anyhow::Result<()> {
    let out = Command::new(styxy_bin())
        .args([
            "--socket",
            "/nonexistent/styxy.sock",
            "run",
            "--",
            "sh",
            "-c",
            "echo ran",
        ])
        .output()?;
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ran");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no daemon answers at /nonexistent/styxy.sock")
            && stderr.contains("will not be moved"),
        "{stderr}"
    );
    Ok(())
}

/// Every client call has a deadline: a stopped daemon costs `--timeout` and an error that says
/// what to do, never a hang.
#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_daemon_costs_the_deadline_and_a_clear_error() -> anyhow::Result<()> {
    let daemon = Daemon::start().await?;
    daemon.signal(libc::SIGSTOP)?;
    let started = std::time::Instant::now();
    let outs: Vec<Output> = [
        vec!["--timeout", "1", "status"],
        vec!["--timeout", "1", "allocate", "api"],
        vec!["--timeout", "1", "watch"],
    ]
    .iter()
    .map(|args| daemon.cli(args))
    .collect();
    let took = started.elapsed();
    daemon.signal(libc::SIGCONT)?;
    for out in &outs {
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("did not")
                && stderr.contains("within 1 s")
                && stderr.contains("--timeout"),
            "{stderr}"
        );
    }
    // Generous: three calls of a one-second deadline, not a hang.
    assert!(took < std::time::Duration::from_secs(20), "{took:?}");
    let bad = daemon.cli(&["--timeout", "0", "status"]);
    assert_eq!(bad.status.code(), Some(2), "clap refuses a zero deadline");
    Ok(())
}

/// Claude Code's SessionEnd hook ends the session's leases and claims, and no one else's; bad
/// input (empty, not JSON) changes nothing and still exits 0 in silence.
#[tokio::test(flavor = "multi_thread")]
async fn the_session_end_hook_ends_the_sessions_leases_only() -> anyhow::Result<()> {
    use std::io::Write;
    let daemon = Daemon::start().await?;
    let mut client = daemon.client().await?;
    for instance in ["claude-s9", "claude-other"] {
        client
            .register_instance(pb::RegisterInstanceRequest {
                instance_id: Some(instance.into()),
                pid: std::process::id(),
                name: None,
            })
            .await?;
    }
    let allocate = |instance: &str| pb::AllocateRequest {
        service_type: "api".into(),
        instance_id: Some(instance.into()),
        ttl_seconds: Some(600),
        ..Default::default()
    };
    client.allocate(allocate("claude-s9")).await?;
    client.allocate(allocate("claude-s9")).await?;
    client.allocate(allocate("claude-other")).await?;
    let hook = |input: &str| -> anyhow::Result<std::process::Output> {
        let mut child = std::process::Command::new(styxy_tests::styxy_bin())
            .arg("--socket")
            .arg(&daemon.socket)
            .args(["hook", "session-end"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(input.as_bytes())?;
        Ok(child.wait_with_output()?)
    };
    let leases = |list: pb::ListPortsResponse| -> Vec<String> {
        list.leases.iter().map(|l| l.instance_id.clone()).collect()
    };
    for bad in ["", "not json", r#"{"hook_event_name":"SessionEnd"}"#] {
        let out = hook(bad)?;
        assert!(
            out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
            "{bad:?}: {out:?}"
        );
    }
    let all = client
        .list_ports(pb::ListPortsRequest::default())
        .await?
        .into_inner();
    assert_eq!(leases(all).len(), 3, "bad input ends nothing");

    let out = hook(r#"{"session_id":"s9","hook_event_name":"SessionEnd","reason":"exit"}"#)?;
    assert!(out.status.success() && out.stdout.is_empty(), "{out:?}");
    let left = client
        .list_ports(pb::ListPortsRequest::default())
        .await?
        .into_inner();
    assert_eq!(leases(left), vec!["claude-other".to_string()]);
    Ok(())
}

/// Claude Code's PostToolUse hook tells the session of a move once (asked → bound, who held it,
/// both addresses) and says nothing when nothing changed or the input is bad (empty, not JSON,
/// huge); `styxy session` lists the session's servers without using up the report.
#[tokio::test(flavor = "multi_thread")]
async fn the_post_tool_use_hook_tells_a_move_once_and_styxy_session_lists_it() -> anyhow::Result<()>
{
    use std::io::Write;
    let daemon = Daemon::start().await?;
    let held = daemon.base + 150;
    let holder = http_server(held)?;
    let hook = |input: Vec<u8>| -> anyhow::Result<Output> {
        let mut child = Command::new(styxy_bin())
            .arg("--socket")
            .arg(&daemon.socket)
            .args(["hook", "post-tool-use"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let mut stdin = child.stdin.take().context("stdin")?;
        // The hook reads at most 1 MiB: the rest of a huge input may meet a closed pipe.
        let _ = stdin.write_all(&input);
        drop(stdin);
        Ok(child.wait_with_output()?)
    };
    let input = br#"{"session_id":"t1","hook_event_name":"PostToolUse","tool_name":"Bash"}"#;
    let quiet =
        |out: &Output| out.status.success() && out.stdout.is_empty() && out.stderr.is_empty();
    let first = hook(input.to_vec())?;
    assert!(quiet(&first), "no server yet, nothing to say: {first:?}");

    // `styxy run` names its own instance unless given one: give the hook's.
    let mut server = styxy_tests::Spawned::start(&mut daemon.shimmed_in(
        "claude-t1",
        "python3",
        &[
            "-u",
            "-m",
            "http.server",
            &held.to_string(),
            "--bind",
            "127.0.0.1",
        ],
    ))?;
    let notice = server.line_where(20, |l| l.starts_with("✓ STYXY"))?;
    let moved = styxy_tests::notice_port(&notice).context("port")?;
    styxy_tests::wait_for_listener(moved)?;

    // `styxy session` (by --instance, and by STYXY_INSTANCE) does not use the report up.
    let listed = styxy_tests::eventually(10, "the session's server listed", || async {
        let out = daemon.cli(&["session", "--instance", "claude-t1"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (!text.contains("no servers")).then_some(text)
    })
    .await?;
    assert!(
        listed.contains("session claude-t1") && listed.contains(&format!("{moved}  tcp    {held}")),
        "{listed}"
    );
    let by_env = Command::new(styxy_bin())
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["--json", "session"])
        .env("STYXY_INSTANCE", "claude-t1")
        .output()?;
    let value: serde_json::Value = serde_json::from_slice(&by_env.stdout)?;
    assert_eq!(value["running"][0]["askedPort"], u32::from(held), "{value}");

    let told = eventually_told(&hook, input).await?;
    let output: serde_json::Value = serde_json::from_str(told.trim())?;
    assert_eq!(output["hookSpecificOutput"]["hookEventName"], "PostToolUse");
    let context = output["hookSpecificOutput"]["additionalContext"]
        .as_str()
        .context("context")?;
    for needle in [
        format!("asked for TCP port {held}"),
        format!("(pid {})", holder.pid()),
        format!("localhost:{held} reaches it"),
        format!("use localhost:{moved}"),
    ] {
        assert!(context.contains(&needle), "{needle:?} in {context}");
    }
    let again = hook(input.to_vec())?;
    assert!(quiet(&again), "told once: {again:?}");
    let mut huge = br#"{"session_id":"t1","pad":""#.to_vec();
    huge.extend(std::iter::repeat_n(b'x', 2 << 20));
    huge.extend(br#""}"#);
    for bad in [Vec::new(), b"not json".to_vec(), b"[1,2]".to_vec(), huge] {
        let out = hook(bad)?;
        assert!(quiet(&out), "{out:?}");
    }

    // The server stops: told once more.
    server.child.kill()?;
    server.child.wait()?;
    let stopped = eventually_told(&hook, input).await?;
    assert!(
        stopped.contains("stopped") && stopped.contains(&format!("port {moved}")),
        "{stopped}"
    );
    // A daemon that is not there: silent, exit 0.
    let gone = Command::new(styxy_bin())
        .args([
            "--socket",
            "/nonexistent/styxy.sock",
            "hook",
            "post-tool-use",
        ])
        .stdin(std::process::Stdio::null())
        .output()?;
    assert!(quiet(&gone), "{gone:?}");
    Ok(())
}

/// Calls the hook until it says something (the daemon sees a bind or a release within a moment).
async fn eventually_told(
    hook: &impl Fn(Vec<u8>) -> anyhow::Result<Output>,
    input: &[u8],
) -> anyhow::Result<String> {
    for _ in 0..100 {
        let out = hook(input.to_vec())?;
        anyhow::ensure!(out.status.success(), "{out:?}");
        if !out.stdout.is_empty() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    anyhow::bail!("the hook never told anything")
}

/// A machine out of processes (here: a user at its `ulimit -u`, so no thread can start): `styxy
/// run` still runs its command, and a client command fails with a message, never a panic.
#[test]
fn with_no_thread_to_spare_styxy_run_still_runs_its_command() -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    if !styxy_tests::can_act_as_another_user() {
        return Ok(());
    }
    let limited = |args: &[&str]| -> anyhow::Result<Output> {
        let mut command = Command::new(styxy_bin());
        command
            .args(["--socket", "/nonexistent/styxy.sock"])
            .args(args)
            .uid(styxy_tests::OTHER_USER)
            .gid(styxy_tests::OTHER_USER);
        // SAFETY: only setrlimit, async-signal-safe, between fork and exec.
        unsafe {
            command.pre_exec(|| {
                let one = libc::rlimit {
                    rlim_cur: 1,
                    rlim_max: 1,
                };
                if libc::setrlimit(libc::RLIMIT_NPROC, &one) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(command.output()?)
    };
    let run = limited(&["run", "--", "/bin/echo", "still ran"])?;
    assert!(run.status.success(), "{run:?}");
    assert_eq!(String::from_utf8_lossy(&run.stdout), "still ran\n");
    let ports = limited(&["ports"])?;
    let stderr = String::from_utf8_lossy(&ports.stderr);
    assert_eq!(ports.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("cannot reach the Styxy daemon"), "{stderr}");
    Ok(())
}

/// `hook install --settings` naming a FIFO (or a device) says so and changes nothing; it used to
/// wait forever for a writer.
#[test]
fn hook_install_refuses_a_fifo_instead_of_hanging() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fifo = dir.path().join("settings.json");
    let path = std::ffi::CString::new(fifo.to_str().context("utf-8")?)?;
    // SAFETY: a valid NUL-terminated path.
    anyhow::ensure!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) } == 0, "mkfifo");
    let mut child = Command::new(styxy_bin())
        .args(["hook", "install", "--settings"])
        .arg(&fifo)
        .env("HOME", dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child.try_wait()?.is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            anyhow::bail!("hook install is still waiting on the FIFO after 20 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is not a regular file"), "{stderr}");
    use std::os::unix::fs::FileTypeExt;
    assert!(
        std::fs::symlink_metadata(&fifo)?.file_type().is_fifo(),
        "left as it was"
    );
    Ok(())
}

/// The MCP server answers a truncated line and one nested deeper than it follows with JSON-RPC
/// parse errors (`id: null`), and goes on serving the next request.
#[test]
fn the_mcp_server_answers_lines_that_are_not_json_with_parse_errors() -> anyhow::Result<()> {
    use std::io::{BufRead, Write};
    let mut mcp = Command::new(styxy_bin())
        .args(["--socket", "/nonexistent/styxy.sock", "mcp"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let mut input = mcp.stdin.take().context("stdin")?;
    let output = mcp.stdout.take().context("stdout")?;
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"test","version":"1"}}}"#;
    let deep = "[".repeat(10_000) + &"]".repeat(10_000);
    for line in [
        init,
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/li"#,
        &deep,
        r#"{"jsonrpc":"2.0","id":3,"method":"tools/list"}"#,
    ] {
        writeln!(input, "{line}")?;
    }
    input.flush()?;
    let mut replies = Vec::new();
    for line in std::io::BufReader::new(output).lines() {
        let reply: serde_json::Value = serde_json::from_str(&line?)?;
        let done = reply["id"] == 3;
        replies.push(reply);
        if done {
            break;
        }
    }
    drop(input);
    let _ = mcp.kill();
    let _ = mcp.wait();
    let parse_errors = replies
        .iter()
        .filter(|r| r["error"]["code"] == -32700 && r["id"].is_null())
        .count();
    assert_eq!(parse_errors, 2, "{replies:#?}");
    assert!(replies
        .iter()
        .any(|r| r["id"] == 1 && r["result"].is_object()));
    assert!(replies
        .iter()
        .any(|r| r["id"] == 3 && r["result"]["tools"].is_array()));
    Ok(())
}

/// `styxy completions SHELL` as each shell loads it: bash completes `styxy po` to `ports`, fish
/// lists `ports` with its description, zsh registers `_styxy` for `styxy`. A shell this machine
/// lacks says SKIP (CI installs them all).
#[test]
fn completions_load_in_bash_zsh_and_fish_and_complete_commands() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let script = |shell: &str| -> anyhow::Result<std::path::PathBuf> {
        let out = Command::new(styxy_bin())
            .args(["completions", shell])
            .output()?;
        let path = dir.path().join(format!("styxy.{shell}"));
        std::fs::write(&path, text(&out))?;
        Ok(path)
    };
    let have = |shell: &str| {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {shell}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI installs {shell} (scripts/setup.sh)"
            );
            eprintln!("SKIP: no {shell} on this machine");
        }
        found
    };
    let bash = script("bash")?;
    let completed = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {}; COMP_WORDS=(styxy po); COMP_CWORD=1; COMP_LINE='styxy po'; COMP_POINT=8; \
             _styxy styxy po styxy; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            bash.display()
        ))
        .output()?;
    assert_eq!(text(&completed).trim(), "ports");
    if have("fish") {
        let fish = script("fish")?;
        let completed = Command::new("fish")
            .arg("-c")
            .arg(format!("source {}; complete -C 'styxy po'", fish.display()))
            .output()?;
        let listed = text(&completed);
        assert!(listed.lines().any(|l| l.starts_with("ports\t")), "{listed}");
    }
    if have("zsh") {
        let functions = dir.path().join("zsh");
        std::fs::create_dir(&functions)?;
        std::fs::rename(script("zsh")?, functions.join("_styxy"))?;
        let registered = Command::new("zsh")
            .arg("-fc")
            .arg(format!(
                "fpath=({} $fpath); autoload -Uz compinit; compinit -u -d {}; print $_comps[styxy]",
                functions.display(),
                dir.path().join("zcompdump").display()
            ))
            .output()?;
        assert_eq!(text(&registered).trim(), "_styxy");
    }
    let refused = Command::new(styxy_bin())
        .args(["completions", "tcsh"])
        .output()?;
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("possible values: bash"));
    Ok(())
}

/// `styxy manpages DIR` writes a page for `styxy` and for every command and subcommand, and
/// `man` renders each with its name and its options.
#[test]
fn every_command_has_a_man_page_that_man_renders() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let out = Command::new(styxy_bin())
        .arg("manpages")
        .arg(dir.path())
        .output()?;
    let written = text(&out);
    // Every command `styxy --help` lists has its page.
    let help = text(&Command::new(styxy_bin()).arg("--help").output()?);
    let commands: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.len() > 15, "{help}");
    for command in commands.iter().copied().chain(["hook-install"]) {
        let page = dir.path().join(format!("styxy-{command}.1"));
        assert!(written.contains(&page.display().to_string()), "{written}");
        let rendered = Command::new("man")
            .arg("-l")
            .arg(&page)
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100")
            .output()?;
        // Words as man lays them out (it justifies lines with extra spaces).
        let rendered = text(&rendered)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            rendered.contains(&format!("NAME styxy-{command} - ")),
            "{command}: {rendered}"
        );
    }
    let ports = std::fs::read_to_string(dir.path().join("styxy-ports.1"))?;
    assert!(ports.contains("instance"), "{ports}");
    Ok(())
}

/// A reader that goes away (`styxy ports | head`) ends a command quietly, as a Unix tool does:
/// status 0 and nothing on stderr (it was a panic and its backtrace).
#[tokio::test(flavor = "multi_thread")]
async fn a_reader_that_goes_away_ends_a_command_quietly() -> anyhow::Result<()> {
    let daemon = Daemon::start().await?;
    let commands: [&[&str]; 4] = [
        &["ports"],
        &["--json", "ports"],
        &["status"],
        &["suggest", "dev", "-n", "3"],
    ];
    for args in commands {
        // A pipe whose reader is closed before the command starts: its first write fails.
        let (reader, writer) = std::io::pipe()?;
        drop(reader);
        let out = daemon
            .cli_command(args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()?;
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "styxy {args:?}: {}, stderr {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
