//! Chat templates: the model's own Jinja template (from GGUF metadata or `tokenizer_config.json`)
//! rendered with minijinja, with ChatML as the fallback for models that ship none.

use ferry_core::{ChatMessage, Error, Part, Result};
use minijinja::{context, Environment, ErrorKind as JinjaErrorKind, Value};

/// ChatML, used when a model ships no template.
pub const CHATML: &str = "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Gemma 3's turn format (`<start_of_turn>user|model`, `<end_of_turn>` ends a turn, a system
/// message folded into the first user turn, roles alternating), used for Gemma 3 GGUFs that
/// ship no template — the instruction-tuned checkpoints' own format.
pub const GEMMA3: &str = r#"{{- bos_token -}}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}
    {%- endif -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{- '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') -}}
    {{- message['content'] | trim -}}
    {{- '<end_of_turn>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<start_of_turn>model\n' -}}
{%- endif -%}"#;

/// The LLaVA conversation format (Vicuna's `USER:` / `ASSISTANT:` turns, each image as the
/// model's image token on its own line before the turn's text), used for LLaVA checkpoints that
/// ship no template. Like transformers' multimodal templates, it reads each message's `content`
/// as a list of `{"type": "image"}` and `{"type": "text", "text": ...}` parts.
pub const LLAVA: &str = r#"{%- for message in messages -%}
{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\n') -%}
{%- if message['role'] == 'system' -%}
{{- text + ' ' -}}
{%- elif message['role'] == 'user' -%}
{{- 'USER: ' -}}
{%- for part in message['content'] | selectattr('type', 'equalto', 'image') -%}
{{- image_token + '\n' -}}
{%- endfor -%}
{{- text + ' ' -}}
{%- else -%}
{{- 'ASSISTANT: ' + text + eos_token -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- 'ASSISTANT:' -}}
{%- endif -%}"#;

/// Removes transformers' `{% generation %}` / `{% endgeneration %}` markers (they only mark the
/// assistant's tokens for training masks, and minijinja has no such tag).
fn strip_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start..].find("%}") else {
            break;
        };
        let tag = &rest[start..start + len + 2];
        let inner =
            tag[2..tag.len() - 2].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..start]);
        if inner != "generation" && inner != "endgeneration" {
            out.push_str(tag);
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}

/// A compiled chat template with the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Template source, kept for diagnostics.
    pub source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("len", &self.source.len())
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token`/`eos_token` are exposed to it as in transformers.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        // Python string methods (`.strip()`, `.startswith()`) used by many HF templates.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(JinjaErrorKind::InvalidOperation, msg))
            },
        );
        // transformers renders chat templates with trim_blocks and lstrip_blocks on.
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| Error::Engine(format!("template syntax: {e}")))?,
        );
        env.add_template_owned("chat", strip_generation_tags(source))
            .map_err(|e| Error::Engine(format!("chat template does not compile: {e}")))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// Renders the conversation with the generation prompt appended.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String> {
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_pairs([
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(m.joined_text())),
                ])
            })
            .collect();
        self.render_values(msgs, "")
    }

    /// Renders the conversation for a vision-language model: each message's `content` is a
    /// list of parts in order, `{"type": "text", "text": ...}` or `{"type": "image"}`, as
    /// transformers' processors pass them, and `image_token` (the placeholder's text) is
    /// available to the template.
    pub fn render_multimodal(&self, messages: &[ChatMessage], image_token: &str) -> Result<String> {
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| {
                let parts: Vec<Value> = m
                    .parts
                    .iter()
                    .map(|p| match p {
                        Part::Text(t) => Value::from_pairs([
                            ("type", Value::from("text")),
                            ("text", Value::from(t.as_str())),
                        ]),
                        Part::Image(_) => Value::from_pairs([("type", Value::from("image"))]),
                    })
                    .collect();
                Value::from_pairs([
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(parts)),
                ])
            })
            .collect();
        self.render_values(msgs, image_token)
    }

    fn render_values(&self, msgs: Vec<Value>, image_token: &str) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| Error::Engine(e.to_string()))?;
        tmpl.render(context! {
            messages => msgs,
            add_generation_prompt => true,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
            image_token => image_token,
        })
        .map_err(|e| match e.kind() {
            // The template itself refused the conversation (e.g. roles must alternate).
            JinjaErrorKind::InvalidOperation => Error::invalid("messages", e.to_string()),
            _ => Error::Engine(format!("chat template failed: {e}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::Role;

    #[test]
    fn chatml_renders_generation_prompt() {
        let t = ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap();
        let out = t
            .render(&[
                ChatMessage::text(Role::System, "Be brief."),
                ChatMessage::text(Role::User, "Hi"),
            ])
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    fn image() -> Part {
        Part::Image(ferry_core::ImagePart {
            data: vec![1],
            mime_type: "image/png".into(),
            source: String::new(),
        })
    }

    #[test]
    fn llava_template_puts_one_placeholder_line_per_image_before_the_text() {
        let t = ChatTemplate::new(LLAVA, "<s>", "</s>").unwrap();
        let out = t
            .render_multimodal(
                &[
                    ChatMessage::text(Role::System, "Be brief."),
                    ChatMessage {
                        role: Role::User,
                        parts: vec![
                            Part::Text("What shape".into()),
                            image(),
                            Part::Text("is it?".into()),
                            image(),
                        ],
                    },
                    ChatMessage::text(Role::Assistant, "A circle."),
                    ChatMessage::text(Role::User, "Colour?"),
                ],
                "<image>",
            )
            .unwrap();
        assert_eq!(
            out,
            "Be brief. USER: <image>\n<image>\nWhat shape\nis it? ASSISTANT: A circle.</s>USER: Colour? ASSISTANT:"
        );
    }

    /// The shape of transformers' multimodal templates: content as a list filtered by type,
    /// `{% generation %}` markers around the assistant's text.
    #[test]
    fn hf_multimodal_template_with_generation_markers() {
        let src = "{% for m in messages %}{{ m['role'] }}:{% for c in m['content'] %}{% if c['type'] == 'image' %}[{{ image_token }}]{% endif %}{% endfor %}{% if m['role'] == 'assistant' %}{%- generation -%}{{ m['content'][0]['text'] }}{%- endgeneration -%}{% else %}{% for c in m['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}{% endif %}|{% endfor %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let out = t
            .render_multimodal(
                &[
                    ChatMessage {
                        role: Role::User,
                        parts: vec![image(), Part::Text("hi".into())],
                    },
                    ChatMessage::text(Role::Assistant, "yo"),
                ],
                "<img>",
            )
            .unwrap();
        assert_eq!(out, "user:[<img>]hi|assistant:yo|");
        assert_eq!(
            strip_generation_tags("a{% generation %}b{%- endgeneration -%}c{% if x %}"),
            "abc{% if x %}"
        );
    }

    #[test]
    fn hf_style_template_with_python_methods_and_exceptions() {
        let src = "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}{% endif %}[{{ m.role }}] {{ m.content.strip() }}\n{% endfor %}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        assert_eq!(
            t.render(&[ChatMessage::text(Role::User, "  hi  ")])
                .unwrap(),
            "<s>[user] hi\n"
        );
        let err = t
            .render(&[ChatMessage::text(Role::System, "x")])
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    }
}
