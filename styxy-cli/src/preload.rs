//! Turning the bind() shim on: finding `libstyxy_preload.so`, `styxy run -- CMD…` and `styxy env`.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use styxy_common::env;
use styxy_common::paths::{artifact_candidates, PRELOAD_LIBRARY};

/// Where the shim may be: see [`artifact_candidates`] (`$STYXY_PRELOAD_LIB` first).
fn candidates() -> Vec<PathBuf> {
    artifact_candidates(env::PRELOAD_LIB, PRELOAD_LIBRARY)
}

/// The shim's absolute path, or an error that lists where it was looked for and how to fix it.
pub fn find_library() -> Result<PathBuf> {
    let candidates = candidates();
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(std::fs::canonicalize(found).unwrap_or_else(|_| found.clone()));
    }
    let looked: Vec<String> = candidates
        .iter()
        .map(|p| format!("  {}", p.display()))
        .collect();
    bail!(
        "{PRELOAD_LIBRARY} not found; looked in:\n{}\nBuild it with `cargo xtask build` (or `cargo xtask build-preload`), \
         install it with `styxy install`, or point {} at it",
        looked.join("\n"),
        env::PRELOAD_LIB.name
    )
}

/// `LD_PRELOAD` with the shim first, keeping what was there and never listing the shim twice.
pub fn preload_value(library: &Path, existing: Option<&str>) -> String {
    let library = library.to_string_lossy();
    let mut entries = vec![library.to_string()];
    for entry in existing
        .unwrap_or("")
        .split([':', ' '])
        .filter(|e| !e.is_empty())
    {
        let is_shim =
            entry == library || Path::new(entry).file_name() == Some(PRELOAD_LIBRARY.as_ref());
        if !is_shim {
            entries.push(entry.to_string());
        }
    }
    entries.join(":")
}

/// `styxy run`: replace this process with `command`, the shim preloaded, in a session.
///
/// The session is registered first, with this process (which the command replaces, keeping its
/// pid): when the daemon runs with eBPF, the kernel then moves and redirects for the command and
/// everything it starts, static binaries included; the shim does it for dynamically linked
/// programs either way. The session is `--instance`, else the one this shell is in
/// (`STYXY_INSTANCE`), else a new one named by the daemon.
pub async fn run(
    command: &[OsString],
    instance: Option<&str>,
    name: Option<&str>,
    socket: Option<&Path>,
) -> Result<()> {
    let Some((program, args)) = command.split_first() else {
        bail!("nothing to run: give a command, e.g. `styxy run -- npm run storybook`");
    };
    if let Some(name) = name {
        if styxy_common::label::dns_label(name).as_deref() != Some(name) {
            bail!(
                "--name {name:?} cannot be part of a host name: use lowercase letters, digits and \
                 inner dashes, at most 63 (e.g. --name {})",
                styxy_common::label::dns_label(name).unwrap_or_else(|| "feature-x".into())
            );
        }
    }
    let library = find_library()?;
    let existing = std::env::var("LD_PRELOAD").ok();
    let mut child = std::process::Command::new(program);
    child
        .args(args)
        .env("LD_PRELOAD", preload_value(&library, existing.as_deref()));
    let instance = instance.map(str::to_owned).or_else(|| {
        std::env::var(env::INSTANCE.name)
            .ok()
            .filter(|v| !v.is_empty())
    });
    if let Some(socket) = socket {
        child.env(env::SOCKET.name, socket);
    }
    let daemon = socket.map_or_else(crate::daemon_socket, Path::to_path_buf);
    let quiet = std::env::var(env::NOTIFY.name).is_ok_and(|v| v == "off");
    match join_session(&daemon, instance.clone(), name.map(str::to_owned)).await {
        Ok(Err(refused)) => {
            if let Some(instance) = &instance {
                child.env(env::INSTANCE.name, instance);
            }
            eprintln!("styxy: warning: the daemon did not register this session: {refused}");
        }
        Ok(Ok(joined)) => {
            child.env(env::INSTANCE.name, &joined.instance_id);
            if !joined.kernel_session && !quiet {
                eprintln!(
                    "styxy: note: only dynamically linked programs will be moved off taken ports in this \
                     session (static binaries such as Go servers will not): {}",
                    joined.kernel_session_detail
                );
            }
        }
        Err(e) => {
            if let Some(instance) = &instance {
                child.env(env::INSTANCE.name, instance);
            }
            // The shim fails open in silence; say here, once, when it will have no daemon to ask.
            eprintln!(
                "styxy: warning: no daemon answers at {} ({e:#}); the command runs, but its ports will not be \
                 moved. Start one with `sudo systemctl start styxy` or `styxy daemon`.",
                daemon.display()
            );
        }
    }
    let error = child.exec();
    bail!(
        "cannot run {}: {error}{}",
        Path::new(program).display(),
        if error.kind() == std::io::ErrorKind::NotFound {
            " (is it installed and on PATH?)"
        } else {
            ""
        }
    )
}

/// Registers this process in the session `instance` (a new one when `None`): the daemon's
/// answer (or why it refused), or why no daemon answered.
async fn join_session(
    daemon: &Path,
    instance: Option<String>,
    name: Option<String>,
) -> Result<Result<styxy_proto::v1::RegisterInstanceResponse, String>> {
    let target = crate::client::Target::Unix(daemon.to_path_buf());
    let answer = crate::client::register_instance(
        &target,
        instance,
        name,
        std::process::id(),
        std::time::Duration::from_secs(2),
    )
    .await?;
    match answer {
        Ok(answer) => Ok(Ok(answer)),
        Err(status) if status.code() == tonic::Code::Unavailable => {
            Err(anyhow::anyhow!("{}", status.message()))
        }
        Err(status) => Ok(Err(status.message().to_string())),
    }
}

/// Quote for a POSIX shell.
pub fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// `styxy env`: the shell lines that turn the shim on, for `eval "$(styxy env)"`.
pub fn env_lines(library: &Path, instance: Option<&str>, socket: Option<&Path>) -> String {
    let mut out = format!(
        "export LD_PRELOAD={}\"${{LD_PRELOAD:+:$LD_PRELOAD}}\"\n",
        shell_quote(&library.to_string_lossy())
    );
    if let Some(instance) = instance {
        out += &format!("export {}={}\n", env::INSTANCE.name, shell_quote(instance));
    }
    if let Some(socket) = socket {
        out += &format!(
            "export {}={}\n",
            env::SOCKET.name,
            shell_quote(&socket.to_string_lossy())
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shim_goes_first_once_and_keeps_the_rest() {
        let lib = Path::new("/opt/styxy/lib/libstyxy_preload.so");
        assert_eq!(
            preload_value(lib, None),
            "/opt/styxy/lib/libstyxy_preload.so"
        );
        assert_eq!(
            preload_value(lib, Some("/usr/lib/libfoo.so other.so")),
            "/opt/styxy/lib/libstyxy_preload.so:/usr/lib/libfoo.so:other.so"
        );
        // An older copy elsewhere is replaced, not doubled.
        assert_eq!(
            preload_value(lib, Some("/tmp/old/libstyxy_preload.so:/x.so")),
            "/opt/styxy/lib/libstyxy_preload.so:/x.so"
        );
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
