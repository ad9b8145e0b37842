//! Kernel sessions that outlive the daemon: every map of the contract and every link pinned in
//! bpffs (where, see `styxy_common::pins`), so the programs keep enforcing the sessions while no
//! daemon runs — in-session clients still reach their own servers, binds of held ports still
//! move — and the next daemon takes the very same maps back.
//!
//! A start with the same object (a crash, `kill -9`, SIGTERM while a session lives) reuses the
//! pinned maps and hands every pinned link its newly loaded program: cgroup links atomically
//! (`BPF_LINK_UPDATE`: no moment without a program and none with two, which would redirect a
//! connection twice); tracepoint links, which cannot be updated, by attaching the new program
//! before the old one is unpinned (both only add and remove the same membership entries). A start
//! with another object (an upgrade) removes the old pins first — map layouts may differ — and
//! puts the sessions back from `/proc` as without pins.
//!
//! Links are pinned only while a session lives ([`ObserverLinks`], and the session programs,
//! which are attached only then): a daemon killed with no session live leaves no program
//! attached (its maps stay pinned until the next start, which finds no links and starts afresh).
//! A daemon that stops cleanly with no session live removes all its pins.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use aya::programs::links::{FdLink, PinnedLink};
use styxy_common::event::PROGRAMS_SOCK;
use styxy_common::pins::{pin_dir_of, unescape_path, BPFFS, PINS_ROOT};

/// bpffs's `statfs` magic number (`BPF_FS_MAGIC` in `linux/magic.h`).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// The `bpf` commands that open a pinned object and give a link another program (`enum bpf_cmd`).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// The pin directory of this daemon's state directory and object.
#[derive(Debug)]
pub struct Pins {
    dir: PathBuf,
    reused: bool,
}

impl Pins {
    /// Makes ready the pins of the daemon of `state_dir` for the object `object` (its bytes):
    /// mounts bpffs where it is not, removes the pins of other objects of this state directory
    /// and those of state directories that are gone, and says whether this object's pins are
    /// there to be reused (its maps and its observer's links, left by the last daemon).
    pub fn prepare(state_dir: &Path, object: &[u8]) -> Result<Pins> {
        if !aya::features().bpf_perf_link() {
            bail!("this kernel attaches tracepoints without BPF links (Linux < 5.15): nothing can be pinned");
        }
        mount_bpffs()?;
        remove_orphans();
        let state_dir = std::fs::canonicalize(state_dir)
            .with_context(|| format!("resolving {}", state_dir.display()))?;
        let own = pin_dir_of(&state_dir);
        let digest = object_digest(object);
        for entry in std::fs::read_dir(&own).into_iter().flatten().flatten() {
            if entry.file_name().to_str() != Some(digest.as_str()) {
                tracing::info!(pins = %entry.path().display(), "removing the pins of another build of the programs");
                remove(&entry.path());
            }
        }
        let dir = own.join(&digest);
        let complete = PROGRAMS_SOCK
            .iter()
            .all(|name| dir.join("links").join(name).exists())
            && dir
                .join("maps")
                .join(styxy_common::session::SESSIONS_MAP)
                .exists();
        if dir.exists() && !complete {
            // Half made (a daemon that died while it attached): nothing in it can be trusted.
            remove(&dir);
        }
        for sub in ["maps", "links"] {
            make_private_dir(&dir.join(sub))?;
        }
        mark_mount_namespace(&dir);
        Ok(Pins {
            dir,
            reused: complete,
        })
    }

    /// Whether the maps and links of the last daemon were found (and are reused).
    pub fn reused(&self) -> bool {
        self.reused
    }

    /// Where map `name` is pinned.
    pub fn map_path(&self, name: &str) -> PathBuf {
        self.dir.join("maps").join(name)
    }

    fn link_path(&self, name: &str) -> PathBuf {
        self.dir.join("links").join(name)
    }

    /// The directory of all this daemon's pins.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// A link the daemon holds: pinned (it stays attached when the daemon ends) or not (it detaches
/// with the daemon, as every link did before pins).
#[derive(Debug)]
pub enum HeldLink {
    Pinned(PinnedLink),
    /// Held only so that it stays attached (dropping it detaches).
    Unpinned {
        _link: FdLink,
    },
}

impl HeldLink {
    /// Detaches it: unpinned, then closed.
    pub fn detach(self) -> Result<()> {
        match self {
            HeldLink::Pinned(link) => {
                link.unpin().context("unpinning a link")?;
            }
            HeldLink::Unpinned { .. } => {}
        }
        Ok(())
    }
}

impl HeldLink {
    /// Pinned at `path` from now on (it was not: `self` as it was else).
    fn pinned_at(self, path: &Path) -> Result<HeldLink> {
        match self {
            HeldLink::Unpinned { _link } => {
                // aya's pin drops the link when it fails: nothing stale may be in its way.
                let _ = std::fs::remove_file(path);
                pin(_link, path)
            }
            pinned => Ok(pinned),
        }
    }

    /// Not pinned any more (still attached while held).
    fn unpinned(self) -> Result<HeldLink> {
        match self {
            HeldLink::Pinned(link) => Ok(HeldLink::Unpinned {
                _link: link.unpin().context("unpinning a link")?,
            }),
            unpinned => Ok(unpinned),
        }
    }
}

/// The observer's links (post_bind4|6, sock_release). They need to outlive the daemon only while
/// a kernel session lives (to keep the per-port counts the sessions' bind programs read true), so
/// they are pinned while one does and unpinned when the last ends: a daemon killed with no
/// session live leaves no program attached.
pub struct ObserverLinks {
    pins: Option<Arc<Pins>>,
    links: Mutex<Vec<(&'static str, Option<HeldLink>)>>,
}

impl ObserverLinks {
    pub fn new(pins: Option<Arc<Pins>>, links: Vec<(&'static str, HeldLink)>) -> ObserverLinks {
        ObserverLinks {
            pins,
            links: Mutex::new(links.into_iter().map(|(n, l)| (n, Some(l))).collect()),
        }
    }

    /// Pins every one (a session is about to go live).
    pub fn pin(&self) -> Result<()> {
        let Some(pins) = &self.pins else {
            return Ok(());
        };
        self.change(|name, link| link.pinned_at(&pins.link_path(name)))
    }

    /// Unpins every one (no session is live any more).
    pub fn unpin(&self) -> Result<()> {
        self.change(|_, link| link.unpinned())
    }

    fn change(&self, how: impl Fn(&str, HeldLink) -> Result<HeldLink>) -> Result<()> {
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        for (name, slot) in links.iter_mut() {
            if let Some(link) = slot.take() {
                // A link whose change failed is dropped: it detaches, and the error says so.
                *slot = Some(how(name, link).with_context(|| format!("the link of {name}"))?);
            }
        }
        Ok(())
    }
}

/// Program `name`, loaded with descriptor `program`, attached to a cgroup: the pinned link of the
/// last daemon given this program (atomically), else `attach()`'s new link (pinned when `pin`).
pub fn hold_cgroup_link(
    pins: Option<&Pins>,
    name: &str,
    program: BorrowedFd<'_>,
    pin_new: bool,
    attach: impl FnOnce() -> Result<FdLink>,
) -> Result<HeldLink> {
    let Some(pins) = pins else {
        return Ok(HeldLink::Unpinned { _link: attach()? });
    };
    let path = pins.link_path(name);
    if path.exists() {
        match open_pinned(&path).and_then(|link| update_link(link.as_fd(), program)) {
            Ok(()) => {
                return PinnedLink::from_pin(&path)
                    .map(HeldLink::Pinned)
                    .with_context(|| format!("opening {}", path.display()));
            }
            Err(e) => tracing::warn!(program = name, cause = %e,
                "the pinned link could not take the new program: attaching a new one"),
        }
        let _ = std::fs::remove_file(&path);
    }
    let link = attach()?;
    if pin_new {
        pin(link, &path)
    } else {
        Ok(HeldLink::Unpinned { _link: link })
    }
}

/// A tracepoint or LSM program `name` (attached to the kernel, not to a cgroup): a new link from
/// `attach()`, pinned as `name@N`; then the pinned links of the last daemon for it are unpinned
/// (they detach). Both run meanwhile, on the same maps.
pub fn hold_numbered_link(
    pins: Option<&Pins>,
    name: &str,
    attach: impl FnOnce() -> Result<FdLink>,
) -> Result<HeldLink> {
    let link = attach()?;
    let Some(pins) = pins else {
        return Ok(HeldLink::Unpinned { _link: link });
    };
    let prefix = format!("{name}@");
    let old: Vec<(u64, PathBuf)> = std::fs::read_dir(pins.dir.join("links"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let generation = e
                .file_name()
                .to_str()?
                .strip_prefix(&prefix)?
                .parse()
                .ok()?;
            Some((generation, e.path()))
        })
        .collect();
    let next = old.iter().map(|(g, _)| g + 1).max().unwrap_or(0);
    let held = pin(link, &pins.link_path(&format!("{prefix}{next}")))?;
    for (_, path) in old {
        let _ = std::fs::remove_file(path);
    }
    Ok(held)
}

/// Unpins every link of program `name` a daemon before this one left (`name@N`, see
/// [`hold_numbered_link`]): the kernel detaches each when nothing else holds it.
pub fn remove_links(pins: &Pins, name: &str) {
    let prefix = format!("{name}@");
    for entry in std::fs::read_dir(pins.dir.join("links"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(&prefix))
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Whether pinned links of tracepoint program `name` are there (the session programs were
/// attached when the last daemon ended).
pub fn has_tracepoint_link(pins: &Pins, name: &str) -> bool {
    let prefix = format!("{name}@");
    std::fs::read_dir(pins.dir.join("links"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(&prefix))
        })
}

fn pin(link: FdLink, path: &Path) -> Result<HeldLink> {
    link.pin(path)
        .map(HeldLink::Pinned)
        .with_context(|| format!("pinning a link at {}", path.display()))
}

/// `BPF_OBJ_GET`: a descriptor of the object pinned at `path`.
fn open_pinned(path: &Path) -> std::io::Result<OwnedFd> {
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let attr = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: `attr` is the `obj_get` member of `union bpf_attr`; `path`, a NUL-terminated
    // string, outlives the call.
    let fd = unsafe { bpf(BPF_OBJ_GET, &attr) }?;
    // SAFETY: a new descriptor, ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_LINK_UPDATE`: `link` runs `program` from now on, in one step.
fn update_link(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> std::io::Result<()> {
    #[repr(C)]
    struct LinkUpdateAttr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: `attr` is the `link_update` member of `union bpf_attr`, with two descriptors.
    unsafe { bpf(BPF_LINK_UPDATE, &attr) }.map(drop)
}

/// The `bpf` system call `command` with `attr`; what it returned.
///
/// # Safety
/// `attr` is the member of `union bpf_attr` that `command` reads, and any pointer in it is valid
/// for the call (the size passed is its own: the kernel treats the rest of the union as zero).
unsafe fn bpf<A>(command: libc::c_long, attr: &A) -> std::io::Result<libc::c_long> {
    // SAFETY: as the caller promised.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            std::ptr::from_ref(attr),
            std::mem::size_of::<A>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

/// Removes what an earlier daemon of `state_dir` left pinned in bpffs (only root can; others
/// never pinned anything).
pub fn remove_left_behind(state_dir: &std::path::Path) {
    if !styxy_common::paths::is_root() {
        return;
    }
    let Ok(state_dir) = std::fs::canonicalize(state_dir) else {
        return;
    };
    match styxy_common::pins::remove_pins_of(&state_dir) {
        Ok(true) => {
            tracing::info!("the kernel programs an earlier daemon left pinned are detached")
        }
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(cause = %e, "removing the kernel programs an earlier daemon left pinned")
        }
    }
}

/// Mounts bpffs at `/sys/fs/bpf` unless it is mounted there (systemd mounts it at boot; minimal
/// systems may not).
fn mount_bpffs() -> Result<()> {
    // SAFETY: a zeroed statfs is a valid out-parameter; the path is NUL-terminated.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::statfs(c"/sys/fs/bpf".as_ptr(), &mut stat) };
    if rc == 0 && stat.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    if let Err(e) = super::object::mount_kernel_fs(c"bpf", c"/sys/fs/bpf") {
        bail!("bpffs is not mounted at {BPFFS} and mounting it failed: {e}");
    }
    tracing::info!("mounted bpffs at {BPFFS} (for the pinned kernel sessions)");
    Ok(())
}

/// The start of the name of the directory, beside `maps` and `links`, that records the mount
/// namespace of the daemon that made a build's pins (`mount-namespace-4026531841`): bpffs holds
/// only directories and pinned objects, so the record is a name.
const MOUNT_NAMESPACE_MARK: &str = "mount-namespace-";

/// The mount namespace of process `pid` (`self` for this one), as its inode number.
fn mount_namespace(pid: &str) -> Option<String> {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok()?;
    let inode = link.to_str()?.strip_prefix("mnt:[")?.strip_suffix(']')?;
    Some(inode.to_string())
}

/// Records in `build_dir` the mount namespace this daemon runs in (see [`remove_orphans`]),
/// replacing the last daemon's record (a service with `PrivateTmp` gets a new namespace at each
/// start).
fn mark_mount_namespace(build_dir: &Path) {
    let Some(namespace) = mount_namespace("self") else {
        return;
    };
    let mark = format!("{MOUNT_NAMESPACE_MARK}{namespace}");
    for entry in std::fs::read_dir(build_dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let stale = name
            .to_str()
            .is_some_and(|n| n.starts_with(MOUNT_NAMESPACE_MARK) && n != mark);
        if stale {
            let _ = std::fs::remove_dir(entry.path());
        }
    }
    if let Err(e) = make_private_dir(&build_dir.join(&mark)) {
        tracing::warn!(cause = %format!("{e:#}"), "recording the mount namespace of the pins");
    }
}

/// The mount namespace recorded in a build's pin directory, when one is.
fn recorded_mount_namespace(build_dir: &Path) -> Option<String> {
    std::fs::read_dir(build_dir)
        .ok()?
        .flatten()
        .find_map(|entry| {
            let name = entry.file_name();
            Some(
                name.to_str()?
                    .strip_prefix(MOUNT_NAMESPACE_MARK)?
                    .to_string(),
            )
        })
}

/// Removes the pins of state directories that no longer exist (a test's, a removed user's): no
/// daemon can ever come back for them. "No longer exist" must hold for the daemon that made
/// them: a daemon in a sandbox of its own (systemd's `PrivateTmp`, `ProtectHome`) sees other
/// directories than one outside it. So a state directory's pins go when each of its builds was
/// pinned by a daemon in this daemon's mount namespace (each build records it), or — builds
/// pinned before that record, or where it could not be made — when this daemon shares pid 1's
/// mount namespace, the machine's own. Where pid 1's cannot be read (a container's init that
/// hides it), the record alone decides.
fn remove_orphans() {
    let Some(own) = mount_namespace("self") else {
        return;
    };
    let machines = mount_namespace("1").is_some_and(|init| init == own);
    for entry in std::fs::read_dir(PINS_ROOT).into_iter().flatten().flatten() {
        let Some(state_dir) = entry.file_name().to_str().and_then(unescape_path) else {
            continue;
        };
        if state_dir.exists() {
            continue;
        }
        let same_view = std::fs::read_dir(entry.path())
            .into_iter()
            .flatten()
            .flatten()
            .all(|build| match recorded_mount_namespace(&build.path()) {
                Some(namespace) => namespace == own,
                None => machines,
            });
        if same_view {
            tracing::info!(pins = %entry.path().display(), "removing the pins of a state directory that is gone");
            remove(&entry.path());
        }
    }
}

fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_dir_all(path) {
        tracing::warn!(pins = %path.display(), cause = %e, "removing pins");
    }
}

fn make_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("making {}", dir.display()))
}

/// The first 16 hex digits of the object's SHA-256: builds with other maps never share pins.
fn object_digest(object: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, object);
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_that_differ_get_other_directories() {
        assert_eq!(object_digest(b"a"), object_digest(b"a"));
        assert_ne!(object_digest(b"a"), object_digest(b"a\0"));
        assert_eq!(object_digest(b"").len(), 16);
    }
}
