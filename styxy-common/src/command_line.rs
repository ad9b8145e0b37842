//! A process's command line as the agent and the human are shown it: one line, no control
//! characters and no backticks (it goes inside a code span), the program by its name rather than
//! its path, and when it must be cut, cut in the middle so that its port arguments stay
//! (`vite --port 5173`, `manage.py runserver 0.0.0.0:8000` are what tell two servers apart).

use std::string::String;
use std::vec::Vec;

/// `cmdline` (else `comm`) shown in at most `max_chars` characters (an ellipsis counted), keeping
/// the arguments that name one of `ports` (and the flag before such an argument).
pub fn shown(cmdline: &str, comm: &str, max_chars: usize, ports: &[u16]) -> String {
    let clean: String = cmdline
        .chars()
        .map(|c| match c {
            '`' => '\'',
            c if c.is_control() => ' ',
            c => c,
        })
        .collect();
    let mut words: Vec<&str> = clean.split_whitespace().collect();
    if words.is_empty() {
        return cut(comm.trim(), max_chars);
    }
    // The program by its name: `/root/.pyenv/versions/3.11.7/bin/python3` is `python3`.
    if let Some(name) = words[0].rsplit('/').next().filter(|n| !n.is_empty()) {
        words[0] = name;
    }
    let whole = words.join(" ");
    if whole.chars().count() <= max_chars {
        return whole;
    }
    // The words that name a port, with the flag before each (`--port 5173`, `-p 8000`).
    let mut kept = vec![false; words.len()];
    for (i, word) in words.iter().enumerate() {
        if names_a_port(word, ports) {
            kept[i] = true;
            if i > 0 && words[i - 1].starts_with('-') && !names_a_port(words[i - 1], ports) {
                kept[i - 1] = true;
            }
        }
    }
    let tail: Vec<&str> = words
        .iter()
        .zip(&kept)
        .skip(1)
        .filter(|(_, k)| **k)
        .map(|(w, _)| *w)
        .collect();
    let tail = tail.join(" ");
    let tail_chars = tail.chars().count();
    if tail.is_empty() || tail_chars + 12 > max_chars {
        return cut(&whole, max_chars);
    }
    // The head: as many leading words as fit before " … " and the port words.
    let room = max_chars - tail_chars - " … ".chars().count();
    let first_kept = kept
        .iter()
        .skip(1)
        .position(|k| *k)
        .map_or(words.len(), |i| i + 1);
    let head = cut(&words[..first_kept].join(" "), room);
    let rest_is_tail = words[first_kept..]
        .iter()
        .zip(&kept[first_kept..])
        .all(|(_, k)| *k);
    if rest_is_tail && !head.ends_with('…') {
        return format!("{head} {tail}");
    }
    format!("{} … {tail}", head.trim_end_matches('…'))
}

/// Whether a server's unmoved `port` is a helper's, not one a person or a client would use:
/// either on an ephemeral port (`ephemeral`, the kernel's `ip_local_port_range`) that its command
/// line does not name (a notebook kernel's channels, a port-0 listener), or one its command line
/// names as a debugging port (`--remote-debugging-port`, `--inspect`).
pub fn is_helper_port(
    cmdline: &str,
    port: u16,
    ephemeral: &core::ops::RangeInclusive<u16>,
) -> bool {
    let named = |word: &str| {
        word.split(|c: char| !c.is_ascii_digit())
            .any(|part| part.parse::<u16>().ok() == Some(port))
    };
    let mut words = cmdline.split_whitespace().peekable();
    let mut names_it = false;
    while let Some(word) = words.next() {
        let debugging =
            word.starts_with("--remote-debugging-port") || word.starts_with("--inspect");
        let this = named(word)
            || (debugging && !word.contains('=') && words.peek().is_some_and(|w| named(w)));
        if this && debugging {
            return true;
        }
        names_it |= this;
    }
    ephemeral.contains(&port) && !names_it
}

/// Whether `word` names one of `ports` as a whole number: `5173`, `--port=5173`,
/// `0.0.0.0:8000`, `localhost:3000/`; not `51730` or `v5173`.
fn names_a_port(word: &str, ports: &[u16]) -> bool {
    word.split(|c: char| !c.is_ascii_digit() && c != '.')
        .filter(|part| !part.contains('.'))
        .filter_map(|part| part.parse::<u16>().ok())
        .any(|n| ports.contains(&n))
        && !word.starts_with("v")
}

/// `text` in at most `max_chars` characters, ending in `…` when cut.
fn cut(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        return text.to_string();
    }
    let mut out: String = text.chars().take(max_chars.saturating_sub(1)).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_command_is_shown_whole_with_the_programs_name() {
        assert_eq!(
            shown(
                "/usr/bin/python3 -m http.server 8000",
                "python3",
                80,
                &[8000]
            ),
            "python3 -m http.server 8000"
        );
        assert_eq!(shown("", "postgres", 80, &[5432]), "postgres");
        assert_eq!(shown("  ", "", 80, &[]), "");
    }

    #[test]
    fn no_control_characters_and_no_backticks() {
        let text = shown("node `rm -rf /`\n\x1b[2J server.js", "node", 80, &[]);
        assert_eq!(text, "node 'rm -rf /' [2J server.js");
    }

    #[test]
    fn a_long_command_keeps_its_port_arguments() {
        let long = format!(
            "/usr/bin/node /home/me/src/{}/node_modules/.bin/vite --host 127.0.0.1 --port 5173 --strictPort",
            "very-long-project-name".repeat(4)
        );
        let text = shown(&long, "node", 80, &[5173, 5174]);
        assert!(text.chars().count() <= 80, "{text}");
        assert!(text.starts_with("node /home/me/src/"), "{text}");
        assert!(text.ends_with(" … --port 5173"), "{text}");
        // `host:port` forms, and `--port=N`.
        let django = format!(
            "python3 {}/manage.py runserver 0.0.0.0:8000",
            "/x".repeat(60)
        );
        let text = shown(&django, "python3", 60, &[8000]);
        assert!(text.ends_with(" … 0.0.0.0:8000"), "{text}");
        assert!(text.chars().count() <= 60, "{text}");
        let text = shown(
            &format!("jupyter {} --port=8888", "a ".repeat(80)),
            "",
            40,
            &[8888],
        );
        assert!(text.ends_with(" … --port=8888"), "{text}");
    }

    #[test]
    fn without_port_arguments_a_long_command_is_cut_at_the_end() {
        let text = shown(&"a ".repeat(100), "", 20, &[8000]);
        assert_eq!(text.chars().count(), 20);
        assert!(text.ends_with('…'));
    }

    #[test]
    fn only_whole_numbers_name_a_port() {
        assert!(names_a_port("8000", &[8000]));
        assert!(names_a_port("--port=8000", &[8000]));
        assert!(names_a_port("localhost:8000/", &[8000]));
        assert!(!names_a_port("80001", &[8000]));
        assert!(!names_a_port("18000", &[8000]));
        assert!(!names_a_port("1.8000", &[8000]));
        assert!(!names_a_port("v8000", &[8000]));
        assert!(!names_a_port("8000", &[]));
    }

    #[test]
    fn what_counts_as_a_helper_port() {
        let ephemeral = 32768..=60999;
        // An ephemeral port the command names is a server someone asked for.
        assert!(!is_helper_port(
            "python3 -m http.server 40000",
            40000,
            &ephemeral
        ));
        let kernel = "python3 -m ipykernel_launcher -f /run/kernel-1.json";
        assert!(is_helper_port(kernel, 40000, &ephemeral));
        assert!(!is_helper_port(kernel, 8000, &ephemeral));
        // A debugging port is a helper wherever it is.
        assert!(is_helper_port(
            "chromium --remote-debugging-port=9222 about:blank",
            9222,
            &ephemeral
        ));
        assert!(is_helper_port(
            "node --inspect 127.0.0.1:9229 app.js",
            9229,
            &ephemeral
        ));
        assert!(!is_helper_port(
            "node --inspect 127.0.0.1:9229 app.js",
            3000,
            &ephemeral
        ));
    }

    #[test]
    fn any_input_stays_within_bounds() {
        for max in [1, 5, 13, 40] {
            for text in [
                "",
                "x",
                "a b c d e f 8000 g h",
                "ééééééééééé 8000 éééé",
                "-p 8000 -p 8000 -p 8000",
            ] {
                let out = shown(text, "comm", max, &[8000]);
                assert!(
                    out.chars().count() <= max.max(1),
                    "{max} {text:?} → {out:?}"
                );
            }
        }
    }
}
