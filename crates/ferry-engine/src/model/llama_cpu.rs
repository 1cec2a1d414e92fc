//! The CPU forward pass of [`super::gguf_llama`] on plain f32 buffers.
//!
//! At SmolLM2's size (576 wide, 30 layers) a decoded token is ~750 candle tensor ops, each
//! allocating its output and taking a lock; they cost more than the matrix products. Here a
//! token is seven buffer passes per layer around four products (query/key/value and gate/up
//! stacked into one weight each, so the thread pool wakes four times per layer, not seven),
//! and the key/value cache grows in place instead of being copied on every token. Attention
//! runs per query position and head, spread over the pool when the prompt is long.

use std::sync::Arc;

use crate::kernels::{par_items, QWeight};

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

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    for (xr, or) in x.chunks_exact(w.len()).zip(out.chunks_exact_mut(w.len())) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * inv * g;
        }
    }
}

/// Dot product in eight lanes (auto-vectorized).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>()
}

/// Interleaved rotary embedding of one head: pairs `(2i, 2i+1)` turn by `angle_i`.
fn rope(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    for ((pair, &c), &s) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
        let (a, b) = (pair[0], pair[1]);
        pair[0] = a * c - b * s;
        pair[1] = a * s + b * c;
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
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for p in pos..pos + t {
            for f in inv_freq {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        let scale = 1.0 / (hd as f32).sqrt();
        let rep = nh / nkv;
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
                    rope(head, c, s);
                }
                kc.extend_from_slice(&row[hidden..hidden + kv_width]);
                vc.extend_from_slice(&row[hidden + kv_width..]);
            }
            let (kc, vc): (&[f32], &[f32]) = (kc, vc);
            let qkv_ref = &qkv;
            // One item per (query position, head): its causal window over the cache.
            par_items(
                &mut att,
                t * nh,
                hd,
                t * nh * (pos + t) * hd * 2,
                |item, out| {
                    let (i, head) = (item / nh, item % nh);
                    let kvh = head / rep;
                    let q = &qkv_ref[i * qkv_width + head * hd..i * qkv_width + (head + 1) * hd];
                    let len = pos + i + 1;
                    let mut scores: Vec<f32> = (0..len)
                        .map(|p| dot(q, &kc[p * kv_width + kvh * hd..][..hd]) * scale)
                        .collect();
                    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut total = 0f32;
                    for s in &mut scores {
                        *s = (*s - max).exp();
                        total += *s;
                    }
                    out.fill(0.0);
                    for (p, s) in scores.iter().enumerate() {
                        let w = s / total;
                        for (o, &v) in out.iter_mut().zip(&vc[p * kv_width + kvh * hd..][..hd]) {
                            *o += w * v;
                        }
                    }
                },
            );
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
                    *o = g / (1.0 + (-g).exp()) * u;
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
        let mut logits = vec![0f32; self.output.rows()];
        // The head picks the token: its input stays f32 (see `QWeight::matvec_f32`).
        self.output.matvec_f32(&normed, &mut logits);
        logits
    }
}
