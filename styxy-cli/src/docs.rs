//! Shell completions (`styxy completions SHELL`, by `clap_complete`) and man pages (`styxy
//! manpages DIR`, by `clap_mangen`), both made from the command line's own definition, so they
//! never fall behind it. The package ships their output (see `cargo xtask dist`).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Writes `shell`'s completion script for `styxy` to `out`. (Made in memory first: the generator
/// panics when its writer fails, and a reader that stops early — `| head` — is no error.)
pub fn completions(shell: clap_complete::Shell, out: &mut dyn Write) -> Result<()> {
    let mut command = super::command_line();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, "styxy", &mut script);
    match out.write_all(&script).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("writing the completion script")
        }
        _ => Ok(()),
    }
}

/// Writes `styxy.1` and one page per command and subcommand (`styxy-hook-install.1`) into `dir`
/// (made if missing); the files written, in order.
pub fn manpages(dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    let mut command = super::command_line();
    command.build();
    write_pages(&command, "styxy", dir, &mut written)?;
    Ok(written)
}

/// The page of `command` (named `name`: `styxy-hook`), then those of its subcommands.
fn write_pages(
    command: &clap::Command,
    name: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> Result<()> {
    // A page's title and NAME are its full name (`styxy-hook-install`), as `man styxy-hook-install` finds it.
    let page = command.clone().name(name.to_string());
    let path = dir.join(format!("{name}.1"));
    let mut out = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut out)
        .with_context(|| format!("rendering the page of {name}"))?;
    std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    written.push(path);
    for sub in command.get_subcommands() {
        if sub.get_name() == "help" {
            continue;
        }
        write_pages(sub, &format!("{name}-{}", sub.get_name()), dir, written)?;
    }
    Ok(())
}
