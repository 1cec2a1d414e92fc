//! The request model shared by every tier: chat messages made of typed parts, sampling settings,
//! and their validated conversion from the wire types of `ferry.v1`.

use ferry_proto::v1 as pb;

use crate::error::{Error, Result};

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// The role name used by chat templates.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// An image attached to a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagePart {
    /// Encoded image bytes.
    pub data: Vec<u8>,
    /// MIME type of `data`.
    pub mime_type: String,
    /// Sensor or view tag ("camera/front").
    pub source: String,
}

/// One typed part of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Text(String),
    Image(ImagePart),
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: Role,
    pub parts: Vec<Part>,
}

impl ChatMessage {
    /// A message with a single text part.
    pub fn text(role: Role, text: impl Into<String>) -> Self {
        ChatMessage {
            role,
            parts: vec![Part::Text(text.into())],
        }
    }

    /// The message's text parts joined by newlines (images are not text).
    pub fn joined_text(&self) -> String {
        let texts: Vec<&str> = self
            .parts
            .iter()
            .filter_map(|p| match p {
                Part::Text(t) => Some(t.as_str()),
                Part::Image(_) => None,
            })
            .collect();
        texts.join("\n")
    }

    /// The images attached to this message.
    pub fn images(&self) -> impl Iterator<Item = &ImagePart> {
        self.parts.iter().filter_map(|p| match p {
            Part::Image(i) => Some(i),
            Part::Text(_) => None,
        })
    }
}

/// Decoding settings of one request, after defaults were applied.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Upper bound on generated tokens (>= 1).
    pub max_tokens: u32,
    /// 0 means greedy.
    pub temperature: f64,
    /// Nucleus mass in (0, 1]; `None` disables it.
    pub top_p: Option<f64>,
    /// Top-k cut-off; `None` disables it.
    pub top_k: Option<usize>,
    /// Sampling seed.
    pub seed: u64,
    /// Stop strings (non-empty).
    pub stop: Vec<String>,
}

impl SamplingParams {
    /// Greedy decoding of at most `max_tokens` tokens.
    pub fn greedy(max_tokens: u32) -> Self {
        SamplingParams {
            max_tokens,
            temperature: 0.0,
            top_p: None,
            top_k: None,
            seed: 0,
            stop: Vec::new(),
        }
    }

    /// True when no randomness is involved.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-sequence token.
    Stop,
    /// `max_tokens` or the context window.
    Length,
    /// A stop string matched.
    StopSequence,
}

impl From<FinishReason> for pb::FinishReason {
    fn from(r: FinishReason) -> Self {
        match r {
            FinishReason::Stop => pb::FinishReason::Stop,
            FinishReason::Length => pb::FinishReason::Length,
            FinishReason::StopSequence => pb::FinishReason::StopSequence,
        }
    }
}

/// Size limits that incoming requests are validated against. Token limits are checked later,
/// once the model's tokenizer has counted the prompt.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RequestLimits {
    /// Most messages in one request.
    pub max_messages: usize,
    /// Most bytes of text over all messages.
    pub max_text_bytes: usize,
    /// Most images in one request.
    pub max_images: usize,
    /// Most bytes of one image.
    pub max_image_bytes: usize,
    /// Most stop strings.
    pub max_stop_sequences: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_new_tokens: u32,
    /// `max_tokens` when the request leaves it unset.
    pub default_max_tokens: u32,
    /// Most prompt tokens after the chat template (also capped by the model's context).
    pub max_prompt_tokens: u32,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            max_messages: 256,
            max_text_bytes: 256 * 1024,
            max_images: 8,
            max_image_bytes: 8 * 1024 * 1024,
            max_stop_sequences: 8,
            max_new_tokens: 2048,
            default_max_tokens: 256,
            max_prompt_tokens: 4096,
        }
    }
}

impl RequestLimits {
    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<()> {
        if self.default_max_tokens == 0 || self.default_max_tokens > self.max_new_tokens {
            return Err(Error::invalid(
                "limits.default_max_tokens",
                "must be between 1 and limits.max_new_tokens",
            ));
        }
        if self.max_prompt_tokens == 0 {
            return Err(Error::invalid(
                "limits.max_prompt_tokens",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// A `ferry.v1.GenerateRequest` after validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedRequest {
    /// Requested model id, or `None` for "auto".
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    pub sampling: SamplingParams,
    /// Client-chosen id, if any.
    pub request_id: Option<String>,
    /// Dialogue the request belongs to, if any.
    pub dialogue_id: Option<String>,
    /// Task category for the placement policy, if given.
    pub task: Option<String>,
    /// The app will send Feedback on this request.
    pub expect_feedback: bool,
    /// The calling app: its bearer token's name, set by the server from the credentials
    /// (empty for an unauthenticated caller), never by the request body. Admission takes
    /// turns between apps.
    pub app: String,
}

impl ValidatedRequest {
    /// Validates a wire request against `limits`. `fallback_seed` is used when the request has
    /// no seed. Messages and fields are checked in order, and the error names the first bad one.
    pub fn from_proto(
        req: pb::GenerateRequest,
        limits: &RequestLimits,
        fallback_seed: u64,
    ) -> Result<Self> {
        if req.messages.is_empty() {
            return Err(Error::invalid(
                "messages",
                "at least one message is required",
            ));
        }
        if req.messages.len() > limits.max_messages {
            return Err(Error::invalid(
                "messages",
                format!(
                    "{} messages exceed the limit of {}",
                    req.messages.len(),
                    limits.max_messages
                ),
            ));
        }
        let mut text_bytes = 0usize;
        let mut images = 0usize;
        let mut messages = Vec::with_capacity(req.messages.len());
        for (i, m) in req.messages.into_iter().enumerate() {
            let role = match pb::Role::try_from(m.role) {
                Ok(pb::Role::System) => Role::System,
                Ok(pb::Role::User) => Role::User,
                Ok(pb::Role::Assistant) => Role::Assistant,
                Ok(pb::Role::Unspecified) | Err(_) => {
                    return Err(Error::invalid(
                        format!("messages[{i}].role"),
                        "must be system, user or assistant",
                    ))
                }
            };
            let mut parts = Vec::with_capacity(m.parts.len());
            for (j, p) in m.parts.into_iter().enumerate() {
                match p.kind {
                    Some(pb::content_part::Kind::Text(t)) => {
                        text_bytes += t.len();
                        parts.push(Part::Text(t));
                    }
                    Some(pb::content_part::Kind::Image(img)) => {
                        images += 1;
                        let field = format!("messages[{i}].parts[{j}].image");
                        if img.data.is_empty() {
                            return Err(Error::invalid(field, "image data is empty"));
                        }
                        if img.data.len() > limits.max_image_bytes {
                            return Err(Error::invalid(
                                field,
                                format!(
                                    "{} bytes exceed the limit of {} bytes",
                                    img.data.len(),
                                    limits.max_image_bytes
                                ),
                            ));
                        }
                        if !img.mime_type.starts_with("image/") {
                            return Err(Error::invalid(
                                field,
                                format!("mime_type `{}` is not an image type", img.mime_type),
                            ));
                        }
                        parts.push(Part::Image(ImagePart {
                            data: img.data,
                            mime_type: img.mime_type,
                            source: img.source,
                        }));
                    }
                    None => {
                        return Err(Error::invalid(
                            format!("messages[{i}].parts[{j}]"),
                            "part has neither text nor image",
                        ))
                    }
                }
            }
            let msg = ChatMessage { role, parts };
            if msg.joined_text().trim().is_empty() && msg.images().next().is_none() {
                return Err(Error::invalid(
                    format!("messages[{i}]"),
                    "message has no text and no image",
                ));
            }
            messages.push(msg);
        }
        if !messages.iter().any(|m| m.role == Role::User) {
            return Err(Error::invalid(
                "messages",
                "at least one user message is required",
            ));
        }
        if text_bytes > limits.max_text_bytes {
            return Err(Error::invalid(
                "messages",
                format!(
                    "{text_bytes} bytes of text exceed the limit of {} bytes",
                    limits.max_text_bytes
                ),
            ));
        }
        if images > limits.max_images {
            return Err(Error::invalid(
                "messages",
                format!("{images} images exceed the limit of {}", limits.max_images),
            ));
        }

        let max_tokens = req.max_tokens.unwrap_or(limits.default_max_tokens);
        if max_tokens == 0 {
            return Err(Error::invalid("max_tokens", "must be at least 1"));
        }
        if max_tokens > limits.max_new_tokens {
            return Err(Error::invalid(
                "max_tokens",
                format!(
                    "{max_tokens} exceeds the limit of {} tokens",
                    limits.max_new_tokens
                ),
            ));
        }
        let temperature = f64::from(req.temperature.unwrap_or(0.0));
        if !temperature.is_finite() || !(0.0..=100.0).contains(&temperature) {
            return Err(Error::invalid(
                "temperature",
                "must be a number in [0, 100]",
            ));
        }
        let top_p = match req.top_p {
            None => None,
            Some(p) if p.is_finite() && p > 0.0 && p <= 1.0 => {
                // 1.0 keeps every token: the same as no nucleus cut.
                (p < 1.0).then_some(f64::from(p))
            }
            Some(_) => return Err(Error::invalid("top_p", "must be in (0, 1]")),
        };
        let top_k = req.top_k.filter(|&k| k > 0).map(|k| k as usize);
        if req.stop.len() > limits.max_stop_sequences {
            return Err(Error::invalid(
                "stop",
                format!(
                    "{} stop strings exceed the limit of {}",
                    req.stop.len(),
                    limits.max_stop_sequences
                ),
            ));
        }
        if req.stop.iter().any(|s| s.is_empty()) {
            return Err(Error::invalid("stop", "stop strings must not be empty"));
        }
        let model = match req.model.trim() {
            "" | "auto" => None,
            m => Some(m.to_string()),
        };
        let non_empty = |s: String| (!s.trim().is_empty()).then_some(s);
        for (field, value) in [
            ("request_id", &req.request_id),
            ("dialogue_id", &req.dialogue_id),
            ("task", &req.task),
        ] {
            if value.len() > 256 {
                return Err(Error::invalid(
                    field,
                    format!("is {} bytes, over the limit of 256", value.len()),
                ));
            }
        }
        Ok(ValidatedRequest {
            model,
            messages,
            sampling: SamplingParams {
                max_tokens,
                temperature,
                top_p,
                top_k,
                seed: req.seed.unwrap_or(fallback_seed),
                stop: req.stop,
            },
            request_id: non_empty(req.request_id),
            dialogue_id: non_empty(req.dialogue_id),
            task: non_empty(req.task),
            expect_feedback: req.expect_feedback,
            app: String::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_msg(role: pb::Role, text: &str) -> pb::Message {
        pb::Message {
            role: role as i32,
            parts: vec![pb::ContentPart {
                kind: Some(pb::content_part::Kind::Text(text.into())),
            }],
        }
    }

    fn req(messages: Vec<pb::Message>) -> pb::GenerateRequest {
        pb::GenerateRequest {
            model: "auto".into(),
            messages,
            ..Default::default()
        }
    }

    fn field_of(err: Error) -> String {
        match err {
            Error::InvalidArgument { field, .. } => field,
            other => panic!("expected InvalidArgument, got {other}"),
        }
    }

    #[test]
    fn valid_request_gets_defaults() {
        let limits = RequestLimits::default();
        let v = ValidatedRequest::from_proto(req(vec![text_msg(pb::Role::User, "hi")]), &limits, 7)
            .unwrap();
        assert_eq!(v.model, None);
        assert_eq!(v.sampling.max_tokens, limits.default_max_tokens);
        assert_eq!(v.sampling.seed, 7);
        assert!(v.sampling.is_greedy());
    }

    #[test]
    fn rejects_empty_and_malformed_input() {
        let limits = RequestLimits::default();
        let cases: Vec<(pb::GenerateRequest, &str)> = vec![
            (req(vec![]), "messages"),
            (req(vec![text_msg(pb::Role::User, "   ")]), "messages[0]"),
            (
                req(vec![text_msg(pb::Role::Unspecified, "x")]),
                "messages[0].role",
            ),
            (req(vec![text_msg(pb::Role::System, "x")]), "messages"),
            (
                pb::GenerateRequest {
                    max_tokens: Some(0),
                    ..req(vec![text_msg(pb::Role::User, "x")])
                },
                "max_tokens",
            ),
            (
                pb::GenerateRequest {
                    max_tokens: Some(limits.max_new_tokens + 1),
                    ..req(vec![text_msg(pb::Role::User, "x")])
                },
                "max_tokens",
            ),
            (
                pb::GenerateRequest {
                    top_p: Some(1.5),
                    ..req(vec![text_msg(pb::Role::User, "x")])
                },
                "top_p",
            ),
            (
                pb::GenerateRequest {
                    temperature: Some(f32::NAN),
                    ..req(vec![text_msg(pb::Role::User, "x")])
                },
                "temperature",
            ),
            (
                pb::GenerateRequest {
                    stop: vec![String::new()],
                    ..req(vec![text_msg(pb::Role::User, "x")])
                },
                "stop",
            ),
        ];
        for (r, field) in cases {
            let err = ValidatedRequest::from_proto(r, &limits, 0).unwrap_err();
            assert_eq!(field_of(err), field);
        }
    }

    #[test]
    fn rejects_oversized_and_non_image_parts() {
        let limits = RequestLimits {
            max_image_bytes: 4,
            ..RequestLimits::default()
        };
        let image = |data: Vec<u8>, mime: &str| pb::Message {
            role: pb::Role::User as i32,
            parts: vec![pb::ContentPart {
                kind: Some(pb::content_part::Kind::Image(pb::Image {
                    data,
                    mime_type: mime.into(),
                    source: "camera/front".into(),
                })),
            }],
        };
        for m in [
            image(vec![1; 5], "image/png"),
            image(vec![1; 3], "text/plain"),
            image(vec![], "image/png"),
        ] {
            let err = ValidatedRequest::from_proto(req(vec![m]), &limits, 0).unwrap_err();
            assert_eq!(field_of(err), "messages[0].parts[0].image");
        }
        let ok =
            ValidatedRequest::from_proto(req(vec![image(vec![1; 4], "image/png")]), &limits, 0)
                .unwrap();
        assert_eq!(
            ok.messages[0].images().next().unwrap().source,
            "camera/front"
        );
    }
}
