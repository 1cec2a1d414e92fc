//! Chat templates: the model's own Jinja template (from GGUF metadata or `tokenizer_config.json`)
//! rendered with minijinja, with ChatML as the fallback for models that ship none.

use ferry_core::{ChatMessage, Error, Result};
use minijinja::{context, Environment, ErrorKind as JinjaErrorKind, Value};

/// ChatML, used when a model ships no template.
pub const CHATML: &str = "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

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
        env.add_template_owned("chat", source.to_string())
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
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| Error::Engine(e.to_string()))?;
        tmpl.render(context! {
            messages => msgs,
            add_generation_prompt => true,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
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
