//! Tokenizers: `tokenizer.json` when the model ships one, otherwise built from the GGUF file's
//! own vocabulary.

use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::Tokenizer;

use ferry_core::{Error, Result};
use std::path::Path;

/// Loads `tokenizer.json`.
pub fn from_file(path: &Path) -> Result<Tokenizer> {
    Tokenizer::from_file(path).map_err(|e| Error::InvalidFile {
        what: "tokenizer",
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Builds the tokenizer stored in a GGUF file's metadata.
pub fn from_gguf(content: &gguf_file::Content, path: &Path) -> Result<Tokenizer> {
    let mut tok = Tokenizer::from_gguf(content).map_err(|e| Error::InvalidFile {
        what: "GGUF tokenizer",
        path: path.to_path_buf(),
        reason: format!("{e}; put a tokenizer.json next to the model to override"),
    })?;
    let pre = content
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .map(|s| s.as_str());
    if pre == Some("smollm") {
        // candle falls back to GPT-2's ByteLevel(add_prefix_space=true) for unknown `pre` values,
        // which turns "user" after a special token into "Ġuser". SmolLM2's own tokenizer.json
        // splits digits individually and adds no prefix space; match it exactly.
        tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ]))));
    }
    Ok(tok)
}

/// Encodes text that already went through the chat template: special tokens written in the
/// text (`<|im_start|>`) become their ids, and no extra BOS/EOS is added by the post-processor
/// when the template already wrote them.
pub fn encode_prompt(tok: &Tokenizer, text: &str, add_special: bool) -> Result<Vec<u32>> {
    tok.encode(text, add_special)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| Error::Engine(format!("tokenizer: {e}")))
}

/// Looks up a token's id by its text.
pub fn token_id(tok: &Tokenizer, token: &str) -> Option<u32> {
    tok.token_to_id(token)
}
