//! Sessions that can be trusted, tried as users and hostile users would on the default set-up:
//! the root daemon with its eBPF programs at the cgroup root *and* the shim in every session's
//! processes (`styxy run`, as the SessionStart hook arranges it).
//!
//! - one enforcer per socket: a chain of moves (8350 → 8351, then 8351 → 8352) never sends a
//!   client two hops, to the session's other server;
//! - kernel membership follows the task exactly: a thread that calls `exec` leaves no entry, and
//!   an entry left behind for a pid never steers a later process that got that pid;
//! - a session steers only its owner's processes (a setuid-root client in a user's session is
//!   untouched), and root's sessions steer all of theirs (a server run as another user inside
//!   root's session moves once, and root's clients there reach it);
//! - nothing another user plants under `/tmp/styxy-UID` is used;
//! - another network namespace is judged there: not moved for the host's ports, never
//!   redirected by a host session's view;
//! - kernel sessions outlive their daemon: enforced while none runs (pinned in bpffs) and taken
//!   over by the next one; another build of the programs replaces the pins.
//!
//! Needs root, cgroup v2 and the eBPF object (each test says why when it skips; CI provides them
//! and fails instead). One test at a time: they read the kernel's session map.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use styxy_tests::{ebpf_ready, notice_port, styxy_bin, wait_for_listener, Daemon, Spawned};

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Debian's python: pyenv's lives under /root, which other users cannot enter.
const PYTHON: &str = "/usr/bin/python3";
const NOBODY: u32 = 65534;

/// The default install: eBPF at the root (kernel sessions enforced), the shim in `styxy run`.
async fn root_daemon() -> Result<Option<Daemon>> {
    Daemon::start_root_ebpf().await
}

/// A directory served by `python3 -m http.server` whose `/whoami.txt` says `name`, readable by
/// every user.
struct Site {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

fn site(name: &str) -> Result<Site> {
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    std::fs::write(dir.path().join("whoami.txt"), name)?;
    Ok(Site {
        root: dir.path().to_path_buf(),
        _dir: dir,
    })
}

fn http_server_args(port: u16, site: &Site) -> Vec<String> {
    [
        "-u",
        "-m",
        "http.server",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--directory",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([site.root.display().to_string()])
    .collect()
}

/// `styxy run --instance SESSION -- PROGRAM ARGS…` against `daemon` (the shim on, as by
/// default), for arguments made at run time.
fn in_session(daemon: &Daemon, session: &str, program: &str, args: &[String]) -> Command {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    daemon.shimmed_in(session, program, &args)
}

/// Starts a named http.server on `port` in `session` (or outside every session); the port it
/// listens on (Python prints its socket's own). A moved one's notice must name that port.
fn serve(daemon: &Daemon, session: Option<&str>, port: u16, site: &Site) -> Result<(Spawned, u16)> {
    let args = http_server_args(port, site);
    let command = match session {
        Some(session) => in_session(daemon, session, PYTHON, &args),
        None => {
            let mut c = Command::new(PYTHON);
            c.args(&args);
            c
        }
    };
    serve_by(command, port, true)
}

/// As [`serve`], in `session` without the shim (as a static binary runs): only the kernel moves
/// it, and nothing prints a notice.
fn serve_unshimmed(
    daemon: &Daemon,
    session: &str,
    port: u16,
    site: &Site,
) -> Result<(Spawned, u16)> {
    let args = http_server_args(port, site);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    serve_by(daemon.unshimmed_in(session, PYTHON, &args), port, false)
}

fn serve_by(mut command: Command, port: u16, notice: bool) -> Result<(Spawned, u16)> {
    let mut server = Spawned::start(&mut command)?;
    // "Serving HTTP on 127.0.0.1 port N (http://…)"; stdout and stderr lines arrive in either
    // order, so the notice is looked for among both.
    let line = server.has_line(15, |l| l.starts_with("Serving HTTP"))?;
    let bound: u16 = line
        .split_whitespace()
        .skip_while(|w| *w != "port")
        .nth(1)
        .and_then(|w| w.parse().ok())
        .with_context(|| format!("a port in {line:?}"))?;
    if bound != port && notice {
        let notice = server.has_line(5, |l| l.contains("STYXY"))?;
        anyhow::ensure!(
            notice_port(&notice) == Some(bound),
            "the notice names where it listens: {notice}"
        );
    }
    wait_for_listener(bound)?;
    Ok((server, bound))
}

/// `curl` of `/whoami.txt` on 127.0.0.1:`port` from inside `session`: which server answered.
fn whoami_in(daemon: &Daemon, session: &str, port: u16) -> Result<String> {
    let url = format!("http://127.0.0.1:{port}/whoami.txt");
    let out = daemon
        .shimmed_in(session, "curl", &["-sS", "-m", "10", &url])
        .output()?;
    if !out.status.success() {
        bail!(
            "curl in {session} to {port} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The moves the daemon recorded (asked → bound) for `asked`, once it has recorded one: a move
/// the kernel made reaches the audit when the daemon has read the moved process, which may be
/// after the server says it serves. (A bind moved twice shows elsewhere too: its notice then
/// names another port than the one the server serves on, which `serve` checks.)
async fn moves_of(daemon: &Daemon, asked: u16) -> Result<Vec<u32>> {
    let recorded = || async {
        let moves: Vec<u32> = daemon
            .audit()
            .await
            .ok()?
            .into_iter()
            .filter(|e| e.requested_port == u32::from(asked))
            .map(|e| e.assigned_port)
            .collect();
        (!moves.is_empty()).then_some(moves)
    };
    styxy_tests::eventually(10, "the move in the audit", recorded).await
}

// ---- one enforcer per socket -------------------------------------------------------------------

/// A session whose first server asked P and was moved to P+1, and whose second server asked P+1
/// and was moved to P+2: inside the session P reaches the first, P+1 the second — never P the
/// second (the shim's redirect P → P+1, then the kernel's P+1 → P+2). Every server is moved once.
#[tokio::test(flavor = "multi_thread")]
async fn a_chain_of_moves_never_sends_a_client_two_hops() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(daemon) = root_daemon().await? else {
        return Ok(());
    };
    let asked = daemon.base + 150; // api range
    let (outside_site, first_site, second_site) =
        (site("outside")?, site("first")?, site("second")?);
    let (_outside, held) = serve(&daemon, None, asked, &outside_site)?;
    assert_eq!(held, asked);
    let (_first, first_port) = serve(&daemon, Some("chain"), asked, &first_site)?;
    assert_ne!(first_port, asked, "moved off the held port");
    let (_second, second_port) = serve(&daemon, Some("chain"), first_port, &second_site)?;
    assert_ne!(
        second_port, first_port,
        "moved off the session's own first server"
    );
    assert_ne!(second_port, asked);
    for round in 0..20 {
        assert_eq!(
            whoami_in(&daemon, "chain", asked)?,
            "first",
            "round {round}: the asked port reaches the server that asked it\n{}",
            daemon.log()
        );
        assert_eq!(whoami_in(&daemon, "chain", first_port)?, "second");
    }
    // Outside the session nothing changes: the real ports.
    assert_eq!(styxy_tests::http_get(asked)?, "HTTP/1.0 200 OK");
    let direct = |port: u16| -> Result<String> {
        let out = Command::new("curl")
            .args([
                "-sS",
                "-m",
                "10",
                &format!("http://127.0.0.1:{port}/whoami.txt"),
            ])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    assert_eq!(direct(asked)?, "outside");
    assert_eq!(direct(first_port)?, "first");
    assert_eq!(direct(second_port)?, "second");
    // One move per server, and the notice named where it really is.
    assert_eq!(moves_of(&daemon, asked).await?, [u32::from(first_port)]);
    assert_eq!(
        moves_of(&daemon, first_port).await?,
        [u32::from(second_port)]
    );
    Ok(())
}

/// Two sessions' servers on one free port, the first bound (SO_REUSEADDR) but not yet listening
/// when the second binds and listens: both start, on distinct ports, one of them the asked
/// port, each moved at most once, and each session's clients reach their own. (Whether the
/// kernel moves the second bind, or the first's `listen()` is refused and the shim rebuilds it
/// elsewhere, depends on what the kernel had seen; either must hold the promise.)
#[tokio::test(flavor = "multi_thread")]
async fn a_server_bound_but_not_yet_listening_keeps_its_session_coherent() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(daemon) = root_daemon().await? else {
        return Ok(());
    };
    let asked = daemon.base + 160;
    let port = asked.to_string();
    let mut first = Spawned::start(&mut daemon.shimmed_in(
        "first",
        PYTHON,
        &["-u", "-c", styxy_tests::BIND_THEN_LISTEN, &port, "first"],
    ))?;
    first.line_where(20, |l| l == "bound")?;
    let second_site = site("second")?;
    let (_second, second_port) = serve(&daemon, Some("second"), asked, &second_site)?;
    first.send_line("")?;
    let first_port =
        styxy_tests::listening_port(&first.line_where(20, |l| l.starts_with("listening"))?)?;
    assert_ne!(first_port, second_port);
    assert!(
        first_port == asked || second_port == asked,
        "one keeps the asked port: {first_port} {second_port}"
    );
    if first_port != asked {
        let notice = first.has_line(10, |l| l.contains("STYXY"))?;
        assert_eq!(notice_port(&notice), Some(first_port), "{notice}");
    }
    for round in 0..5 {
        assert_eq!(
            whoami_in(&daemon, "first", asked)?,
            "first",
            "round {round}"
        );
        assert_eq!(
            whoami_in(&daemon, "second", asked)?,
            "second",
            "round {round}"
        );
    }
    Ok(())
}

// ---- membership follows the task exactly -------------------------------------------------------

/// The kernel's `SESSIONS` map of this daemon: the one holding `pid`'s entry. Its id.
fn sessions_map_holding(pid: u32) -> Result<u32> {
    let out = Command::new("bpftool")
        .args(["-j", "map", "show"])
        .output()
        .context("running bpftool (apt-get install bpftool, or cargo xtask setup)")?;
    let maps: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    for map in maps.as_array().into_iter().flatten() {
        if map["name"] != "SESSIONS" {
            continue;
        }
        let Some(id) = map["id"].as_u64() else {
            continue;
        };
        if session_entries(id as u32)?
            .iter()
            .any(|(task, _)| *task == pid)
        {
            return Ok(id as u32);
        }
    }
    bail!("no SESSIONS map holds pid {pid}")
}

/// The entries of `SESSIONS` map `id`: task id → value bytes.
fn session_entries(id: u32) -> Result<Vec<(u32, Vec<u8>)>> {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "id", &id.to_string()])
        .output()?;
    let entries: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("bpftool map dump: {}", String::from_utf8_lossy(&out.stdout)))?;
    let bytes = |v: &serde_json::Value| -> Vec<u8> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b.as_str())
            .filter_map(|b| u8::from_str_radix(b.trim_start_matches("0x"), 16).ok())
            .collect()
    };
    Ok(entries
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let key = bytes(&e["key"]);
            let task = u32::from_le_bytes(key.get(..4)?.try_into().ok()?);
            Some((task, bytes(&e["value"])))
        })
        .collect())
}

/// Writes `SESSIONS[task] = value` into map `id`, as a leaked entry would be.
fn plant_entry(id: u32, task: u32, value: &[u8]) -> Result<()> {
    let hex =
        |bytes: &[u8]| -> Vec<String> { bytes.iter().map(|b| format!("0x{b:02x}")).collect() };
    let status = Command::new("bpftool")
        .args(["map", "update", "id", &id.to_string(), "key"])
        .args(hex(&task.to_le_bytes()))
        .arg("value")
        .args(hex(value))
        .status()?;
    anyhow::ensure!(status.success(), "bpftool map update failed");
    Ok(())
}

/// A thread that calls `exec` takes its process's pid; its own task id must not stay behind in
/// the kernel's session map (it did, forever: a leak any user could grow at will).
#[tokio::test(flavor = "multi_thread")]
async fn a_thread_that_calls_exec_leaves_no_entry_behind() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(daemon) = root_daemon().await? else {
        return Ok(());
    };
    // A session's process: a thread prints its task id, then execs a program that waits.
    let script = "import os, threading, sys\n\
                  print('pid', os.getpid(), flush=True)\n\
                  def run():\n    print('thread', threading.get_native_id(), flush=True)\n    \
                  os.execv('/bin/sh', ['sh', '-c', 'echo exec $$; read line'])\n\
                  threading.Thread(target=run).start()\n\
                  threading.Event().wait()\n";
    let mut process =
        Spawned::start(&mut daemon.shimmed_in("exec-thread", PYTHON, &["-c", script]))?;
    let pid: u32 = process
        .line_where(15, |l| l.starts_with("pid "))?
        .trim_start_matches("pid ")
        .parse()?;
    let thread: u32 = process
        .line_where(15, |l| l.starts_with("thread "))?
        .trim_start_matches("thread ")
        .parse()?;
    let after_exec = process.line_where(15, |l| l.starts_with("exec "))?;
    assert_eq!(
        after_exec,
        format!("exec {pid}"),
        "exec took the process's pid"
    );
    assert_ne!(thread, pid);
    let map = sessions_map_holding(pid)?;
    let tasks: Vec<u32> = session_entries(map)?.into_iter().map(|(t, _)| t).collect();
    assert!(
        !tasks.contains(&thread),
        "the exec'ing thread's own id {thread} stayed in the session map: {tasks:?}"
    );
    process.send_line("done")?;
    styxy_tests::eventually(10, "the process's entry to go at exit", || async {
        let tasks: Vec<u32> = session_entries(map)
            .ok()?
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        (!tasks.contains(&pid) && !tasks.contains(&thread)).then_some(())
    })
    .await?;
    Ok(())
}

/// An entry left behind for a pid (however it was: a missed exit, a leak) never steers the
/// process that gets that pid later. Simulated by writing the session's entry for a process
/// outside every session, as a leak followed by pid reuse would leave it: stamped before the
/// process started, it is ignored; stamped after (the process really was placed), it steers.
#[tokio::test(flavor = "multi_thread")]
async fn an_entry_left_for_a_reused_pid_never_steers_the_new_process() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(daemon) = root_daemon().await? else {
        return Ok(());
    };
    let asked = daemon.base + 160;
    let (outside_site, session_site) = (site("outside")?, site("session")?);
    let (_outside, _) = serve(&daemon, None, asked, &outside_site)?;
    let (session_server, moved) = serve(&daemon, Some("leaky"), asked, &session_site)?;
    assert_ne!(moved, asked);
    let server_pid = session_server.child.id();
    let map = sessions_map_holding(server_pid)?;
    let entry = session_entries(map)?
        .into_iter()
        .find(|(task, _)| *task == server_pid)
        .map(|(_, value)| value)
        .context("the server's entry")?;
    assert_eq!(
        entry.len(),
        std::mem::size_of::<styxy_common::session::Member>(),
        "session, owner, stamp, flags"
    );

    // A root process outside every session (no shim), asking on command.
    let client = "import sys, urllib.request\n\
                  print('ready', flush=True)\n\
                  for line in sys.stdin:\n    \
                  print(urllib.request.urlopen('http://127.0.0.1:%s/whoami.txt' % line.strip(), timeout=10).read().decode(), flush=True)\n";
    let mut q = Spawned::start(Command::new(PYTHON).args(["-c", client]))?;
    q.line_where(15, |l| l == "ready")?;
    let ask = |q: &mut Spawned| -> Result<String> {
        q.send_line(&asked.to_string())?;
        q.line_where(15, |l| l == "outside" || l == "session")
    };
    assert_eq!(ask(&mut q)?, "outside", "outside every session");

    let q_pid = q.child.id();
    let with_stamp = |stamp: u64| -> Vec<u8> {
        let mut value = entry[..8].to_vec();
        value.extend_from_slice(&stamp.to_le_bytes());
        value.extend_from_slice(&entry[16..]);
        value
    };
    // The leaked entry: written before this process started.
    plant_entry(map, q_pid, &with_stamp(1))?;
    for _ in 0..10 {
        assert_eq!(
            ask(&mut q)?,
            "outside",
            "an entry older than the process must not steer it"
        );
    }
    // The control: the same entry stamped now (as a real placement is) does steer it, so the
    // entry, the view and the client are all as a hijack would need them.
    plant_entry(map, q_pid, &with_stamp(u64::MAX))?;
    assert_eq!(ask(&mut q)?, "session", "a real member is steered");
    plant_entry(map, q_pid, &with_stamp(1))?;
    assert_eq!(ask(&mut q)?, "outside");
    // And the daemon counts only what holds: one session (the server's).
    assert_eq!(daemon.status().await?.kernel_sessions, 1);
    Ok(())
}

// ---- a session steers its owner's processes ----------------------------------------------------

/// `PROGRAM ARGS…` as `uid` (its group the same number), with no runtime dir of its own.
fn as_user(uid: u32, program: &Path) -> Command {
    let mut command = Command::new(program);
    command
        .uid(uid)
        .gid(uid)
        .env("HOME", "/tmp")
        .env_remove("XDG_RUNTIME_DIR");
    command
}

/// A setuid-root client inside an ordinary user's kernel session is not steered by that user's
/// view: root's connection to root's server reaches root's server (the shim never loads into a
/// setuid program; this is the kernel's part). The same client without setuid is steered.
#[tokio::test(flavor = "multi_thread")]
async fn a_setuid_client_in_a_users_session_is_not_steered_by_it() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    if !styxy_tests::can_act_as_another_user() {
        return Ok(());
    }
    let Some(programs) = styxy_tests::static_programs() else {
        return Ok(());
    };
    let Some(daemon) = root_daemon().await? else {
        return Ok(());
    };
    // Copies every user may run: one plain, one setuid root.
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let plain = dir.path().join("netprobe");
    let setuid = dir.path().join("netprobe-setuid");
    std::fs::copy(&programs.netprobe, &plain)?;
    std::fs::copy(&programs.netprobe, &setuid)?;
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(&setuid, std::fs::Permissions::from_mode(0o4755))?;

    let asked = daemon.base + 170;
    let port = asked.to_string();
    let mut root_server =
        Spawned::start(Command::new(&plain).args(["serve", "tcp", &port, "root"]))?;
    root_server.line_where(15, |l| l.starts_with("listening "))?;
    let in_nobodys_session = |program: &Path, args: &[&str]| -> Command {
        let mut command = as_user(NOBODY, &styxy_bin());
        command
            .arg("--socket")
            .arg(&daemon.socket)
            .args(["run", "--instance", "nobodys", "--"])
            .arg(program)
            .args(args);
        command
    };
    let mut session_server = Spawned::start(&mut in_nobodys_session(
        &plain,
        &["serve", "tcp", &port, "nobody"],
    ))?;
    let line = session_server.line_where(15, |l| {
        l.starts_with("listening ") || l.starts_with("error")
    })?;
    assert_ne!(
        line,
        format!("listening {asked}"),
        "moved by the kernel: {line}"
    );
    let client = |program: &Path| -> Result<String> {
        let out = in_nobodys_session(program, &["get", &port]).output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    assert_eq!(
        client(&plain)?,
        format!("nobody peer {asked}"),
        "nobody's own client is steered"
    );
    for _ in 0..5 {
        assert_eq!(
            client(&setuid)?,
            format!("root peer {asked}"),
            "a setuid-root client in nobody's session reaches root's server\n{}",
            daemon.log()
        );
    }
    Ok(())
}

/// Root's session running a server as another user (`runuser -u postgres -- postgres`): moved
/// once (the shim's notice names where it listens), and root's clients in that session reach it.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_run_as_another_user_in_roots_session_moves_once_and_is_reached() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    if !styxy_tests::can_act_as_another_user() {
        return Ok(());
    }
    let Some(daemon) = root_daemon().await? else {
        return Ok(());
    };
    let asked = daemon.base + 180;
    let (outside_site, db_site) = (site("outside")?, site("database")?);
    let (_outside, _) = serve(&daemon, None, asked, &outside_site)?;
    let mut args: Vec<String> = [
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
        PYTHON,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(http_server_args(asked, &db_site));
    let mut server = Spawned::start(&mut in_session(&daemon, "roots", "setpriv", &args))?;
    let notice = server.has_line(15, |l| l.contains("STYXY"))?;
    let moved = notice_port(&notice).with_context(|| format!("a notice: {notice}"))?;
    let serving = server.has_line(15, |l| l.starts_with("Serving HTTP"))?;
    assert!(serving.contains(&format!("port {moved} ")), "{serving}");
    wait_for_listener(moved)?;
    assert_ne!(moved, asked);
    assert_eq!(
        moves_of(&daemon, asked).await?,
        [u32::from(moved)],
        "one move, to where the notice says\n{}",
        daemon.log()
    );
    for _ in 0..5 {
        assert_eq!(whoami_in(&daemon, "roots", asked)?, "database");
    }
    Ok(())
}

// ---- nothing another user plants is used -------------------------------------------------------

/// Without `XDG_RUNTIME_DIR` (su, cron, CI) a user's own daemon lives under `/tmp/styxy-UID`.
/// Another user who made that directory first, with a socket and a table in it, is ignored: the
/// CLI says so and goes to the system daemon, and the shim neither maps that table nor talks to
/// that socket.
#[tokio::test(flavor = "multi_thread")]
async fn a_squatted_tmp_directory_is_never_used() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    if !styxy_tests::can_act_as_another_user() {
        return Ok(());
    }
    let daemon = Daemon::start().await?;
    // Users that own nothing else on the machine.
    const VICTIM: u32 = 65_432;
    const SQUATTER: u32 = 65_433;
    let squatted = PathBuf::from(format!("/tmp/styxy-{VICTIM}"));
    let _ = std::fs::remove_dir_all(&squatted);
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Remove(squatted.clone());
    // The squatter's directory, socket (a listener that reports every connection) and table (a
    // real one's bytes, so it would be taken as live).
    let dir = squatted.join("styxy");
    let listener = format!(
        "import os, socket\nos.makedirs('{dir}', exist_ok=True)\n\
         s = socket.socket(socket.AF_UNIX)\ns.bind('{dir}/styxy.sock')\ns.listen(8)\n\
         print('ready', flush=True)\nwhile True:\n    c, _ = s.accept()\n    print('connected', flush=True)\n    c.close()\n",
        dir = dir.display()
    );
    let mut squatter =
        Spawned::start(as_user(SQUATTER, Path::new(PYTHON)).args(["-c", &listener]))?;
    squatter.line_where(15, |l| l == "ready")?;
    let table = dir.join("styxy.sock.table");
    std::fs::copy(daemon.socket.with_extension("sock.table"), &table)?;
    std::os::unix::fs::chown(&table, Some(SQUATTER), Some(SQUATTER))?;

    // The CLI: warned, and not connected there.
    let out = as_user(VICTIM, &styxy_bin())
        .args(["--timeout", "2", "status"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("ignoring {}/styxy.sock", dir.display()))
            && stderr.contains(&format!("belongs to uid {SQUATTER}")),
        "{stderr}"
    );
    // The shim: a bind of a port the planted table shows taken (held now, and seen so by the real
    // daemon whose table is copied again once it shows it).
    let held = daemon.base + 190;
    let _holder = styxy_tests::port_holder(&[held])?;
    styxy_tests::eventually(10, "the held port in the daemon's table", || async {
        let out = daemon.cli(&["observe", &held.to_string()]);
        String::from_utf8_lossy(&out.stdout)
            .contains("python")
            .then_some(())
    })
    .await?;
    std::fs::copy(daemon.socket.with_extension("sock.table"), &table)?;
    let bind = format!(
        "import socket\ns = socket.socket()\ntry:\n    s.bind(('127.0.0.1', {held}))\n    print('bound', s.getsockname()[1])\n\
         except OSError as e:\n    print('failed', e.errno)\n"
    );
    let out = as_user(VICTIM, Path::new(PYTHON))
        .args(["-c", &bind])
        .env("LD_PRELOAD", styxy_tests::shim_library())
        .output()?;
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the program lived: {:?}", out.status);
    assert_eq!(
        said.trim(),
        "failed 98",
        "bound as without Styxy (no daemon of its own)"
    );
    assert!(
        squatter.rest(1).iter().all(|l| l != "connected"),
        "the squatter's socket was used"
    );
    Ok(())
}

// ---- network namespaces ------------------------------------------------------------------------

/// A process of a session that enters a fresh network namespace binds and connects there as
/// without Styxy: the host's taken ports do not move its binds, and the session's view (the
/// host's) does not redirect its loopback traffic.
#[tokio::test(flavor = "multi_thread")]
async fn in_another_network_namespace_nothing_is_moved_or_redirected() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(daemon) = root_daemon().await? else {
        return Ok(());
    };
    let asked = daemon.base + 200 - 5; // api range
    let (outside_site, session_site) = (site("outside")?, site("session")?);
    let (_outside, _) = serve(&daemon, None, asked, &outside_site)?;
    let (_server, moved) = serve(&daemon, Some("netns"), asked, &session_site)?;
    assert_ne!(moved, asked);
    assert_eq!(
        whoami_in(&daemon, "netns", asked)?,
        "session",
        "the view on the host"
    );
    // In a new network namespace, servers on both the asked and the moved port, then a client.
    let script = format!(
        "import socket, subprocess, threading\n\
         subprocess.run(['ip', 'link', 'set', 'lo', 'up'], check=True)\n\
         def serve(port, name):\n    s = socket.socket()\n    s.bind(('127.0.0.1', port))\n    s.listen(8)\n    \
         print('bound', port, s.getsockname()[1], flush=True)\n    \
         def run():\n        while True:\n            c, _ = s.accept()\n            c.sendall(name.encode())\n            c.close()\n    \
         threading.Thread(target=run, daemon=True).start()\n\
         serve({asked}, 'asked')\nserve({moved}, 'moved')\n\
         for _ in range(5):\n    c = socket.create_connection(('127.0.0.1', {asked}))\n    \
         print('reached', c.recv(16).decode(), c.getpeername()[1], flush=True)\n"
    );
    let mut args: Vec<String> = vec!["-n".into(), PYTHON.into(), "-c".into()];
    args.push(script);
    let out = in_session(&daemon, "netns", "unshare", &args).output()?;
    let said = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = said.lines().collect();
    assert_eq!(
        lines[..2],
        [
            format!("bound {asked} {asked}").as_str(),
            format!("bound {moved} {moved}").as_str()
        ],
        "binds as asked in the namespace: {said}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        lines[2..],
        vec![format!("reached asked {asked}").as_str(); 5],
        "connects not redirected: {said}"
    );
    Ok(())
}

// ---- stopping --------------------------------------------------------------------------------

/// SIGTERM ends the daemon within two seconds (systemd gives 90 before it kills), whatever its
/// clients hold: here 50 shimmed processes, each keeping its pooled connection open after its
/// moved bind, as every server of a session does.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_ends_the_daemon_promptly_with_fifty_shimmed_clients_connected() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(mut daemon) = root_daemon().await? else {
        return Ok(());
    };
    let held = daemon.base + 120;
    let _holder = styxy_tests::port_holder(&[held])?;
    let bind_and_stay = format!(
        "import socket, sys\ns = socket.socket()\ns.bind(('127.0.0.1', {held}))\n\
         print('bound', s.getsockname()[1], flush=True)\nsys.stdin.read()\n"
    );
    let mut clients = Vec::new();
    for _ in 0..50 {
        let mut client = Spawned::start(&mut daemon.shimmed(PYTHON, &["-c", &bind_and_stay]))?;
        let line = client.line_where(15, |l| l.starts_with("bound "))?;
        assert_ne!(line, format!("bound {held}"), "moved, through the daemon");
        clients.push(client);
    }
    let connected = std::fs::read_dir(format!("/proc/{}/fd", daemon.pid()))?.count();
    assert!(
        connected > 50,
        "the clients' connections are open ({connected} descriptors)"
    );
    daemon.signal(libc::SIGTERM)?;
    let signalled = std::time::Instant::now();
    let status = daemon.wait_for_exit(std::time::Duration::from_secs(2))?;
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM: exited {status:?} within 2 s ({:?} so far)\n{}",
        signalled.elapsed(),
        daemon.log()
    );
    Ok(())
}

// ---- restarts ----------------------------------------------------------------------------------

/// The helper the restart tests run in a session without the shim (only the kernel acts for it,
/// as for a static binary), one command per line: `get PORT` (its own GET), `child PORT` (a GET
/// by a new process, forked now), `bind PORT`, `orphan PORT FILE` (starts a process that leaves
/// the tree — `setsid -f`, reparented away — and appends what it reaches on PORT to FILE five
/// times a second until FILE.stop exists).
const RESTART_HELPER: &str = "import socket, subprocess, sys, urllib.request\n\
    ORPHAN = '''import os, sys, time, urllib.request\n\
    port, path = sys.argv[1], sys.argv[2]\n\
    for _ in range(1500):\n    \
    if os.path.exists(path + '.stop'): break\n    \
    try: said = urllib.request.urlopen('http://127.0.0.1:%s/whoami.txt' % port, timeout=5).read().decode()\n    \
    except Exception as e: said = 'error ' + type(e).__name__\n    \
    with open(path, 'a') as f: f.write(said + chr(10))\n    \
    time.sleep(0.2)\n'''\n\
    print('ready', flush=True)\n\
    for line in sys.stdin:\n    \
    word, port, *rest = line.split()\n    \
    url = 'http://127.0.0.1:%s/whoami.txt' % port\n    \
    if word == 'get':\n        \
    print(urllib.request.urlopen(url, timeout=10).read().decode(), flush=True)\n    \
    elif word == 'child':\n        \
    print('child', subprocess.run(['curl', '-sS', '-m', '10', url], capture_output=True, text=True).stdout, flush=True)\n    \
    elif word == 'orphan':\n        \
    subprocess.run(['setsid', '-f', sys.executable, '-c', ORPHAN, port, rest[0]])\n        \
    print('orphaned', flush=True)\n    \
    else:\n        \
    s = socket.socket(); s.bind(('127.0.0.1', int(port))); print('bound', s.getsockname()[1], flush=True); s.close()\n";

/// What the orphan of [`RESTART_HELPER`] reached, line by line.
fn orphan_lines(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Waits until the orphan has written `more` lines after the first `from`; those lines.
fn orphan_lines_after(file: &Path, from: usize, more: usize) -> Result<Vec<String>> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let lines = orphan_lines(file);
        if lines.len() >= from + more {
            return Ok(lines[from..].to_vec());
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "the orphan wrote {} lines, not {}",
                lines.len(),
                from + more
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A GET by the helper (`get`) or by a process it forks now (`child`): what it reached.
fn reached(process: &mut Spawned, how: &str, port: u16) -> Result<String> {
    process.send_line(&format!("{how} {port}"))?;
    process.line_where(15, |l| l.ends_with("session") || l.ends_with("outside"))
}

/// A bind of `port` by the helper: the line it printed.
fn helper_bind(process: &mut Spawned, port: u16) -> Result<String> {
    process.send_line(&format!("bind {port}"))?;
    process.line_where(15, |l| l.starts_with("bound ") || l.contains("Error"))
}

/// A kernel session outlives its daemon. While no daemon runs — after `kill -9`, and after
/// SIGTERM with the session live — its programs and maps stay pinned: a process of the session
/// still reaches its session's server at the asked port (not the other one there), a process it
/// forks meanwhile too, and its binds of held ports are still moved. The next daemon takes the
/// maps over, so even a process that left the session's tree (double fork), which no reading of
/// `/proc` finds, stays in. All by the kernel alone (the shim is off in these processes), as for
/// a static binary. Once no session is live, a clean stop leaves nothing pinned.
#[tokio::test(flavor = "multi_thread")]
async fn kernel_sessions_survive_a_daemon_restart() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(mut daemon) = root_daemon().await? else {
        return Ok(());
    };
    let pins = daemon.pin_dir().context("the pin directory")?;
    assert!(
        pins.is_dir(),
        "a root daemon with eBPF pins its programs at {}",
        pins.display()
    );
    let asked = daemon.base + 130;
    let (outside_site, session_site) = (site("outside")?, site("session")?);
    let (_outside, _) = serve(&daemon, None, asked, &outside_site)?;
    let (server, moved) = serve(&daemon, Some("survivor"), asked, &session_site)?;
    assert_ne!(moved, asked);
    let held = daemon.base + 140;
    let _holder = styxy_tests::port_holder(&[held, held + 1, held + 2, held + 3])?;
    let mut process =
        Spawned::start(&mut daemon.unshimmed_in("survivor", PYTHON, &["-c", RESTART_HELPER]))?;
    process.line_where(15, |l| l == "ready")?;
    assert_eq!(
        reached(&mut process, "get", asked)?,
        "session",
        "before any restart"
    );
    let orphan_file = daemon.dir.join("orphan.txt");
    process.send_line(&format!("orphan {asked} {}", orphan_file.display()))?;
    process.line_where(15, |l| l == "orphaned")?;
    let first = orphan_lines_after(&orphan_file, 0, 3)?;
    assert!(
        first.iter().all(|l| l == "session"),
        "the orphan, before: {first:?}"
    );
    // The session's last `styxy run` is a short client that is gone by the restart: the session
    // still has its server and the helper.
    assert_eq!(whoami_in(&daemon, "survivor", asked)?, "session");
    let mut port = held;
    for how in ["kill -9", "SIGTERM"] {
        if how == "kill -9" {
            daemon.kill9()?;
        } else {
            daemon.signal(libc::SIGTERM)?;
            let status = daemon.wait_for_exit(std::time::Duration::from_secs(5))?;
            assert!(status.is_some_and(|s| s.success()), "SIGTERM: {status:?}");
        }
        // No daemon runs now.
        assert!(pins.is_dir(), "after {how}, a live session keeps the pins");
        for _ in 0..5 {
            assert_eq!(
                reached(&mut process, "get", asked)?,
                "session",
                "after {how}, no daemon: its process"
            );
        }
        assert_eq!(
            reached(&mut process, "child", asked)?,
            "child session",
            "after {how}, no daemon: a child forked now"
        );
        let line = helper_bind(&mut process, port)?;
        assert!(
            line.starts_with("bound ") && line != format!("bound {port}"),
            "after {how}, no daemon: a held port's bind is moved: {line}"
        );
        port += 1;
        let during = orphan_lines(&orphan_file).len();
        let gap = orphan_lines_after(&orphan_file, during, 3)?;
        assert!(
            gap.iter().all(|l| l == "session"),
            "after {how}, no daemon: the orphan {gap:?}"
        );

        daemon.restart().await?;
        styxy_tests::eventually(10, "the session back in the kernel", || async {
            let status = daemon.status().await.ok()?;
            (status.kernel_sessions == 1).then_some(())
        })
        .await
        .with_context(|| format!("after {how}\n{}", daemon.log()))?;
        assert!(
            daemon.log().contains("taken over (pinned maps)"),
            "after {how}, the maps are the last daemon's\n{}",
            daemon.log()
        );
        for _ in 0..5 {
            assert_eq!(
                reached(&mut process, "get", asked)?,
                "session",
                "after {how} and a restart, the session's process reaches its own server\n{}",
                daemon.log()
            );
        }
        assert_eq!(reached(&mut process, "child", asked)?, "child session");
        let line = helper_bind(&mut process, port)?;
        assert!(
            line.starts_with("bound ") && line != format!("bound {port}"),
            "after {how} and a restart, a held port's bind is moved: {line}"
        );
        port += 1;
        let after = orphan_lines(&orphan_file).len();
        let restarted = orphan_lines_after(&orphan_file, after, 3)?;
        assert!(
            restarted.iter().all(|l| l == "session"),
            "after {how} and a restart, the process that left the tree: {restarted:?}"
        );
    }
    // The session ends: a clean stop leaves nothing attached.
    std::fs::write(daemon.dir.join("orphan.txt.stop"), "")?;
    drop(process);
    drop(server);
    styxy_tests::eventually(20, "no session live", || async {
        let status = daemon.status().await.ok()?;
        (status.kernel_sessions == 0).then_some(())
    })
    .await
    .with_context(|| daemon.log())?;
    daemon.signal(libc::SIGTERM)?;
    daemon.wait_for_exit(std::time::Duration::from_secs(5))?;
    assert!(
        !pins.exists(),
        "stopped with no session live: {} is gone",
        pins.display()
    );
    Ok(())
}

/// Pins whose state directory is gone are removed by the next daemon that starts, whatever its
/// own state directory — the daemon that left them ran where this one runs (its pins record the
/// mount namespace): their programs detach. Without the record this needs pid 1's mount
/// namespace, which some machines hide; the record decides either way.
#[tokio::test(flavor = "multi_thread")]
async fn the_pins_of_a_state_dir_that_is_gone_go_with_the_next_start() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(mut left) = root_daemon().await? else {
        return Ok(());
    };
    let pins = left.pin_dir().context("the pin directory")?;
    let session_site = site("session")?;
    let (_server, _) = serve(&left, Some("left-behind"), left.base + 160, &session_site)?;
    styxy_tests::eventually(
        10,
        "the session in the kernel, its links pinned",
        || async {
            let status = left.status().await.ok()?;
            (status.kernel_sessions == 1).then_some(())
        },
    )
    .await
    .with_context(|| left.log())?;
    let marks = || -> Vec<String> {
        std::fs::read_dir(&pins)
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|build| {
                std::fs::read_dir(build.path())
                    .into_iter()
                    .flatten()
                    .flatten()
            })
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with("mount-namespace-"))
            .collect()
    };
    let own = std::fs::read_link("/proc/self/ns/mnt")?;
    let own = own.to_string_lossy();
    let own_mark = format!(
        "mount-namespace-{}",
        own.trim_start_matches("mnt:[").trim_end_matches(']')
    );
    assert_eq!(
        marks(),
        vec![own_mark.clone()],
        "the build records its mount namespace"
    );
    // A restart replaces the last daemon's record (a service's private namespace is new at each
    // start): a record left by another namespace goes.
    let build = std::fs::read_dir(&pins)?
        .flatten()
        .next()
        .context("the build's pins")?
        .path();
    std::fs::create_dir(build.join("mount-namespace-1"))?;
    left.kill9()?;
    left.restart().await?;
    assert_eq!(
        marks(),
        vec![own_mark],
        "the restarted daemon's record alone"
    );
    left.kill9()?;
    assert!(pins.is_dir(), "a live session keeps the pins after kill -9");
    std::fs::remove_dir_all(left.state_dir())?;
    let next = root_daemon().await?.context("a second root daemon")?;
    assert!(
        !pins.exists(),
        "the pins of the state directory that is gone: {}\n{}",
        pins.display(),
        next.log()
    );
    assert!(next.pin_dir().is_some_and(|p| p.is_dir()), "its own stay");
    Ok(())
}

/// Another build of the programs (an upgrade) never runs on the last build's maps: its start
/// removes the old pins, and the session is put back from `/proc`, its process still reaching
/// its own server.
#[tokio::test(flavor = "multi_thread")]
async fn another_build_of_the_programs_replaces_the_pins() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(mut daemon) = root_daemon().await? else {
        return Ok(());
    };
    let pins = daemon.pin_dir().context("the pin directory")?;
    let builds = |pins: &Path| -> Vec<String> {
        std::fs::read_dir(pins)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    let first = builds(&pins);
    assert_eq!(first.len(), 1, "one build pinned: {first:?}");
    let asked = daemon.base + 150;
    let (outside_site, session_site) = (site("outside")?, site("session")?);
    let (_outside, _) = serve(&daemon, None, asked, &outside_site)?;
    let (_server, moved) = serve(&daemon, Some("upgraded"), asked, &session_site)?;
    assert_ne!(moved, asked);
    let mut process =
        Spawned::start(&mut daemon.unshimmed_in("upgraded", PYTHON, &["-c", RESTART_HELPER]))?;
    process.line_where(15, |l| l == "ready")?;
    // The same object with a byte more: another build, as far as pins go.
    let setup = ebpf_ready().context("eBPF")?;
    let other = daemon.dir.join("other-build.o");
    let mut bytes = std::fs::read(&setup.object)?;
    bytes.push(0);
    std::fs::write(&other, bytes)?;
    daemon.kill9()?;
    daemon.replace_arg(
        setup.object.to_str().context("utf-8")?,
        other.to_str().context("utf-8")?,
    );
    daemon.restart().await?;
    let second = builds(&pins);
    assert!(
        second.len() == 1 && second != first,
        "the old build's pins are gone: {first:?} → {second:?}"
    );
    styxy_tests::eventually(10, "the session back in the kernel", || async {
        let status = daemon.status().await.ok()?;
        (status.kernel_sessions == 1).then_some(())
    })
    .await
    .with_context(|| daemon.log())?;
    assert_eq!(
        reached(&mut process, "get", asked)?,
        "session",
        "{}",
        daemon.log()
    );
    Ok(())
}

// ---- between two lives of a server ---------------------------------------------------------------

/// A session's server restarts (an autoreloader, Ctrl-C and up-arrow): between its two lives its
/// port stays its session's. Another session's server asking that port meanwhile is moved off
/// it; the session's own clients find nothing there (refused), not the other session's server;
/// and its next server gets the same port back. For a moved server (held on its new port, the
/// view still leading there) and for one that got its asked port.
#[tokio::test(flavor = "multi_thread")]
async fn between_two_lives_of_a_server_its_port_stays_its_sessions() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(daemon) = root_daemon().await? else {
        return Ok(());
    };
    let asked = daemon.base + 135;
    // The sessions live on (an agent's process), whatever their servers do.
    let mut agents = Vec::new();
    for session in ["lives-a", "lives-b", "lives-c"] {
        let mut agent = Spawned::start(&mut daemon.shimmed_in(session, "sleep", &["600"]))?;
        agent.rest(0);
        agents.push(agent);
    }
    let (a1, b1, b2, c1) = (
        site("a-first")?,
        site("b-first")?,
        site("b-second")?,
        site("c")?,
    );
    let (a_server, a_port) = serve(&daemon, Some("lives-a"), asked, &a1)?;
    assert_eq!(a_port, asked, "A was first: its asked port");
    let (b_server, b_port) = serve(&daemon, Some("lives-b"), asked, &b1)?;
    assert_ne!(b_port, asked, "B was moved");
    assert_eq!(whoami_in(&daemon, "lives-b", asked)?, "b-first");

    // B's server stops: B's clients are refused, not sent to A's server.
    drop(b_server);
    styxy_tests::eventually(10, "B's server gone", || async {
        let out = daemon.cli(&["observe", &b_port.to_string()]);
        (!String::from_utf8_lossy(&out.stdout).contains("python")).then_some(())
    })
    .await?;
    let refused = whoami_in(&daemon, "lives-b", asked).expect_err("nothing of B's is there");
    assert!(
        refused.to_string().contains("Couldn't connect") || refused.to_string().contains("refused"),
        "{refused}"
    );
    // B's own server asking that port itself — through the shim, then without it (only the
    // kernel acts) — is moved off it too: in B's view it stands for the asked port, whose clients
    // must not reach this other server.
    let b_other = site("b-other")?;
    for shim in [true, false] {
        let how = if shim { "shim" } else { "kernel" };
        let (other, other_port) = if shim {
            serve(&daemon, Some("lives-b"), b_port, &b_other)?
        } else {
            serve_unshimmed(&daemon, "lives-b", b_port, &b_other)?
        };
        assert_ne!(
            other_port, b_port,
            "{how}: B's held port is kept for B's server of {asked}"
        );
        assert_eq!(whoami_in(&daemon, "lives-b", b_port)?, "b-other", "{how}");
        assert!(
            whoami_in(&daemon, "lives-b", asked).is_err(),
            "{how}: B's clients of {asked} still find nothing, not B's other server\n{}",
            daemon.log()
        );
        drop(other);
        styxy_tests::eventually(10, "B's other server gone", || async {
            let out = daemon.cli(&["observe", &other_port.to_string()]);
            (!String::from_utf8_lossy(&out.stdout).contains("python")).then_some(())
        })
        .await?;
    }
    // A third session asking B's port meanwhile is moved off it.
    let (_c_server, c_port) = serve(&daemon, Some("lives-c"), b_port, &c1)?;
    assert_ne!(c_port, b_port, "B's port is held for B");
    // B's next server: the same port.
    let (_b_again, b_again) = serve(&daemon, Some("lives-b"), asked, &b2)?;
    assert_eq!(b_again, b_port, "B's next server gets its port back");
    assert_eq!(whoami_in(&daemon, "lives-b", asked)?, "b-second");

    // A's server (on its asked port) stops: A's clients are refused, another session's server
    // asking that port is moved, and A's next server gets it.
    drop(a_server);
    styxy_tests::eventually(10, "A's server gone", || async {
        let out = daemon.cli(&["observe", &asked.to_string()]);
        (!String::from_utf8_lossy(&out.stdout).contains("python")).then_some(())
    })
    .await?;
    assert!(
        whoami_in(&daemon, "lives-a", asked).is_err(),
        "A's clients are refused between its lives"
    );
    let (_c_again, c_again) = serve(&daemon, Some("lives-c"), asked, &c1)?;
    assert_ne!(c_again, asked, "A's asked port is held for A");
    let (_a_again, a_again) = serve(&daemon, Some("lives-a"), asked, &a1)?;
    assert_eq!(a_again, asked, "A's next server gets its asked port back");
    assert_eq!(whoami_in(&daemon, "lives-a", asked)?, "a-first");
    Ok(())
}
