//! What a shell command would signal, read from its text before it runs: the kill idioms agents
//! use to clean up — `kill PIDS`, `kill $(lsof -t -i:P)`, `lsof -ti:P | xargs kill`, `fuser -k
//! P/tcp`, `pkill [-f] PATTERN`, `killall NAME`, `npx kill-port P`, `kill $(cat PIDFILE)` — as
//! [`KillTarget`]s, and the scripts it runs (`./stop.sh`, `bash down.sh`, `npm run stop`) for the
//! guard to read.
//! Pure: files and live processes are read elsewhere (`kill_guard`).
//!
//! Hand-written rather than a crate: the shell-splitting crates (`shlex`, `shell-words`) split
//! words but know neither command substitutions nor `|`, `;`, `&&`, which these idioms are made
//! of. The reader knows only what it needs — quotes, backslashes, `$(…)` and backticks, the
//! operators — and is fuzzed (`fuzz_the_reader_never_panics`). A command it cannot read yields
//! no target: the guard then lets it run (it fails open).

/// Something a command would send a signal to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KillTarget {
    /// A process by pid (`kill 1234`).
    Pid(u32),
    /// A process group (`kill -- -1234`).
    Group(u32),
    /// Whoever holds a port (`lsof -t -i:P`, `fuser -k P/tcp`, `kill-port P`).
    Port(u16),
    /// Processes whose name (`full: false`) or command line (`full: true`) matches a pattern
    /// (`pkill`, `pgrep`); `exact`: the whole name must match (`-x`).
    Pattern {
        pattern: String,
        full: bool,
        exact: bool,
    },
    /// Processes by name (`killall`, `pidof`).
    Name(String),
    /// The pids written in a file (`kill $(cat server.pid)`, `$(<server.pid)`, `cat server.pid |
    /// xargs kill`), as the command wrote its path: resolved against the command's directory.
    PidFile(String),
    /// A script the command runs (`./stop.sh`, `bash scripts/stop.sh`, `. ./env.sh`), as the
    /// command wrote its path: what it would signal is read from its text (`kill_guard`).
    /// `by_shell`: a shell was named to run it, so it is shell whatever its first line says.
    Script { path: String, by_shell: bool },
    /// A package script a package manager runs (`npm run stop`, `yarn stop`, `pnpm run kill`):
    /// `scripts.NAME` of the `package.json` in `dir` (as the command wrote it: `--prefix`,
    /// `--cwd`, `-C`) or, without one, the command's directory or the nearest above it.
    PackageScript { name: String, dir: Option<String> },
}

/// The words that may start a kill idiom: a command without any of them, and without a path or
/// a shell that could run a script, is not read further.
const KILL_WORDS: [&str; 3] = ["kill", "fuser", "kill-port"];
/// The shells whose scripts are read (`bash stop.sh`, a `#!/bin/sh` file).
pub const SHELLS: [&str; 4] = ["sh", "bash", "dash", "zsh"];
/// The package managers whose scripts are read (`npm run stop`); `npm` is in `pnpm` too.
const PACKAGE_MANAGERS: [&str; 3] = ["npm", "yarn", "bun"];

/// Everything `command` would signal, as far as its text says; the scripts it runs are
/// [`KillTarget::Script`]s, for the caller to read.
pub fn kill_targets(command: &str) -> Vec<KillTarget> {
    let may_run_a_script = command.contains('/')
        || command.contains("sh ")
        || PACKAGE_MANAGERS.iter().any(|m| command.contains(m));
    if !may_run_a_script && !KILL_WORDS.iter().any(|w| command.contains(w)) {
        return Vec::new();
    }
    let mut targets = Vec::new();
    read_list(command, 0, &mut targets);
    targets.dedup();
    targets
}

/// Commands nest in substitutions; deeper than this is not read.
const MAX_DEPTH: usize = 4;

/// A word of a simple command: its text, and the commands substituted into it.
#[derive(Clone, Debug, Default)]
struct Word {
    text: String,
    substitutions: Vec<String>,
}

/// A command list: pipelines separated by `;`, `&&`, `||`, `&` or newlines.
fn read_list(text: &str, depth: usize, targets: &mut Vec<KillTarget>) {
    if depth > MAX_DEPTH {
        return;
    }
    for pipeline in split_pipelines(text) {
        let commands: Vec<Vec<Word>> = pipeline.into_iter().map(strip_prefixes).collect();
        for (i, words) in commands.iter().enumerate() {
            let previous = i.checked_sub(1).and_then(|p| commands.get(p));
            read_command(words, previous, depth, targets);
        }
    }
}

/// `sudo`, `env`, `command`, `exec`, `nohup`, `timeout N` and `VAR=value` before a command.
fn strip_prefixes(mut words: Vec<Word>) -> Vec<Word> {
    loop {
        let Some(first) = words.first() else {
            return words;
        };
        let text = first.text.as_str();
        let assignment = text.split_once('=').is_some_and(|(name, _)| {
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
        // `/usr/bin/env` as `env`; `./env` is a script of that name.
        let name = if text.starts_with('/') {
            program_name(text)
        } else {
            text
        };
        if assignment
            || matches!(
                name,
                "sudo" | "env" | "command" | "exec" | "nohup" | "builtin"
            )
        {
            words.remove(0);
            // sudo's and env's own options.
            while words
                .first()
                .is_some_and(|w| w.text.starts_with('-') && w.text != "--")
            {
                words.remove(0);
            }
        } else if name == "timeout" {
            words.remove(0);
            while words.first().is_some_and(|w| w.text.starts_with('-')) {
                words.remove(0);
            }
            if !words.is_empty() {
                words.remove(0); // the duration
            }
        } else {
            return words;
        }
    }
}

fn read_command(
    words: &[Word],
    previous: Option<&Vec<Word>>,
    depth: usize,
    targets: &mut Vec<KillTarget>,
) {
    // Whatever is substituted runs too (`echo $(pkill node)`).
    for word in words {
        for inner in &word.substitutions {
            read_list(inner, depth + 1, targets);
        }
    }
    let Some(first) = words.first() else {
        return;
    };
    let args = &words[1..];
    match program_name(&first.text) {
        "kill" => read_kill(args, depth, targets),
        "pkill" => targets.extend(read_pgrep(args)),
        "killall" => targets.extend(
            args.iter()
                .filter(|w| !w.text.starts_with('-'))
                .map(|w| KillTarget::Name(w.text.clone())),
        ),
        "fuser" if args.iter().any(|w| is_short_flag(&w.text, 'k')) => {
            targets.extend(fuser_ports(args).into_iter().map(KillTarget::Port));
        }
        "kill-port" => targets.extend(kill_port_ports(args)),
        // `bash -c 'pkill -f vite'`: the script runs too; `bash stop.sh`: the file's.
        "sh" | "bash" | "dash" | "zsh" => {
            let inline = args.iter().position(|w| is_short_flag(&w.text, 'c'));
            if let (None, Some(file)) = (inline, script_operand(args)) {
                targets.push(KillTarget::Script {
                    path: file.text.clone(),
                    by_shell: true,
                });
            }
            if let Some(position) = inline {
                if let Some(script) = args.get(position + 1) {
                    read_list(&script.text, depth + 1, targets);
                    // In double quotes, `$(…)` was read as the word's substitution: when the
                    // script kills, what it substitutes names the targets.
                    let kills = script
                        .text
                        .split_whitespace()
                        .any(|w| program_name(w) == "kill");
                    if kills && depth < MAX_DEPTH {
                        for inner in &script.substitutions {
                            for pipeline in split_pipelines(inner) {
                                if let Some(last) =
                                    pipeline.into_iter().map(strip_prefixes).next_back()
                                {
                                    targets.extend(producer_targets(&last));
                                }
                            }
                        }
                    }
                }
            }
        }
        "npx" | "pnpx" | "bunx" => targets.extend(package_run(args)),
        manager @ ("npm" | "yarn" | "pnpm" | "bun") => {
            targets.extend(package_manager_targets(manager, args));
        }
        // `. ./env.sh`, `source scripts/stop.sh`: run by this shell.
        "." | "source" => {
            if let Some(file) = args.first() {
                targets.push(KillTarget::Script {
                    path: file.text.clone(),
                    by_shell: true,
                });
            }
        }
        "xargs" => {
            // `PRODUCER | xargs [opts] kill [opts]`: the producer's pids.
            let kills = args
                .iter()
                .find(|w| !w.text.starts_with('-'))
                .is_some_and(|w| program_name(&w.text) == "kill");
            if let (true, Some(producer)) = (kills, previous) {
                targets.extend(producer_targets(producer));
            }
        }
        // `./stop.sh`, `scripts/stop-dev`: a file run by its path (what it is, its first line
        // says).
        program
            if first.text.contains('/')
                && first.substitutions.is_empty()
                && !program.is_empty() =>
        {
            targets.push(KillTarget::Script {
                path: first.text.clone(),
                by_shell: false,
            });
        }
        _ => {}
    }
}

/// What a package's binary run by `npx` (`npm exec`, `pnpm dlx`, `bun x`, …) would signal:
/// `kill-port P…`.
fn package_run(args: &[Word]) -> Vec<KillTarget> {
    let rest: Vec<&Word> = args
        .iter()
        .skip_while(|w| w.text.starts_with('-'))
        .collect();
    match rest.split_first() {
        Some((binary, ports)) if program_name(&binary.text) == "kill-port" => {
            let ports: Vec<Word> = ports.iter().map(|w| (*w).clone()).collect();
            kill_port_ports(&ports)
        }
        _ => Vec::new(),
    }
}

/// What a package manager's command line runs that may signal: the package scripts it names
/// (`npm run stop`, `npm stop`, `yarn stop`, `pnpm run stop`, `bun run stop`; npm's and yarn's
/// `preNAME` and `postNAME` with them) and the packages' binaries it runs (`npm exec kill-port
/// 3000`). The package's directory is `--prefix DIR` (npm), `--cwd DIR` (yarn) or `-C`/`--dir
/// DIR` (pnpm) when given. A workspace's script (`-w`, `--filter`) is another package's and is
/// not read.
fn package_manager_targets(manager: &str, args: &[Word]) -> Vec<KillTarget> {
    let mut dir = None;
    // The manager's command (`run`, `stop`, `exec`, a script's bare name), then a `run`'s script.
    let mut command: Option<&str> = None;
    let mut words = args.iter();
    let name = loop {
        let Some(word) = words.next() else {
            return Vec::new();
        };
        let text = word.text.as_str();
        if let Some((option, value)) = text.split_once('=') {
            if matches!(option, "--prefix" | "--cwd" | "--dir") {
                dir = Some(value.to_string());
                continue;
            }
        }
        match text {
            "--prefix" | "--cwd" | "-C" | "--dir" => dir = words.next().map(|w| w.text.clone()),
            "-w" | "--workspace" | "--workspaces" | "-ws" | "--filter" | "-F" | "--recursive"
            | "-r" => return Vec::new(),
            // The script's own arguments follow `--`.
            "--" if command.is_some() => return Vec::new(),
            _ if text.starts_with('-') => {}
            _ => match (manager, command) {
                (_, Some(_)) => break text.to_string(),
                (_, None) if matches!(text, "run" | "run-script" | "rum" | "urn") => {
                    command = Some(text);
                }
                (_, None)
                    if matches!(
                        (manager, text),
                        ("npm", "exec" | "x") | ("pnpm" | "yarn", "exec" | "dlx") | ("bun", "x")
                    ) =>
                {
                    return package_run(words.as_slice());
                }
                ("npm", None) if matches!(text, "t" | "tst" | "test") => break "test".to_string(),
                ("npm", None) if matches!(text, "start" | "stop" | "restart") => {
                    break text.to_string();
                }
                // npm's other commands are its own; the others run a script by its bare name.
                ("npm", None) => return Vec::new(),
                (_, None) => break text.to_string(),
            },
        }
    };
    // `npm restart` without a restart script runs stop, then start.
    let mut names = vec![name.clone()];
    if manager == "npm" && name == "restart" {
        names.extend(["stop".to_string(), "start".to_string()]);
    }
    let with_pre_post = matches!(manager, "npm" | "yarn");
    names
        .into_iter()
        .flat_map(|name| {
            if with_pre_post {
                vec![format!("pre{name}"), name.clone(), format!("post{name}")]
            } else {
                vec![name]
            }
        })
        .map(|name| KillTarget::PackageScript {
            name,
            dir: dir.clone(),
        })
        .collect()
}

/// The script a shell is given to run (`bash -e -o pipefail stop.sh` → `stop.sh`): its first
/// operand, past the options and the arguments of those that take one.
fn script_operand(args: &[Word]) -> Option<&Word> {
    let mut words = args.iter();
    while let Some(word) = words.next() {
        match word.text.as_str() {
            "-o" | "+o" | "-O" | "+O" | "--rcfile" | "--init-file" => {
                words.next();
            }
            "--" => return words.next(),
            text if text.starts_with('-') || text.starts_with('+') => {}
            _ => return Some(word),
        }
    }
    None
}

/// `/usr/bin/kill` → `kill`.
fn program_name(text: &str) -> &str {
    text.rsplit('/').next().unwrap_or(text)
}

/// Whether `text` is a short-option cluster holding `flag` (`-k`, `-ki`, `-kn`).
fn is_short_flag(text: &str, flag: char) -> bool {
    text.strip_prefix('-').is_some_and(|f| {
        !f.starts_with('-')
            && !f.is_empty()
            && f.chars().all(|c| c.is_ascii_alphabetic())
            && f.contains(flag)
    })
}

fn read_kill(args: &[Word], depth: usize, targets: &mut Vec<KillTarget>) {
    let mut i = 0;
    let mut options_done = false;
    while let Some(word) = args.get(i) {
        i += 1;
        let text = word.text.as_str();
        if !options_done {
            match text {
                "--" => {
                    options_done = true;
                    continue;
                }
                "-l" | "-L" | "--list" | "--table" => return,
                "-s" | "-n" | "--signal" => {
                    i += 1;
                    continue;
                }
                _ if text.starts_with('-') && text.len() > 1 && !is_number(&text[1..]) => {
                    continue; // -9 is below; -TERM, -SIGKILL
                }
                _ if text.starts_with('-') && is_number(&text[1..]) && i == 1 => {
                    continue; // `kill -9 PID`: a signal number first
                }
                _ => {}
            }
        }
        if !word.substitutions.is_empty() {
            for inner in &word.substitutions {
                // `$(<FILE)`: bash reads the file in place of `cat`.
                if let Some(file) = inner.trim().strip_prefix('<') {
                    let file = file.trim();
                    if !file.is_empty() && !file.contains(char::is_whitespace) {
                        targets.push(KillTarget::PidFile(unquote(file)));
                    }
                    continue;
                }
                if depth < MAX_DEPTH {
                    for pipeline in split_pipelines(inner) {
                        if let Some(last) = pipeline.into_iter().map(strip_prefixes).next_back() {
                            targets.extend(producer_targets(&last));
                        }
                    }
                }
            }
            continue;
        }
        targets.extend(text.split_whitespace().filter_map(kill_operand));
    }
}

/// One operand of `kill` as `kill` reads it: `1234` a process, `-1234` a process group; anything
/// else (`%1`, a name) nothing here.
pub fn kill_operand(piece: &str) -> Option<KillTarget> {
    match piece.strip_prefix('-') {
        Some(group) => group.parse().ok().map(KillTarget::Group),
        None => piece.parse().ok().map(KillTarget::Pid),
    }
}

fn is_number(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())
}

/// What a command that prints pids names: `lsof -t -i:P`, `fuser P/tcp`, `pgrep [-f] PAT`,
/// `pidof NAME`, `cat PIDFILE`.
fn producer_targets(words: &[Word]) -> Vec<KillTarget> {
    let Some(first) = words.first() else {
        return Vec::new();
    };
    let args = &words[1..];
    match program_name(&first.text) {
        "lsof" => lsof_ports(args).into_iter().map(KillTarget::Port).collect(),
        "fuser" => fuser_ports(args)
            .into_iter()
            .map(KillTarget::Port)
            .collect(),
        "pgrep" => read_pgrep(args),
        "pidof" => args
            .iter()
            .filter(|w| !w.text.starts_with('-'))
            .map(|w| KillTarget::Name(w.text.clone()))
            .collect(),
        "cat" => args
            .iter()
            .filter(|w| !w.text.starts_with('-') && !w.text.is_empty())
            .map(|w| KillTarget::PidFile(w.text.clone()))
            .collect(),
        _ => Vec::new(),
    }
}

/// A word's text without the quotes around it (`"$(<'my app.pid')"` reaches here whole).
fn unquote(text: &str) -> String {
    let quoted = |q: char| text.len() >= 2 && text.starts_with(q) && text.ends_with(q);
    if quoted('\'') || quoted('"') {
        text[1..text.len() - 1].to_string()
    } else {
        text.to_string()
    }
}

/// The ports of `lsof`'s `-i` selections: `-i:P`, `-i :P`, `-i tcp:P`, `-ti:P`, `-i4TCP:P-Q`
/// (a range only when short).
fn lsof_ports(args: &[Word]) -> Vec<u16> {
    let mut ports = Vec::new();
    let mut i = 0;
    while let Some(word) = args.get(i) {
        i += 1;
        let text = word.text.as_str();
        let selection = if let Some(pos) = text.find("i") {
            let is_option = text.starts_with('-') && !text.starts_with("--");
            if !is_option {
                continue;
            }
            let after = &text[pos + 1..];
            if after.is_empty() {
                // `-i :P`: the selection is the next word.
                match args.get(i) {
                    Some(next) if !next.text.starts_with('-') => {
                        i += 1;
                        next.text.clone()
                    }
                    _ => continue,
                }
            } else {
                after.to_string()
            }
        } else {
            continue;
        };
        if let Some((_, port)) = selection.rsplit_once(':') {
            ports.extend(port_list(port));
        }
    }
    ports
}

/// `8000`, `8000,8001`, `8000-8002` (at most 64 ports from a range).
fn port_list(text: &str) -> Vec<u16> {
    let mut ports = Vec::new();
    for part in text.split(',') {
        if let Some((low, high)) = part.split_once('-') {
            if let (Ok(low), Ok(high)) = (low.parse::<u16>(), high.parse::<u16>()) {
                if low <= high && high - low < 64 {
                    ports.extend(low..=high);
                }
            }
        } else if let Ok(port) = part.parse::<u16>() {
            ports.push(port);
        }
    }
    ports.retain(|p| *p != 0);
    ports
}

/// `fuser`'s `P/tcp`, `P/udp`, or `-n tcp P`.
fn fuser_ports(args: &[Word]) -> Vec<u16> {
    let mut ports = Vec::new();
    let mut namespace = false;
    for word in args {
        let text = word.text.as_str();
        if text == "-n" || text == "--namespace" {
            namespace = true;
            continue;
        }
        if let Some((port, proto)) = text.split_once('/') {
            if matches!(proto, "tcp" | "udp") {
                ports.extend(port.parse::<u16>().ok().filter(|p| *p != 0));
            }
        } else if namespace && !text.starts_with('-') && !matches!(text, "tcp" | "udp" | "file") {
            ports.extend(text.parse::<u16>().ok().filter(|p| *p != 0));
        }
    }
    ports
}

/// `kill-port P [P…]`, `--port P`, `-p P`, `P,Q`.
fn kill_port_ports(args: &[Word]) -> Vec<KillTarget> {
    args.iter()
        .filter(|w| !w.text.starts_with('-'))
        .flat_map(|w| port_list(&w.text))
        .map(KillTarget::Port)
        .collect()
}

/// `pkill`/`pgrep` options and pattern.
fn read_pgrep(args: &[Word]) -> Vec<KillTarget> {
    let (mut full, mut exact) = (false, false);
    let mut pattern = None;
    let mut i = 0;
    while let Some(word) = args.get(i) {
        i += 1;
        let text = word.text.as_str();
        match text {
            "-f" | "--full" => full = true,
            "-x" | "--exact" => exact = true,
            // Options with a value.
            "-u" | "-U" | "-g" | "-G" | "-P" | "-s" | "-t" | "-F" | "--signal" | "-d"
            | "--euid" | "--uid" | "--parent" | "--pidfile" | "--session" | "--terminal" => i += 1,
            _ if text.starts_with("--") => {}
            _ if text.starts_with('-') && text.len() > 1 => {
                let flags = &text[1..];
                if flags.chars().all(|c| c.is_ascii_lowercase()) {
                    full |= flags.contains('f');
                    exact |= flags.contains('x');
                }
                // else a signal: -9, -TERM, -SIGKILL
            }
            _ => {
                if pattern.is_none() {
                    pattern = Some(text.to_string());
                }
            }
        }
    }
    pattern
        .map(|pattern| {
            vec![KillTarget::Pattern {
                pattern,
                full,
                exact,
            }]
        })
        .unwrap_or_default()
}

/// Splits a command list into pipelines of simple commands (each a list of words).
fn split_pipelines(text: &str) -> Vec<Vec<Vec<Word>>> {
    let mut pipelines: Vec<Vec<Vec<Word>>> = Vec::new();
    let mut pipeline: Vec<Vec<Word>> = Vec::new();
    let mut command: Vec<Word> = Vec::new();
    let mut word = Word::default();
    let mut in_word = false;
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    let end_word = |command: &mut Vec<Word>, word: &mut Word, in_word: &mut bool| {
        if *in_word {
            command.push(std::mem::take(word));
            *in_word = false;
        }
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\\' => {
                if let Some(next) = chars.get(i + 1) {
                    if *next != '\n' {
                        word.text.push(*next);
                        in_word = true;
                    }
                }
                i += 2;
                continue;
            }
            '\'' => {
                in_word = true;
                i += 1;
                while i < chars.len() && chars[i] != '\'' {
                    word.text.push(chars[i]);
                    i += 1;
                }
            }
            '"' => {
                in_word = true;
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    if chars[i] == '\\' && i + 1 < chars.len() {
                        i += 1;
                        word.text.push(chars[i]);
                    } else if chars[i] == '$' && chars.get(i + 1) == Some(&'(') {
                        let (inner, next) = substitution(&chars, i + 2, ')');
                        word.substitutions.push(inner);
                        i = next;
                        continue;
                    } else if chars[i] == '`' {
                        let (inner, next) = substitution(&chars, i + 1, '`');
                        word.substitutions.push(inner);
                        i = next;
                        continue;
                    } else {
                        word.text.push(chars[i]);
                    }
                    i += 1;
                }
            }
            '$' if chars.get(i + 1) == Some(&'(') => {
                in_word = true;
                let (inner, next) = substitution(&chars, i + 2, ')');
                word.substitutions.push(inner);
                i = next;
                continue;
            }
            '`' => {
                in_word = true;
                let (inner, next) = substitution(&chars, i + 1, '`');
                word.substitutions.push(inner);
                i = next;
                continue;
            }
            '#' if !in_word => {
                // A comment, to the end of the line.
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
                continue;
            }
            ' ' | '\t' => end_word(&mut command, &mut word, &mut in_word),
            '|' | ';' | '&' | '\n' | '(' | ')' | '{' | '}'
                if !(matches!(c, '{' | '}') && in_word) =>
            {
                end_word(&mut command, &mut word, &mut in_word);
                if !command.is_empty() {
                    pipeline.push(std::mem::take(&mut command));
                }
                let pipe = c == '|' && chars.get(i + 1) != Some(&'|');
                if !pipe && !pipeline.is_empty() {
                    pipelines.push(std::mem::take(&mut pipeline));
                }
                if matches!(c, '|' | '&') && chars.get(i + 1) == Some(&c) {
                    i += 1;
                }
            }
            '>' | '<' => {
                // A redirection: its target word is no argument, nor its descriptor (`2>`).
                if in_word && word.substitutions.is_empty() && is_number(&word.text) {
                    word = Word::default();
                    in_word = false;
                }
                end_word(&mut command, &mut word, &mut in_word);
                i += 1;
                while i < chars.len() && matches!(chars[i], '>' | '&' | '|') {
                    i += 1;
                }
                while i < chars.len() && chars[i] == ' ' {
                    i += 1;
                }
                while i < chars.len() && !matches!(chars[i], ' ' | '\t' | '\n' | ';' | '|' | '&') {
                    i += 1;
                }
                continue;
            }
            _ => {
                word.text.push(c);
                in_word = true;
            }
        }
        i += 1;
    }
    end_word(&mut command, &mut word, &mut in_word);
    if !command.is_empty() {
        pipeline.push(command);
    }
    if !pipeline.is_empty() {
        pipelines.push(pipeline);
    }
    pipelines
}

/// The text of a substitution starting at `start` (after `$(` or the opening backtick), and
/// where reading goes on after it. Nested parentheses and quotes are kept whole.
fn substitution(chars: &[char], start: usize, close: char) -> (String, usize) {
    let mut depth = 0usize;
    let mut i = start;
    let mut quote: Option<char> = None;
    while i < chars.len() {
        let c = chars[i];
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' || (c == '"' && close != '"') => quote = Some(c),
            None if c == '\\' => i += 1,
            None if close == ')' && c == '(' => depth += 1,
            None if c == close && depth == 0 => {
                return (chars[start..i].iter().collect(), i + 1);
            }
            None if close == ')' && c == ')' => depth -= 1,
            None => {}
        }
        i += 1;
    }
    (
        chars[start.min(chars.len())..].iter().collect(),
        chars.len(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use KillTarget::*;

    fn pattern(p: &str, full: bool) -> KillTarget {
        Pattern {
            pattern: p.into(),
            full,
            exact: false,
        }
    }

    fn script(path: &str, by_shell: bool) -> KillTarget {
        Script {
            path: path.into(),
            by_shell,
        }
    }

    #[test]
    fn the_common_kill_idioms_are_read() {
        let cases: Vec<(&str, Vec<KillTarget>)> = vec![
            ("kill 1234", vec![Pid(1234)]),
            ("kill -9 1234 5678", vec![Pid(1234), Pid(5678)]),
            ("kill -TERM 42", vec![Pid(42)]),
            ("kill -s KILL 42", vec![Pid(42)]),
            ("kill -- -77", vec![Group(77)]),
            ("kill $(lsof -t -i:8000)", vec![Port(8000)]),
            ("kill -9 $(lsof -ti:3000)", vec![Port(3000)]),
            ("kill `lsof -t -i :5173`", vec![Port(5173)]),
            ("kill $(lsof -t -i tcp:6006)", vec![Port(6006)]),
            ("lsof -ti:8000 | xargs kill", vec![Port(8000)]),
            ("lsof -ti:8000 | xargs -r kill -9", vec![Port(8000)]),
            ("fuser -k 8000/tcp", vec![Port(8000)]),
            ("fuser -k -n tcp 8000", vec![Port(8000)]),
            ("fuser 8000/tcp", vec![]),
            ("pkill -f http.server", vec![pattern("http.server", true)]),
            ("pkill node", vec![pattern("node", false)]),
            (
                "pkill -9 -f 'vite --port'",
                vec![pattern("vite --port", true)],
            ),
            ("pgrep -f vite | xargs kill", vec![pattern("vite", true)]),
            (
                "kill $(pgrep -f storybook)",
                vec![pattern("storybook", true)],
            ),
            ("killall node", vec![Name("node".into())]),
            ("kill $(pidof python3)", vec![Name("python3".into())]),
            ("npx kill-port 3000", vec![Port(3000)]),
            ("npx -y kill-port 3000 3001", vec![Port(3000), Port(3001)]),
            ("sudo kill 99", vec![Pid(99)]),
            (
                "cd app && npm run build; pkill -f vite || true",
                vec![
                    package("prebuild", None),
                    package("build", None),
                    package("postbuild", None),
                    pattern("vite", true),
                ],
            ),
            ("echo kill 5 # kill 6", vec![]),
            ("git commit -m 'kill 5'", vec![]),
            ("ls", vec![]),
            ("kill -l", vec![]),
            ("bash -c 'pkill -f vite'", vec![pattern("vite", true)]),
            ("sh -c \"kill $(lsof -t -i:8000)\"", vec![Port(8000)]),
            ("kill %1", vec![]),
            ("kill $(cat server.pid)", vec![PidFile("server.pid".into())]),
            (
                "kill -9 `cat /tmp/a.pid`",
                vec![PidFile("/tmp/a.pid".into())],
            ),
            ("kill $(<.vite.pid)", vec![PidFile(".vite.pid".into())]),
            (
                "cat run/web.pid | xargs kill",
                vec![PidFile("run/web.pid".into())],
            ),
            ("cat server.pid", vec![]),
            ("./stop.sh", vec![script("./stop.sh", false)]),
            (
                "cd app && scripts/stop-dev --all",
                vec![script("scripts/stop-dev", false)],
            ),
            ("bash -e stop.sh", vec![script("stop.sh", true)]),
            ("bash -e -o pipefail down.sh", vec![script("down.sh", true)]),
            ("/usr/bin/env bash stop.sh", vec![script("stop.sh", true)]),
            ("/usr/bin/sudo /bin/kill 99", vec![Pid(99)]),
            ("./env --all", vec![script("./env", false)]),
            ("sudo sh ./down.sh", vec![script("./down.sh", true)]),
            (
                ". ./env.sh; source x.sh",
                vec![script("./env.sh", true), script("x.sh", true)],
            ),
            ("ls /tmp", vec![]),
            ("bash", vec![]),
            ("echo $(cat notes.txt)", vec![]),
        ];
        for (command, wanted) in cases {
            assert_eq!(kill_targets(command), wanted, "{command}");
        }
    }

    fn package(name: &str, dir: Option<&str>) -> KillTarget {
        PackageScript {
            name: name.into(),
            dir: dir.map(Into::into),
        }
    }

    #[test]
    fn the_package_scripts_a_command_runs_are_named() {
        let npm = |name: &str, dir: Option<&str>| {
            vec![
                package(&format!("pre{name}"), dir),
                package(name, dir),
                package(&format!("post{name}"), dir),
            ]
        };
        let cases: Vec<(&str, Vec<KillTarget>)> = vec![
            ("npm run stop", npm("stop", None)),
            ("npm run-script stop -- --force", npm("stop", None)),
            ("npm stop", npm("stop", None)),
            ("npm test", npm("test", None)),
            ("npm --prefix web run kill", npm("kill", Some("web"))),
            ("npm run --prefix=web kill", npm("kill", Some("web"))),
            (
                "npm restart",
                [npm("restart", None), npm("stop", None), npm("start", None)].concat(),
            ),
            ("yarn stop", npm("stop", None)),
            ("yarn --cwd app run stop", npm("stop", Some("app"))),
            ("pnpm run stop", vec![package("stop", None)]),
            ("pnpm -C app stop", vec![package("stop", Some("app"))]),
            ("bun run stop", vec![package("stop", None)]),
            ("npm exec kill-port 3000", vec![Port(3000)]),
            ("npm x -- kill-port 3000", vec![Port(3000)]),
            ("pnpm dlx kill-port 5173", vec![Port(5173)]),
            ("yarn dlx kill-port 8080", vec![Port(8080)]),
            ("bun x kill-port 6006", vec![Port(6006)]),
            // npm's own commands, another workspace's scripts, nothing to run: nothing.
            ("npm install", vec![]),
            ("npm ci && npm ls", vec![]),
            ("npm -w api run stop", vec![]),
            ("pnpm --filter web stop", vec![]),
            ("npm run", vec![]),
            ("yarn", vec![]),
        ];
        for (command, wanted) in cases {
            assert_eq!(kill_targets(command), wanted, "{command}");
        }
    }

    #[test]
    fn redirections_and_nesting_do_not_confuse_it() {
        assert_eq!(
            kill_targets("kill $(lsof -t -i:8000) 2>/dev/null"),
            vec![Port(8000)]
        );
        assert_eq!(
            kill_targets("bash -c \"echo\"; (pkill -f 'python3 -m http.server 8000') &"),
            vec![pattern("python3 -m http.server 8000", true)]
        );
        assert_eq!(
            kill_targets("kill \"$(lsof -t -i:9000)\""),
            vec![Port(9000)]
        );
    }

    proptest::proptest! {
        #[test]
        fn fuzz_the_reader_never_panics(text in ".{0,200}") {
            let _ = kill_targets(&text);
            let _ = kill_targets(&format!("kill {text}"));
            let _ = kill_targets(&format!("kill $(lsof -ti:{text}"));
        }
    }
}
