//! `styxy install` / `styxy uninstall`: put the binary, the shim, its client library, the eBPF
//! object and the systemd units (the daemon's, and the sockets of its names' proxy) in place, and
//! take them away again.
//!
//! Every file is written to a temporary name and renamed over the target, so a running daemon or a
//! process that has the shim mapped never sees a half-written file. What was created (files and
//! the directories made for them) is listed in a manifest, which `uninstall` follows, so that an
//! install followed by an uninstall leaves the tree as it was.

use std::io::Write;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::preload;
use styxy_common::paths::{EBPF_OBJECT, PRELOAD_LIBRARY};

/// The unit template; `@BINDIR@` becomes `<prefix>/bin`.
pub const UNIT_TEMPLATE: &str = include_str!("../../packaging/styxy.service");
pub const UNIT_NAME: &str = "styxy.service";
/// The socket units that pass the names' proxy its loopback ports 80 and 443.
pub const SOCKET_UNITS: [(&str, &str); 2] = [
    (
        "styxy-http.socket",
        include_str!("../../packaging/styxy-http.socket"),
    ),
    (
        "styxy-https.socket",
        include_str!("../../packaging/styxy-https.socket"),
    ),
];
pub const DEFAULT_PREFIX: &str = "/usr/local";
const MANIFEST: &str = "install-manifest";

/// Where things go: `root` is prepended to every path (a staging directory; `/` for real), and
/// `prefix` is what the installed files refer to each other by.
#[derive(Clone, Debug)]
pub struct Layout {
    pub root: PathBuf,
    pub prefix: PathBuf,
}

impl Layout {
    pub fn new(root: Option<PathBuf>, prefix: Option<PathBuf>) -> Result<Layout> {
        let prefix = prefix.unwrap_or_else(|| PathBuf::from(DEFAULT_PREFIX));
        if !prefix.is_absolute() || prefix.components().any(|c| c == Component::ParentDir) {
            bail!(
                "--prefix {} must be an absolute path without `..`",
                prefix.display()
            );
        }
        Ok(Layout {
            root: root.unwrap_or_else(|| PathBuf::from("/")),
            prefix,
        })
    }

    /// `path` (absolute, as the installed system sees it) under the root.
    fn staged(&self, path: &Path) -> PathBuf {
        self.root.join(path.strip_prefix("/").unwrap_or(path))
    }

    pub fn bin_dir(&self) -> PathBuf {
        self.prefix.join("bin")
    }

    pub fn lib_dir(&self) -> PathBuf {
        self.prefix.join("lib/styxy")
    }

    pub fn unit_path(&self) -> PathBuf {
        PathBuf::from("/etc/systemd/system").join(UNIT_NAME)
    }

    fn manifest_path(&self) -> PathBuf {
        self.staged(&self.lib_dir().join(MANIFEST))
    }

    fn is_real_root(&self) -> bool {
        self.root == Path::new("/")
    }
}

/// The unit with its paths filled in.
pub fn render_unit(layout: &Layout) -> String {
    UNIT_TEMPLATE.replace("@BINDIR@", &layout.bin_dir().to_string_lossy())
}

/// One file to install.
struct Item {
    /// Absolute path on the installed system.
    target: PathBuf,
    contents: Vec<u8>,
    mode: u32,
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// `styxy install`: returns the lines to print.
pub fn install(layout: &Layout) -> Result<Vec<String>> {
    let exe = std::env::current_exe().context("finding the styxy binary")?;
    let shim = preload::find_library()?;
    let client = shim.with_file_name(styxy_common::shim::CLIENT_LIBRARY);
    if !client.is_file() {
        bail!(
            "{} is missing next to {} (build it with `cargo xtask build`)",
            client.display(),
            shim.display()
        );
    }
    let mut items = vec![
        Item {
            target: layout.bin_dir().join("styxy"),
            contents: read(&exe)?,
            mode: 0o755,
        },
        Item {
            target: layout.lib_dir().join(PRELOAD_LIBRARY),
            contents: read(&shim)?,
            mode: 0o755,
        },
        Item {
            target: layout.lib_dir().join(styxy_common::shim::CLIENT_LIBRARY),
            contents: read(&client)?,
            mode: 0o755,
        },
        Item {
            target: layout.unit_path(),
            contents: render_unit(layout).into_bytes(),
            mode: 0o644,
        },
    ];
    for (name, unit) in SOCKET_UNITS {
        items.push(Item {
            target: layout.unit_path().with_file_name(name),
            contents: unit.as_bytes().to_vec(),
            mode: 0o644,
        });
    }
    let mut report = Vec::new();
    // A binary built with its eBPF programs inside (`cargo xtask build`) needs no object file.
    if styxy_daemon::embedded_ebpf_object().is_none() {
        match styxy_daemon::find_ebpf_object_file(None) {
            Ok(object) => items.push(Item {
                target: layout.lib_dir().join(EBPF_OBJECT),
                contents: read(&object)?,
                mode: 0o644,
            }),
            Err(e) => report.push(format!(
                "note: {e:#}; the daemon will read the socket tables instead"
            )),
        }
    }

    let mut manifest = Manifest::load(layout)?;
    for item in &items {
        let staged = layout.staged(&item.target);
        if let Some(parent) = staged.parent() {
            manifest.created_dirs.extend(create_dirs(parent)?);
        }
        write_atomically(&staged, &item.contents, item.mode)?;
        if !manifest.files.contains(&staged) {
            manifest.files.push(staged.clone());
        }
        report.push(format!("installed {}", staged.display()));
    }
    manifest.save(layout)?;
    if layout.is_real_root() {
        report.push(String::new());
        report.push(
            "Next: systemctl daemon-reload && systemctl enable --now styxy-http.socket \
             styxy-https.socket styxy"
                .into(),
        );
        report.push(
            "(the sockets serve every server by name on loopback 80 and 443: http://NAME.localhost/; \
             `styxy trust` makes browsers trust the https)"
                .into(),
        );
        report.push("Then, for Claude Code: styxy hook install".into());
        if let Some(fix) = names_resolution_fix() {
            report.push(fix);
        }
    } else {
        report.push(format!(
            "(staged under {}; nothing was enabled)",
            layout.root.display()
        ));
    }
    Ok(report)
}

/// `styxy uninstall`: returns the lines to print.
pub fn uninstall(layout: &Layout) -> Result<Vec<String>> {
    let manifest = Manifest::load(layout)?;
    if manifest.files.is_empty() {
        bail!(
            "nothing to uninstall: no manifest at {} (installed with another --prefix or --root?)",
            layout.manifest_path().display()
        );
    }
    let mut report = Vec::new();
    if layout.is_real_root() {
        report.push(
            "Stop it first if it runs: systemctl disable --now styxy styxy-http.socket \
             styxy-https.socket (and `styxy untrust` while it runs)"
                .into(),
        );
    }
    for file in &manifest.files {
        match std::fs::remove_file(file) {
            Ok(()) => report.push(format!("removed {}", file.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", file.display())),
        }
    }
    let manifest_path = layout.manifest_path();
    let _ = std::fs::remove_file(&manifest_path);
    // A daemon stopped while a kernel session lived left its programs pinned for the next one.
    if layout.is_real_root() {
        let state_dir = Path::new(styxy_common::paths::SYSTEM_STATE_DIR);
        match styxy_common::pins::remove_pins_of(state_dir) {
            Ok(true) => report.push(format!(
                "detached the kernel programs pinned in {}",
                styxy_common::pins::pin_dir_of(state_dir).display()
            )),
            Ok(false) => {}
            Err(e) => report.push(format!(
                "could not detach the kernel programs pinned in {}: {e} (they go at the next reboot)",
                styxy_common::pins::pin_dir_of(state_dir).display()
            )),
        }
    }
    // Directories this install created, deepest first, and only when empty.
    let mut dirs = manifest.created_dirs.clone();
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for dir in dirs {
        if std::fs::remove_dir(&dir).is_ok() {
            report.push(format!("removed {}/", dir.display()));
        }
    }
    Ok(report)
}

/// What to do when this machine's glibc does not resolve `*.localhost` (browsers and curl do
/// by themselves; python, node and Go with cgo ask glibc): `None` when it does.
fn names_resolution_fix() -> Option<String> {
    use std::net::ToSocketAddrs;
    let resolves = ("styxy.localhost", 80)
        .to_socket_addrs()
        .is_ok_and(|mut addrs| addrs.all(|a| a.ip().is_loopback()));
    (!resolves).then(|| {
        "note: programs that resolve names through glibc (python, node) do not resolve \
         *.localhost here: `sudo apt install libnss-myhostname` (it adds `myhostname` to the hosts: \
         line of /etc/nsswitch.conf; elsewhere add it there yourself)"
            .to_string()
    })
}

/// Creates `dir` and its missing parents; returns the ones it created, outermost first.
fn create_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    let mut current = Some(dir);
    while let Some(d) = current.filter(|d| !d.exists()) {
        missing.push(d.to_path_buf());
        current = d.parent();
    }
    missing.reverse();
    for d in &missing {
        std::fs::create_dir(d).with_context(|| format!("creating {}", d.display()))?;
    }
    Ok(missing)
}

/// Writes `contents` to `path` through a new temporary file beside it (created with `O_EXCL`, so no
/// link is followed), with `mode`, synced, then renamed over `path`; the temporary file is removed
/// when anything fails. Also what `hook install` writes Claude Code's settings with.
pub(crate) fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let tmp = path.with_file_name(format!(
        ".{}.styxy-{}",
        path.file_name()
            .map_or_else(|| "file".into(), |n| n.to_string_lossy()),
        std::process::id()
    ));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The mode again: `open` applies the umask.
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()
    })();
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    Ok(())
}

/// What an install created, one path per line: `f PATH` for files, `d PATH` for directories.
#[derive(Default)]
struct Manifest {
    files: Vec<PathBuf>,
    created_dirs: Vec<PathBuf>,
}

impl Manifest {
    fn load(layout: &Layout) -> Result<Manifest> {
        let path = layout.manifest_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Manifest::default()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mut manifest = Manifest::default();
        for line in text.lines() {
            match line.split_once(' ') {
                Some(("f", p)) => manifest.files.push(PathBuf::from(p)),
                Some(("d", p)) => manifest.created_dirs.push(PathBuf::from(p)),
                _ => bail!("{}: unreadable line {line:?}", path.display()),
            }
        }
        Ok(manifest)
    }

    fn save(&self, layout: &Layout) -> Result<()> {
        let mut text = String::new();
        for f in &self.files {
            text += &format!("f {}\n", f.display());
        }
        for d in &self.created_dirs {
            text += &format!("d {}\n", d.display());
        }
        write_atomically(&layout.manifest_path(), text.as_bytes(), 0o644)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_points_at_the_installed_binary() {
        let layout = Layout::new(None, Some("/opt/styxy".into())).expect("layout");
        let unit = render_unit(&layout);
        assert!(
            unit.contains("ExecStart=/opt/styxy/bin/styxy daemon"),
            "{unit}"
        );
        assert!(!unit.contains("@BINDIR@"));
    }

    #[test]
    fn a_relative_prefix_is_refused() {
        assert!(Layout::new(None, Some("usr/local".into())).is_err());
        assert!(Layout::new(None, Some("/usr/../etc".into())).is_err());
    }
}
