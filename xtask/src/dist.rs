//! `cargo xtask dist`: `target/dist/styxy_<version>_amd64.deb`, the package a user installs.
//!
//! Its files are exactly what `styxy install --prefix /usr` stages (the binary with its eBPF
//! programs inside, the two shim libraries in `/usr/lib/styxy`, the systemd units) — one list of
//! files for both ways in — with the units moved where packages keep them (`/usr/lib/systemd`),
//! plus shell completions and man pages made by `styxy` itself, and the Debian files. It is put
//! together with `dpkg-deb` rather than cargo-deb so that the list stays `styxy install`'s: a
//! cargo-deb manifest would be a second list to keep in step. `lintian` checks it when present.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Maintainer scripts: systemd is told where it runs (PID 1), and nothing is attempted where it
/// does not; a daemon started by hand from the package stops with it.
const POSTINST: &str = r#"#!/bin/sh
set -e
if [ "$1" = "configure" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
    systemctl enable --now styxy-http.socket styxy-https.socket styxy.service >/dev/null 2>&1 || true
    # An upgrade: the running daemon makes way for the new one (kernel sessions stay pinned).
    systemctl try-restart styxy.service >/dev/null 2>&1 || true
fi
exit 0
"#;
/// On removal (not on an upgrade, which keeps the kernel sessions across the restart): the
/// daemon stops, and the programs it pinned for its sessions are detached.
const PRERM: &str = r#"#!/bin/sh
set -e
if [ "$1" = "remove" ] || [ "$1" = "deconfigure" ]; then
    if [ -d /run/systemd/system ]; then
        systemctl disable --now styxy.service styxy-http.socket styxy-https.socket >/dev/null 2>&1 || true
    fi
    # A daemon started by hand (no systemd) stops too.
    pkill -TERM -f '^/usr/bin/styxy daemon' >/dev/null 2>&1 || true
    rm -rf /sys/fs/bpf/styxy/var-lib-styxy
fi
exit 0
"#;
const POSTRM: &str = r#"#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
if [ "$1" = "purge" ]; then
    rm -rf /var/lib/styxy /run/styxy
fi
exit 0
"#;

/// Builds the package; its path.
pub fn dist(root: &Path) -> Result<PathBuf> {
    super::build_release(root)?;
    let version = workspace_version(root)?;
    let out = root.join("target/dist");
    let stage = out.join("stage");
    if stage.exists() {
        std::fs::remove_dir_all(&stage).with_context(|| format!("clearing {}", stage.display()))?;
    }
    std::fs::create_dir_all(&stage)?;
    let styxy = root.join("target/release/styxy");
    super::run(
        Command::new(&styxy)
            .args(["install", "--prefix", "/usr", "--root"])
            .arg(&stage),
    )?;
    // What `styxy uninstall` reads; dpkg keeps its own list.
    std::fs::remove_file(stage.join("usr/lib/styxy/install-manifest"))
        .context("the staged install manifest")?;
    let units = stage.join("usr/lib/systemd/system");
    std::fs::create_dir_all(&units)?;
    for unit in std::fs::read_dir(stage.join("etc/systemd/system"))? {
        let unit = unit?;
        std::fs::rename(unit.path(), units.join(unit.file_name()))?;
    }
    std::fs::remove_dir_all(stage.join("etc"))?;
    for binary in [
        "usr/bin/styxy",
        "usr/lib/styxy/libstyxy_preload.so",
        "usr/lib/styxy/libstyxy_shim_client.so",
    ] {
        super::run(
            Command::new("strip")
                .args([
                    "--strip-unneeded",
                    "--remove-section=.comment",
                    "--remove-section=.note",
                ])
                .arg(stage.join(binary)),
        )?;
    }

    let installed = stage.join("usr/bin/styxy");
    for (shell, place) in [
        ("bash", "usr/share/bash-completion/completions/styxy"),
        ("zsh", "usr/share/zsh/vendor-completions/_styxy"),
        ("fish", "usr/share/fish/vendor_completions.d/styxy.fish"),
    ] {
        let script = output(Command::new(&installed).args(["completions", shell]))?;
        write(&stage.join(place), script.as_bytes(), 0o644)?;
    }
    let man = stage.join("usr/share/man/man1");
    super::run(Command::new(&installed).arg("manpages").arg(&man))?;
    for page in std::fs::read_dir(&man)? {
        super::run(Command::new("gzip").args(["-9", "-n"]).arg(page?.path()))?;
    }
    let doc = stage.join("usr/share/doc/styxy");
    write(&doc.join("copyright"), copyright().as_bytes(), 0o644)?;
    let changelog = doc.join("changelog.gz");
    write(
        &changelog.with_extension(""),
        changelog_text(&version).as_bytes(),
        0o644,
    )?;
    super::run(
        Command::new("gzip")
            .args(["-9", "-n"])
            .arg(changelog.with_extension("")),
    )?;

    let debian = stage.join("DEBIAN");
    let size_kb = disk_usage_kb(&stage)?;
    let glibc = needed_glibc(&[
        installed.clone(),
        stage.join("usr/lib/styxy/libstyxy_shim_client.so"),
    ])?;
    write(
        &debian.join("control"),
        control(&version, size_kb, &glibc).as_bytes(),
        0o644,
    )?;
    write(&debian.join("postinst"), POSTINST.as_bytes(), 0o755)?;
    write(&debian.join("prerm"), PRERM.as_bytes(), 0o755)?;
    write(&debian.join("postrm"), POSTRM.as_bytes(), 0o755)?;

    let package = out.join(format!("styxy_{version}_amd64.deb"));
    super::run(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&stage)
            .arg(&package),
    )?;
    if Command::new("lintian").arg("--version").output().is_ok() {
        super::run(
            Command::new("lintian")
                .args(["--fail-on", "error", "--suppress-tags", "no-manual-page"])
                .arg(&package),
        )
        .context("lintian found errors in the package")?;
    } else {
        eprintln!(
            "xtask: lintian is not installed (apt-get install lintian): the package is not checked"
        );
    }
    println!("xtask: {}", package.display());
    Ok(package)
}

/// `[workspace.package] version` from the root Cargo.toml: the one version of everything.
fn workspace_version(root: &Path) -> Result<String> {
    let manifest = std::fs::read_to_string(root.join("Cargo.toml"))?;
    let mut in_package = false;
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_package = line == "[workspace.package]";
        } else if in_package {
            if let Some(value) = line.strip_prefix("version") {
                let value = value.trim_start().trim_start_matches('=').trim();
                return Ok(value.trim_matches('"').to_string());
            }
        }
    }
    bail!("no version in [workspace.package] of Cargo.toml")
}

/// The highest `GLIBC_x.y` symbol version the binaries need (their `Depends: libc6 (>= x.y)`).
fn needed_glibc(binaries: &[PathBuf]) -> Result<String> {
    let mut highest = (2u32, 17u32);
    for binary in binaries {
        let symbols = output(Command::new("objdump").arg("-T").arg(binary))?;
        for word in symbols.split_whitespace() {
            let version = word.trim_start_matches('(').trim_end_matches(')');
            if let Some((major, minor)) = version
                .strip_prefix("GLIBC_")
                .and_then(|v| v.split_once('.'))
            {
                let minor = minor.split('.').next().unwrap_or(minor);
                if let (Ok(major), Ok(minor)) = (major.parse(), minor.parse()) {
                    highest = highest.max((major, minor));
                }
            }
        }
    }
    Ok(format!("{}.{}", highest.0, highest.1))
}

fn control(version: &str, size_kb: u64, glibc: &str) -> String {
    format!(
        "Package: styxy\n\
         Version: {version}\n\
         Architecture: amd64\n\
         Maintainer: Styxy developers <styxy@users.noreply.github.com>\n\
         Installed-Size: {size_kb}\n\
         Depends: libc6 (>= {glibc})\n\
         Section: net\n\
         Priority: optional\n\
         Homepage: https://styxy.localhost/\n\
         Description: port broker for machines running many dev servers and agents\n \
         Styxy keeps dev servers and AI coding agents that run side by side from\n \
         fighting over ports: a bind to a taken port moves to a free one (in the\n \
         kernel, through eBPF programs built into the binary, and through an\n \
         LD_PRELOAD shim), each agent session reaches its own servers at the ports\n \
         it asked for, and every server gets a name such as\n \
         https://storybook.feature-x.localhost through a local proxy.\n"
    )
}

fn copyright() -> String {
    "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
     Upstream-Name: styxy\n\n\
     Files: *\n\
     Copyright: 2026 Styxy developers\n\
     License: MIT or Apache-2.0\n \
     Styxy may be used under the terms of the MIT license or of the Apache\n \
     License, Version 2.0, at your option.\n \
     .\n \
     On Debian systems the Apache License 2.0 is in\n \
     /usr/share/common-licenses/Apache-2.0.\n"
        .to_string()
}

/// The package's changelog: one entry, dated by the last commit (so two builds of one commit
/// make the same file).
fn changelog_text(version: &str) -> String {
    let date = output(Command::new("git").args(["log", "-1", "--format=%aD"]))
        .map(|d| d.trim().to_string())
        .unwrap_or_else(|_| "Thu, 01 Jan 1970 00:00:00 +0000".to_string());
    format!(
        "styxy ({version}) unstable; urgency=medium\n\n  * Built by `cargo xtask dist`.\n\n \
         -- Styxy developers <styxy@users.noreply.github.com>  {date}\n"
    )
}

fn disk_usage_kb(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            disk_usage_kb(&entry.path())? * 1024
        } else {
            meta.len()
        };
    }
    Ok(total.div_ceil(1024))
}

fn write(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn output(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("running {:?}", command.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}",
            command.get_program(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
