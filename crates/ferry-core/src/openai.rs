//! The OpenAI chat-completions request as ferry reads it: the JSON body of
//! `POST /v1/chat/completions` mapped onto the gRPC `GenerateRequest`, so both APIs share one
//! request path from here on (validation, routing, admission). Pure: no I/O, so it can be
//! fuzzed on its own (`fuzz/fuzz_targets/openai.rs`).

use base64::Engine;
use serde::Deserialize;
use serde_json::Value;

use crate::Error;
use ferry_proto::v1 as pb;

fn invalid(field: &str, reason: impl Into<String>) -> Error {
    Error::invalid(field, reason)
}

/// A parsed chat-completions call.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatCall {
    /// The request, as the gRPC API would have received it.
    pub request: pb::GenerateRequest,
    /// `stream`: answer as server-sent events.
    pub stream: bool,
    /// `stream_options.include_usage`: a usage chunk before `[DONE]`.
    pub include_usage: bool,
}

/// Parses a request body: a JSON chat-completions request, or INVALID_ARGUMENT saying why not
/// (the field in error, where there is one).
pub fn parse_chat_request(body: &[u8]) -> Result<ChatCall, Error> {
    let req: ChatRequest = serde_json::from_slice(body)
        .map_err(|e| invalid("body", format!("not a chat completion request: {e}")))?;
    to_proto(req)
}

/// `stop`: one string or a list.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct ImageUrl {
    url: String,
}

/// A typed content part.
#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
    image_url: Option<ImageUrl>,
}

/// Message content: a string, or a list of parts.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<Content>,
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The subset of OpenAI's chat-completions request ferryd implements; other fields are
/// ignored, and fields whose meaning it cannot honour (`n` > 1, tools, logprobs) are refused.
#[derive(Deserialize)]
struct ChatRequest {
    model: Option<String>,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// Not in OpenAI's API; vLLM and llama.cpp accept it too.
    top_k: Option<u32>,
    seed: Option<i64>,
    stop: Option<Stop>,
    n: Option<u32>,
    logprobs: Option<bool>,
    tools: Option<Vec<Value>>,
    /// ferry extensions: feedback id, dialogue grouping and task category for placement, and
    /// whether the app will send feedback (the router may then explore on this request).
    request_id: Option<String>,
    dialogue_id: Option<String>,
    task: Option<String>,
    expect_feedback: Option<bool>,
}

/// Decodes a `data:<mime>;base64,<payload>` URL. Remote URLs are refused: ferryd does not fetch
/// from the network on a client's behalf.
fn data_url(url: &str, field: &str) -> Result<pb::Image, Error> {
    let rest = url.strip_prefix("data:").ok_or_else(|| {
        invalid(
            field,
            "only data: URLs are accepted (data:image/png;base64,...); ferryd does not download images",
        )
    })?;
    let (meta, payload) = rest
        .split_once(',')
        .ok_or_else(|| invalid(field, "malformed data: URL (no comma)"))?;
    let mime = meta
        .strip_suffix(";base64")
        .ok_or_else(|| invalid(field, "data: URL must be base64-encoded"))?;
    if !mime.starts_with("image/") {
        return Err(invalid(field, format!("`{mime}` is not an image type")));
    }
    let data = base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .map_err(|e| invalid(field, format!("bad base64: {e}")))?;
    Ok(pb::Image {
        data,
        mime_type: mime.to_string(),
        source: field.to_string(),
    })
}

fn to_proto(req: ChatRequest) -> Result<ChatCall, Error> {
    if req.n.is_some_and(|n| n != 1) {
        return Err(invalid("n", "only n = 1 is supported"));
    }
    if req.logprobs == Some(true) {
        return Err(invalid("logprobs", "log probabilities are not supported"));
    }
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(invalid("tools", "tool calling is not supported"));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.into_iter().enumerate() {
        let field = format!("messages[{i}]");
        let role = match m.role.as_str() {
            "system" | "developer" => pb::Role::System,
            "user" => pb::Role::User,
            "assistant" => pb::Role::Assistant,
            other => {
                return Err(invalid(
                    &format!("{field}.role"),
                    format!("role `{other}` is not supported (system, developer, user, assistant)"),
                ))
            }
        };
        let text = |t: String| pb::ContentPart {
            kind: Some(pb::content_part::Kind::Text(t)),
        };
        let parts = match m.content {
            None => Vec::new(),
            Some(Content::Text(t)) => vec![text(t)],
            Some(Content::Parts(parts)) => {
                let mut out = Vec::with_capacity(parts.len());
                for (j, p) in parts.into_iter().enumerate() {
                    let pf = format!("{field}.content[{j}]");
                    match (p.kind.as_str(), p.text, p.image_url) {
                        ("text", Some(t), _) => out.push(text(t)),
                        ("image_url", _, Some(u)) => out.push(pb::ContentPart {
                            kind: Some(pb::content_part::Kind::Image(data_url(
                                &u.url,
                                &format!("{pf}.image_url"),
                            )?)),
                        }),
                        (kind, _, _) => {
                            return Err(invalid(
                                &pf,
                                format!("part of type `{kind}` is missing its field or is not supported (text, image_url)"),
                            ))
                        }
                    }
                }
                out
            }
        };
        messages.push(pb::Message {
            role: role as i32,
            parts,
        });
    }
    let stop = match req.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    let include_usage = req.stream_options.unwrap_or_default().include_usage;
    Ok(ChatCall {
        request: pb::GenerateRequest {
            model: req.model.unwrap_or_else(|| "auto".into()),
            messages,
            max_tokens: req.max_completion_tokens.or(req.max_tokens),
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            // OpenAI's seed is a signed integer; keep its bits.
            seed: req.seed.map(|s| s as u64),
            stop,
            request_id: req
                .request_id
                .unwrap_or_else(|| format!("chatcmpl-{}", uuid::Uuid::new_v4().simple())),
            dialogue_id: req.dialogue_id.unwrap_or_default(),
            task: req.task.unwrap_or_default(),
            expect_feedback: req.expect_feedback.unwrap_or(false),
        },
        stream: req.stream,
        include_usage,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<(pb::GenerateRequest, bool, bool), Error> {
        parse_chat_request(&serde_json::to_vec(&v).unwrap())
            .map(|c| (c.request, c.stream, c.include_usage))
    }

    fn param(e: &Error) -> Option<&str> {
        match e {
            Error::InvalidArgument { field, .. } => Some(field),
            _ => None,
        }
    }

    #[test]
    fn maps_an_openai_request() {
        let png = base64::engine::general_purpose::STANDARD.encode([0x89, b'P', b'N', b'G']);
        let (r, stream, usage) = parse(json!({
            "model": "smollm2-135m-instruct",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{png}")}}
                ]}
            ],
            "max_completion_tokens": 7, "stop": "END", "seed": -1, "stream": true,
            "stream_options": {"include_usage": true}, "frequency_penalty": 0.5
        }))
        .ok()
        .unwrap();
        assert!(stream && usage);
        assert_eq!(r.max_tokens, Some(7));
        assert_eq!(r.stop, vec!["END"]);
        assert_eq!(r.seed, Some(u64::MAX));
        assert_eq!(r.messages[0].role, pb::Role::System as i32);
        match &r.messages[1].parts[1].kind {
            Some(pb::content_part::Kind::Image(i)) => {
                assert_eq!(i.mime_type, "image/png");
                assert_eq!(i.data, vec![0x89, b'P', b'N', b'G']);
            }
            other => panic!("{other:?}"),
        }
        assert!(r.request_id.starts_with("chatcmpl-"));
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        let msgs = json!([{"role": "user", "content": "hi"}]);
        for (extra, field) in [
            (json!({"n": 2}), "n"),
            (json!({"logprobs": true}), "logprobs"),
            (json!({"tools": [{"type": "function"}]}), "tools"),
        ] {
            let mut v = json!({"messages": msgs});
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let e = parse(v).err().unwrap();
            assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument);
            assert_eq!(param(&e), Some(field));
        }
        let e = parse(json!({"messages": [{"role": "tool", "content": "x"}]}))
            .err()
            .unwrap();
        assert_eq!(param(&e), Some("messages[0].role"));
        let e = parse(json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}))
        .err()
        .unwrap();
        assert!(e.to_string().contains("data: URLs"), "{e}");
    }

    #[test]
    fn a_body_that_is_not_json_is_invalid() {
        for body in [&b""[..], b"{", b"[]", b"{\"messages\": 3}", b"\xff\xfe"] {
            let e = parse_chat_request(body).unwrap_err();
            assert_eq!(param(&e), Some("body"), "{e}");
        }
    }

    proptest::proptest! {
        /// Whatever JSON arrives, it maps or is refused with INVALID_ARGUMENT.
        #[test]
        fn never_panics_on_any_body(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            if let Err(e) = parse_chat_request(&body) {
                proptest::prop_assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument);
            }
        }
    }
}
