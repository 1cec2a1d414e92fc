//! Tokenizers: `tokenizer.json` when the model ships one, otherwise built from the GGUF file's
//! own vocabulary: byte-level BPE (`tokenizer.ggml.model = "gpt2"`) through candle, SentencePiece
//! BPE (`"llama"`: Gemma, Llama 2, Mistral) by [`sentencepiece_bpe`].

use std::collections::HashMap;

use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

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
    let bad = |reason: String| Error::InvalidFile {
        what: "GGUF tokenizer",
        path: path.to_path_buf(),
        reason: format!("{reason}; put a tokenizer.json next to the model to override"),
    };
    let kind = content
        .metadata
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .map(|s| s.to_lowercase());
    if kind.as_deref() == Some("llama") {
        // candle only builds byte-level BPE ("gpt2") tokenizers.
        let vocab = SpmVocab::from_gguf(content).map_err(bad)?;
        return sentencepiece_bpe(&vocab).map_err(|e| bad(e.to_string()));
    }
    let mut tok = Tokenizer::from_gguf(content).map_err(|e| bad(e.to_string()))?;
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

/// GGUF token types (llama.cpp's `llama_token_type`, numbered like SentencePiece's piece types).
mod token_type {
    pub const NORMAL: u32 = 1;
    pub const UNKNOWN: u32 = 2;
    pub const CONTROL: u32 = 3;
    pub const USER_DEFINED: u32 = 4;
    pub const UNUSED: u32 = 5;
}

/// The word-piece marker SentencePiece writes for a space.
const SPM_SPACE: &str = "\u{2581}";

/// A SentencePiece vocabulary as GGUF stores it (`tokenizer.ggml.*`).
#[derive(Debug, Clone, Default)]
pub struct SpmVocab {
    /// Pieces by id, with `▁` for spaces and `<0xAB>` byte pieces.
    pub tokens: Vec<String>,
    /// Piece scores; for a BPE model, a higher score merges earlier.
    pub scores: Vec<f32>,
    /// Piece types (see `token_type`); all normal when the file has none.
    pub types: Vec<u32>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub unk_id: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    /// Prepend a space to the text (Llama 2, Mistral); Gemma does not.
    pub add_space_prefix: bool,
}

fn gguf_u32(v: &gguf_file::Value) -> Option<u32> {
    use gguf_file::Value as V;
    match *v {
        V::U8(x) => Some(x.into()),
        V::U16(x) => Some(x.into()),
        V::U32(x) => Some(x),
        V::U64(x) => u32::try_from(x).ok(),
        V::I8(x) => u32::try_from(x).ok(),
        V::I16(x) => u32::try_from(x).ok(),
        V::I32(x) => u32::try_from(x).ok(),
        V::I64(x) => u32::try_from(x).ok(),
        _ => None,
    }
}

impl SpmVocab {
    /// Reads the vocabulary from GGUF metadata, with llama.cpp's defaults for absent keys
    /// (BOS added, no EOS, a space prefix).
    pub fn from_gguf(content: &gguf_file::Content) -> std::result::Result<Self, String> {
        let md = |key: &str| content.metadata.get(key);
        let array = |key: &str| -> std::result::Result<Option<&Vec<gguf_file::Value>>, String> {
            md(key)
                .map(|v| v.to_vec().map_err(|_| format!("`{key}` is not an array")))
                .transpose()
        };
        let tokens = array("tokenizer.ggml.tokens")?
            .ok_or("missing `tokenizer.ggml.tokens`")?
            .iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|_| "`tokenizer.ggml.tokens` holds a non-string".to_string())
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let scores = array("tokenizer.ggml.scores")?
            .ok_or("missing `tokenizer.ggml.scores` (a SentencePiece BPE vocabulary needs them)")?
            .iter()
            .map(|v| {
                v.to_f32()
                    .map_err(|_| "`tokenizer.ggml.scores` holds a non-f32".to_string())
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let types = match array("tokenizer.ggml.token_type")? {
            Some(a) => a
                .iter()
                .map(|v| gguf_u32(v).ok_or("`tokenizer.ggml.token_type` holds a non-integer"))
                .collect::<std::result::Result<Vec<_>, _>>()?,
            None => vec![token_type::NORMAL; tokens.len()],
        };
        if scores.len() != tokens.len() || types.len() != tokens.len() {
            return Err(format!(
                "{} tokens but {} scores and {} token types",
                tokens.len(),
                scores.len(),
                types.len()
            ));
        }
        let id = |key: &str| md(key).and_then(gguf_u32);
        let flag =
            |key: &str, default: bool| md(key).and_then(|v| v.to_bool().ok()).unwrap_or(default);
        Ok(SpmVocab {
            tokens,
            scores,
            types,
            bos_id: id("tokenizer.ggml.bos_token_id"),
            eos_id: id("tokenizer.ggml.eos_token_id"),
            unk_id: id("tokenizer.ggml.unknown_token_id"),
            add_bos: flag("tokenizer.ggml.add_bos_token", true),
            add_eos: flag("tokenizer.ggml.add_eos_token", false),
            add_space_prefix: flag("tokenizer.ggml.add_space_prefix", true),
        })
    }

    fn token(&self, id: Option<u32>) -> Option<&String> {
        id.and_then(|i| self.tokens.get(i as usize))
    }
}

/// Builds a `tokenizers` BPE tokenizer that encodes like SentencePiece's BPE model (and
/// llama.cpp's SPM tokenizer) from a scored vocabulary:
///
/// - spaces become `▁` (after a leading `▁` when `add_space_prefix`); nothing is split first;
/// - symbols start as single characters and the adjacent pair whose concatenation is the
///   highest-scoring normal piece merges first (ties: leftmost). The BPE merge list encodes
///   exactly that: every split of every normal piece into two normal pieces, ranked by the
///   score of the whole piece;
/// - characters outside the vocabulary fall back to their UTF-8 bytes (`<0xAB>` pieces);
/// - control and unknown pieces are special tokens (matched when written in the text, skipped
///   when decoding); user-defined pieces (Gemma's runs of newlines, tabs and spaces) are always
///   matched in the raw text, as llama.cpp does.
pub fn sentencepiece_bpe(v: &SpmVocab) -> Result<Tokenizer> {
    use token_type::*;
    let err =
        |e: tokenizers::Error| Error::Engine(format!("building the SentencePiece tokenizer: {e}"));
    let vocab: Vocab = v
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let normal: HashMap<&str, u32> = v
        .tokens
        .iter()
        .zip(&v.types)
        .enumerate()
        .filter(|(_, (_, ty))| **ty == NORMAL)
        .map(|(i, (t, _))| (t.as_str(), i as u32))
        .collect();
    // (score of the merged piece, left id, right id)
    let mut ranked: Vec<(f32, u32, u32)> = Vec::new();
    for (piece, &id) in &normal {
        for (at, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(at);
            if let (Some(&li), Some(&ri)) = (normal.get(l), normal.get(r)) {
                ranked.push((v.scores[id as usize], li, ri));
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let merges: Vec<(String, String)> = ranked
        .into_iter()
        .map(|(_, l, r)| (v.tokens[l as usize].clone(), v.tokens[r as usize].clone()))
        .collect();

    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = v.token(v.unk_id) {
        builder = builder.unk_token(unk.clone());
    }
    let mut tok = Tokenizer::new(builder.build().map_err(err)?);

    let replace = Replace::new(" ", SPM_SPACE).map_err(err)?;
    if v.add_space_prefix {
        tok.with_normalizer(Some(NormalizerSequence::new(vec![
            Prepend::new(SPM_SPACE.to_string()).into(),
            replace.into(),
        ])))
        .map_err(err)?;
    } else {
        tok.with_normalizer(Some(replace)).map_err(err)?;
    }
    let mut decoders = vec![
        Replace::new(SPM_SPACE, " ").map_err(err)?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if v.add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tok.with_decoder(Some(DecoderSequence::new(decoders)));

    let bos = v.token(v.bos_id).filter(|_| v.add_bos);
    let eos = v.token(v.eos_id).filter(|_| v.add_eos);
    if bos.is_some() || eos.is_some() {
        let mut single: Vec<String> = Vec::new();
        let mut pair: Vec<String> = Vec::new();
        let mut specials: Vec<(String, u32)> = Vec::new();
        if let (Some(b), Some(id)) = (bos, v.bos_id) {
            single.push(b.clone());
            pair.push(b.clone());
            specials.push((b.clone(), id));
        }
        single.push("$A".into());
        pair.push("$A".into());
        if let (Some(e), Some(id)) = (eos, v.eos_id) {
            single.push(e.clone());
            pair.push(e.clone());
            specials.push((e.clone(), id));
        }
        pair.push("$B:1".into());
        let pp = TemplateProcessing::builder()
            .try_single(single)
            .and_then(|b| b.try_pair(pair))
            .map_err(|e| Error::Engine(format!("post-processor: {e}")))?
            .special_tokens(specials)
            .build()
            .map_err(|e| Error::Engine(format!("post-processor: {e}")))?;
        tok.with_post_processor(Some(pp));
    }

    let added = |want: &[u32], special: bool| -> Vec<AddedToken> {
        v.tokens
            .iter()
            .zip(&v.types)
            .filter(|(_, ty)| want.contains(ty))
            .map(|(t, _)| AddedToken::from(t.clone(), special).normalized(false))
            .collect()
    };
    tok.add_special_tokens(added(&[UNKNOWN, CONTROL, UNUSED], true))
        .map_err(err)?;
    tok.add_tokens(added(&[USER_DEFINED], false)).map_err(err)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny SentencePiece vocabulary laid out like Gemma's: control pieces first, user-defined
    /// newlines, all 256 byte pieces, then scored normal pieces.
    fn vocab(add_space_prefix: bool) -> SpmVocab {
        let mut v = SpmVocab {
            bos_id: Some(2),
            eos_id: Some(1),
            unk_id: Some(3),
            add_bos: true,
            add_space_prefix,
            ..Default::default()
        };
        let mut push = |t: &str, score: f32, ty: u32| {
            v.tokens.push(t.to_string());
            v.scores.push(score);
            v.types.push(ty);
        };
        push("<pad>", 0.0, token_type::CONTROL); // 0
        push("<eos>", 0.0, token_type::CONTROL); // 1
        push("<bos>", 0.0, token_type::CONTROL); // 2
        push("<unk>", 0.0, token_type::UNKNOWN); // 3
        push("<start_of_turn>", 0.0, token_type::CONTROL); // 4
        push("\n", 0.0, token_type::USER_DEFINED); // 5
        push("\n\n", 0.0, token_type::USER_DEFINED); // 6
        for b in 0..=255u8 {
            push(&format!("<0x{b:02X}>"), 0.0, 6); // 7..=262
        }
        for (i, t) in [
            "▁", "a", "b", "c", "d", "e", "h", "l", "o", "r", "w", // 263..=273
            "he", "ll", "hell", "hello", "▁w", "or", "▁wor", "▁world", "ld", // 274..=282
            "ab", "bc", "▁hello", // 283..=285
        ]
        .iter()
        .enumerate()
        {
            let score = match *t {
                // "bc" outranks "ab": "abc" must become a|bc, not ab|c.
                "ab" => -30.0,
                "bc" => -20.0,
                _ => -(i as f32),
            };
            push(t, score, token_type::NORMAL);
        }
        v
    }

    fn ids(tok: &Tokenizer, text: &str, special: bool) -> Vec<u32> {
        encode_prompt(tok, text, special).unwrap()
    }

    #[test]
    fn merges_follow_piece_scores_not_longest_match() {
        let tok = sentencepiece_bpe(&vocab(false)).unwrap();
        // he, ll, hell, hello, ▁w, or, ▁wor, then ld before ▁world: hand-traced.
        assert_eq!(ids(&tok, "hello world", false), vec![277, 281]);
        assert_eq!(ids(&tok, "abc", false), vec![264, 284]);
        assert_eq!(ids(&tok, "cab", false), vec![266, 283]);
        // No prefix space (Gemma): a leading word has no ▁.
        assert_eq!(ids(&tok, " world", false), vec![281]);
        assert_eq!(tok.decode(&[277, 281], true).unwrap(), "hello world");
    }

    #[test]
    fn bytes_specials_and_bos() {
        let tok = sentencepiece_bpe(&vocab(false)).unwrap();
        // é is not a piece: its UTF-8 bytes C3 A9 are.
        let e = ids(&tok, "é", false);
        assert_eq!(e, vec![7 + 0xC3, 7 + 0xA9]);
        assert_eq!(tok.decode(&e, true).unwrap(), "é");
        // Control pieces written in the text are single tokens; user-defined newlines match the
        // longest run; BOS is added only when asked.
        let t = "<start_of_turn>hello\n\nab\nc";
        let got = ids(&tok, t, true);
        assert_eq!(got, vec![2, 4, 277, 6, 283, 5, 266]);
        assert_eq!(tok.decode(&got, false).unwrap(), format!("<bos>{t}"));
        assert_eq!(tok.decode(&got, true).unwrap(), "hello\n\nab\nc");
        assert_eq!(token_id(&tok, "<start_of_turn>"), Some(4));
    }

    #[test]
    fn round_trips_through_bytes() {
        let tok = sentencepiece_bpe(&vocab(false)).unwrap();
        for text in ["a  b", "🚢 ferry\n", "hello\tworld", "  ", "ab c d e"] {
            let got = ids(&tok, text, false);
            assert_eq!(tok.decode(&got, true).unwrap(), text, "{got:?}");
        }
    }

    #[test]
    fn llama_style_space_prefix() {
        let tok = sentencepiece_bpe(&vocab(true)).unwrap();
        assert_eq!(ids(&tok, "hello world", false), vec![285, 281]);
        assert_eq!(ids(&tok, "hello", true), vec![2, 285]);
        assert_eq!(tok.decode(&[285, 281], true).unwrap(), "hello world");
    }

    #[test]
    fn reads_the_vocabulary_from_gguf_metadata() {
        use gguf_file::Value;
        let v = vocab(false);
        let strings = |xs: &[String]| Value::Array(xs.iter().cloned().map(Value::String).collect());
        let meta: Vec<(&str, Value)> = vec![
            ("tokenizer.ggml.model", Value::String("llama".into())),
            ("tokenizer.ggml.tokens", strings(&v.tokens)),
            (
                "tokenizer.ggml.scores",
                Value::Array(v.scores.iter().map(|s| Value::F32(*s)).collect()),
            ),
            (
                "tokenizer.ggml.token_type",
                Value::Array(v.types.iter().map(|t| Value::I32(*t as i32)).collect()),
            ),
            ("tokenizer.ggml.bos_token_id", Value::U32(2)),
            ("tokenizer.ggml.eos_token_id", Value::U32(1)),
            ("tokenizer.ggml.unknown_token_id", Value::U32(3)),
            ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
            ("tokenizer.ggml.add_space_prefix", Value::Bool(false)),
        ];
        let refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
        let mut buf = std::io::Cursor::new(Vec::new());
        gguf_file::write(&mut buf, &refs, &[]).unwrap();
        buf.set_position(0);
        let content = gguf_file::Content::read(&mut buf).unwrap();
        let read = SpmVocab::from_gguf(&content).unwrap();
        assert_eq!(read.tokens, v.tokens);
        assert_eq!(read.types, v.types);
        assert_eq!(
            (read.bos_id, read.eos_id, read.unk_id),
            (Some(2), Some(1), Some(3))
        );
        assert!(read.add_bos && !read.add_eos && !read.add_space_prefix);
        let tok = from_gguf(&content, Path::new("t.gguf")).unwrap();
        assert_eq!(ids(&tok, "hello world", true), vec![2, 277, 281]);
    }
}
