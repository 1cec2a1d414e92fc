//! Model weights and per-request decoding state.
//!
//! A [`Backbone`] holds the loaded weights once; each request gets a [`Session`] — a cheap clone
//! whose tensors share the weights' storage, with its own empty KV cache — so concurrent requests
//! never see each other's attention state.

pub(crate) mod cpu_ops;
pub mod gemma3;
pub mod gguf_llama;
mod llama_cpu;
pub mod llava;
mod parts;

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{llama, quantized_llama, qwen2};

use crate::candle_err;
use ferry_core::{Error, Result};

/// Architectures this engine can run, by weight format.
pub const SUPPORTED: &str =
    "GGUF: llama, gemma3; safetensors: llama, qwen2; safetensors vision-language: llava, llava_next";

/// Loaded weights of one model.
#[derive(Clone)]
pub enum Backbone {
    /// Quantized llama-family GGUF (llama, SmolLM2, Mistral, ...): ferry's forward pass, see
    /// [`gguf_llama`].
    GgufLlama(Arc<gguf_llama::GgufLlama>),
    /// Quantized llama-family GGUF that [`gguf_llama`] does not run (mixture of experts, partial
    /// rotary): candle's implementation.
    QuantizedLlama(quantized_llama::ModelWeights),
    /// Quantized Gemma 3 GGUF (ferry's own forward pass, see [`gemma3`]).
    QuantizedGemma3(Arc<gemma3::Gemma3>),
    /// Full-precision llama from safetensors.
    Llama {
        model: llama::Llama,
        config: llama::Config,
        dtype: DType,
    },
    /// Full-precision Qwen2 from safetensors.
    Qwen2(qwen2::ModelForCausalLM),
    /// LLaVA-1.5 or LLaVA-NeXT from safetensors: a vision-language model (see [`llava`]).
    Llava(Arc<llava::Llava>),
}

impl std::fmt::Debug for Backbone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.family())
    }
}

impl Backbone {
    /// Family name as used in manifests.
    pub fn family(&self) -> &'static str {
        match self {
            Backbone::GgufLlama(_) | Backbone::QuantizedLlama(_) | Backbone::Llama { .. } => {
                "llama"
            }
            Backbone::QuantizedGemma3(_) => "gemma3",
            Backbone::Qwen2(_) => "qwen2",
            Backbone::Llava(m) => match m.config.version {
                llava::LlavaVersion::V1_5 => "llava",
                llava::LlavaVersion::Next => "llava_next",
            },
        }
    }

    /// The vision-language model, when this backbone reads images.
    pub fn vision(&self) -> Option<&Arc<llava::Llava>> {
        match self {
            Backbone::Llava(m) => Some(m),
            _ => None,
        }
    }

    /// Loads GGUF weights; the architecture comes from `general.architecture`.
    pub fn from_gguf<R: std::io::Read + std::io::Seek>(
        content: gguf_file::Content,
        file: &mut R,
        path: &Path,
        device: &Device,
    ) -> Result<Self> {
        let arch = gguf_architecture(&content);
        let bad = |e: candle_core::Error| Error::InvalidFile {
            what: "GGUF model",
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        match arch.as_str() {
            "llama" if gguf_llama::GgufLlama::supports(&content) => {
                gguf_llama::GgufLlama::from_gguf(&content, file, device)
                    .map(|m| Backbone::GgufLlama(Arc::new(m)))
                    .map_err(bad)
            }
            "llama" => quantized_llama::ModelWeights::from_gguf(content, file, device)
                .map(Backbone::QuantizedLlama)
                .map_err(bad),
            "gemma3" => gemma3::Gemma3::from_gguf(&content, file, device)
                .map(|m| Backbone::QuantizedGemma3(Arc::new(m)))
                .map_err(bad),
            other => Err(Error::InvalidFile {
                what: "GGUF model",
                path: path.to_path_buf(),
                reason: format!("architecture `{other}` is not supported ({SUPPORTED})"),
            }),
        }
    }

    /// Loads a safetensors checkpoint of `family` with its parsed `config.json`.
    pub fn from_safetensors(
        family: &str,
        config_json: &str,
        files: &[std::path::PathBuf],
        config_path: &Path,
        device: &Device,
    ) -> Result<Self> {
        // f32 on CPU: candle's f16/bf16 CPU matmuls are much slower than f32 ones.
        let dtype = if device.is_cpu() {
            DType::F32
        } else {
            DType::BF16
        };
        let bad_config = |e: serde_json::Error| Error::InvalidFile {
            what: "model config",
            path: config_path.to_path_buf(),
            reason: e.to_string(),
        };
        // SAFETY: the files are memory-mapped read-only; ferry never writes model files while
        // serving, and a concurrent writer is outside what the engine can defend against.
        #[allow(unsafe_code)]
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }
            .map_err(candle_err)?;
        match family {
            "llama" => {
                let cfg: llama::LlamaConfig =
                    serde_json::from_str(config_json).map_err(bad_config)?;
                let config = cfg.into_config(false);
                let model = llama::Llama::load(vb, &config).map_err(candle_err)?;
                Ok(Backbone::Llama {
                    model,
                    config,
                    dtype,
                })
            }
            "qwen2" => {
                let cfg: qwen2::Config = serde_json::from_str(config_json).map_err(bad_config)?;
                let model = qwen2::ModelForCausalLM::new(&cfg, vb).map_err(candle_err)?;
                Ok(Backbone::Qwen2(model))
            }
            "llava" | "llava_next" => {
                let bad = |reason: String| Error::InvalidFile {
                    what: "model config",
                    path: config_path.to_path_buf(),
                    reason,
                };
                let value: serde_json::Value =
                    serde_json::from_str(config_json).map_err(bad_config)?;
                let cfg = llava::LlavaConfig::from_json(&value).map_err(bad)?;
                let model = llava::Llava::load(cfg, vb).map_err(|e| Error::InvalidFile {
                    what: "LLaVA weights",
                    path: files.first().cloned().unwrap_or_default(),
                    reason: e.to_string(),
                })?;
                Ok(Backbone::Llava(Arc::new(model)))
            }
            other => Err(Error::InvalidFile {
                what: "model config",
                path: config_path.to_path_buf(),
                reason: format!("family `{other}` is not supported ({SUPPORTED})"),
            }),
        }
    }

    /// Largest sequence length the implementation supports, if it has a hard limit.
    pub fn max_positions(&self) -> Option<usize> {
        match self {
            Backbone::GgufLlama(m) => m.context_length,
            Backbone::QuantizedLlama(_) => Some(quantized_llama::MAX_SEQ_LEN),
            // RoPE angles are computed per position: no table bounds the context.
            Backbone::QuantizedGemma3(_) => None,
            Backbone::Llama { config, .. } => Some(config.max_position_embeddings),
            Backbone::Qwen2(_) => None,
            Backbone::Llava(m) => Some(m.config.llama.max_position_embeddings),
        }
    }

    /// Bytes of weights resident in memory when the backbone knows better than the file size
    /// (ferry's GGUF models count what they hold; Gemma 3 may requantize some tensors at load).
    pub fn resident_bytes(&self) -> Option<u64> {
        match self {
            Backbone::GgufLlama(m) => Some(m.resident_bytes),
            Backbone::QuantizedGemma3(m) => Some(m.resident_bytes),
            _ => None,
        }
    }

    /// A fresh decoding session sharing these weights.
    pub fn session(&self, device: &Device) -> Result<Session> {
        let state = match self {
            Backbone::GgufLlama(m) => SessionState::GgufLlama {
                cache: m.new_cache(),
                model: m.clone(),
            },
            Backbone::QuantizedLlama(m) => {
                let mut m = m.clone();
                m.clear_kv_cache();
                SessionState::QuantizedLlama(m)
            }
            Backbone::QuantizedGemma3(m) => SessionState::QuantizedGemma3 {
                cache: m.new_cache(),
                model: m.clone(),
            },
            Backbone::Llama {
                model,
                config,
                dtype,
            } => SessionState::Llama {
                model: model.clone(),
                cache: llama::Cache::new(true, *dtype, config, device).map_err(candle_err)?,
            },
            Backbone::Qwen2(m) => {
                let mut m = m.clone();
                m.clear_kv_cache();
                SessionState::Qwen2(m)
            }
            Backbone::Llava(m) => SessionState::Llava {
                cache: m.new_cache(device).map_err(candle_err)?,
                model: m.clone(),
            },
        };
        Ok(Session {
            state,
            device: device.clone(),
            position: 0,
        })
    }
}

/// Rewrites a GGUF file in memory with every Q4_1 tensor requantised to Q8_0.
///
/// For CPUs where ferry's own kernels do not run ([`crate::kernels::kernel_available`]): candle
/// 0.11's x86 Q4_1 dot product is its generic scalar loop, its Q8_0 one SIMD. Requantising at
/// load costs about half a second and 1.8x the Q4_1 bytes, and there doubles decode speed. Q8_0 keeps 255 levels per 32-value block where Q4_1 has 16, so the requantised
/// weights differ from the originals by well under one Q4_1 step. Returns `None` when the file has
/// no Q4_1 tensor.
pub fn repack_q4_1_as_q8_0(
    content: &gguf_file::Content,
    file: &mut std::fs::File,
    path: &Path,
) -> Result<Option<(gguf_file::Content, std::io::Cursor<Vec<u8>>)>> {
    use candle_core::quantized::{GgmlDType, QTensor};
    if !content
        .tensor_infos
        .values()
        .any(|t| t.ggml_dtype == GgmlDType::Q4_1)
    {
        return Ok(None);
    }
    let bad = |e: candle_core::Error| Error::InvalidFile {
        what: "GGUF model",
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let cpu = Device::Cpu;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors: Vec<(&str, QTensor)> = Vec::with_capacity(names.len());
    for name in names {
        let qt = content.tensor(file, name, &cpu).map_err(bad)?;
        let qt = if qt.dtype() == GgmlDType::Q4_1 {
            QTensor::quantize(&qt.dequantize(&cpu).map_err(bad)?, GgmlDType::Q8_0).map_err(bad)?
        } else {
            qt
        };
        tensors.push((name.as_str(), qt));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    let mut buf = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut buf, &metadata, &refs).map_err(bad)?;
    buf.set_position(0);
    let repacked = gguf_file::Content::read(&mut buf).map_err(bad)?;
    Ok(Some((repacked, buf)))
}

/// The `general.architecture` of a GGUF file, lower-cased.
pub fn gguf_architecture(content: &gguf_file::Content) -> String {
    content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .map(|s| s.to_lowercase())
        .unwrap_or_else(|| "unknown".to_string())
}

enum SessionState {
    GgufLlama {
        model: Arc<gguf_llama::GgufLlama>,
        cache: gguf_llama::LlamaCache,
    },
    QuantizedLlama(quantized_llama::ModelWeights),
    QuantizedGemma3 {
        model: Arc<gemma3::Gemma3>,
        cache: gemma3::Gemma3Cache,
    },
    Llama {
        model: llama::Llama,
        cache: llama::Cache,
    },
    Qwen2(qwen2::ModelForCausalLM),
    Llava {
        model: Arc<llava::Llava>,
        cache: llama::Cache,
    },
}

/// Per-request decoding state: the KV cache and the position reached.
pub struct Session {
    state: SessionState,
    device: Device,
    position: usize,
}

impl Session {
    /// Feeds `tokens` after everything fed so far and returns the next-token logits (1-D, f32).
    pub fn forward(&mut self, tokens: &[u32]) -> Result<Tensor> {
        let input = Tensor::new(tokens, &self.device)
            .and_then(|t| t.unsqueeze(0))
            .map_err(candle_err)?;
        let pos = self.position;
        let logits = match &mut self.state {
            SessionState::GgufLlama { model, cache } => model.forward(cache, tokens, pos),
            SessionState::QuantizedLlama(m) => m.forward(&input, pos),
            SessionState::QuantizedGemma3 { model, cache } => model.forward(cache, tokens, pos),
            SessionState::Llama { model, cache } => model.forward(&input, pos, cache),
            SessionState::Qwen2(m) => m.forward(&input, pos),
            SessionState::Llava { model, cache } => model.forward_tokens(&input, pos, cache),
        }
        .map_err(candle_err)?;
        self.position += tokens.len();
        let logits = logits.flatten_all().map_err(candle_err)?;
        logits.to_dtype(DType::F32).map_err(candle_err)
    }

    /// Feeds each session its tokens and returns each one's next-token logits (1-D, f32), like
    /// [`Session::forward`] on each. Sessions of one ferry CPU model (GGUF llama or Gemma 3)
    /// run as one batch, so the weights are read once per step for all of them; other sessions
    /// run one after another.
    pub fn forward_many(batch: &mut [(&mut Session, &[u32])]) -> Result<Vec<Tensor>> {
        let rows = if let Some(model) = Self::shared(batch, |state| match state {
            SessionState::GgufLlama { model, .. } => Some(model),
            _ => None,
        }) {
            let mut items: Vec<(&mut gguf_llama::LlamaCache, &[u32], usize)> = batch
                .iter_mut()
                .filter_map(|(s, tokens)| match &mut s.state {
                    SessionState::GgufLlama { cache, .. } => Some((cache, *tokens, s.position)),
                    _ => None,
                })
                .collect();
            model.forward_batch(&mut items).map_err(candle_err)?
        } else if let Some(model) = Self::shared(batch, |state| match state {
            SessionState::QuantizedGemma3 { model, .. } => Some(model),
            _ => None,
        }) {
            let mut items: Vec<(&mut gemma3::Gemma3Cache, &[u32], usize)> = batch
                .iter_mut()
                .filter_map(|(s, tokens)| match &mut s.state {
                    SessionState::QuantizedGemma3 { cache, .. } => {
                        Some((cache, *tokens, s.position))
                    }
                    _ => None,
                })
                .collect();
            model.forward_batch(&mut items).map_err(candle_err)?
        } else {
            return batch
                .iter_mut()
                .map(|(s, tokens)| s.forward(tokens))
                .collect();
        };
        batch
            .iter_mut()
            .zip(rows)
            .map(|((s, tokens), logits)| {
                s.position += tokens.len();
                let n = logits.len();
                Tensor::from_vec(logits, n, &s.device).map_err(candle_err)
            })
            .collect()
    }

    /// The model every session of `batch` decodes with, as `model_of` reads it from a session's
    /// state, if they all share one (the same weights, not merely the same kind).
    fn shared<T>(
        batch: &[(&mut Session, &[u32])],
        model_of: impl Fn(&SessionState) -> Option<&Arc<T>>,
    ) -> Option<Arc<T>> {
        let mut shared: Option<&Arc<T>> = None;
        for (s, _) in batch {
            match (model_of(&s.state), shared) {
                (Some(model), None) => shared = Some(model),
                (Some(model), Some(m)) if Arc::ptr_eq(model, m) => {}
                _ => return None,
            }
        }
        shared.cloned()
    }

    /// Feeds input embeddings (`(1, n, hidden_size)`, e.g. a prompt with image features spliced
    /// in) after everything fed so far and returns the next-token logits (1-D, f32). Only
    /// vision-language models take embeddings.
    pub fn forward_embeds(&mut self, embeds: &Tensor) -> Result<Tensor> {
        let pos = self.position;
        let n = embeds.dim(1).map_err(candle_err)?;
        let logits = match &mut self.state {
            SessionState::Llava { model, cache } => model
                .forward_embeds(embeds, pos, cache)
                .map_err(candle_err)?,
            _ => {
                return Err(Error::Engine(
                    "this model takes token ids, not input embeddings".to_string(),
                ))
            }
        };
        self.position += n;
        let logits = logits.flatten_all().map_err(candle_err)?;
        logits.to_dtype(DType::F32).map_err(candle_err)
    }

    /// Tokens fed so far.
    pub fn position(&self) -> usize {
        self.position
    }
}
