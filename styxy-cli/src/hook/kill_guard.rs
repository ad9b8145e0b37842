//! `styxy hook pre-tool-use` (Claude Code `PreToolUse`, matcher `Bash`): the kill guard. Before
//! a command runs, the kill idioms in it (`kill_idioms`) are resolved against the live processes
//! and ports — pids as given, ports through the daemon's table of bound sockets, `pkill` and
//! `killall` patterns through `/proc` as those tools match them — and the daemon says which
//! session each process is in. When any belongs to another session, the call is denied with a
//! reason naming it and the `styxy stop` to use instead; everything else passes silently.
//!
//! It fails open: a command it cannot read, a daemon that does not answer within
//! [`BUDGET`], any error — the command runs, as it would without Styxy. A command with no kill
//! word in it costs reading the hook's input and nothing else.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use styxy_proto::v1::{ListPortsRequest, ProcessSession, ProcessSessionsRequest};

use super::kill_idioms::{kill_targets, KillTarget};
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
        println!("{denial}");
    }
}

/// The hook's JSON output for `input`, when the command must not run.
async fn decide(input: &str, target: &Target) -> Option<String> {
    let value: Value = serde_json::from_str(input).ok()?;
    let command = value.get("tool_input")?.get("command")?.as_str()?;
    let targets = kill_targets(command);
    if targets.is_empty() {
        return None;
    }
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
/// port's holders): the sockets from `/proc/net/tcp{,6}` whose remote port is one of them, found
/// among the processes' descriptors this user may read (another user's processes are not this
/// user's to signal anyway). Nothing is read when no such connection exists.
fn clients_of(ports: &[u16]) -> BTreeSet<u32> {
    let mut found = BTreeSet::new();
    if ports.is_empty() {
        return found;
    }
    let mut inodes: BTreeSet<u64> = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        inodes.extend(
            text.lines()
                .skip(1)
                .filter_map(|line| client_inode(line, ports)),
        );
    }
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
