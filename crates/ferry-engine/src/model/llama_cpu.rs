//! The CPU forward pass of [`super::gguf_llama`] on plain f32 buffers.
//!
//! At SmolLM2's size (576 wide, 30 layers) a decoded token is ~750 candle tensor ops, each
//! allocating its output and taking a lock; they cost more than the matrix products. Here a
//! token is seven buffer passes per layer around four products (query/key/value and gate/up
//! stacked into one weight each, so the thread pool wakes four times per layer, not seven),
//! and the key/value cache grows in place instead of being copied on every token. Attention
//! runs per query position and head, spread over the pool when the prompt is long.

use std::sync::Arc;

use super::cpu_ops::{attend, rms_norm, rope_interleaved, rope_tables, silu, AttentionShape};
use crate::kernels::QWeight;

/// One layer's weights as the CPU path reads them.
#[derive(Debug)]
pub(crate) struct CpuLayer {
    pub attn_norm: Vec<f32>,
    pub ffn_norm: Vec<f32>,
    /// Query, key and value rows stacked.
    pub qkv: Arc<QWeight>,
    pub wo: Arc<QWeight>,
    /// Gate and up rows stacked.
    pub gate_up: Arc<QWeight>,
    pub down: Arc<QWeight>,
}

/// Everything the CPU path needs besides the embedding.
#[derive(Debug)]
pub(crate) struct CpuLlama {
    pub layers: Vec<CpuLayer>,
    pub norm: Vec<f32>,
    pub output: Arc<QWeight>,
    pub eps: f32,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub ffn: usize,
}

/// A session's keys and values, per layer `[position][kv head][head_dim]`.
#[derive(Debug, Clone, Default)]
pub struct CpuCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl CpuCache {
    pub(crate) fn new(layers: usize) -> Self {
        CpuCache {
            k: vec![Vec::new(); layers],
            v: vec![Vec::new(); layers],
        }
    }
}

impl CpuLlama {
    /// Feeds `x` (`t` embedded tokens at positions `pos..`, row-major) through every layer and
    /// returns the logits of the last token.
    pub(crate) fn forward(
        &self,
        cache: &mut CpuCache,
        mut x: Vec<f32>,
        t: usize,
        pos: usize,
        inv_freq: &[f64],
    ) -> Vec<f32> {
        let (nh, nkv, hd) = (self.n_head, self.n_kv_head, self.head_dim);
        let hidden = nh * hd;
        let kv_width = nkv * hd;
        let qkv_width = hidden + 2 * kv_width;
        let half = hd / 2;
        let (cos, sin) = rope_tables(inv_freq, 1.0, pos, t);
        let scale = 1.0 / (hd as f32).sqrt();
        let mut h = vec![0f32; t * hidden];
        let mut qkv = vec![0f32; t * qkv_width];
        let mut att = vec![0f32; t * hidden];
        let mut gu = vec![0f32; t * 2 * self.ffn];
        let mut act = vec![0f32; t * self.ffn];
        for (layer, (kc, vc)) in self
            .layers
            .iter()
            .zip(cache.k.iter_mut().zip(cache.v.iter_mut()))
        {
            rms_norm(&x, &layer.attn_norm, self.eps, &mut h);
            layer.qkv.matmul(&h, t, &mut qkv);
            for (i, row) in qkv.chunks_exact_mut(qkv_width).enumerate() {
                let (c, s) = (
                    &cos[i * half..(i + 1) * half],
                    &sin[i * half..(i + 1) * half],
                );
                for head in row[..hidden + kv_width].chunks_exact_mut(hd) {
                    rope_interleaved(head, c, s);
                }
                kc.extend_from_slice(&row[hidden..hidden + kv_width]);
                vc.extend_from_slice(&row[hidden + kv_width..]);
            }
            let shape = AttentionShape {
                n_head: nh,
                n_kv_head: nkv,
                head_dim: hd,
                scale,
                window: None,
            };
            attend(&shape, &qkv, qkv_width, kc, vc, 0, pos, t, &mut att);
            layer.wo.matmul(&att, t, &mut h);
            for (a, b) in x.iter_mut().zip(&h) {
                *a += b;
            }
            rms_norm(&x, &layer.ffn_norm, self.eps, &mut h);
            layer.gate_up.matmul(&h, t, &mut gu);
            for (row, out) in gu
                .chunks_exact(2 * self.ffn)
                .zip(act.chunks_exact_mut(self.ffn))
            {
                let (gate, up) = row.split_at(self.ffn);
                for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                    *o = silu(g) * u;
                }
            }
            layer.down.matmul(&act, t, &mut h);
            for (a, b) in x.iter_mut().zip(&h) {
                *a += b;
            }
        }
        let last = &x[(t - 1) * hidden..];
        let mut normed = vec![0f32; hidden];
        rms_norm(last, &self.norm, self.eps, &mut normed);
        // The head picks the token: its leading logits are exact (`QWeight::head_logits`).
        self.output.head_logits(&normed)
    }
}
