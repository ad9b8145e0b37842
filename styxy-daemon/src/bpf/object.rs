//! Where the kernel programs come from and where they go: the eBPF object file, the cgroup v2
//! mount, and the kernel file systems they need mounted (tracefs, bpffs).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use styxy_common::env;
use styxy_common::paths::{artifact_candidates, EBPF_OBJECT};

/// Where the object may be: see [`artifact_candidates`] (`$STYXY_EBPF_OBJECT` first;
/// `cargo xtask build-ebpf` puts it in `target/`, above the binaries).
fn object_candidates() -> Vec<PathBuf> {
    artifact_candidates(env::EBPF_OBJECT, EBPF_OBJECT)
}

/// The object to load, or why there is none.
pub fn find_object(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        if path.is_file() {
            return Ok(path.to_path_buf());
        }
        bail!("--ebpf-object {}: no such file", path.display());
    }
    let candidates = object_candidates();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "no eBPF object ({EBPF_OBJECT}) in {}; build it with `cargo xtask build-ebpf`",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// Where cgroup v2 is mounted: `/sys/fs/cgroup` on a unified layout, `/sys/fs/cgroup/unified` on
/// a hybrid one; read from this process's mount table.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = procfs::process::Process::myself()
        .and_then(|me| me.mountinfo())
        .context("reading /proc/self/mountinfo")?;
    mounts
        .into_iter()
        .find(|m| m.fs_type == "cgroup2")
        .map(|m| m.mount_point)
        .context("no cgroup v2 mount found (mount one with `mount -t cgroup2 none /sys/fs/cgroup`)")
}

/// Mounts a kernel file system of type `fstype` at `target` (tracefs, bpffs: no source, no
/// options).
pub fn mount_kernel_fs(fstype: &std::ffi::CStr, target: &std::ffi::CStr) -> std::io::Result<()> {
    // SAFETY: valid NUL-terminated strings; a failure is reported.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
