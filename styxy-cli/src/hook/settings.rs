//! `styxy hook install|uninstall`: adds Styxy's three Claude Code hooks (SessionStart,
//! PreToolUse and PostToolUse for Bash, SessionEnd) and its MCP server to the files Claude Code reads, and takes
//! exactly them away again.
//!
//! - User scope (the default): hooks in `~/.claude/settings.json` (or `--settings FILE`), the MCP
//!   server in `~/.claude.json` (`mcpServers.styxy`, as `claude mcp add --scope user` does).
//! - Project scope (`--project DIR`): hooks in `DIR/.claude/settings.json`, the MCP server in
//!   `DIR/.mcp.json`, approved for the project by `enabledMcpjsonServers` in those settings.
//!
//! The edits are made on the parsed JSON (key order kept), so the user's other settings stay as
//! they were. So that `uninstall` gives back the file byte for byte — not just the same JSON — the
//! first install keeps the file's original bytes under `$XDG_STATE_HOME/styxy/claude-settings/`;
//! uninstall writes them back when, without Styxy's entries, the file still says what they say
//! (otherwise, the user changed it since, it writes the JSON without Styxy's entries). Files are
//! replaced by a rename, keep their permissions (`~/.claude.json` is private), and a symlinked
//! settings file (a dotfiles repository) is written through its link.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

use crate::preload;

/// The hooks Styxy adds: (Claude Code event, matcher, `styxy hook …` argument).
pub const HOOKS: [(&str, Option<&str>, &str); 4] = [
    ("SessionStart", None, "session-start"),
    ("PreToolUse", Some("Bash"), "pre-tool-use"),
    ("PostToolUse", Some("Bash"), "post-tool-use"),
    ("SessionEnd", None, "session-end"),
];
/// The name of Styxy's MCP server in Claude Code's configuration.
pub const MCP_NAME: &str = "styxy";

/// Where `install` writes.
#[derive(Clone, Debug)]
pub struct Places {
    /// The settings file that gets the hooks.
    pub settings: PathBuf,
    /// The file that gets the MCP server (`~/.claude.json` or `DIR/.mcp.json`).
    pub mcp: PathBuf,
    /// Project scope: the settings also approve the project's `.mcp.json` server.
    pub project: bool,
}

impl Places {
    /// User scope: `settings` (default `~/.claude/settings.json`) and `~/.claude.json`.
    pub fn user(settings: Option<PathBuf>) -> Result<Places> {
        let home = std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(PathBuf::from)
            .context("HOME is not set; give --settings FILE or --project DIR")?;
        Ok(Places {
            settings: settings.unwrap_or_else(|| home.join(".claude/settings.json")),
            mcp: home.join(".claude.json"),
            project: false,
        })
    }

    /// Project scope: `dir/.claude/settings.json` (or `settings`) and `dir/.mcp.json`.
    pub fn project(dir: &Path, settings: Option<PathBuf>) -> Places {
        Places {
            settings: settings.unwrap_or_else(|| dir.join(".claude/settings.json")),
            mcp: dir.join(".mcp.json"),
            project: true,
        }
    }
}

/// The command line of hook `arg` for binary `exe`.
fn hook_command(exe: &str, arg: &str) -> String {
    format!("{} hook {arg}", preload::shell_quote(exe))
}

fn is_our_hook(hook: &Value, arg: &str) -> bool {
    hook.get("command")
        .and_then(Value::as_str)
        .is_some_and(|c| c.contains("styxy") && c.trim_end().ends_with(&format!(" hook {arg}")))
}

fn object<'a>(value: &'a mut Value, what: &str) -> Result<&'a mut Map<String, Value>> {
    value
        .as_object_mut()
        .with_context(|| format!("{what} is not a JSON object; fix it first, nothing was changed"))
}

/// Adds Styxy's hooks (run by `exe`) to `settings`; false when all are there already.
pub fn add_hooks(settings: &mut Value, exe: &str) -> Result<bool> {
    let root = object(settings, "the settings file")?;
    let hooks = root.entry("hooks").or_insert_with(|| json!({}));
    let hooks = object(hooks, "`hooks` in the settings")?;
    let mut changed = false;
    for (event, matcher, arg) in HOOKS {
        let groups = hooks.entry(event).or_insert_with(|| json!([]));
        let Some(groups) = groups.as_array_mut() else {
            bail!("`hooks.{event}` in the settings is not an array; fix it first, nothing was changed");
        };
        // Present already: kept, but pointed at this binary (styxy moved, say from
        // target/release to /usr/local/bin, and the old path would run a stale or missing one).
        let command = hook_command(exe, arg);
        let mut present = false;
        for hook in groups
            .iter_mut()
            .filter_map(|g| g.get_mut("hooks").and_then(Value::as_array_mut))
            .flatten()
            .filter(|h| is_our_hook(h, arg))
        {
            present = true;
            if hook.get("command").and_then(Value::as_str) != Some(command.as_str()) {
                hook["command"] = json!(command);
                changed = true;
            }
        }
        if present {
            continue;
        }
        let mut group = Map::new();
        if let Some(matcher) = matcher {
            group.insert("matcher".into(), json!(matcher));
        }
        group.insert(
            "hooks".into(),
            json!([{ "type": "command", "command": hook_command(exe, arg) }]),
        );
        groups.push(Value::Object(group));
        changed = true;
    }
    Ok(changed)
}

/// Removes Styxy's hooks (only them) and the containers they leave empty; false when absent.
pub fn remove_hooks(settings: &mut Value) -> bool {
    let Some(hooks) = settings.get_mut("hooks").and_then(Value::as_object_mut) else {
        return false;
    };
    let mut removed = false;
    for (event, _, arg) in HOOKS {
        let Some(groups) = hooks.get_mut(event).and_then(Value::as_array_mut) else {
            continue;
        };
        let mut removed_here = false;
        for group in groups.iter_mut() {
            if let Some(hs) = group.get_mut("hooks").and_then(Value::as_array_mut) {
                let before = hs.len();
                hs.retain(|h| !is_our_hook(h, arg));
                removed_here |= hs.len() != before;
            }
        }
        if removed_here {
            groups.retain(|g| {
                g.get("hooks")
                    .and_then(Value::as_array)
                    .is_none_or(|hs| !hs.is_empty())
            });
            if groups.is_empty() {
                hooks.shift_remove(event);
            }
        }
        removed |= removed_here;
    }
    if removed && hooks.is_empty() {
        if let Some(root) = settings.as_object_mut() {
            root.shift_remove("hooks");
        }
    }
    removed
}

fn is_our_server(server: &Value) -> bool {
    server
        .get("command")
        .and_then(Value::as_str)
        .is_some_and(|c| c.contains("styxy"))
        && server
            .get("args")
            .and_then(Value::as_array)
            .is_some_and(|a| a.first().and_then(Value::as_str) == Some("mcp"))
}

/// Adds Styxy's MCP server (`exe mcp`) to `config`'s `mcpServers`; false when it is there.
pub fn add_mcp_server(config: &mut Value, exe: &str) -> Result<bool> {
    let root = object(config, "the MCP configuration file")?;
    let servers = root.entry("mcpServers").or_insert_with(|| json!({}));
    let servers = object(servers, "`mcpServers`")?;
    match servers.get(MCP_NAME) {
        Some(existing) if is_our_server(existing) => {
            // Pointed at this binary, as the hooks are.
            if existing.get("command").and_then(Value::as_str) == Some(exe) {
                return Ok(false);
            }
            if let Some(server) = servers.get_mut(MCP_NAME) {
                server["command"] = json!(exe);
            }
            Ok(true)
        }
        Some(_) => bail!(
            "an MCP server named `{MCP_NAME}` that is not Styxy's is configured already; \
             rename or remove it, nothing was changed"
        ),
        None => {
            servers.insert(
                MCP_NAME.into(),
                json!({ "type": "stdio", "command": exe, "args": ["mcp"], "env": {} }),
            );
            Ok(true)
        }
    }
}

/// Removes Styxy's MCP server (only it, and `mcpServers` when it leaves it empty).
pub fn remove_mcp_server(config: &mut Value) -> bool {
    let Some(servers) = config.get_mut("mcpServers").and_then(Value::as_object_mut) else {
        return false;
    };
    if !servers.get(MCP_NAME).is_some_and(is_our_server) {
        return false;
    }
    servers.shift_remove(MCP_NAME);
    if servers.is_empty() {
        if let Some(root) = config.as_object_mut() {
            root.shift_remove("mcpServers");
        }
    }
    true
}

/// Approves the project's `.mcp.json` server `styxy` in project settings.
fn approve_project_server(settings: &mut Value) -> Result<bool> {
    let root = object(settings, "the settings file")?;
    let approved = root
        .entry("enabledMcpjsonServers")
        .or_insert_with(|| json!([]));
    let Some(approved) = approved.as_array_mut() else {
        bail!("`enabledMcpjsonServers` in the settings is not an array; fix it first, nothing was changed");
    };
    if approved.iter().any(|v| v == MCP_NAME) {
        return Ok(false);
    }
    approved.push(json!(MCP_NAME));
    Ok(true)
}

fn withdraw_project_server(settings: &mut Value) -> bool {
    let Some(approved) = settings
        .get_mut("enabledMcpjsonServers")
        .and_then(Value::as_array_mut)
    else {
        return false;
    };
    let before = approved.len();
    approved.retain(|v| v != MCP_NAME);
    let removed = approved.len() != before;
    if removed && approved.is_empty() {
        if let Some(root) = settings.as_object_mut() {
            root.shift_remove("enabledMcpjsonServers");
        }
    }
    removed
}

/// The largest settings file read (Claude Code's own are a few KiB).
const SETTINGS_MAX_BYTES: u64 = 16 << 20;

/// A settings file's bytes, `None` when it does not exist. Only a regular file is read: a FIFO
/// (which would block the read until someone writes), a device or a directory at that path is an
/// error that names it, as is a file over [`SETTINGS_MAX_BYTES`].
fn read_settings_file(path: &Path) -> Result<Option<Vec<u8>>> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let meta = file
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?;
    if !meta.is_file() {
        bail!(
            "{} is not a regular file (a pipe, device or directory); move it aside or point \
             --settings at the settings file; nothing was changed",
            path.display()
        );
    }
    if meta.len() > SETTINGS_MAX_BYTES {
        bail!(
            "{} is {} bytes, more than a settings file holds ({SETTINGS_MAX_BYTES}); nothing was changed",
            path.display(),
            meta.len()
        );
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(SETTINGS_MAX_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(bytes))
}

/// A JSON file Claude Code reads, as it is on disk.
struct JsonFile {
    /// Where it is written (a symlink's target).
    path: PathBuf,
    /// Its bytes, `None` when it does not exist.
    original: Option<Vec<u8>>,
    value: Value,
}

impl JsonFile {
    fn load(path: &Path) -> Result<JsonFile> {
        // Through a symlink: the link stays, its target gets the change.
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let original = read_settings_file(&path)?;
        let value = match &original {
            Some(bytes) if !bytes.iter().all(u8::is_ascii_whitespace) => {
                serde_json::from_slice(bytes).with_context(|| {
                    format!(
                        "{} is not valid JSON; fix it first, nothing was changed",
                        path.display()
                    )
                })?
            }
            _ => json!({}),
        };
        Ok(JsonFile {
            path,
            original,
            value,
        })
    }

    /// Writes `text` over the file by a rename, with the file's permissions (0600 for a new one:
    /// these files may hold credentials).
    fn write(&self, bytes: &[u8]) -> Result<()> {
        let path = &self.path;
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mode = std::fs::metadata(path).map_or(0o600, |m| m.permissions().mode() & 0o7777);
        crate::install::write_atomically(path, bytes, mode)
    }

    fn pretty(&self) -> Result<Vec<u8>> {
        Ok((serde_json::to_string_pretty(&self.value)? + "\n").into_bytes())
    }
}

/// Where the original bytes of the files `install` changed are kept until `uninstall`.
fn backup_dir() -> Result<PathBuf> {
    let state = std::env::var_os("XDG_STATE_HOME")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .map(|h| PathBuf::from(h).join(".local/state"))
        })
        .context("neither XDG_STATE_HOME nor HOME is set")?;
    Ok(state.join("styxy/claude-settings"))
}

/// The backup's name for `path`: the path with `%` and `/` escaped.
fn backup_name(path: &Path) -> String {
    path.to_string_lossy()
        .replace('%', "%25")
        .replace('/', "%2F")
}

/// A backup: the original bytes, or the one byte `-` for a file that did not exist (`+` before
/// the bytes of one that did).
fn save_backup(file: &JsonFile) -> Result<()> {
    let dir = backup_dir()?;
    let path = dir.join(backup_name(&file.path));
    if path.exists() {
        return Ok(()); // The first install's original is the one to give back.
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("securing {}", dir.display()))?;
    let mut bytes = Vec::new();
    match &file.original {
        Some(original) => {
            bytes.push(b'+');
            bytes.extend_from_slice(original);
        }
        None => bytes.push(b'-'),
    }
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode_private()
        .open(&path)
        .with_context(|| {
            format!(
                "keeping the original of {} in {}",
                file.path.display(),
                path.display()
            )
        })?;
    out.write_all(&bytes)
        .with_context(|| format!("writing {}", path.display()))
}

trait PrivateMode {
    fn mode_private(&mut self) -> &mut Self;
}

impl PrivateMode for std::fs::OpenOptions {
    fn mode_private(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt as _;
        self.mode(0o600)
    }
}

/// Writes `file` without Styxy's entries: its original bytes when they say the same, else the
/// JSON; a file that did not exist before and is empty now is removed.
fn restore(file: &JsonFile) -> Result<()> {
    let backup_path = backup_dir()?.join(backup_name(&file.path));
    let backup = std::fs::read(&backup_path).ok();
    let original: Option<Option<&[u8]>> = match backup.as_deref() {
        Some([b'-']) => Some(None),
        Some([b'+', rest @ ..]) => Some(Some(rest)),
        _ => None,
    };
    let same_as = |bytes: &[u8]| -> bool {
        let value = if bytes.iter().all(u8::is_ascii_whitespace) {
            Some(json!({}))
        } else {
            serde_json::from_slice::<Value>(bytes).ok()
        };
        value.as_ref() == Some(&file.value)
    };
    match original {
        Some(None) if file.value == json!({}) => {
            std::fs::remove_file(&file.path)
                .with_context(|| format!("removing {}", file.path.display()))?;
        }
        Some(Some(bytes)) if same_as(bytes) => file.write(bytes)?,
        _ => file.write(&file.pretty()?)?,
    }
    if backup.is_some() {
        let _ = std::fs::remove_file(&backup_path);
    }
    Ok(())
}

/// The styxy binary the hooks and the MCP server run (its canonical path).
fn styxy_exe() -> Result<String> {
    let exe = std::env::current_exe().context("finding the styxy binary")?;
    let exe = std::fs::canonicalize(&exe).unwrap_or(exe);
    Ok(exe.to_string_lossy().into_owned())
}

/// What `styxy hook install` put in one scope (read only; for `styxy doctor`).
pub struct Installed {
    /// The hooks of [`HOOKS`] missing from the settings file (by event name).
    pub missing_hooks: Vec<&'static str>,
    /// Whether the MCP server is configured.
    pub mcp_server: bool,
}

/// Reads which of Styxy's hooks and whether its MCP server are in `places` (nothing is written).
pub fn installed(places: &Places) -> Result<Installed> {
    let settings = JsonFile::load(&places.settings)?;
    let mcp = JsonFile::load(&places.mcp)?;
    let has_hook = |event: &str, arg: &str| {
        settings
            .value
            .pointer(&format!("/hooks/{event}"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|g| g.get("hooks").and_then(Value::as_array))
            .flatten()
            .any(|h| is_our_hook(h, arg))
    };
    let missing_hooks = HOOKS
        .iter()
        .filter(|(event, _, arg)| !has_hook(event, arg))
        .map(|(event, _, _)| *event)
        .collect();
    let mcp_server = mcp
        .value
        .pointer(&format!("/mcpServers/{MCP_NAME}"))
        .is_some();
    Ok(Installed {
        missing_hooks,
        mcp_server,
    })
}

/// `styxy hook install`: returns the lines to print.
pub fn install(places: &Places) -> Result<Vec<String>> {
    let exe = styxy_exe()?;
    // Both files are read and checked before either is written.
    let mut settings = JsonFile::load(&places.settings)?;
    let same_file = places.mcp == places.settings;
    let mut mcp = JsonFile::load(&places.mcp)?;
    let hooks_added = add_hooks(&mut settings.value, &exe)?;
    let approved = places.project && approve_project_server(&mut settings.value)?;
    let server_added = if same_file {
        add_mcp_server(&mut settings.value, &exe)?
    } else {
        add_mcp_server(&mut mcp.value, &exe)?
    };
    let mut lines = Vec::new();
    if hooks_added || approved || (same_file && server_added) {
        save_backup(&settings)?;
        settings.write(&settings.pretty()?)?;
        lines.push(format!(
            "added the Styxy hooks (SessionStart, PreToolUse and PostToolUse for Bash, SessionEnd) to {}",
            settings.path.display()
        ));
    } else {
        lines.push(format!(
            "the Styxy hooks are already in {}",
            settings.path.display()
        ));
    }
    if server_added && !same_file {
        save_backup(&mcp)?;
        mcp.write(&mcp.pretty()?)?;
    }
    lines.push(if server_added {
        format!(
            "added the MCP server `{MCP_NAME}` (`{exe} mcp`) to {}",
            places.mcp.display()
        )
    } else {
        format!(
            "the MCP server `{MCP_NAME}` is already in {}",
            places.mcp.display()
        )
    });
    lines
        .push("new Claude Code sessions get the shim, move reports and the styxy MCP tools".into());
    Ok(lines)
}

/// `styxy hook uninstall`: returns the lines to print.
pub fn uninstall(places: &Places) -> Result<Vec<String>> {
    let mut settings = JsonFile::load(&places.settings)?;
    let same_file = places.mcp == places.settings;
    let mut lines = Vec::new();
    let mut changed = remove_hooks(&mut settings.value);
    changed |= places.project && withdraw_project_server(&mut settings.value);
    if same_file {
        changed |= remove_mcp_server(&mut settings.value);
    }
    if changed {
        restore(&settings)?;
        lines.push(format!(
            "removed the Styxy hooks from {}",
            settings.path.display()
        ));
    } else {
        lines.push(format!("no Styxy hooks in {}", settings.path.display()));
    }
    if !same_file {
        let mut mcp = JsonFile::load(&places.mcp)?;
        if remove_mcp_server(&mut mcp.value) {
            restore(&mcp)?;
            lines.push(format!(
                "removed the MCP server `{MCP_NAME}` from {}",
                mcp.path.display()
            ));
        }
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_go_in_beside_the_users_own_and_come_out_exactly() {
        let mut settings = json!({
            "model": "opus",
            "hooks": { "SessionStart": [ { "matcher": "startup", "hooks": [ { "type": "command", "command": "echo hi" } ] } ],
                       "Stop": [] }
        });
        let before = settings.clone();
        assert!(add_hooks(&mut settings, "/usr/local/bin/styxy").expect("add"));
        assert!(!add_hooks(&mut settings, "/usr/local/bin/styxy").expect("add again"));
        // Moved: the same entries, pointed at the new binary.
        let mut moved = settings.clone();
        assert!(add_hooks(&mut moved, "/opt/styxy/bin/styxy").expect("moved"));
        assert_eq!(
            moved["hooks"]["PostToolUse"][0]["hooks"][0]["command"],
            "'/opt/styxy/bin/styxy' hook post-tool-use"
        );
        assert_eq!(
            moved["hooks"]["SessionStart"].as_array().map(Vec::len),
            Some(2)
        );
        assert_eq!(settings["model"], "opus");
        assert_eq!(
            settings["hooks"]["SessionStart"].as_array().map(Vec::len),
            Some(2)
        );
        assert_eq!(settings["hooks"]["PostToolUse"][0]["matcher"], "Bash");
        assert_eq!(
            settings["hooks"]["SessionEnd"][0]["hooks"][0]["command"],
            "'/usr/local/bin/styxy' hook session-end"
        );
        assert!(remove_hooks(&mut settings));
        assert_eq!(settings, before, "uninstall removes only its own entries");
        assert!(!remove_hooks(&mut settings));
    }

    #[test]
    fn an_empty_settings_file_gets_only_the_hooks_and_loses_them_again() {
        let mut settings = json!({});
        assert!(add_hooks(&mut settings, "styxy").expect("add"));
        assert!(remove_hooks(&mut settings));
        assert_eq!(settings, json!({}));
    }

    #[test]
    fn the_mcp_server_is_added_once_and_never_replaces_anothers() {
        let mut config =
            json!({ "numStartups": 3, "mcpServers": { "db": { "command": "pg-mcp" } } });
        let before = config.clone();
        assert!(add_mcp_server(&mut config, "/bin/styxy").expect("add"));
        assert!(!add_mcp_server(&mut config, "/bin/styxy").expect("again"));
        let mut moved = config.clone();
        assert!(add_mcp_server(&mut moved, "/usr/local/bin/styxy").expect("moved"));
        assert_eq!(
            moved["mcpServers"]["styxy"]["command"],
            "/usr/local/bin/styxy"
        );
        assert_eq!(config["mcpServers"]["styxy"]["args"], json!(["mcp"]));
        assert!(remove_mcp_server(&mut config));
        assert_eq!(config, before);
        let mut taken = json!({ "mcpServers": { "styxy": { "command": "something-else" } } });
        let error = add_mcp_server(&mut taken, "/bin/styxy").expect_err("not ours");
        assert!(format!("{error:#}").contains("not Styxy's"), "{error:#}");
        assert!(!remove_mcp_server(&mut taken));
    }

    #[test]
    fn bad_settings_are_refused_with_the_fix() {
        for bad in [
            json!([1]),
            json!({ "hooks": [] }),
            json!({ "hooks": { "PostToolUse": {} } }),
        ] {
            let mut settings = bad.clone();
            let error = add_hooks(&mut settings, "styxy").expect_err("refused");
            assert!(format!("{error:#}").contains("fix it first"), "{error:#}");
        }
    }

    #[test]
    fn backup_names_are_one_path_component() {
        assert_eq!(
            backup_name(Path::new("/root/.claude.json")),
            "%2Froot%2F.claude.json"
        );
        assert_eq!(backup_name(Path::new("/a%2Fb/c")), "%2Fa%252Fb%2Fc");
    }
}
