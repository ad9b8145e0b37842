//! The NSS databases browsers read: Chromium's (`~/.pki/nssdb`, made when missing, as
//! Chromium would at its first start) and each Firefox profile's, changed with NSS's own
//! `certutil` (Debian's libnss3-tools) under the nickname `Styxy local CA <fingerprint>`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::system::find_program;
use super::{Authority, Change, Outcome, StoreOwner};

/// One database: what reads it, and where it is.
struct Database {
    reader: String,
    dir: PathBuf,
}

/// The databases of `owner`'s browsers; Chromium's is listed even when it does not exist yet.
fn databases(owner: &StoreOwner) -> Vec<Database> {
    let home = &owner.home;
    let mut found = vec![Database {
        reader: "Chromium and Chrome".into(),
        dir: home.join(".pki/nssdb"),
    }];
    let snap_chromium = home.join("snap/chromium/current/.pki/nssdb");
    if snap_chromium.join("cert9.db").is_file() {
        found.push(Database {
            reader: "Chromium (snap)".into(),
            dir: snap_chromium,
        });
    }
    for profiles in [
        home.join(".mozilla/firefox"),
        home.join("snap/firefox/common/.mozilla/firefox"),
    ] {
        let Ok(entries) = std::fs::read_dir(&profiles) else {
            continue;
        };
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("cert9.db").is_file())
            .collect();
        dirs.sort();
        for dir in dirs {
            let profile = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            found.push(Database {
                reader: format!("Firefox profile {profile}"),
                dir,
            });
        }
    }
    found
}

fn nickname(authority: &Authority) -> String {
    format!(
        "Styxy local CA {}",
        authority
            .fingerprint
            .get(..16)
            .unwrap_or(&authority.fingerprint)
    )
}

/// Adds the authority to every browser database of `owner`.
pub fn add(authority: &Authority, owner: &StoreOwner) -> Vec<Outcome> {
    let Some(certutil) = find_program("certutil") else {
        return vec![missing_certutil(owner)];
    };
    let nickname = nickname(authority);
    databases(owner)
        .into_iter()
        .map(|db| {
            let result = add_to(&certutil, &db, &nickname, authority, owner);
            Outcome {
                store: db.reader,
                path: db.dir,
                result,
            }
        })
        .collect()
}

/// Removes the authority from every browser database of `owner` that has it.
pub fn remove(authority: &Authority, owner: &StoreOwner) -> Vec<Outcome> {
    let Some(certutil) = find_program("certutil") else {
        return vec![missing_certutil(owner)];
    };
    let nickname = nickname(authority);
    databases(owner)
        .into_iter()
        .filter(|db| db.dir.join("cert9.db").is_file())
        .map(|db| {
            let result = if !holds(&certutil, &db.dir, &nickname) {
                Change::AlreadyDone
            } else {
                match run(&certutil, &db.dir, &["-D", "-n", &nickname], None) {
                    Ok(()) => Change::Changed,
                    Err(e) => Change::Failed(e),
                }
            };
            Outcome {
                store: db.reader,
                path: db.dir,
                result,
            }
        })
        .collect()
}

fn add_to(
    certutil: &Path,
    db: &Database,
    nickname: &str,
    authority: &Authority,
    owner: &StoreOwner,
) -> Change {
    if !db.dir.join("cert9.db").is_file() {
        if let Err(e) = create(certutil, &db.dir, owner) {
            return Change::Failed(e);
        }
    }
    if holds(certutil, &db.dir, nickname) {
        return Change::AlreadyDone;
    }
    // Trusted to issue server certificates (`C`), not mail or code signing.
    match run(
        certutil,
        &db.dir,
        &["-A", "-t", "C,,", "-n", nickname, "-a"],
        Some(authority.certificate_pem.as_bytes()),
    ) {
        Ok(()) => Change::Changed,
        Err(e) => Change::Failed(e),
    }
}

/// Makes an empty database (no password), owned by `owner`, as Chromium makes its own.
fn create(certutil: &Path, dir: &Path, owner: &StoreOwner) -> Result<(), String> {
    let mut made = Vec::new();
    let mut missing = Some(dir);
    while let Some(d) = missing.filter(|d| !d.exists()) {
        made.push(d.to_path_buf());
        missing = d.parent();
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    run(certutil, dir, &["-N", "--empty-password"], None)?;
    // Made by root for a user (`sudo styxy trust`): the user's, like the rest of their home.
    let files = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    for path in made.iter().chain(files.iter()) {
        let _ = std::os::unix::fs::chown(path, Some(owner.uid), Some(owner.gid));
    }
    Ok(())
}

/// Whether the database holds a certificate under `nickname`.
fn holds(certutil: &Path, dir: &Path, nickname: &str) -> bool {
    run(certutil, dir, &["-L", "-n", nickname], None).is_ok()
}

/// Runs certutil on the database in `dir`, with `input` on its standard input.
fn run(certutil: &Path, dir: &Path, args: &[&str], input: Option<&[u8]>) -> Result<(), String> {
    let mut child = Command::new(certutil)
        .arg("-d")
        .arg(format!("sql:{}", dir.display()))
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running {}: {e}", certutil.display()))?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(input)
            .map_err(|e| format!("writing to certutil: {e}"))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|e| format!("waiting for certutil: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "certutil {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

fn missing_certutil(owner: &StoreOwner) -> Outcome {
    Outcome {
        store: "browsers (NSS)".into(),
        path: owner.home.join(".pki/nssdb"),
        result: Change::Skipped(
            "certutil is not installed: `sudo apt install libnss3-tools` (Debian, Ubuntu) or \
             `sudo dnf install nss-tools` (Fedora), then run this again for Chromium and Firefox"
                .into(),
        ),
    }
}
