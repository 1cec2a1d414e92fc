//! Quantized Gemma 3 (text) for GGUF files.
//!
//! ferry runs its own forward pass instead of candle 0.11's `quantized_gemma3`, which on Gemma
//! 3 270M (1) gates the MLP with SiLU where Gemma uses GELU (tanh approximation), so greedy
//! answers go wrong; (2) precomputes RoPE tables for 131072 positions in every layer and
//! dequantizes the 262144-row embedding to f32, 3.6 GB resident for a 253 MB file; (3) lets
//! sliding-window layers see every cached token while decoding.
//!
//! Here the weights stay quantized: the embedding is shared with the tied output head and only
//! the rows a request looks up are dequantized (on the CPU), RoPE angles are computed for the
//! positions being fed, and sliding-window layers keep only the last `window - 1` keys. On the
//! CPU, Q4_0/Q4_1/Q5_0/Q8_0 weights run on ferry's kernels ([`crate::kernels`]) as stored; the
//! formats neither they nor candle have a SIMD product for (Q5_1, and Q4_1/Q5_0 on a CPU
//! without AVX2) are requantized to Q8_0 at load.

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Module, Result, Tensor};
use candle_transformers::quantized_nn::RmsNorm;
use half::f16;

use super::cpu_ops::{
    attend, batch_rope_tables, gelu_tanh, last_rows_normed, rms_norm, rms_norm_in_place,
    rope_halves, AttendSeq, AttentionShape, Segment, ACTIVATION_MACS,
};
use super::parts::{
    cached_attention, gguf_head_and_embedding, heads, inv_freq, rope_angles, two_paths_api,
    Embedding, TwoPaths,
};
use crate::kernels::{self, extend_f16, par_items, QLinear};

/// Gemma 3 alternates five sliding-window layers with one global layer unless the file says
/// otherwise.
const DEFAULT_SLIDING_WINDOW_PATTERN: usize = 6;
/// RoPE base of the sliding-window layers (the GGUF stores only the global one).
const DEFAULT_LOCAL_ROPE_BASE: f64 = 10_000.0;

/// Whether a weight of `dtype` is read as Q8_0 on the CPU instead of as stored.
///
/// Formats that neither ferry's kernels (on this CPU) nor candle's SIMD ones multiply (candle
/// runs them through a scalar loop), and, where ferry's kernels run, the K-quants: candle
/// multiplies those through repacked copies it keeps beside the original (two of them on a CPU
/// with AMX), so a Q4_K weight held as Q8_0 takes fewer bytes than the three copies and runs
/// on ferry's kernel. Q8_0 holds a K-quant's dequantized values to within half a step of its
/// own 8-bit grid.
fn reads_as_q8_0(dtype: GgmlDType) -> bool {
    match dtype {
        GgmlDType::Q5_1 => true,
        GgmlDType::Q4_1 | GgmlDType::Q5_0 => !kernels::kernel_available(),
        GgmlDType::Q2K
        | GgmlDType::Q3K
        | GgmlDType::Q4K
        | GgmlDType::Q5K
        | GgmlDType::Q6K
        | GgmlDType::Q8K => kernels::kernel_available(),
        _ => false,
    }
}

#[derive(Debug, Clone)]
struct Layer {
    wq: QLinear,
    wk: QLinear,
    wv: QLinear,
    wo: QLinear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    attn_norm: RmsNorm,
    post_attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    post_ffn_norm: RmsNorm,
    gate: QLinear,
    up: QLinear,
    down: QLinear,
    /// `Some(window)` for sliding-window layers.
    window: Option<usize>,
}

/// Gemma 3 weights, shared by every session.
/// A layer's norm weights as the CPU path reads them.
#[derive(Debug)]
struct LayerNorms {
    q: Vec<f32>,
    k: Vec<f32>,
    attn: Vec<f32>,
    post_attn: Vec<f32>,
    ffn: Vec<f32>,
    post_ffn: Vec<f32>,
}

/// What the plain-buffer CPU forward pass needs besides the layers' products.
#[derive(Debug)]
pub(crate) struct GemmaCpu {
    layers: Vec<LayerNorms>,
    norm: Vec<f32>,
    eps: f32,
}

#[derive(Debug)]
pub struct Gemma3 {
    embedding: Embedding,
    /// The plain-buffer forward pass (on CPUs where ferry's kernels run).
    cpu: Option<GemmaCpu>,
    hidden: usize,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: QLinear,
    /// RoPE inverse frequencies of the global and the sliding-window layers.
    inv_freq_global: Vec<f64>,
    inv_freq_local: Vec<f64>,
    /// Linear RoPE scaling of the global layers (positions are divided by it).
    global_scale: f64,
    /// Attention logit scale, 1 / sqrt(query_pre_attn_scalar).
    attn_scale: f64,
    /// Bytes of weights held (quantized, after any requantization).
    pub resident_bytes: u64,
    device: Device,
}

/// Per-session attention cache: keys and values per layer, `(batch, kv_heads, len, head_dim)`
/// on candle's path; on the CPU path plain f16 `[position][kv head][head_dim]` buffers with the
/// absolute position of their first entry (sliding-window layers drop old keys).
#[derive(Debug, Clone, Default)]
pub struct Gemma3Cache {
    kv: Vec<Option<(Tensor, Tensor)>>,
    plain: Vec<(Vec<f16>, Vec<f16>, usize)>,
}

impl Gemma3 {
    /// Loads the weights of a `gemma3` GGUF file.
    pub fn from_gguf<R: std::io::Read + std::io::Seek>(
        ct: &gguf_file::Content,
        r: &mut R,
        device: &Device,
    ) -> Result<Self> {
        let md = |key: &str| ct.metadata.get(&format!("gemma3.{key}"));
        let need = |key: &str| {
            md(key).ok_or_else(|| candle_core::Error::Msg(format!("GGUF lacks gemma3.{key}")))
        };
        let n_head = need("attention.head_count")?.to_u32()? as usize;
        let n_kv_head = need("attention.head_count_kv")?.to_u32()? as usize;
        let n_layer = need("block_count")?.to_u32()? as usize;
        let hidden = need("embedding_length")?.to_u32()? as usize;
        let head_dim = need("attention.key_length")?.to_u32()? as usize;
        let eps = need("attention.layer_norm_rms_epsilon")?.to_f32()? as f64;
        let window = need("attention.sliding_window")?.to_u32()? as usize;
        let pattern = md("attention.sliding_window_pattern")
            .and_then(|v| v.to_u32().ok())
            .map(|v| v as usize)
            .unwrap_or(DEFAULT_SLIDING_WINDOW_PATTERN);
        let global_base = md("rope.freq_base")
            .and_then(|v| v.to_f32().ok())
            .map(f64::from)
            .unwrap_or(1_000_000.0);
        let global_scale = md("rope.scaling.factor")
            .and_then(|v| v.to_f32().ok())
            .map(f64::from)
            .filter(|f| *f > 0.0)
            .unwrap_or(1.0);
        if n_kv_head == 0 || !n_head.is_multiple_of(n_kv_head) || !head_dim.is_multiple_of(2) {
            candle_core::bail!(
                "unsupported attention shape: {n_head} heads, {n_kv_head} kv heads, head dim {head_dim}"
            );
        }

        let mut resident = 0u64;
        let mut tensor = |name: &str| -> Result<QTensor> {
            let t = ct.tensor(r, name, device)?;
            let t = if device.is_cpu() && reads_as_q8_0(t.dtype()) {
                QTensor::quantize(&t.dequantize(device)?, GgmlDType::Q8_0)?
            } else {
                t
            };
            resident += t.storage_size_in_bytes() as u64;
            Ok(t)
        };
        // The CPU path reads the norms as plain vectors: the final one, then per layer q, k,
        // attention, post-attention, ffn, post-ffn (the order they are read below).
        let mut plain_norms: Vec<Vec<f32>> = Vec::new();
        let mut norm_of = |t: QTensor| -> Result<RmsNorm> {
            plain_norms.push(t.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?);
            RmsNorm::from_qtensor(t, eps)
        };

        let tied = !ct.tensor_infos.contains_key("output.weight");
        let (output, embedding) = gguf_head_and_embedding(tied, &mut tensor, device)?;
        let norm = norm_of(tensor("output_norm.weight")?)?;
        let mut layers = Vec::with_capacity(n_layer);
        for i in 0..n_layer {
            let mut t = |name: &str| tensor(&format!("blk.{i}.{name}.weight"));
            let sliding = (i + 1) % pattern != 0;
            layers.push(Layer {
                wq: QLinear::from_qtensor(t("attn_q")?)?,
                wk: QLinear::from_qtensor(t("attn_k")?)?,
                wv: QLinear::from_qtensor(t("attn_v")?)?,
                wo: QLinear::from_qtensor(t("attn_output")?)?,
                q_norm: norm_of(t("attn_q_norm")?)?,
                k_norm: norm_of(t("attn_k_norm")?)?,
                attn_norm: norm_of(t("attn_norm")?)?,
                post_attn_norm: norm_of(t("post_attention_norm")?)?,
                ffn_norm: norm_of(t("ffn_norm")?)?,
                post_ffn_norm: norm_of(t("post_ffw_norm")?)?,
                gate: QLinear::from_qtensor(t("ffn_gate")?)?,
                up: QLinear::from_qtensor(t("ffn_up")?)?,
                down: QLinear::from_qtensor(t("ffn_down")?)?,
                window: sliding.then_some(window),
            });
        }
        let cpu = (device.is_cpu() && kernels::kernel_available()).then(|| GemmaCpu {
            norm: plain_norms[0].clone(),
            layers: plain_norms[1..]
                .chunks_exact(6)
                .map(|c| LayerNorms {
                    q: c[0].clone(),
                    k: c[1].clone(),
                    attn: c[2].clone(),
                    post_attn: c[3].clone(),
                    ffn: c[4].clone(),
                    post_ffn: c[5].clone(),
                })
                .collect(),
            eps: eps as f32,
        });
        Ok(Gemma3 {
            embedding,
            cpu,
            hidden,
            n_head,
            n_kv_head,
            head_dim,
            layers,
            norm,
            output,
            inv_freq_global: inv_freq(global_base, head_dim),
            inv_freq_local: inv_freq(DEFAULT_LOCAL_ROPE_BASE, head_dim),
            global_scale,
            // GGUF does not store query_pre_attn_scalar: it is the head dimension except for
            // the 27B model (62 layers), where it is hidden / heads (as llama.cpp assumes).
            attn_scale: if n_layer == 62 {
                1.0 / ((hidden / n_head) as f64).sqrt()
            } else {
                1.0 / (head_dim as f64).sqrt()
            },
            resident_bytes: resident,
            device: device.clone(),
        })
    }

    /// Loads a `gemma3` GGUF file.
    pub fn from_gguf_file(path: &std::path::Path, device: &Device) -> Result<Self> {
        let mut f = std::fs::File::open(path)?;
        let ct = gguf_file::Content::read(&mut f)?;
        Self::from_gguf(&ct, &mut f, device)
    }

    /// Sets the window of the sliding-window layers (tests use a short one to check that the
    /// prefill mask and the decode-time cache trim agree).
    pub fn set_sliding_window(&mut self, window: usize) {
        for l in &mut self.layers {
            if l.window.is_some() {
                l.window = Some(window.max(2));
            }
        }
    }

    /// The same model with every matrix dequantized to f32. candle's quantized matmul quantizes
    /// activations too, with kernels that differ by batch size, so quantized logits move by
    /// up to a few units in the tail of the vocabulary with how a prompt is split into
    /// forward passes; the f32 model gives the same logits for any split (tests), at ~4x the
    /// memory.
    pub fn dequantized(mut self) -> Result<Self> {
        fn f32_matmul(m: &mut QLinear) -> Result<()> {
            *m = m.dequantized()?;
            Ok(())
        }
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
                f32_matmul(m)?;
            }
        }
        f32_matmul(&mut self.output)?;
        Ok(self)
    }

    /// The same model on candle's tensor forward pass, the one accelerators and CPUs without
    /// ferry's kernels run (tests compare the two passes).
    pub fn on_candle_path(mut self) -> Self {
        self.cpu = None;
        self
    }

    /// Whether the forward pass runs on plain buffers (a CPU where ferry's kernels run).
    pub fn uses_cpu_path(&self) -> bool {
        self.cpu.is_some()
    }

    /// An empty cache for a new session.
    pub fn new_cache(&self) -> Gemma3Cache {
        Gemma3Cache {
            kv: vec![None; self.layers.len()],
            plain: vec![(Vec::new(), Vec::new(), 0); self.layers.len()],
        }
    }

    two_paths_api!(Gemma3Cache);

    /// The forward pass on plain buffers (see [`super::llama_cpu`] for why), over every
    /// segment's rows at once.
    fn forward_cpu(
        &self,
        cpu: &GemmaCpu,
        segs: &mut [Segment<'_, Gemma3Cache>],
        tokens: &[u32],
    ) -> Result<Vec<Vec<f32>>> {
        let t = tokens.len();
        let (nh, nkv, hd) = (self.n_head, self.n_kv_head, self.head_dim);
        let (q_width, kv_width) = (nh * hd, nkv * hd);
        let hidden = self.hidden;
        let embed_scale = (hidden as f32).sqrt();
        let mut x: Vec<f32> = self
            .embedding
            .lookup(tokens, &self.device)?
            .flatten_all()?
            .to_vec1()?;
        for v in &mut x {
            *v *= embed_scale;
        }
        let global = batch_rope_tables(segs, &self.inv_freq_global, self.global_scale);
        let local = batch_rope_tables(segs, &self.inv_freq_local, 1.0);
        let half = hd / 2;
        let ffn = self.layers.first().map_or(0, |l| l.gate.out_features());
        let mut h = vec![0f32; t * hidden];
        let mut h2 = vec![0f32; t * hidden];
        let mut q = vec![0f32; t * q_width];
        let mut k = vec![0f32; t * kv_width];
        let mut v = vec![0f32; t * kv_width];
        let mut att = vec![0f32; t * q_width];
        let mut gate = vec![0f32; t * ffn];
        let mut up = vec![0f32; t * ffn];
        for (l, (layer, norms)) in self.layers.iter().zip(&cpu.layers).enumerate() {
            let (cos, sin) = if layer.window.is_some() {
                &local
            } else {
                &global
            };
            rms_norm(&x, &norms.attn, cpu.eps, &mut h);
            layer.wq.matmul_f32(&h, t, &mut q)?;
            layer.wk.matmul_f32(&h, t, &mut k)?;
            layer.wv.matmul_f32(&h, t, &mut v)?;
            rms_norm_in_place(&mut q, &norms.q, cpu.eps);
            rms_norm_in_place(&mut k, &norms.k, cpu.eps);
            for i in 0..t {
                let (c, s) = (&cos[i * half..][..half], &sin[i * half..][..half]);
                for head in q[i * q_width..][..q_width].chunks_exact_mut(hd) {
                    rope_halves(head, c, s);
                }
                for head in k[i * kv_width..][..kv_width].chunks_exact_mut(hd) {
                    rope_halves(head, c, s);
                }
            }
            let shape = AttentionShape {
                n_head: nh,
                n_kv_head: nkv,
                head_dim: hd,
                scale: self.attn_scale as f32,
                window: layer.window,
            };
            let mut row = 0;
            for seg in segs.iter_mut() {
                let (kc, vc, _) = &mut seg.cache.plain[l];
                extend_f16(kc, &k[row * kv_width..(row + seg.t) * kv_width]);
                extend_f16(vc, &v[row * kv_width..(row + seg.t) * kv_width]);
                row += seg.t;
            }
            let seqs: Vec<AttendSeq<'_>> = segs
                .iter()
                .map(|seg| {
                    let (kc, vc, first) = &seg.cache.plain[l];
                    AttendSeq {
                        k_cache: kc,
                        v_cache: vc,
                        first: *first,
                        pos: seg.pos,
                        t: seg.t,
                    }
                })
                .collect();
            attend(&shape, &q, q_width, &seqs, &mut att);
            // A sliding-window layer never looks further back than window - 1 keys; drop the
            // rest once there are twice as many, so the copy is paid rarely.
            if let Some(w) = layer.window {
                for seg in segs.iter_mut() {
                    let (kc, vc, first) = &mut seg.cache.plain[l];
                    let len = kc.len() / kv_width;
                    if len >= 2 * w {
                        let drop = len - (w - 1);
                        kc.drain(..drop * kv_width);
                        vc.drain(..drop * kv_width);
                        *first += drop;
                    }
                }
            }
            layer.wo.matmul_f32(&att, t, &mut h)?;
            rms_norm(&h, &norms.post_attn, cpu.eps, &mut h2);
            for (a, b) in x.iter_mut().zip(&h2) {
                *a += b;
            }
            rms_norm(&x, &norms.ffn, cpu.eps, &mut h);
            layer.gate.matmul_f32(&h, t, &mut gate)?;
            layer.up.matmul_f32(&h, t, &mut up)?;
            // Over the pool, as the llama path's SiLU.
            par_items(&mut gate, t, ffn, t * ffn * ACTIVATION_MACS, |row, g| {
                for (g, u) in g.iter_mut().zip(&up[row * ffn..][..ffn]) {
                    *g = gelu_tanh(*g) * u;
                }
            });
            layer.down.matmul_f32(&gate, t, &mut h)?;
            rms_norm(&h, &norms.post_ffn, cpu.eps, &mut h2);
            for (a, b) in x.iter_mut().zip(&h2) {
                *a += b;
            }
        }
        let normed = last_rows_normed(&x, segs, hidden, |row, out| {
            rms_norm(row, &cpu.norm, cpu.eps, out)
        });
        self.output.head_logits_rows(&normed, segs.len())
    }

    fn attention(
        &self,
        layer: &Layer,
        kv: &mut Option<(Tensor, Tensor)>,
        x: &Tensor,
        pos: usize,
        (cos, sin): &(Tensor, Tensor),
    ) -> Result<Tensor> {
        let (nh, nkv, hd) = (self.n_head, self.n_kv_head, self.head_dim);
        let q = layer
            .q_norm
            .forward(&heads(layer.wq.forward(x)?, nh, hd)?)?;
        let k = layer
            .k_norm
            .forward(&heads(layer.wk.forward(x)?, nkv, hd)?)?;
        let v = heads(layer.wv.forward(x)?, nkv, hd)?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;

        let out = cached_attention(kv, &q, k, v, pos, self.attn_scale, layer.window)?;
        layer.wo.forward(&out)
    }
}

impl TwoPaths for Gemma3 {
    type Cache = Gemma3Cache;
    type Cpu = GemmaCpu;

    fn forward_candle(
        &self,
        cache: &mut Gemma3Cache,
        tokens: &[u32],
        pos: usize,
    ) -> Result<Tensor> {
        let t = tokens.len();
        let mut x = (self.embedding.lookup(tokens, &self.device)? * (self.hidden as f64).sqrt())?;
        let global = rope_angles(
            &self.inv_freq_global,
            self.global_scale,
            pos,
            t,
            &self.device,
        )?;
        let local = rope_angles(&self.inv_freq_local, 1.0, pos, t, &self.device)?;
        for (layer, kv) in self.layers.iter().zip(cache.kv.iter_mut()) {
            let rope = if layer.window.is_some() {
                &local
            } else {
                &global
            };
            let h = layer.attn_norm.forward(&x)?;
            let h = self.attention(layer, kv, &h, pos, rope)?;
            x = (layer.post_attn_norm.forward(&h)? + x)?;
            let h = layer.ffn_norm.forward(&x)?;
            let h = (layer.gate.forward(&h)?.gelu()? * layer.up.forward(&h)?)?;
            let h = layer.down.forward(&h)?;
            x = (layer.post_ffn_norm.forward(&h)? + x)?;
        }
        let last = x.narrow(1, t - 1, 1)?.squeeze(1)?;
        self.output.forward(&self.norm.forward(&last)?)
    }

    fn forward_rows(
        &self,
        cpu: &GemmaCpu,
        items: &mut [(&mut Gemma3Cache, &[u32], usize)],
        all: &[u32],
    ) -> Result<Vec<Vec<f32>>> {
        let mut segs: Vec<Segment<'_, Gemma3Cache>> = items
            .iter_mut()
            .map(|(cache, tokens, pos)| Segment {
                cache: &mut **cache,
                pos: *pos,
                t: tokens.len(),
            })
            .collect();
        self.forward_cpu(cpu, &mut segs, all)
    }

    fn cpu_path(&self) -> Option<&GemmaCpu> {
        self.cpu.as_ref()
    }

    fn device(&self) -> &Device {
        &self.device
    }
}
