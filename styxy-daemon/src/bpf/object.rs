//! Where the kernel programs come from and where they go: the eBPF object (a file, or the one
//! built into this binary), the cgroup v2 mount, and the kernel file systems they need mounted
//! (tracefs, bpffs).

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use styxy_common::env;
use styxy_common::paths::{artifact_candidates, EBPF_OBJECT};

/// The object this binary was built with (see `build.rs`), aligned as the ELF parser wants it.
#[cfg(styxy_embedded_ebpf)]
static EMBEDDED: &[u8] = aya::include_bytes_aligned!(env!("STYXY_EBPF_EMBEDDED"));

/// The object built into this binary, if any.
pub fn embedded_object() -> Option<&'static [u8]> {
    #[cfg(styxy_embedded_ebpf)]
    return Some(EMBEDDED);
    #[cfg(not(styxy_embedded_ebpf))]
    None
}

/// An eBPF object to load, and where it came from (for messages: `from FILE`, `built into this
/// binary`).
pub struct Object {
    pub bytes: Cow<'static, [u8]>,
    pub origin: String,
}

/// Where the object may be as a file: see [`artifact_candidates`] (`$STYXY_EBPF_OBJECT` first;
/// `cargo xtask build-ebpf` puts it in `target/`, above the binaries).
fn object_candidates() -> Vec<PathBuf> {
    artifact_candidates(env::EBPF_OBJECT, EBPF_OBJECT)
}

/// The object file to load — `explicit` (`--ebpf-object`), `$STYXY_EBPF_OBJECT`, else the first
/// of the other places it may be — or why there is none. See [`find_object`] for the object
/// the daemon loads (this binary's own comes before those other places).
pub fn find_object_file(explicit: Option<&Path>) -> Result<PathBuf> {
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

/// The object the daemon loads: `--ebpf-object FILE`, else `$STYXY_EBPF_OBJECT`, else the one
/// built into this binary, else a file where a build or an install puts it; or why there is
/// none.
pub fn find_object(explicit: Option<&Path>) -> Result<Object> {
    let from_file = |path: PathBuf| -> Result<Object> {
        let bytes = std::fs::read(&path)
            .with_context(|| format!("reading eBPF object {}", path.display()))?;
        Ok(Object {
            bytes: Cow::Owned(bytes),
            origin: format!("from {}", path.display()),
        })
    };
    let from_env = std::env::var_os(env::EBPF_OBJECT.name).filter(|v| !v.is_empty());
    if explicit.is_some() || from_env.is_some() {
        return from_file(find_object_file(explicit)?);
    }
    if let Some(bytes) = embedded_object() {
        return Ok(Object {
            bytes: Cow::Borrowed(bytes),
            origin: "built into this binary".to_string(),
        });
    }
    find_object_file(None)
        .map_err(|e| {
            e.context(
                "this binary carries no eBPF object (it was built without the eBPF toolchain: \
                 `cargo xtask build` builds one in)",
            )
        })
        .and_then(from_file)
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
