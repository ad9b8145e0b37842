//! The MCP server's stdio transport, with JSON-RPC's answers to what is not a request.
//!
//! rmcp's own stdio transport drops a line it cannot parse without a word, so a client that sent
//! a truncated line, or one nested deeper than any parser should follow, waits for an answer that
//! never comes. JSON-RPC 2.0 says what to answer: `-32700 Parse error` for a line that is not
//! JSON, `-32600 Invalid Request` for JSON that is not a request object, both with `"id": null`.
//! Here each line from stdin is checked before rmcp sees it; rmcp's output and these answers go
//! to stdout one whole line at a time, never interleaved within a line. A line over
//! [`MAX_LINE_BYTES`] is answered as a parse error and skipped without being held in memory.

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, DuplexStream};
use tokio::sync::mpsc;

/// The longest request line read (a tool call's arguments are a few hundred bytes).
pub const MAX_LINE_BYTES: usize = 4 << 20;
/// In-memory pipes between this filter and rmcp.
const PIPE_BYTES: usize = 64 << 10;

/// What to answer a line instead of handing it to rmcp, if anything.
pub fn answer_for(line: &[u8]) -> Option<Value> {
    let text = std::str::from_utf8(line).ok();
    let parsed = text.map(|t| serde_json::from_str::<Value>(t.trim()));
    match parsed {
        _ if line.iter().all(u8::is_ascii_whitespace) => None,
        Some(Ok(Value::Object(_))) => None,
        Some(Ok(_)) => Some(error_reply(
            -32600,
            "Invalid Request: not a JSON-RPC request object",
        )),
        Some(Err(e)) => Some(error_reply(-32700, &format!("Parse error: {e}"))),
        None => Some(error_reply(-32700, "Parse error: not UTF-8")),
    }
}

fn error_reply(code: i32, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": null, "error": {"code": code, "message": message}})
}

/// The transport to hand rmcp, and the task that pumps stdin and stdout through the filter
/// until stdin ends (then rmcp sees its input end) and rmcp's output is written.
pub fn transport<R, W>(
    input: R,
    output: W,
) -> (
    (DuplexStream, DuplexStream),
    impl std::future::Future<Output = ()>,
)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (rmcp_in, mut to_rmcp) = tokio::io::duplex(PIPE_BYTES);
    let (from_rmcp, rmcp_out) = tokio::io::duplex(PIPE_BYTES);
    let (lines, mut to_write) = mpsc::channel::<Vec<u8>>(64);
    let answers = lines.clone();
    let read_input = async move {
        let mut input = BufReader::new(input);
        while let Some(line) = read_line(&mut input).await {
            let answer = match &line {
                Line::Whole(bytes) => answer_for(bytes),
                Line::TooLong => Some(error_reply(
                    -32700,
                    &format!("Parse error: a line of more than {MAX_LINE_BYTES} bytes"),
                )),
            };
            match (answer, line) {
                (Some(answer), _) => {
                    let mut bytes = answer.to_string().into_bytes();
                    bytes.push(b'\n');
                    if answers.send(bytes).await.is_err() {
                        return;
                    }
                }
                (None, Line::Whole(mut bytes)) => {
                    bytes.push(b'\n');
                    if to_rmcp.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
                (None, Line::TooLong) => {}
            }
        }
        // End of input: rmcp sees its input end, and stops.
        let _ = to_rmcp.shutdown().await;
    };
    let read_rmcp = async move {
        let mut from_rmcp = BufReader::new(from_rmcp);
        let mut line = Vec::new();
        loop {
            line.clear();
            match from_rmcp.read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if lines.send(line.clone()).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let write_output = async move {
        let mut output = output;
        while let Some(line) = to_write.recv().await {
            if output.write_all(&line).await.is_err() || output.flush().await.is_err() {
                return;
            }
        }
    };
    let pump = async move {
        tokio::join!(read_input, read_rmcp, write_output);
    };
    ((rmcp_in, rmcp_out), pump)
}

enum Line {
    Whole(Vec<u8>),
    TooLong,
}

/// The next line (without its newline), or `None` at the end of input.
async fn read_line<R: AsyncRead + Unpin>(input: &mut BufReader<R>) -> Option<Line> {
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let buf = input.fill_buf().await.ok()?;
        if buf.is_empty() {
            // The end of input: a last line without its newline still counts.
            return if too_long {
                Some(Line::TooLong)
            } else {
                (!line.is_empty()).then_some(Line::Whole(line))
            };
        }
        let (chunk, ends) = match buf.iter().position(|b| *b == b'\n') {
            Some(at) => (&buf[..at], Some(at + 1)),
            None => (buf, None),
        };
        if !too_long && line.len() + chunk.len() <= MAX_LINE_BYTES {
            line.extend_from_slice(chunk);
        } else {
            too_long = true;
            line = Vec::new();
        }
        let used = ends.unwrap_or(buf.len());
        input.consume(used);
        if ends.is_some() {
            return Some(if too_long {
                Line::TooLong
            } else {
                Line::Whole(line)
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_that_are_not_requests_get_json_rpc_errors() {
        assert_eq!(
            answer_for(br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#),
            None
        );
        assert_eq!(answer_for(b"   "), None, "blank lines are skipped");
        let truncated =
            answer_for(br#"{"jsonrpc":"2.0","id":2,"method":"tools/li"#).expect("error");
        assert_eq!(truncated["error"]["code"], -32700);
        assert_eq!(truncated["id"], Value::Null);
        let deep = "[".repeat(5000) + &"]".repeat(5000);
        assert_eq!(
            answer_for(deep.as_bytes()).expect("error")["error"]["code"],
            -32700
        );
        assert_eq!(
            answer_for(b"[1,2]").expect("error")["error"]["code"],
            -32600
        );
        assert_eq!(
            answer_for(b"\xff\xfe").expect("error")["error"]["code"],
            -32700
        );
    }

    #[tokio::test]
    async fn requests_pass_and_bad_lines_are_answered_in_order() {
        let big = "x".repeat(MAX_LINE_BYTES + 10);
        let input = format!("{{\"a\":1}}\nnot json\n{big}\n{{\"b\":2}}\n");
        let (output_end, mut output) = tokio::io::duplex(1 << 20);
        let ((mut rmcp_in, mut rmcp_out), pump) =
            transport(std::io::Cursor::new(input.into_bytes()), output_end);
        let pump = tokio::spawn(pump);
        // What rmcp would read: the two objects, nothing else.
        let mut seen = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut rmcp_in, &mut seen)
            .await
            .expect("read");
        assert_eq!(seen, "{\"a\":1}\n{\"b\":2}\n");
        rmcp_out
            .write_all(b"{\"reply\":true}\n")
            .await
            .expect("write");
        drop(rmcp_out);
        drop(rmcp_in);
        pump.await.expect("pump");
        let mut written = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut output, &mut written)
            .await
            .expect("read");
        let lines: Vec<Value> = written
            .lines()
            .map(|l| serde_json::from_str(l).expect("whole JSON lines"))
            .collect();
        assert_eq!(lines.len(), 3, "{written}");
        let codes: Vec<&Value> = lines.iter().map(|l| &l["error"]["code"]).collect();
        assert_eq!(codes.iter().filter(|c| **c == -32700).count(), 2);
        assert!(lines.iter().any(|l| l["reply"] == true));
    }
}
