//! The CPU forward pass of [`super::gguf_llama`] on plain f32 buffers.
//!
//! At SmolLM2's size (576 wide, 30 layers) a decoded token is ~750 candle tensor ops, each
//! allocating its output and taking a lock; they cost more than the matrix products. Here a
//! token is seven buffer passes per layer around four products (query/key/value and gate/up
//! stacked into one weight each, so the thread pool wakes four times per layer, not seven),
//! and the key/value cache grows in place instead of being copied on every token. Attention
//! runs per query position and head, spread over the pool when the prompt is long.

use std::sync::Arc;

use half::f16;

use super::cpu_ops::{
    attend, batch_rope_tables, last_rows_normed, rms_norm, rope_interleaved, silu, AttendSeq,
    AttentionShape, Segment, ACTIVATION_MACS,
};
use crate::kernels::{extend_f16, par_items, QWeight};

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

/// A session's keys and values, per layer `[position][kv head][head_dim]`, in f16.
#[derive(Debug, Clone, Default)]
pub struct CpuCache {
    k: Vec<Vec<f16>>,
    v: Vec<Vec<f16>>,
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
    /// Feeds `x` (the embedded tokens of every segment, one after another, row-major) through
    /// every layer and returns the logits of each segment's last token. The products run once
    /// over all the rows (a weight is read once per step, whatever the batch); attention runs per
    /// segment over its own cache.
    pub(crate) fn forward(
        &self,
        segs: &mut [Segment<'_, CpuCache>],
        mut x: Vec<f32>,
        inv_freq: &[f64],
    ) -> Vec<Vec<f32>> {
        let (nh, nkv, hd) = (self.n_head, self.n_kv_head, self.head_dim);
        let hidden = nh * hd;
        let kv_width = nkv * hd;
        let qkv_width = hidden + 2 * kv_width;
        let half = hd / 2;
        let t: usize = segs.iter().map(|s| s.t).sum();
        let (cos, sin) = batch_rope_tables(segs, inv_freq, 1.0);
        let scale = 1.0 / (hd as f32).sqrt();
        let mut h = vec![0f32; t * hidden];
        let mut qkv = vec![0f32; t * qkv_width];
        let mut att = vec![0f32; t * hidden];
        let mut gu = vec![0f32; t * 2 * self.ffn];
        let mut act = vec![0f32; t * self.ffn];
        let shape = AttentionShape {
            n_head: nh,
            n_kv_head: nkv,
            head_dim: hd,
            scale,
            window: None,
        };
        for (l, layer) in self.layers.iter().enumerate() {
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
            }
            let mut row = 0;
            for seg in segs.iter_mut() {
                let (kc, vc) = (&mut seg.cache.k[l], &mut seg.cache.v[l]);
                for r in qkv[row * qkv_width..(row + seg.t) * qkv_width].chunks_exact(qkv_width) {
                    extend_f16(kc, &r[hidden..hidden + kv_width]);
                    extend_f16(vc, &r[hidden + kv_width..]);
                }
                row += seg.t;
            }
            let seqs: Vec<AttendSeq<'_>> = segs
                .iter()
                .map(|seg| AttendSeq {
                    k_cache: &seg.cache.k[l],
                    v_cache: &seg.cache.v[l],
                    first: 0,
                    pos: seg.pos,
                    t: seg.t,
                })
                .collect();
            attend(&shape, &qkv, qkv_width, &seqs, &mut att);
            layer.wo.matmul(&att, t, &mut h);
            for (a, b) in x.iter_mut().zip(&h) {
                *a += b;
            }
            rms_norm(&x, &layer.ffn_norm, self.eps, &mut h);
            layer.gate_up.matmul(&h, t, &mut gu);
            let ffn = self.ffn;
            // Over the pool when there are rows enough: at eight streams the exponentials were
            // the largest pass left on one core, the other waiting.
            par_items(&mut act, t, ffn, t * ffn * ACTIVATION_MACS, |row, out| {
                let (gate, up) = gu[row * 2 * ffn..][..2 * ffn].split_at(ffn);
                for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                    *o = silu(g) * u;
                }
            });
            layer.down.matmul(&act, t, &mut h);
            for (a, b) in x.iter_mut().zip(&h) {
                *a += b;
            }
        }
        let normed = last_rows_normed(&x, segs, hidden, |row, out| {
            rms_norm(row, &self.norm, self.eps, out)
        });
        // The head picks the token: its leading logits are exact (`QWeight::head_logits`).
        self.output.head_logits_rows(&normed, segs.len())
    }
}
