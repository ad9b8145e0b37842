//! Running the real Claude Code CLI in tests: where its native binary is, a stand-in for the
//! Anthropic Messages API that answers with scripted turns (streamed as server-sent events, as the
//! real API streams them), and a runner that starts `claude -p` against it in a scratch HOME and
//! returns its stream-json events.
//!
//! The stand-in tells the agent's main loop (requests that offer the `Bash` tool) apart from the
//! CLI's side requests, and picks the turn by how many tool results the conversation holds, so a
//! retried request gets the same answer. Every request body is kept for the test to read (what
//! the model was told, hook context included).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// The version `cargo xtask setup` installs (scripts/setup.sh).
pub const CLAUDE_CODE_VERSION: &str = "2.1.332";

/// The real `claude` binary: `$STYXY_CLAUDE_BIN`, else where `cargo xtask setup` installs it. `Err`
/// says why there is none (the tests say so and skip).
pub fn claude_binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("STYXY_CLAUDE_BIN").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let platform = "node_modules/@anthropic-ai/claude-code-linux-x64/claude";
    let mut places = vec![PathBuf::from("/opt/styxy-claude-code").join(platform)];
    if let Some(home) = std::env::var_os("HOME") {
        places.push(
            PathBuf::from(home)
                .join(".cache/styxy/claude-code")
                .join(platform),
        );
    }
    places.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        format!(
            "the Claude Code CLI is not installed (`cargo xtask setup` installs \
             @anthropic-ai/claude-code@{CLAUDE_CODE_VERSION} into /opt/styxy-claude-code, or set \
             STYXY_CLAUDE_BIN)"
        )
    })
}

/// One scripted answer of the model.
#[derive(Clone, Debug)]
pub enum Turn {
    /// Call a tool (`Bash`, `mcp__styxy__status`, …) with this input.
    Tool(&'static str, Value),
    /// Say this and end the turn.
    Text(&'static str),
}

/// The stand-in Messages API on 127.0.0.1.
pub struct StandIn {
    pub port: u16,
    /// Every main-loop request body, in order.
    pub requests: Arc<Mutex<Vec<Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StandIn {
    /// Serves `script`: main-loop request N (N tool results so far) gets `script[N]`, and text
    /// once the script is done.
    pub async fn start(script: Vec<Turn>) -> Result<StandIn> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(script);
        let kept = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let script = script.clone();
                let kept = kept.clone();
                tokio::spawn(async move {
                    let _ = serve_connection(stream, &script, &kept).await;
                });
            }
        });
        Ok(StandIn {
            port,
            requests,
            task,
        })
    }

    /// The main-loop requests so far.
    pub fn requests(&self) -> Vec<Value> {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// One HTTP/1.1 connection: requests with a Content-Length (or chunked) body, kept alive.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    script: &[Turn],
    kept: &Mutex<Vec<Value>>,
) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).await? == 0 {
            return Ok(());
        }
        let path = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("/")
            .to_string();
        let mut length = 0usize;
        let mut chunked = false;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).await?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.parse().context("content-length")?;
                } else if name.eq_ignore_ascii_case("transfer-encoding")
                    && value.eq_ignore_ascii_case("chunked")
                {
                    chunked = true;
                }
            }
        }
        let body = if chunked {
            read_chunked(&mut reader).await?
        } else {
            let mut body = vec![0; length];
            reader.read_exact(&mut body).await?;
            body
        };
        let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let (content_type, answer) = answer(&path, &request, script, kept);
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\
             request-id: req_standin\r\n\r\n",
            answer.len()
        );
        write.write_all(head.as_bytes()).await?;
        write.write_all(answer.as_bytes()).await?;
    }
}

async fn read_chunked(reader: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut size = String::new();
        reader.read_line(&mut size).await?;
        let size = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
            .context("chunk size")?;
        let mut chunk = vec![0; size + 2];
        reader.read_exact(&mut chunk).await?;
        if size == 0 {
            return Ok(body);
        }
        body.extend_from_slice(&chunk[..size]);
    }
}

/// The answer to one request: (content type, body).
fn answer(
    path: &str,
    request: &Value,
    script: &[Turn],
    kept: &Mutex<Vec<Value>>,
) -> (&'static str, String) {
    if path.contains("count_tokens") {
        return (
            "application/json",
            json!({ "input_tokens": 100 }).to_string(),
        );
    }
    if !path.starts_with("/v1/messages") {
        return ("application/json", json!({}).to_string());
    }
    let main_loop = request["tools"]
        .as_array()
        .is_some_and(|tools| tools.iter().any(|t| t["name"] == "Bash"));
    let step = tool_results(request);
    let turn = if main_loop {
        kept.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(request.clone());
        script.get(step).cloned().unwrap_or(Turn::Text("done"))
    } else {
        Turn::Text("none")
    };
    let model = request["model"].as_str().unwrap_or("claude-stand-in");
    let streamed = request["stream"].as_bool().unwrap_or(false);
    let (block, delta, stop) = match &turn {
        Turn::Tool(name, input) => (
            json!({ "type": "tool_use", "id": format!("toolu_standin_{step}"), "name": name, "input": {} }),
            json!({ "type": "input_json_delta", "partial_json": input.to_string() }),
            "tool_use",
        ),
        Turn::Text(text) => (
            json!({ "type": "text", "text": "" }),
            json!({ "type": "text_delta", "text": text }),
            "end_turn",
        ),
    };
    if !streamed {
        let content = match &turn {
            Turn::Tool(name, input) => {
                json!([{ "type": "tool_use", "id": format!("toolu_standin_{step}"), "name": name, "input": input }])
            }
            Turn::Text(text) => json!([{ "type": "text", "text": text }]),
        };
        let message = json!({
            "id": "msg_standin", "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": stop, "stop_sequence": null,
            "usage": { "input_tokens": 100, "output_tokens": 10 }
        });
        return ("application/json", message.to_string());
    }
    let events = [
        (
            "message_start",
            json!({ "type": "message_start", "message": {
                "id": "msg_standin", "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": { "input_tokens": 100, "output_tokens": 1 } } }),
        ),
        (
            "content_block_start",
            json!({ "type": "content_block_start", "index": 0, "content_block": block }),
        ),
        (
            "content_block_delta",
            json!({ "type": "content_block_delta", "index": 0, "delta": delta }),
        ),
        (
            "content_block_stop",
            json!({ "type": "content_block_stop", "index": 0 }),
        ),
        (
            "message_delta",
            json!({ "type": "message_delta", "delta": { "stop_reason": stop, "stop_sequence": null },
                    "usage": { "output_tokens": 10 } }),
        ),
        ("message_stop", json!({ "type": "message_stop" })),
    ];
    let body = events
        .iter()
        .map(|(name, data)| format!("event: {name}\ndata: {data}\n\n"))
        .collect();
    ("text/event-stream", body)
}

/// How many tool results the conversation in `request` holds.
pub fn tool_results(request: &Value) -> usize {
    request["messages"].as_array().map_or(0, |messages| {
        messages
            .iter()
            .filter_map(|m| m["content"].as_array())
            .flatten()
            .filter(|block| block["type"] == "tool_result")
            .count()
    })
}

/// `claude -p` in `cwd` with `home` as HOME, against the stand-in; `env` is added to its
/// environment (e.g. STYXY_SOCKET). Returns its stream-json events. Killed after `timeout`.
pub fn run_claude(
    binary: &Path,
    stand_in_port: u16,
    home: &Path,
    cwd: &Path,
    allowed_tools: &str,
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<Vec<Value>> {
    let mut command = Command::new(binary);
    command
        .args([
            "-p",
            "Follow the scripted turns.",
            "--allowedTools",
            allowed_tools,
            "--output-format",
            "stream-json",
            "--verbose",
            "--include-hook-events",
        ])
        .current_dir(cwd)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .env(
            "ANTHROPIC_BASE_URL",
            format!("http://127.0.0.1:{stand_in_port}"),
        )
        .env("ANTHROPIC_API_KEY", "sk-ant-stand-in")
        .env("DISABLE_TELEMETRY", "1")
        .env("DISABLE_AUTOUPDATER", "1")
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = command.spawn().context("starting claude")?;
    let pid = child.id();
    // A watchdog: claude must not outlive the test's patience.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(timeout).is_err() {
            // SAFETY: signalling our own child by pid; it may have exited (then ESRCH).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    });
    let out = child.wait_with_output().context("waiting for claude")?;
    let _ = done_tx.send(());
    let _ = watchdog.join();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let events: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    if !out.status.success() {
        bail!(
            "claude exited with {}: stderr {}\nstdout {}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            stdout
        );
    }
    Ok(events)
}

/// The stdout of each `hook_response` event of hook `name` (e.g. `PostToolUse:Bash`), in order.
pub fn hook_outputs(events: &[Value], name: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["subtype"] == "hook_response" && e["hook_name"] == name)
        .map(|e| e["stdout"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The text of the tool result for tool call `id` as the agent saw it.
pub fn tool_result_text(events: &[Value], id: &str) -> Option<String> {
    events
        .iter()
        .filter(|e| e["type"] == "user")
        .filter_map(|e| e["message"]["content"].as_array())
        .flatten()
        .find(|block| block["type"] == "tool_result" && block["tool_use_id"] == id)
        .map(|block| match &block["content"] {
            Value::String(text) => text.clone(),
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .join(""),
            other => other.to_string(),
        })
}

/// The id the stand-in gives the tool call of script step `step`.
pub fn tool_use_id(step: usize) -> String {
    format!("toolu_standin_{step}")
}
