//! Quantized llama-family models (llama, SmolLM2, Mistral, ...) from GGUF files.
//!
//! ferry runs its own forward pass instead of candle 0.11's `quantized_llama` so that every
//! linear layer goes through [`QLinear`] (ferry's CPU kernels read Q4_0/Q4_1/Q5_0/Q8_0 blocks in
//! place; candle's `quantized_llama` has no seam for them), and so that the token embedding
//! stays quantized: candle dequantizes the whole table to f32 at load (113 MB for SmolLM2's
//! 49152×576 table, more than the model file), where here only the rows a request looks up are
//! dequantized and a tied output head shares the table. RoPE angles are computed for the
//! positions being fed, so no table bounds the context; the file's `context_length` does.
//!
//! The GGUF convention for llama is the *interleaved* rotary embedding (llama.cpp permutes the
//! query and key weights when converting), and Llama 3.1+ files carry per-frequency divisors
//! in `rope_freqs.weight`.

use std::sync::Arc;

use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{Device, Module, Result, Tensor};
use candle_transformers::quantized_nn::RmsNorm;

use super::cpu_ops::Segment;
use super::llama_cpu::{CpuCache, CpuLayer, CpuLlama};
use super::parts::{
    cached_attention, gguf_head_and_embedding, heads, inv_freq, rope_angles, two_paths_api,
    Embedding, TwoPaths,
};
use crate::kernels::{QLinear, QWeight};

#[derive(Debug, Clone)]
struct Layer {
    wq: QLinear,
    wk: QLinear,
    wv: QLinear,
    wo: QLinear,
    attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    gate: QLinear,
    up: QLinear,
    down: QLinear,
}

/// Llama weights, shared by every session.
#[derive(Debug)]
pub struct GgufLlama {
    embedding: Embedding,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: QLinear,
    inv_freq: Vec<f64>,
    /// The plain-buffer forward pass, when every layer runs on ferry's CPU kernels.
    cpu: Option<CpuLlama>,
    /// Longest context the file was trained for, when it says.
    pub context_length: Option<usize>,
    /// Bytes of weights held.
    pub resident_bytes: u64,
    device: Device,
}

/// Per-session attention cache: keys and values per layer, `(batch, kv_heads, len, head_dim)`
/// on candle's path, plain buffers on the CPU path.
#[derive(Debug, Clone, Default)]
pub struct LlamaCache {
    kv: Vec<Option<(Tensor, Tensor)>>,
    cpu: CpuCache,
}

impl GgufLlama {
    /// Whether this loader runs the file: dense llama GGUFs whose rotary dimension is the whole
    /// head. Mixture-of-experts files (`ffn_gate_inp`) and partial rotary are left to candle's
    /// implementation.
    pub fn supports(ct: &gguf_file::Content) -> bool {
        let md = |key: &str| ct.metadata.get(&format!("llama.{key}"));
        let get = |key: &str| md(key).and_then(|v| v.to_u32().ok()).map(|v| v as usize);
        let moe = ct
            .tensor_infos
            .keys()
            .any(|k| k.contains("ffn_gate_inp") || k.contains("ffn_gate_exps"));
        let head_dim = match (get("embedding_length"), get("attention.head_count")) {
            (Some(h), Some(n)) if n > 0 => h / n,
            _ => return false,
        };
        let rope_dim = get("rope.dimension_count").unwrap_or(head_dim);
        !moe && rope_dim == head_dim
    }

    /// Loads the weights of a `llama` GGUF file.
    pub fn from_gguf<R: std::io::Read + std::io::Seek>(
        ct: &gguf_file::Content,
        r: &mut R,
        device: &Device,
    ) -> Result<Self> {
        let md = |key: &str| ct.metadata.get(&format!("llama.{key}"));
        let need = |key: &str| {
            md(key).ok_or_else(|| candle_core::Error::Msg(format!("GGUF lacks llama.{key}")))
        };
        let n_head = need("attention.head_count")?.to_u32()? as usize;
        let n_kv_head = md("attention.head_count_kv")
            .map(|v| v.to_u32())
            .transpose()?
            .map(|v| v as usize)
            .unwrap_or(n_head);
        let n_layer = need("block_count")?.to_u32()? as usize;
        let hidden = need("embedding_length")?.to_u32()? as usize;
        let eps = need("attention.layer_norm_rms_epsilon")?.to_f32()? as f64;
        let base = md("rope.freq_base")
            .and_then(|v| v.to_f32().ok())
            .map(f64::from)
            .unwrap_or(10_000.0);
        let context_length = md("context_length")
            .and_then(|v| v.to_u32().ok())
            .map(|v| v as usize);
        if n_head == 0
            || n_kv_head == 0
            || !n_head.is_multiple_of(n_kv_head)
            || !hidden.is_multiple_of(n_head)
            || !(hidden / n_head).is_multiple_of(2)
        {
            candle_core::bail!(
                "unsupported attention shape: hidden {hidden}, {n_head} heads, {n_kv_head} kv heads"
            );
        }
        let head_dim = hidden / n_head;

        let mut resident = 0u64;
        let mut tensor = |name: &str| -> Result<QTensor> {
            let t = ct.tensor(r, name, device)?;
            resident += t.storage_size_in_bytes() as u64;
            Ok(t)
        };
        // The CPU path reads the norms as plain vectors.
        let mut plain_norms: Vec<Vec<f32>> = Vec::new();
        let mut norm_of = |t: QTensor| -> Result<RmsNorm> {
            plain_norms.push(t.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?);
            RmsNorm::from_qtensor(t, eps)
        };

        let mut inv_freq = inv_freq(base, head_dim);
        if ct.tensor_infos.contains_key("rope_freqs.weight") {
            let factors = tensor("rope_freqs.weight")?
                .dequantize(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            if factors.len() != inv_freq.len() {
                candle_core::bail!(
                    "rope_freqs.weight has {} factors for {} frequencies",
                    factors.len(),
                    inv_freq.len()
                );
            }
            for (f, d) in inv_freq.iter_mut().zip(factors) {
                *f /= f64::from(d);
            }
        }

        let tied = !ct.tensor_infos.contains_key("output.weight");
        let (output, embedding) = gguf_head_and_embedding(tied, &mut tensor, device)?;
        let norm = norm_of(tensor("output_norm.weight")?)?;
        let mut layers = Vec::with_capacity(n_layer);
        for i in 0..n_layer {
            let mut t = |name: &str| tensor(&format!("blk.{i}.{name}.weight"));
            layers.push(Layer {
                wq: QLinear::from_qtensor(t("attn_q")?)?,
                wk: QLinear::from_qtensor(t("attn_k")?)?,
                wv: QLinear::from_qtensor(t("attn_v")?)?,
                wo: QLinear::from_qtensor(t("attn_output")?)?,
                attn_norm: norm_of(t("attn_norm")?)?,
                ffn_norm: norm_of(t("ffn_norm")?)?,
                gate: QLinear::from_qtensor(t("ffn_gate")?)?,
                up: QLinear::from_qtensor(t("ffn_up")?)?,
                down: QLinear::from_qtensor(t("ffn_down")?)?,
            });
        }
        // Norms were read as: output, then (attention, ffn) per layer.
        let cpu = if device.is_cpu() {
            cpu_path(
                &mut layers,
                &output,
                &plain_norms,
                eps as f32,
                n_head,
                n_kv_head,
                head_dim,
            )
        } else {
            None
        };
        Ok(GgufLlama {
            embedding,
            n_head,
            n_kv_head,
            head_dim,
            layers,
            norm,
            output,
            inv_freq,
            cpu,
            context_length,
            resident_bytes: resident,
            device: device.clone(),
        })
    }

    /// An empty cache for a new session.
    pub fn new_cache(&self) -> LlamaCache {
        LlamaCache {
            kv: vec![None; self.layers.len()],
            cpu: CpuCache::new(self.layers.len()),
        }
    }

    /// The same model with every matrix dequantized to f32, on candle's path (tests).
    pub fn dequantized(mut self) -> Result<Self> {
        self.cpu = None;
        for l in &mut self.layers {
            for m in [
                &mut l.wq,
                &mut l.wk,
                &mut l.wv,
                &mut l.wo,
                &mut l.gate,
                &mut l.up,
                &mut l.down,
            ] {
                *m = m.dequantized()?;
            }
        }
        self.output = self.output.dequantized()?;
        Ok(self)
    }

    /// Whether the forward pass runs on plain buffers (every linear layer on ferry's kernels).
    pub fn uses_cpu_path(&self) -> bool {
        self.cpu.is_some()
    }

    /// Whether every linear layer runs on ferry's kernels.
    pub fn uses_kernels(&self) -> bool {
        self.output.uses_kernel()
            && self.layers.iter().all(|l| {
                [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down]
                    .iter()
                    .all(|m| m.uses_kernel())
            })
    }

    two_paths_api!(LlamaCache);

    fn attention(
        &self,
        layer: &Layer,
        kv: &mut Option<(Tensor, Tensor)>,
        x: &Tensor,
        pos: usize,
        (cos, sin): &(Tensor, Tensor),
    ) -> Result<Tensor> {
        let (nh, nkv, hd) = (self.n_head, self.n_kv_head, self.head_dim);
        let q = heads(layer.wq.forward(x)?, nh, hd)?;
        let k = heads(layer.wk.forward(x)?, nkv, hd)?;
        let v = heads(layer.wv.forward(x)?, nkv, hd)?;
        let q = candle_nn::rotary_emb::rope_i(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope_i(&k, cos, sin)?;

        let scale = 1.0 / (hd as f64).sqrt();
        let out = cached_attention(kv, &q, k, v, pos, scale, None)?;
        layer.wo.forward(&out)
    }
}

/// Builds the plain-buffer path when every layer's weights are on ferry's kernels and the
/// query/key/value and gate/up weights stack (same format); the layers' own weights become
/// views of the stacked ones, so nothing is held twice.
#[allow(clippy::too_many_arguments)]
fn cpu_path(
    layers: &mut [Layer],
    output: &QLinear,
    norms: &[Vec<f32>],
    eps: f32,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
) -> Option<CpuLlama> {
    let kernel = |l: &QLinear| match l {
        QLinear::Kernel(w) => Some(w.clone()),
        QLinear::Candle(_) => None,
    };
    let output = kernel(output)?;
    let mut stacked = Vec::with_capacity(layers.len());
    for l in layers.iter() {
        let (q, k, v) = (kernel(&l.wq)?, kernel(&l.wk)?, kernel(&l.wv)?);
        let (g, u) = (kernel(&l.gate)?, kernel(&l.up)?);
        let shapes_fit = q.rows() == n_head * head_dim
            && k.rows() == n_kv_head * head_dim
            && v.rows() == k.rows()
            && g.rows() == u.rows();
        if !shapes_fit {
            return None;
        }
        let qkv = Arc::new(QWeight::stack(&[&q, &k, &v])?);
        let gate_up = Arc::new(QWeight::stack(&[&g, &u])?);
        stacked.push((qkv, gate_up, kernel(&l.wo)?, kernel(&l.down)?));
    }
    let ffn = stacked.first().map(|s| s.1.rows() / 2)?;
    let mut cpu_layers = Vec::with_capacity(layers.len());
    for (i, (l, (qkv, gate_up, wo, down))) in layers.iter_mut().zip(stacked).enumerate() {
        let (q, k) = (n_head * head_dim, n_kv_head * head_dim);
        l.wq = QLinear::Kernel(Arc::new(qkv.view(0..q)));
        l.wk = QLinear::Kernel(Arc::new(qkv.view(q..q + k)));
        l.wv = QLinear::Kernel(Arc::new(qkv.view(q + k..q + 2 * k)));
        l.gate = QLinear::Kernel(Arc::new(gate_up.view(0..ffn)));
        l.up = QLinear::Kernel(Arc::new(gate_up.view(ffn..2 * ffn)));
        cpu_layers.push(CpuLayer {
            attn_norm: norms.get(1 + 2 * i)?.clone(),
            ffn_norm: norms.get(2 + 2 * i)?.clone(),
            qkv,
            wo,
            gate_up,
            down,
        });
    }
    Some(CpuLlama {
        layers: cpu_layers,
        norm: norms.first()?.clone(),
        output,
        eps,
        n_head,
        n_kv_head,
        head_dim,
        ffn,
    })
}

impl TwoPaths for GgufLlama {
    type Cache = LlamaCache;
    type Cpu = CpuLlama;

    fn forward_candle(&self, cache: &mut LlamaCache, tokens: &[u32], pos: usize) -> Result<Tensor> {
        let t = tokens.len();
        let mut x = self.embedding.lookup(tokens, &self.device)?;
        let rope = rope_angles(&self.inv_freq, 1.0, pos, t, &self.device)?;
        for (layer, kv) in self.layers.iter().zip(cache.kv.iter_mut()) {
            let h = layer.attn_norm.forward(&x)?;
            let h = self.attention(layer, kv, &h, pos, &rope)?;
            x = (h + x)?;
            let h = layer.ffn_norm.forward(&x)?;
            let h = (candle_nn::ops::silu(&layer.gate.forward(&h)?)? * layer.up.forward(&h)?)?;
            x = (layer.down.forward(&h)? + x)?;
        }
        let last = x.narrow(1, t - 1, 1)?.squeeze(1)?;
        self.output.forward(&self.norm.forward(&last)?)
    }

    fn forward_rows(
        &self,
        cpu: &CpuLlama,
        items: &mut [(&mut LlamaCache, &[u32], usize)],
        all: &[u32],
    ) -> Result<Vec<Vec<f32>>> {
        let x = self
            .embedding
            .lookup(all, &self.device)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut segs: Vec<Segment<'_, CpuCache>> = items
            .iter_mut()
            .map(|(cache, tokens, pos)| Segment {
                cache: &mut cache.cpu,
                pos: *pos,
                t: tokens.len(),
            })
            .collect();
        Ok(cpu.forward(&mut segs, x, &self.inv_freq))
    }

    fn cpu_path(&self) -> Option<&CpuLlama> {
        self.cpu.as_ref()
    }

    fn device(&self) -> &Device {
        &self.device
    }
}
