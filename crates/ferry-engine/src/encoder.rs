//! Sentence embeddings with a BERT-family encoder (all-MiniLM-L6-v2 by default): mean pooling
//! over the attention mask, then L2 normalisation — the sentence-transformers recipe. Routing
//! policies use it to turn a question into features. Embeddings of a text are cached.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{PaddingParams, Tokenizer, TruncationParams};

use crate::candle_err;
use crate::source::ModelLocation;
use ferry_core::{Error, ModelManifest, Result};

/// Longest input, in tokens (the MESS+ reference truncates questions at 256).
pub const MAX_TOKENS: usize = 256;
/// Texts kept in the cache before it is cleared.
const CACHE_LIMIT: usize = 200_000;

/// A loaded sentence encoder.
pub struct SentenceEncoder {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    dim: usize,
    cache: Mutex<HashMap<String, Arc<Vec<f32>>>>,
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
        // SAFETY: read-only mapping of a model file that ferry never writes while serving.
        #[allow(unsafe_code)]
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, device) }
            .map_err(candle_err)?;
        let model = BertModel::load(vb, &config).map_err(candle_err)?;
        Ok(SentenceEncoder {
            model,
            tokenizer,
            device: device.clone(),
            dim: config.hidden_size,
            cache: Mutex::new(HashMap::new()),
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
            .map_err(|e| Error::Engine(format!("encoder tokenizer: {e}")))
    }

    fn embed_uncached(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let enc = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| Error::Engine(format!("encoder tokenizer: {e}")))?;
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
            let hidden = self.model.forward(&ids, &types, Some(&mask))?;
            let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
            let summed = hidden.broadcast_mul(&m)?.sum(1)?;
            let counts = m.sum(1)?.clamp(1e-9, f64::MAX)?;
            let mean = summed.broadcast_div(&counts)?;
            let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
            mean.broadcast_div(&norm)?.to_vec2::<f32>()
        };
        run().map_err(candle_err)
    }
}
