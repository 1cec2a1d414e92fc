//! The openai backend: ferry-cloud fronts an OpenAI-compatible engine (vLLM in production, or
//! any server with `POST /v1/chat/completions`, ferryd's own HTTP API included).
//!
//! Requests go out as chat completions: text parts as text, images as `image_url` content parts
//! with `data:` URLs, `stream_options.include_usage` so the engine's `usage` gives the token
//! counts. Streaming answers are read as server-sent events; non-streaming ones in one piece.
//! The engine's failures come back as ferry statuses through [`ErrorKind`]: its HTTP status
//! (404 → NOT_FOUND, 400/422 → INVALID_ARGUMENT, 429 → RESOURCE_EXHAUSTED, 503 → UNAVAILABLE,
//! ...) with the message of its OpenAI-style error body; a refused or timed-out connection is
//! UNAVAILABLE / DEADLINE_EXCEEDED.

use std::time::Duration;

use base64::Engine;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use ferry_core::{ErrorKind, FinishReason, Part};

use crate::backend::{Backend, BackendOutcome, BackendRequest, Failure};
use crate::config::ModelConfig;

/// Most bytes of an upstream error body that are read (for its message).
const MAX_ERROR_BODY: usize = 64 * 1024;

/// One model behind an OpenAI-compatible engine.
pub struct OpenAiBackend {
    client: reqwest::Client,
    base_url: String,
    url: String,
    upstream_model: String,
    api_key: Option<String>,
    stream: bool,
}

impl OpenAiBackend {
    /// Builds the backend of `model` (`backend = "openai"`); reads its API key from the
    /// environment. Fails when the named key variable is unset.
    pub fn new(model: &ModelConfig) -> Result<Self, ferry_core::Error> {
        let base_url = model
            .base_url
            .clone()
            .ok_or_else(|| ferry_core::Error::invalid("models.base_url", "is required"))?
            .trim_end_matches('/')
            .to_string();
        let api_key = match &model.api_key_env {
            None => None,
            Some(var) => Some(std::env::var(var).map_err(|_| {
                ferry_core::Error::invalid(
                    format!("models[{}].api_key_env", model.id),
                    format!("environment variable `{var}` is not set"),
                )
            })?),
        };
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(model.connect_timeout_ms))
            .read_timeout(Duration::from_millis(model.read_timeout_ms))
            .user_agent(concat!("ferry-cloud/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ferry_core::Error::Engine(format!("HTTP client: {e}")))?;
        Ok(OpenAiBackend {
            client,
            url: format!("{base_url}/chat/completions"),
            base_url,
            upstream_model: model
                .upstream_model
                .clone()
                .unwrap_or_else(|| model.id.clone()),
            api_key,
            stream: model.stream,
        })
    }

    /// The chat-completions body for `req`.
    fn body(&self, req: &BackendRequest) -> Value {
        let messages: Vec<Value> = req
            .messages
            .iter()
            .map(|m| {
                let has_images = m.images().next().is_some();
                let content = if has_images {
                    Value::Array(
                        m.parts
                            .iter()
                            .map(|p| match p {
                                Part::Text(t) => json!({"type": "text", "text": t}),
                                Part::Image(img) => json!({
                                    "type": "image_url",
                                    "image_url": {"url": format!(
                                        "data:{};base64,{}",
                                        img.mime_type,
                                        base64::engine::general_purpose::STANDARD.encode(&img.data)
                                    )},
                                }),
                            })
                            .collect(),
                    )
                } else {
                    Value::String(m.joined_text())
                };
                json!({"role": m.role.as_str(), "content": content})
            })
            .collect();
        let s = &req.sampling;
        let mut body = json!({
            "model": self.upstream_model,
            "messages": messages,
            "max_tokens": s.max_tokens,
            "temperature": s.temperature,
            "stream": self.stream,
            // OpenAI's seed is signed; keep the bits.
            "seed": s.seed as i64,
        });
        if self.stream {
            body["stream_options"] = json!({"include_usage": true});
        }
        if let Some(p) = s.top_p {
            body["top_p"] = json!(p);
        }
        if let Some(k) = s.top_k {
            // Not OpenAI's; vLLM and llama.cpp accept it.
            body["top_k"] = json!(k);
        }
        if !s.stop.is_empty() {
            body["stop"] = json!(s.stop);
        }
        body
    }

    fn upstream(&self) -> String {
        format!("upstream `{}` at {}", self.upstream_model, self.base_url)
    }
}

/// A reqwest error with its causes, which hold the useful part ("connection refused").
fn describe(e: &reqwest::Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// Classifies a transport failure.
fn transport_failure(what: &str, e: &reqwest::Error) -> Failure {
    let kind = if e.is_timeout() {
        ErrorKind::DeadlineExceeded
    } else {
        ErrorKind::Unavailable
    };
    Failure::new(kind, format!("{what}: {}", describe(e)))
}

/// The ferry kind of an upstream HTTP status.
pub fn kind_of_http_status(status: u16) -> ErrorKind {
    match status {
        400 | 413 | 422 => ErrorKind::InvalidArgument,
        404 => ErrorKind::NotFound,
        408 | 504 => ErrorKind::DeadlineExceeded,
        409 | 501 => ErrorKind::FailedPrecondition,
        429 => ErrorKind::ResourceExhausted,
        // The engine refused ferry-cloud's own credentials: nothing the edge can fix, and it
        // should fall back, so the tier is unavailable rather than the caller unauthenticated.
        401 | 403 => ErrorKind::Unavailable,
        500 => ErrorKind::Internal,
        _ if status >= 500 => ErrorKind::Unavailable,
        _ => ErrorKind::Internal,
    }
}

/// The message of an OpenAI-style error body (`{"error": {"message": ..}}`, or vLLM's older
/// `{"message": ..}`), else the body text itself, shortened.
fn error_message(body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let msg = parsed.as_ref().and_then(|v| {
        v.pointer("/error/message")
            .or_else(|| v.get("message"))
            .or_else(|| v.get("detail"))
            .and_then(Value::as_str)
            .map(str::to_string)
    });
    msg.unwrap_or_else(|| {
        let t = body.trim();
        if t.is_empty() {
            "(empty body)".to_string()
        } else {
            t.chars().take(500).collect()
        }
    })
}

/// The kind of an error object sent inside a stream: its `code` when it is one of ferry's kind
/// names (ferryd's API), else its numeric `code` as an HTTP status, else UNAVAILABLE.
fn stream_error_kind(err: &Value) -> ErrorKind {
    match err.get("code") {
        Some(Value::String(s)) => match s.as_str() {
            "invalid_argument" => ErrorKind::InvalidArgument,
            "not_found" => ErrorKind::NotFound,
            "resource_exhausted" => ErrorKind::ResourceExhausted,
            "deadline_exceeded" => ErrorKind::DeadlineExceeded,
            "failed_precondition" => ErrorKind::FailedPrecondition,
            "internal" => ErrorKind::Internal,
            _ => ErrorKind::Unavailable,
        },
        Some(Value::Number(n)) => n
            .as_u64()
            .map(|c| kind_of_http_status(c as u16))
            .unwrap_or(ErrorKind::Unavailable),
        _ => ErrorKind::Unavailable,
    }
}

fn finish_reason(s: &str) -> FinishReason {
    match s {
        "length" => FinishReason::Length,
        // "stop" covers both end-of-sequence and a stop string in OpenAI's API.
        _ => FinishReason::Stop,
    }
}

/// Incremental server-sent-events parser: feed bytes, get the `data` of each complete event.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    data: Vec<String>,
}

impl SseParser {
    /// Adds bytes; returns the data of the events they completed, in order. Lines may end in
    /// `\n`, `\r\n` or `\r`... (`\r` alone is treated as part of the line and trimmed); fields
    /// other than `data` (event, id, retry, comments) are ignored.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !self.data.is_empty() {
                    events.push(self.data.join("\n"));
                    self.data.clear();
                }
            } else if let Some(rest) = line.strip_prefix("data:") {
                self.data
                    .push(rest.strip_prefix(' ').unwrap_or(rest).to_string());
            }
        }
        events
    }

    /// The event left when the body ended without its blank line.
    pub fn finish(&mut self) -> Option<String> {
        if !self.buf.is_empty() {
            self.push(b"\n");
        }
        (!self.data.is_empty()).then(|| {
            let d = self.data.join("\n");
            self.data.clear();
            d
        })
    }
}

/// Token counts from a `usage` object.
fn usage_of(v: &Value) -> Option<(u32, u32)> {
    let u = v.get("usage")?;
    if u.is_null() {
        return None;
    }
    let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0) as u32;
    Some((n("prompt_tokens"), n("completion_tokens")))
}

#[tonic::async_trait]
impl Backend for OpenAiBackend {
    fn kind(&self) -> &'static str {
        "openai"
    }

    async fn generate(
        &self,
        req: BackendRequest,
        deltas: mpsc::Sender<String>,
    ) -> Result<BackendOutcome, Failure> {
        let mut http = self
            .client
            .post(&self.url)
            .header("content-type", "application/json")
            .header("x-request-id", &req.request_id)
            .body(self.body(&req).to_string());
        if let Some(key) = &self.api_key {
            http = http.bearer_auth(key);
        }
        let resp = http
            .send()
            .await
            .map_err(|e| transport_failure(&format!("cannot reach {}", self.upstream()), &e))?;
        let status = resp.status();
        if !status.is_success() {
            let mut body = Vec::new();
            let mut chunks = resp.bytes_stream();
            while let Some(Ok(c)) = chunks.next().await {
                body.extend_from_slice(&c);
                if body.len() > MAX_ERROR_BODY {
                    break;
                }
            }
            let msg = error_message(&String::from_utf8_lossy(&body));
            return Err(Failure::new(
                kind_of_http_status(status.as_u16()),
                format!(
                    "{} answered HTTP {}: {msg}",
                    self.upstream(),
                    status.as_u16()
                ),
            ));
        }

        if !self.stream {
            let bytes = resp.bytes().await.map_err(|e| {
                transport_failure(&format!("reading the answer of {}", self.upstream()), &e)
            })?;
            let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
                Failure::new(
                    ErrorKind::Unavailable,
                    format!("{} sent a malformed answer: {e}", self.upstream()),
                )
            })?;
            let choice = v.pointer("/choices/0").ok_or_else(|| {
                Failure::new(
                    ErrorKind::Unavailable,
                    format!("{} sent an answer without choices", self.upstream()),
                )
            })?;
            let text = choice
                .pointer("/message/content")
                .and_then(Value::as_str)
                .unwrap_or("");
            if !text.is_empty() && deltas.send(text.to_string()).await.is_err() {
                return Err(Failure::new(ErrorKind::Cancelled, "client went away"));
            }
            let finish = choice
                .get("finish_reason")
                .and_then(Value::as_str)
                .map(finish_reason)
                .unwrap_or(FinishReason::Stop);
            let (prompt_tokens, completion_tokens) = usage_of(&v).unwrap_or((0, 0));
            return Ok(BackendOutcome {
                prompt_tokens,
                completion_tokens,
                finish_reason: finish,
                energy: None,
            });
        }

        let mut body = resp.bytes_stream();
        let mut sse = SseParser::default();
        let mut finish: Option<FinishReason> = None;
        let mut usage: Option<(u32, u32)> = None;
        let mut chunks_with_text = 0u32;
        let mut done = false;
        while !done {
            let events = match body.next().await {
                Some(Ok(bytes)) => sse.push(&bytes),
                Some(Err(e)) => {
                    return Err(transport_failure(
                        &format!("the stream of {} broke", self.upstream()),
                        &e,
                    ))
                }
                None => {
                    done = true;
                    sse.finish().into_iter().collect()
                }
            };
            for data in events {
                if data.trim() == "[DONE]" {
                    done = true;
                    break;
                }
                let v: Value = serde_json::from_str(&data).map_err(|e| {
                    Failure::new(
                        ErrorKind::Unavailable,
                        format!("{} sent a malformed event: {e}", self.upstream()),
                    )
                })?;
                if let Some(err) = v.get("error") {
                    let msg = err
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("unknown error");
                    return Err(Failure::new(
                        stream_error_kind(err),
                        format!("{} failed mid-stream: {msg}", self.upstream()),
                    ));
                }
                if let Some(u) = usage_of(&v) {
                    usage = Some(u);
                }
                let Some(choice) = v.pointer("/choices/0") else {
                    continue;
                };
                if let Some(text) = choice.pointer("/delta/content").and_then(Value::as_str) {
                    if !text.is_empty() {
                        chunks_with_text += 1;
                        if deltas.send(text.to_string()).await.is_err() {
                            return Err(Failure::new(ErrorKind::Cancelled, "client went away"));
                        }
                    }
                }
                if let Some(f) = choice.get("finish_reason").and_then(Value::as_str) {
                    finish = Some(finish_reason(f));
                }
            }
        }
        let finish = finish.ok_or_else(|| {
            Failure::new(
                ErrorKind::Unavailable,
                format!(
                    "{} ended the stream without a finish reason",
                    self.upstream()
                ),
            )
        })?;
        // Without `usage` (an engine that ignores include_usage) each text chunk counts as one
        // token: vLLM and llama.cpp send one token per chunk.
        let (prompt_tokens, completion_tokens) = usage.unwrap_or((0, chunks_with_text));
        Ok(BackendOutcome {
            prompt_tokens,
            completion_tokens,
            finish_reason: finish,
            energy: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_parser_handles_split_events_crlf_and_comments() {
        let mut p = SseParser::default();
        assert!(p.push(b"data: {\"a\"").is_empty());
        assert_eq!(p.push(b":1}\n\n: keep-alive\n\r\n"), vec!["{\"a\":1}"]);
        assert_eq!(
            p.push(b"event: x\r\ndata: one\r\ndata: two\r\n\r\ndata:[DONE]\n\n"),
            vec!["one\ntwo", "[DONE]"]
        );
        assert!(p.push(b"data: tail").is_empty());
        assert_eq!(p.finish().as_deref(), Some("tail"));
        assert_eq!(p.finish(), None);
    }

    #[test]
    fn upstream_statuses_map_to_ferry_kinds() {
        assert_eq!(kind_of_http_status(404), ErrorKind::NotFound);
        assert_eq!(kind_of_http_status(400), ErrorKind::InvalidArgument);
        assert_eq!(kind_of_http_status(422), ErrorKind::InvalidArgument);
        assert_eq!(kind_of_http_status(429), ErrorKind::ResourceExhausted);
        assert_eq!(kind_of_http_status(503), ErrorKind::Unavailable);
        assert_eq!(kind_of_http_status(504), ErrorKind::DeadlineExceeded);
        assert_eq!(kind_of_http_status(401), ErrorKind::Unavailable);
        assert_eq!(kind_of_http_status(500), ErrorKind::Internal);
    }

    #[test]
    fn error_messages_come_from_openai_bodies() {
        assert_eq!(
            error_message(
                r#"{"error":{"message":"model `x` not found","type":"not_found_error"}}"#
            ),
            "model `x` not found"
        );
        assert_eq!(error_message(r#"{"message":"bad"}"#), "bad");
        assert_eq!(error_message("  plain  "), "plain");
        assert_eq!(error_message(""), "(empty body)");
        assert_eq!(
            stream_error_kind(&json!({"code": "deadline_exceeded"})),
            ErrorKind::DeadlineExceeded
        );
        assert_eq!(
            stream_error_kind(&json!({"code": 429})),
            ErrorKind::ResourceExhausted
        );
    }
}
