//! Sentence embeddings with a BERT-family encoder (all-MiniLM-L6-v2 by default): mean pooling
//! over the attention mask, then L2 normalisation — the sentence-transformers recipe. Routing
//! policies use it to turn a question into features. Embeddings of a text are cached.
//!
//! A manifest with `pooling = "static"` trades context for speed: each token's vector is the
//! encoder's embedding of that token alone, computed the first time the token is seen and kept,
//! and a text is the normalised mean of its tokens' vectors. A 54-token question then costs a
//! table lookup per token instead of a 1-GFLOP forward pass, once its tokens have been seen.
//!
//! A manifest with `encoder_weights = "q8_0"` runs the forward pass on ferry's int8 kernels
//! ([`quantized`]) instead of candle's f32 one, on the CPU.

mod quantized;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{PaddingParams, Tokenizer, TruncationParams};

use crate::candle_err;
use crate::source::ModelLocation;
use ferry_core::{EncoderWeights, Error, ModelManifest, Pooling, Result};
use quantized::QuantizedBert;

/// Longest input, in tokens (the MESS+ reference truncates questions at 256).
pub const MAX_TOKENS: usize = 256;

/// Names the encoders' arithmetic: bumped whenever a change moves their output vectors (even by
/// rounding), so vectors cached on disk by an older build are not mixed with this one's.
/// 2026-12-07: the int8 kernel folds Q8_0's weight offset into the integer dot.
pub const NUMERICS_REVISION: &str = "2026-12-07";

/// Texts kept in the cache before it is cleared.
const CACHE_LIMIT: usize = 200_000;

/// The network itself: candle's f32 BERT, or ferry's int8 one.
enum Body {
    Candle(BertModel),
    Quantized(QuantizedBert),
}

/// A loaded sentence encoder.
pub struct SentenceEncoder {
    body: Body,
    tokenizer: Tokenizer,
    device: Device,
    dim: usize,
    cache: Mutex<HashMap<String, Arc<Vec<f32>>>>,
    /// Static pooling: per-token vectors (unnormalised), filled as tokens are first seen.
    tokens: Option<Mutex<HashMap<u32, Arc<[f32]>>>>,
}

/// The encoder's weights, read into memory with every linear layer's `(out, in)` matrix stored
/// transposed (same shape, column-major strides). candle's `Linear` multiplies by `weightᵀ`; with
/// this layout that operand is row-major, which the CPU gemm streams as it is, where the file's
/// layout made it repack every weight matrix on every call — a fixed cost of about 10 ms per
/// forward pass on a 2-core VM, most of the time for a short question.
fn linear_weights_column_major(path: &Path, device: &Device) -> Result<VarBuilder<'static>> {
    let tensors = candle_core::safetensors::load(path, device).map_err(candle_err)?;
    let mut out = HashMap::with_capacity(tensors.len());
    for (name, t) in tensors {
        let linear = t.rank() == 2 && name.ends_with(".weight") && !name.contains("embeddings");
        let t = if linear {
            t.t().and_then(|w| w.contiguous()).and_then(|w| w.t())
        } else {
            Ok(t)
        }
        .map_err(candle_err)?;
        out.insert(name, t);
    }
    Ok(VarBuilder::from_tensors(out, DType::F32, device))
}

/// `v` scaled to unit length (a zero vector stays zero).
fn unit(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

fn tokenizer_err(e: impl std::fmt::Display) -> Error {
    Error::Engine(format!("encoder tokenizer: {e}"))
}

impl SentenceEncoder {
    /// Loads `config.json`, `tokenizer.json` and `model.safetensors` of an encoder manifest.
    pub fn load(manifest: &ModelManifest, model_dir: &Path, device: &Device) -> Result<Self> {
        let loc = ModelLocation::of(manifest, model_dir);
        let config_path = loc.file("config.json")?;
        let text = std::fs::read_to_string(&config_path)
            .map_err(|e| Error::io(format!("reading {}", config_path.display()), e))?;
        let config: Config = serde_json::from_str(&text).map_err(|e| Error::InvalidFile {
            what: "encoder config",
            path: config_path.clone(),
            reason: e.to_string(),
        })?;
        let mut tokenizer = crate::tokenizer::from_file(&loc.file("tokenizer.json")?)?;
        tokenizer.with_padding(Some(PaddingParams::default()));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..Default::default()
            }))
            .map_err(|e| Error::Engine(format!("tokenizer truncation: {e}")))?;
        let weights = loc.file("model.safetensors")?;
        let body = if manifest.encoder_weights == EncoderWeights::Q8_0 && device.is_cpu() {
            Body::Quantized(QuantizedBert::load(
                quantized::read_tensors(&weights)?,
                &config,
            )?)
        } else {
            Body::Candle(
                BertModel::load(linear_weights_column_major(&weights, device)?, &config)
                    .map_err(candle_err)?,
            )
        };
        Ok(SentenceEncoder {
            body,
            tokenizer,
            device: device.clone(),
            dim: config.hidden_size,
            cache: Mutex::new(HashMap::new()),
            tokens: (manifest.pooling == Pooling::Static).then(|| Mutex::new(HashMap::new())),
        })
    }

    /// Embedding dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Embeds texts (batched), using and filling the cache.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Arc<Vec<f32>>>> {
        let mut out: Vec<Option<Arc<Vec<f32>>>> = {
            let cache = self.cache.lock().expect("encoder cache lock");
            texts.iter().map(|t| cache.get(*t).cloned()).collect()
        };
        let mut missing: Vec<usize> = (0..texts.len()).filter(|&i| out[i].is_none()).collect();
        // Batches of similar length waste little work on padding.
        missing.sort_by_key(|&i| texts[i].len());
        for chunk in missing.chunks(32) {
            let batch: Vec<&str> = chunk.iter().map(|&i| texts[i]).collect();
            let vectors = self.embed_uncached(&batch)?;
            let mut cache = self.cache.lock().expect("encoder cache lock");
            if cache.len() + vectors.len() > CACHE_LIMIT {
                cache.clear();
            }
            for (&i, v) in chunk.iter().zip(vectors) {
                let v = Arc::new(v);
                cache.insert(texts[i].to_string(), v.clone());
                out[i] = Some(v);
            }
        }
        Ok(out
            .into_iter()
            .map(|v| v.expect("every text embedded"))
            .collect())
    }

    /// Tokens the encoder sees for `text` (after truncation).
    pub fn embed_token_count(&self, text: &str) -> Result<usize> {
        self.tokenizer
            .encode(text, true)
            .map(|e| e.get_ids().len())
            .map_err(tokenizer_err)
    }

    fn embed_uncached(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        if self.tokens.is_some() {
            return self.embed_static(texts);
        }
        self.embed_contextual(texts)
    }

    fn embed_contextual(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let model = match &self.body {
            Body::Candle(model) => model,
            Body::Quantized(q) => {
                // One text at a time: no padding to compute, and a text's vector does not
                // depend on what else was in its batch.
                return texts
                    .iter()
                    .map(|t| {
                        let enc = self.tokenizer.encode(*t, true).map_err(tokenizer_err)?;
                        Ok(unit(q.mean_pooled(enc.get_ids())?))
                    })
                    .collect();
            }
        };
        let enc = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(tokenizer_err)?;
        let n = enc.len();
        let len = enc.first().map(|e| e.get_ids().len()).unwrap_or(0);
        let ids: Vec<u32> = enc.iter().flat_map(|e| e.get_ids().to_vec()).collect();
        let mask: Vec<u32> = enc
            .iter()
            .flat_map(|e| e.get_attention_mask().to_vec())
            .collect();
        let run = || -> candle_core::Result<Vec<Vec<f32>>> {
            let ids = Tensor::from_vec(ids, (n, len), &self.device)?;
            let mask = Tensor::from_vec(mask, (n, len), &self.device)?;
            let types = ids.zeros_like()?;
            let hidden = model.forward(&ids, &types, Some(&mask))?;
            let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
            let summed = hidden.broadcast_mul(&m)?.sum(1)?;
            let counts = m.sum(1)?.clamp(1e-9, f64::MAX)?;
            let mean = summed.broadcast_div(&counts)?;
            let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
            mean.broadcast_div(&norm)?.to_vec2::<f32>()
        };
        run().map_err(candle_err)
    }

    /// Static pooling: the normalised mean of each text's token vectors. The tokens no text has
    /// shown before are embedded together, once for the whole batch. A text with no tokens
    /// (empty, or only characters the tokenizer drops) gets the contextual embedding.
    fn embed_static(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let encodings = texts
            .iter()
            .map(|t| self.tokenizer.encode(*t, false).map_err(tokenizer_err))
            .collect::<Result<Vec<_>>>()?;
        let table = self.tokens.as_ref().expect("static pooling");
        let mut unseen: Vec<u32> = {
            let t = table.lock().expect("encoder token lock");
            encodings
                .iter()
                .flat_map(|e| e.get_ids().iter().copied())
                .filter(|i| !t.contains_key(i))
                .collect()
        };
        unseen.sort_unstable();
        unseen.dedup();
        if !unseen.is_empty() {
            let vectors = self.token_vectors(&unseen)?;
            let mut t = table.lock().expect("encoder token lock");
            for (id, v) in unseen.into_iter().zip(vectors) {
                t.insert(id, v.into());
            }
        }
        let mut out = Vec::with_capacity(texts.len());
        for (text, enc) in texts.iter().zip(&encodings) {
            let ids = enc.get_ids();
            if ids.is_empty() {
                out.push(self.embed_contextual_one(text)?);
                continue;
            }
            let t = table.lock().expect("encoder token lock");
            let mut mean = vec![0.0f32; self.dim];
            for id in ids {
                for (m, x) in mean.iter_mut().zip(t[id].iter()) {
                    *m += x;
                }
            }
            out.push(unit(mean));
        }
        Ok(out)
    }

    /// Each token's own embedding: the encoder over `[CLS] token [SEP]` (the tokenizer's own
    /// special tokens), mean-pooled, not normalised (a token's weight in a text's mean stays
    /// its vector's length, as in Model2Vec).
    fn token_vectors(&self, ids: &[u32]) -> Result<Vec<Vec<f32>>> {
        let specials = self.tokenizer.encode("", true).map_err(tokenizer_err)?;
        let (head, tail) = match specials.get_ids() {
            [h, t] => (*h, *t),
            other => {
                return Err(Error::Engine(format!(
                    "static pooling needs a tokenizer that wraps a text in two special tokens; it adds {}",
                    other.len()
                )))
            }
        };
        let model = match &self.body {
            Body::Candle(model) => model,
            Body::Quantized(q) => {
                return ids
                    .iter()
                    .map(|&id| q.mean_pooled(&[head, id, tail]))
                    .collect();
            }
        };
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(256) {
            let n = chunk.len();
            let rows: Vec<u32> = chunk.iter().flat_map(|&i| [head, i, tail]).collect();
            let run = || -> candle_core::Result<Vec<Vec<f32>>> {
                let ids = Tensor::from_vec(rows, (n, 3), &self.device)?;
                let types = ids.zeros_like()?;
                let mask = ids.ones_like()?;
                let hidden = model.forward(&ids, &types, Some(&mask))?;
                hidden.mean(1)?.to_vec2::<f32>()
            };
            out.extend(run().map_err(candle_err)?);
        }
        Ok(out)
    }

    fn embed_contextual_one(&self, text: &str) -> Result<Vec<f32>> {
        let mut v = self.embed_contextual(&[text])?;
        Ok(v.pop().expect("one text in, one vector out"))
    }
}
