//! What the eBPF tests need: the built object, root and cgroup v2, and child cgroups.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::binaries::bin_dir;
use crate::users::is_root;

/// What the eBPF tests need: root, a cgroup v2 mount and the built object. `None` (after printing
/// Where `cargo xtask build-ebpf` puts the kernel programs (`$STYXY_EBPF_OBJECT` first).
fn ebpf_object_path() -> PathBuf {
    std::env::var_os("STYXY_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            bin_dir()
                .parent()
                .map_or_else(PathBuf::new, Path::to_path_buf)
                .join("styxy-ebpf.o")
        })
}

/// The built eBPF object, for tests that read it without loading it; `None` (SKIP, and a
/// failure in CI) when it was not built.
pub fn ebpf_object() -> Option<PathBuf> {
    let object = ebpf_object_path();
    if object.is_file() {
        return Some(object);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "the eBPF object must be built in CI: {} missing",
        object.display()
    );
    eprintln!(
        "SKIP: {} missing (cargo xtask build-ebpf)",
        object.display()
    );
    None
}

/// why) when something is missing outside CI; in CI (`CI` set) a missing piece fails the test.
pub fn ebpf_ready() -> Option<EbpfSetup> {
    let object = ebpf_object_path();
    let cgroup_root = std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|mounts| {
            mounts
                .lines()
                .find(|l| {
                    l.split(" - ")
                        .nth(1)
                        .is_some_and(|fs| fs.starts_with("cgroup2 "))
                })
                .and_then(|l| l.split(' ').nth(4).map(PathBuf::from))
        });
    let missing = if !is_root() {
        Some("not root".to_string())
    } else if cgroup_root.is_none() {
        Some("no cgroup v2 mount".to_string())
    } else if !object.is_file() {
        Some(format!(
            "{} missing (cargo xtask build-ebpf)",
            object.display()
        ))
    } else {
        None
    };
    if let Some(why) = missing {
        assert!(
            std::env::var_os("CI").is_none(),
            "the eBPF tests must run in CI, but: {why}"
        );
        eprintln!("SKIP: eBPF test: {why}");
        return None;
    }
    Some(EbpfSetup {
        object,
        cgroup_root: cgroup_root?,
    })
}

pub struct EbpfSetup {
    pub object: PathBuf,
    pub cgroup_root: PathBuf,
}

/// A fresh child cgroup, removed (once empty) when dropped.
pub struct ChildCgroup {
    pub path: PathBuf,
}

impl ChildCgroup {
    pub fn create(root: &Path) -> Result<ChildCgroup> {
        static NEXT: AtomicU16 = AtomicU16::new(0);
        let path = root.join(format!(
            "styxy-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir(&path)
            .with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(ChildCgroup { path })
    }

    /// `sh -c 'echo $$ > cgroup.procs; exec PROGRAM ARGS…'`: the program runs inside this cgroup.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
            .arg(&self.path)
            .arg(program)
            .args(args);
        command
    }
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        // The processes were killed by their owners' Drop; the kernel needs a moment to let go.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
