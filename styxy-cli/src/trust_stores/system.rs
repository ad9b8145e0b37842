//! The system's trust store: a certificate file in the distribution's directory for local
//! authorities, then its update command (`update-ca-certificates` on Debian and Ubuntu,
//! `update-ca-trust` on Fedora and Arch), which rebuilds the bundle curl, Python, Go and
//! OpenSSL read. Changing it needs root.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{Authority, Change, Outcome};

/// One distribution family's layout.
struct Layout {
    dir: &'static str,
    update: &'static str,
    extension: &'static str,
    /// Where the update command links each certificate (by name and by subject hash), when it
    /// leaves a removed certificate's links behind (Debian's does, without `--fresh`).
    links: Option<&'static str>,
}

const LAYOUTS: [Layout; 3] = [
    Layout {
        dir: "/usr/local/share/ca-certificates",
        update: "update-ca-certificates",
        extension: "crt",
        links: Some("/etc/ssl/certs"),
    },
    Layout {
        dir: "/etc/pki/ca-trust/source/anchors",
        update: "update-ca-trust",
        extension: "pem",
        links: None,
    },
    Layout {
        dir: "/etc/ca-certificates/trust-source/anchors",
        update: "update-ca-trust",
        extension: "crt",
        links: None,
    },
];

/// The layout of this machine: the first whose update command is installed.
fn layout() -> Option<&'static Layout> {
    LAYOUTS.iter().find(|l| {
        find_program(l.update).is_some() && Path::new(l.dir).parent().is_some_and(Path::is_dir)
    })
}

/// Where the authority's file goes (or is) on this machine.
pub fn certificate_path(authority: &Authority) -> Option<PathBuf> {
    layout().map(|l| Path::new(l.dir).join(format!("{}.{}", authority.short_name(), l.extension)))
}

/// Adds the authority to the system store.
pub fn add(authority: &Authority) -> Outcome {
    let Some(layout) = layout() else {
        return outcome(
            PathBuf::new(),
            Change::Skipped(
                "no system trust store found (neither update-ca-certificates nor update-ca-trust \
                 is installed): install ca-certificates"
                    .into(),
            ),
        );
    };
    let path =
        Path::new(layout.dir).join(format!("{}.{}", authority.short_name(), layout.extension));
    if fs::read_to_string(&path).is_ok_and(|held| held == authority.certificate_pem) {
        return outcome(path, Change::AlreadyDone);
    }
    if !is_root() {
        return outcome(
            path,
            Change::Skipped(
                "only root may change the system store: run `sudo styxy trust` for curl, Python, \
                 Go and OpenSSL to trust it"
                    .into(),
            ),
        );
    }
    if let Err(e) = write_public(
        Path::new(layout.dir),
        &path,
        authority.certificate_pem.as_bytes(),
    ) {
        return outcome(path, Change::Failed(e));
    }
    match update(layout) {
        Ok(()) => outcome(path, Change::Changed),
        Err(e) => {
            // Left as it was: the file goes again, and the bundle is rebuilt without it.
            let _ = fs::remove_file(&path);
            let _ = update(layout);
            outcome(path, Change::Failed(e))
        }
    }
}

/// Removes the authority from the system store.
pub fn remove(authority: &Authority) -> Outcome {
    let Some(layout) = layout() else {
        return outcome(
            PathBuf::new(),
            Change::Skipped("no system trust store found".into()),
        );
    };
    let path =
        Path::new(layout.dir).join(format!("{}.{}", authority.short_name(), layout.extension));
    if !path.exists() {
        return outcome(path, Change::AlreadyDone);
    }
    if !is_root() {
        return outcome(
            path,
            Change::Skipped(
                "only root may change the system store: run `sudo styxy untrust`".into(),
            ),
        );
    }
    if let Err(e) = fs::remove_file(&path) {
        return outcome(
            path.clone(),
            Change::Failed(format!("removing {}: {e}", path.display())),
        );
    }
    if let Some(links) = layout.links {
        remove_links(Path::new(links), &path);
    }
    match update(layout) {
        Ok(()) => outcome(path, Change::Changed),
        Err(e) => outcome(path, Change::Failed(e)),
    }
}

/// Removes the links the update command made for `certificate`: `<name>.pem` to it, and the
/// subject-hash link (`03f8655f.0`) to that.
fn remove_links(dir: &Path, certificate: &Path) {
    let Some(stem) = certificate.file_stem() else {
        return;
    };
    let mut named = stem.to_owned();
    named.push(".pem");
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let link = entry.path();
        let Ok(target) = fs::read_link(&link) else {
            continue;
        };
        if target == certificate || target.as_os_str() == named {
            let _ = fs::remove_file(&link);
        }
    }
}

fn outcome(path: PathBuf, result: Change) -> Outcome {
    Outcome {
        store: "system store".into(),
        path,
        result,
    }
}

/// Runs the layout's update command; its output is kept for the error only.
fn update(layout: &Layout) -> Result<(), String> {
    let program =
        find_program(layout.update).ok_or_else(|| format!("{} is not installed", layout.update))?;
    let output = Command::new(&program)
        .output()
        .map_err(|e| format!("running {}: {e}", program.display()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} failed ({}): {}",
            layout.update,
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Writes a file readable by everyone (0644, as certificates are), atomically.
fn write_public(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".new");
    let temporary = PathBuf::from(temporary);
    let _ = fs::remove_file(&temporary);
    let written = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&temporary)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| fs::rename(&temporary, path));
    written.map_err(|e| {
        let _ = fs::remove_file(&temporary);
        format!("writing {}: {e}", path.display())
    })
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A program on `PATH`, or in the sbin directories a user's `PATH` may lack.
pub(super) fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}
