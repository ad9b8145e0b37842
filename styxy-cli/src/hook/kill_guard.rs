//! `styxy hook pre-tool-use` (Claude Code `PreToolUse`, matcher `Bash`): the kill guard. Before
//! a command runs, the kill idioms in it (`kill_idioms`) are resolved against the live processes
//! and ports (in the command, and in the shell scripts it runs) — pids as given or as a pid file
//! holds them, ports through the daemon's table of bound sockets, `pkill` and `killall` patterns
//! through `/proc` as those tools match them — and the daemon says which session each process is
//! in. When any belongs to another session, the call is denied with a
//! reason naming it and the `styxy stop` to use instead; everything else passes silently.
//!
//! It fails open: a command it cannot read, a daemon that does not answer within
//! [`BUDGET`], any error — the command runs, as it would without Styxy. A command with no kill
//! word in it costs reading the hook's input and nothing else.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use styxy_proto::v1::{ListPortsRequest, ProcessSession, ProcessSessionsRequest};

use super::kill_idioms::{kill_operand, kill_targets, KillTarget, SHELLS};
use crate::client::Target;

/// The longest the guard may hold a command up; past it the command runs.
const BUDGET: Duration = Duration::from_secs(2);
/// At most this many processes of other sessions are named in a denial.
const NAMED: usize = 6;

/// Runs the hook: prints a denial when the command would signal another session's process,
/// nothing otherwise.
pub async fn run(target: &Target) {
    let input = super::read_hook_input();
    if let Ok(Some(denial)) = tokio::time::timeout(BUDGET, decide(&input, target)).await {
        outln!("{denial}");
    }
}

/// The hook's JSON output for `input`, when the command must not run.
async fn decide(input: &str, target: &Target) -> Option<String> {
    let value: Value = serde_json::from_str(input).ok()?;
    let command = value.get("tool_input")?.get("command")?.as_str()?;
    let cwd = value.get("cwd").and_then(Value::as_str).map(Path::new);
    let mut targets = expand_scripts(kill_targets(command), cwd);
    if targets.is_empty() {
        return None;
    }
    targets.extend(pid_file_targets(&targets, cwd));
    let session_id = super::session_id_of(input)?;
    let instance = super::instance_id(&session_id);
    let mut client = crate::client::connect(target).await.ok()?;
    let mut pids: BTreeSet<u32> = BTreeSet::new();
    let ports: Vec<u16> = targets
        .iter()
        .filter_map(|t| match t {
            KillTarget::Port(port) => Some(*port),
            _ => None,
        })
        .collect();
    if !ports.is_empty() {
        let listed = client
            .list_ports(ListPortsRequest {})
            .await
            .ok()?
            .into_inner();
        pids.extend(
            listed
                .holders
                .iter()
                .filter(|h| u16::try_from(h.port).is_ok_and(|p| ports.contains(&p)))
                .map(|h| h.pid)
                .filter(|pid| *pid != 0),
        );
    }
    // `lsof -i:P` lists the clients of P too: their processes are targets as well.
    pids.extend(clients_of(&ports));
    pids.extend(processes_matching(&targets));
    if pids.is_empty() {
        return None;
    }
    let processes = client
        .process_sessions(ProcessSessionsRequest {
            pids: pids.into_iter().collect(),
        })
        .await
        .ok()?
        .into_inner()
        .processes;
    let others: Vec<&ProcessSession> = processes
        .iter()
        .filter(|p| !p.instance_id.is_empty() && p.instance_id != instance)
        .collect();
    if others.is_empty() {
        return None;
    }
    Some(denial(&others, &ports))
}

/// The hook's output denying the call.
fn denial(others: &[&ProcessSession], ports: &[u16]) -> String {
    let named: Vec<String> = others
        .iter()
        .take(NAMED)
        .map(|p| {
            let session = if p.session_name.is_empty() || p.session_name == p.instance_id {
                p.instance_id.clone()
            } else {
                format!("{} ({})", p.session_name, p.instance_id)
            };
            let on: Vec<String> = p.ports.iter().map(u32::to_string).collect();
            let on = if on.is_empty() {
                String::new()
            } else {
                format!(", port {}", on.join(", "))
            };
            format!("pid {} ({}{on}) of session {session}", p.pid, p.comm)
        })
        .collect();
    let more = others.len().saturating_sub(NAMED);
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    let instead = match ports.first() {
        Some(port) => format!(
            "`styxy stop {port}` (it stops the server this session reaches at {port}, wherever it landed)"
        ),
        None => "`styxy stop PORT` (the port this session uses), `styxy stop NAME`".to_string(),
    };
    let reason = format!(
        "Styxy: this command would signal another session's processes: {}{more}. Sessions run \
         the same servers on the same asked ports side by side, so kill, pkill, killall, fuser -k \
         and kill-port reach servers that are not this session's. Stop this session's own \
         servers with {instead}, or `styxy stop --session` for all of them; `styxy session` \
         lists them.",
        named.join("; ")
    );
    json!({
        "hookSpecificOutput": {
            "hookEventName": "PreToolUse",
            "permissionDecision": "deny",
            "permissionDecisionReason": reason,
        }
    })
    .to_string()
}

/// The processes with a TCP connection to one of `ports` (as `lsof -i:P` lists them besides the
/// port's holders), found among the processes' descriptors this user may read (another user's
/// processes are not this user's to signal anyway). Nothing is read when no such connection
/// exists.
fn clients_of(ports: &[u16]) -> BTreeSet<u32> {
    let mut found = BTreeSet::new();
    if ports.is_empty() {
        return found;
    }
    // sock_diag picks the connections by port in the kernel; where it is refused (a sandbox
    // without netlink), the `/proc` tables say the same, slower.
    let inodes =
        styxy_daemon::inodes_connected_to(ports).unwrap_or_else(|_| proc_table_inodes(ports));
    if inodes.is_empty() {
        return found;
    }
    for pid in running_pids() {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|target| {
                target
                    .to_str()
                    .and_then(|t| t.strip_prefix("socket:["))
                    .and_then(|t| t.strip_suffix(']'))
                    .and_then(|n| n.parse::<u64>().ok())
                    .is_some_and(|inode| inodes.contains(&inode))
            })
        });
        if holds {
            found.insert(pid);
        }
    }
    found
}

/// The socket inodes of connections to one of `ports` from `/proc/net/tcp{,6}`: every read()
/// of a table walks the kernel's whole TCP hash and formats every socket in it, TIME_WAIT
/// included (14 ms with 14,700 of them here), so read in as few calls as can be
/// (`read_socket_table`), the two tables at once, each on a thread of its own.
fn proc_table_inodes(ports: &[u16]) -> HashSet<u64> {
    let read = |table: &str| -> Vec<u64> {
        read_socket_table(table)
            .map(|text| {
                text.lines()
                    .skip(1)
                    .filter_map(|line| client_inode(line, ports))
                    .collect()
            })
            .unwrap_or_default()
    };
    std::thread::scope(|scope| {
        let v6 = scope.spawn(|| read("/proc/net/tcp6"));
        let mut inodes = read("/proc/net/tcp");
        inodes.extend(v6.join().unwrap_or_default());
        inodes.into_iter().collect()
    })
}

/// What the kernel puts in one read() of a `/proc/net` table at most: the records that fit in a
/// page (a `seq_file`'s buffer).
const SEQ_FILE_PAGE: usize = 4096;
/// The longest record of `/proc/net/tcp6` (`/proc/net/tcp`'s are 150 bytes), with room to spare.
const LONGEST_RECORD: usize = 256;

/// A `/proc/net/tcp{,6}` table. Each read() walks the kernel's TCP hash (a few ms however
/// empty), and `read_to_string` takes four or more — small first reads, then one more to see
/// the end. The kernel fills each read with whole records up to a page, and stops short of it
/// only at the end of the table: a read that leaves more than a record's room unused is the last.
fn read_socket_table(path: &str) -> Option<String> {
    let mut file = std::fs::File::open(path).ok()?;
    let mut bytes = Vec::new();
    let mut chunk = vec![0u8; 16 * SEQ_FILE_PAGE];
    loop {
        let got = match file.read(&mut chunk) {
            Ok(got) => got,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        };
        bytes.extend_from_slice(&chunk[..got]);
        if got == 0 || got + LONGEST_RECORD < SEQ_FILE_PAGE.min(chunk.len()) {
            break;
        }
    }
    String::from_utf8(bytes).ok()
}

/// The socket inode of a `/proc/net/tcp` line whose remote port is one of `ports` (a connection
/// to it, any state but LISTEN).
fn client_inode(line: &str, ports: &[u16]) -> Option<u64> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let remote = fields.get(2)?;
    let port = u16::from_str_radix(remote.rsplit_once(':')?.1, 16).ok()?;
    let state = fields.get(3)?;
    if !ports.contains(&port) || *state == "0A" {
        return None;
    }
    fields.get(9)?.parse().ok().filter(|inode| *inode != 0)
}

/// The most of a pid file read: pid files hold a line or a few.
const PID_FILE_BYTES: u64 = 64 * 1024;

/// The pids and groups in the pid files among `targets` (`kill $(cat server.pid)`), as `kill`
/// would read them: whitespace-separated numbers, `-N` a group. A path relative to the command's
/// directory (the hook's `cwd`) or `~/…`; one with a variable or a glob in it, or that cannot be
/// read, names nothing (the guard fails open).
fn pid_file_targets(targets: &[KillTarget], cwd: Option<&Path>) -> Vec<KillTarget> {
    let mut found = Vec::new();
    for target in targets {
        let KillTarget::PidFile(written) = target else {
            continue;
        };
        let Some(path) = written_path(written, cwd) else {
            continue;
        };
        let mut text = String::new();
        let read =
            open_regular(&path).and_then(|f| f.take(PID_FILE_BYTES).read_to_string(&mut text).ok());
        if read.is_none() {
            continue;
        }
        found.extend(text.split_whitespace().filter_map(kill_operand));
    }
    found
}

/// `path` opened for reading when it is a regular file: a FIFO (`kill $(cat pipe)`), a terminal
/// or a device could block the guard, and so the agent, for as long as nobody writes.
fn open_regular(path: &Path) -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    if !std::fs::metadata(path).ok()?.is_file() {
        return None;
    }
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .ok()
        .filter(|f| f.metadata().is_ok_and(|m| m.is_file()))
}

/// The most of a script read.
const SCRIPT_BYTES: u64 = 256 * 1024;
/// Scripts that run scripts are followed this deep.
const SCRIPT_DEPTH: usize = 3;

/// `targets` with each script the command runs replaced by what its text would signal (and the
/// scripts it runs in turn, [`SCRIPT_DEPTH`] deep, each once). A script is read when it is
/// shell: run by a named shell (`bash stop.sh`), or its first line names one (`#!/bin/sh`,
/// `#!/usr/bin/env bash`), or, without a first `#!` line, its name ends in `.sh`; a package
/// script (`npm run stop`) is read from its `package.json`, and its paths are relative to the
/// package's directory, where it runs. Pid files come out as paths from the directory of the
/// script that reads them. Anything else — a binary, a Node or Python script, a
/// file that cannot be read — names nothing.
fn expand_scripts(targets: Vec<KillTarget>, cwd: Option<&Path>) -> Vec<KillTarget> {
    let mut found = Vec::new();
    let mut read: BTreeSet<(PathBuf, String)> = BTreeSet::new();
    // Each package.json read once, however many of its scripts run (`npm run stop`: prestop,
    // stop, poststop).
    let mut manifests: BTreeMap<PathBuf, Option<Value>> = BTreeMap::new();
    // Each target with the directory its paths are relative to.
    let cwd = cwd.map(Path::to_path_buf);
    let mut pending: Vec<(KillTarget, usize, Option<PathBuf>)> =
        targets.into_iter().map(|t| (t, 0, cwd.clone())).collect();
    while let Some((target, depth, cwd)) = pending.pop() {
        let (text, runs_in) = match target {
            KillTarget::Script { .. } | KillTarget::PackageScript { .. }
                if depth >= SCRIPT_DEPTH =>
            {
                continue;
            }
            KillTarget::Script { path, by_shell } => {
                let Some(file) = written_path(&path, cwd.as_deref()) else {
                    continue;
                };
                if !read.insert((file.clone(), String::new())) {
                    continue;
                }
                (shell_script_text(&file, by_shell), cwd)
            }
            KillTarget::PackageScript { name, dir } => {
                let Some(package) = package_dir(dir.as_deref(), cwd.as_deref()) else {
                    continue;
                };
                if !read.insert((package.clone(), name.clone())) {
                    continue;
                }
                let manifest = manifests
                    .entry(package.clone())
                    .or_insert_with(|| package_manifest(&package));
                let text = manifest
                    .as_ref()
                    .and_then(|m| Some(m.get("scripts")?.get(&name)?.as_str()?.to_string()));
                (text, Some(package))
            }
            // A pid file where the command that reads it runs.
            KillTarget::PidFile(path) => {
                let path = match written_path(&path, cwd.as_deref()) {
                    Some(file) => file.display().to_string(),
                    None => path,
                };
                let target = KillTarget::PidFile(path);
                if !found.contains(&target) {
                    found.push(target);
                }
                continue;
            }
            other => {
                if !found.contains(&other) {
                    found.push(other);
                }
                continue;
            }
        };
        let Some(text) = text else {
            continue;
        };
        pending.extend(
            kill_targets(&text)
                .into_iter()
                .map(|t| (t, depth + 1, runs_in.clone())),
        );
    }
    found
}

/// The most of a `package.json` read.
const PACKAGE_JSON_BYTES: u64 = 1024 * 1024;

/// The directory of the package a package manager would run a script of: `dir` (`--prefix`)
/// when given, else the nearest directory from the command's up that has a `package.json`.
fn package_dir(dir: Option<&str>, cwd: Option<&Path>) -> Option<PathBuf> {
    let start = match dir {
        Some(dir) => return written_path(dir, cwd),
        None => cwd?,
    };
    start
        .ancestors()
        .find(|d| d.join("package.json").is_file())
        .map(Path::to_path_buf)
}

/// `package`'s `package.json`, parsed; its `scripts.NAME` are shell command lines.
fn package_manifest(package: &Path) -> Option<Value> {
    let mut text = String::new();
    open_regular(&package.join("package.json"))?
        .take(PACKAGE_JSON_BYTES)
        .read_to_string(&mut text)
        .ok()?;
    serde_json::from_str(&text).ok()
}

/// The text of `file` when it is a shell script (see [`expand_scripts`]).
fn shell_script_text(file: &Path, by_shell: bool) -> Option<String> {
    let plain_shell = by_shell || file.extension().is_some_and(|e| e == "sh");
    let mut opened = open_regular(file)?;
    // Two bytes first: a binary or another language's file run by its path is not read on.
    let mut head = [0u8; 2];
    let got = opened.read(&mut head).ok()?;
    if !plain_shell && &head[..got] != b"#!" {
        return None;
    }
    let mut bytes = head[..got].to_vec();
    opened.take(SCRIPT_BYTES).read_to_end(&mut bytes).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let shell = match text.strip_prefix("#!") {
        Some(line) => {
            let mut words = line.lines().next().unwrap_or("").split_whitespace();
            let mut interpreter = words.next().map(|w| w.rsplit('/').next().unwrap_or(w));
            if interpreter == Some("env") {
                interpreter = words.find(|w| !w.starts_with('-'));
            }
            interpreter.is_some_and(|i| SHELLS.contains(&i))
        }
        None => plain_shell,
    };
    shell.then_some(text)
}

/// Where a file the command names (a pid file, a script) is, when its text says so without the
/// shell's help.
fn written_path(written: &str, cwd: Option<&Path>) -> Option<PathBuf> {
    if written.is_empty() || written.contains(['$', '*', '?', '[', '{']) {
        return None;
    }
    let path = match written.strip_prefix("~/") {
        Some(rest) => PathBuf::from(std::env::var_os("HOME")?).join(rest),
        None => PathBuf::from(written),
    };
    if path.is_absolute() {
        return Some(path);
    }
    Some(cwd?.join(path))
}

/// The processes the pid, group, pattern and name targets name, read from `/proc` as `kill`,
/// `pkill` and `killall` match them. Never the guard itself.
fn processes_matching(targets: &[KillTarget]) -> BTreeSet<u32> {
    let mut pids = BTreeSet::new();
    let matchers: Vec<Matcher> = targets.iter().filter_map(Matcher::new).collect();
    for target in targets {
        if let KillTarget::Pid(pid) = target {
            pids.insert(*pid);
        }
    }
    let groups: Vec<u32> = targets
        .iter()
        .filter_map(|t| match t {
            KillTarget::Group(g) => Some(*g),
            _ => None,
        })
        .collect();
    if matchers.is_empty() && groups.is_empty() {
        return pids;
    }
    let own = std::process::id();
    for pid in running_pids() {
        if pid == own {
            continue;
        }
        let Some(process) = ProcEntry::read(pid) else {
            continue;
        };
        if groups.contains(&process.group) || matchers.iter().any(|m| m.matches(&process)) {
            pids.insert(pid);
        }
    }
    pids
}

/// Every process's pid, as `/proc` lists them (none when it cannot be read).
fn running_pids() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
}

/// What `pkill` and `killall` look at.
struct ProcEntry {
    comm: String,
    cmdline: String,
    group: u32,
}

impl ProcEntry {
    fn read(pid: u32) -> Option<ProcEntry> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (head, tail) = stat.rsplit_once(')')?;
        let comm = head.split_once('(')?.1.to_string();
        // After the comm: state, ppid, pgrp.
        let group = tail.split_whitespace().nth(2)?.parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|raw| {
                raw.split(|b| *b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        Some(ProcEntry {
            comm,
            cmdline,
            group,
        })
    }
}

/// A `pkill` pattern (an extended regular expression, on the name or with `-f` the command
/// line) or a `killall` name (the whole name; a kernel comm holds its first 15 bytes).
enum Matcher {
    Pattern { regex: regex::Regex, full: bool },
    Name(String),
}

impl Matcher {
    fn new(target: &KillTarget) -> Option<Matcher> {
        match target {
            KillTarget::Pattern {
                pattern,
                full,
                exact,
            } => {
                let source = if *exact {
                    format!("^(?:{pattern})$")
                } else {
                    pattern.clone()
                };
                // A pattern the regex engine does not take is matched as plain text.
                let regex = regex::Regex::new(&source)
                    .or_else(|_| regex::Regex::new(&regex::escape(pattern)))
                    .ok()?;
                Some(Matcher::Pattern { regex, full: *full })
            }
            KillTarget::Name(name) => Some(Matcher::Name(name.clone())),
            _ => None,
        }
    }

    fn matches(&self, process: &ProcEntry) -> bool {
        match self {
            Matcher::Pattern { regex, full: true } => regex.is_match(&process.cmdline),
            Matcher::Pattern { regex, full: false } => regex.is_match(&process.comm),
            Matcher::Name(name) => {
                let comm_len = name.len().min(15);
                process.comm == name.get(..comm_len).unwrap_or(name)
                    || process
                        .cmdline
                        .split(' ')
                        .next()
                        .is_some_and(|exe| exe.rsplit('/').next() == Some(name.as_str()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(comm: &str, cmdline: &str) -> ProcEntry {
        ProcEntry {
            comm: comm.into(),
            cmdline: cmdline.into(),
            group: 1,
        }
    }

    fn matcher(target: KillTarget) -> Matcher {
        Matcher::new(&target).expect("a matcher")
    }

    #[test]
    fn a_socket_table_of_many_pages_is_read_whole() {
        // 80 connections: 160 lines of 150 bytes, six pages of the kernel's reads.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a listener");
        let port = listener.local_addr().expect("its address").port();
        let clients: Vec<std::net::TcpStream> = (0..80)
            .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).expect("connecting"))
            .collect();
        let text = read_socket_table("/proc/net/tcp").expect("the table");
        for client in &clients {
            let local = client.local_addr().expect("its address").port();
            let wanted = format!(":{local:04X} ");
            assert!(text.contains(&wanted), "{local} missing from the table");
        }
        // Each of them is a client of the port: its inode is found.
        let inodes = text
            .lines()
            .skip(1)
            .filter_map(|line| client_inode(line, &[port]))
            .count();
        assert!(inodes >= clients.len(), "{inodes} clients found");
    }

    #[test]
    fn the_shell_scripts_a_command_runs_are_read_and_nothing_else() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let write = |name: &str, text: &str| {
            std::fs::write(dir.path().join(name), text).expect("writing");
        };
        write(
            "stop.sh",
            "#!/usr/bin/env bash\nset -e\npkill -f vite\n./more.sh\n",
        );
        write("more.sh", "kill 4242\nsh stop.sh\n"); // runs stop.sh again: read once
        write("down", "#!/bin/sh\nkillall node\n");
        write("tool.js", "#!/usr/bin/env node\nprocess.kill(1)\n");
        write("notes", "kill 9\n");
        let script = |path: &str, by_shell: bool| KillTarget::Script {
            path: path.into(),
            by_shell,
        };
        let vite = KillTarget::Pattern {
            pattern: "vite".into(),
            full: true,
            exact: false,
        };
        let mut read = expand_scripts(vec![script("./stop.sh", false)], Some(dir.path()));
        read.sort_by_key(|t| format!("{t:?}"));
        assert_eq!(read, vec![vite, KillTarget::Pid(4242)]);
        assert_eq!(
            expand_scripts(vec![script("./down", false)], Some(dir.path())),
            vec![KillTarget::Name("node".into())]
        );
        // Not shell: a Node script, a file with no `#!` and no .sh run by its path.
        assert_eq!(
            expand_scripts(vec![script("./tool.js", false)], Some(dir.path())),
            vec![]
        );
        assert_eq!(
            expand_scripts(vec![script("./notes", false)], Some(dir.path())),
            vec![]
        );
        // ... unless a shell is named to run it.
        assert_eq!(
            expand_scripts(vec![script("notes", true)], Some(dir.path())),
            vec![KillTarget::Pid(9)]
        );
        // A FIFO is never opened (nobody writes to it: opening it would block).
        let fifo = dir.path().join("pipe.sh");
        let made = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("a path");
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(made.as_ptr(), 0o600) }, 0);
        assert_eq!(
            expand_scripts(vec![script("pipe.sh", true)], Some(dir.path())),
            vec![]
        );
        assert_eq!(
            pid_file_targets(&[KillTarget::PidFile("pipe.sh".into())], Some(dir.path())),
            vec![]
        );
        // A binary is not read as text; a missing file names nothing.
        assert_eq!(
            expand_scripts(
                vec![script("/bin/true", false), script("./gone.sh", false)],
                None
            ),
            vec![]
        );
    }

    #[test]
    fn package_scripts_are_read_from_the_nearest_package_json_and_run_in_its_directory() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let package = dir.path().join("web");
        std::fs::create_dir_all(package.join("src/components")).expect("a package");
        std::fs::create_dir_all(package.join("scripts")).expect("a scripts dir");
        std::fs::write(
            package.join("package.json"),
            r#"{"name": "web", "scripts": {
                "stop": "pkill -f http.server && ./scripts/down.sh",
                "prekill": "kill $(cat run/web.pid)",
                "kill": "echo",
                "again": "npm run stop",
                "dev": "vite --port 5173"
            }}"#,
        )
        .expect("writing");
        std::fs::write(package.join("scripts/down.sh"), "#!/bin/sh\nkillall node\n")
            .expect("writing");
        let from = |command: &str, cwd: &Path| {
            let mut read = expand_scripts(kill_targets(command), Some(cwd));
            read.sort_by_key(|t| format!("{t:?}"));
            read
        };
        let stop = vec![
            KillTarget::Name("node".into()),
            KillTarget::Pattern {
                pattern: "http.server".into(),
                full: true,
                exact: false,
            },
        ];
        // From a directory inside the package: its package.json, and the script's paths from
        // the package's directory.
        let inside = package.join("src/components");
        assert_eq!(from("npm run stop", &inside), stop);
        assert_eq!(from("yarn stop", &inside), stop);
        assert_eq!(from("npm run again", &inside), stop);
        assert_eq!(from("npm --prefix web stop", dir.path()), stop);
        assert_eq!(
            from("npm run kill", &inside),
            vec![KillTarget::PidFile(
                package.join("run/web.pid").display().to_string()
            )]
        );
        // Scripts that signal nothing, a script the package lacks, no package: nothing.
        assert_eq!(from("npm run dev", &inside), vec![]);
        assert_eq!(from("npm run missing", &inside), vec![]);
        assert_eq!(from("npm run stop", dir.path()), vec![]);
        std::fs::write(dir.path().join("package.json"), "{ not json").expect("writing");
        assert_eq!(from("npm run stop", dir.path()), vec![]);
    }

    #[test]
    fn pid_files_are_read_as_kill_reads_them_relative_to_the_command() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        std::fs::write(dir.path().join("server.pid"), "4242\n").expect("writing");
        std::fs::write(dir.path().join("two.pid"), "11 -12\nnot-a-pid\n").expect("writing");
        let targets = vec![
            KillTarget::PidFile("server.pid".into()),
            KillTarget::PidFile(dir.path().join("two.pid").display().to_string()),
            KillTarget::PidFile("missing.pid".into()),
            KillTarget::PidFile("$PIDFILE".into()),
            KillTarget::Pid(7),
        ];
        assert_eq!(
            pid_file_targets(&targets, Some(dir.path())),
            vec![
                KillTarget::Pid(4242),
                KillTarget::Pid(11),
                KillTarget::Group(12)
            ]
        );
        // No directory to resolve against: only the absolute path is read.
        assert_eq!(
            pid_file_targets(&targets, None),
            vec![KillTarget::Pid(11), KillTarget::Group(12)]
        );
    }

    #[test]
    fn patterns_match_as_pkill_and_killall_match() {
        let server = entry("python3", "python3 -m http.server 8000");
        let by_line = matcher(KillTarget::Pattern {
            pattern: "http.server".into(),
            full: true,
            exact: false,
        });
        assert!(by_line.matches(&server));
        let by_name = matcher(KillTarget::Pattern {
            pattern: "http.server".into(),
            full: false,
            exact: false,
        });
        assert!(
            !by_name.matches(&server),
            "without -f, pkill matches the name only"
        );
        let exact = matcher(KillTarget::Pattern {
            pattern: "python".into(),
            full: false,
            exact: true,
        });
        assert!(!exact.matches(&server));
        assert!(matcher(KillTarget::Name("python3".into())).matches(&server));
        assert!(!matcher(KillTarget::Name("python".into())).matches(&server));
        // A long name: the kernel keeps 15 bytes of it.
        let long = entry("storybook-serve", "/usr/bin/storybook-server --port 6006");
        assert!(matcher(KillTarget::Name("storybook-server".into())).matches(&long));
        // A pattern that is no regular expression is plain text.
        let odd = matcher(KillTarget::Pattern {
            pattern: "vite (".into(),
            full: true,
            exact: false,
        });
        assert!(odd.matches(&entry("node", "node vite (dev)")));
    }

    #[test]
    fn a_denial_names_the_other_sessions_processes_and_styxy_stop() {
        let other = ProcessSession {
            pid: 30,
            comm: "python3".into(),
            instance_id: "claude-a".into(),
            session_name: "feature-a".into(),
            ports: vec![8000],
        };
        let out: Value = serde_json::from_str(&denial(&[&other], &[8000])).expect("JSON");
        let output = &out["hookSpecificOutput"];
        assert_eq!(output["hookEventName"], "PreToolUse");
        assert_eq!(output["permissionDecision"], "deny");
        let reason = output["permissionDecisionReason"]
            .as_str()
            .expect("a reason");
        assert!(
            reason.contains("pid 30 (python3, port 8000) of session feature-a (claude-a)"),
            "{reason}"
        );
        assert!(reason.contains("`styxy stop 8000`"), "{reason}");
    }

    #[test]
    fn a_connection_to_a_port_is_read_from_the_kernels_table() {
        // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
        let client = "   3: 0100007F:C350 0100007F:1F40 01 00000000:00000000 00:00000000 00000000  1000        0 424242 1 0";
        assert_eq!(client_inode(client, &[8000]), Some(424242));
        assert_eq!(client_inode(client, &[8001]), None);
        let listener = "   0: 00000000:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 5151 1 0";
        assert_eq!(
            client_inode(listener, &[0]),
            None,
            "a listener has no remote port of its own"
        );
        assert_eq!(client_inode("garbage", &[8000]), None);
    }

    #[test]
    fn a_process_connected_to_a_port_is_found_as_its_client() {
        let server = std::net::TcpListener::bind("127.0.0.1:0").expect("a listener");
        let port = server.local_addr().expect("its address").port();
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connected");
        assert!(clients_of(&[port]).contains(&std::process::id()));
        assert!(clients_of(&[]).is_empty());
    }

    #[tokio::test]
    async fn it_fails_open() {
        // No daemon at this socket: the command runs (no output).
        let target = Target::Unix("/nonexistent/styxy.sock".into());
        let input = json!({
            "session_id": "s1",
            "tool_input": { "command": "kill $(lsof -t -i:8000)" },
        })
        .to_string();
        assert_eq!(decide(&input, &target).await, None);
        // Not a kill: not even a connection is tried.
        let input = json!({ "session_id": "s1", "tool_input": { "command": "ls" } }).to_string();
        assert_eq!(decide(&input, &target).await, None);
        assert_eq!(decide("not json", &target).await, None);
    }
}
