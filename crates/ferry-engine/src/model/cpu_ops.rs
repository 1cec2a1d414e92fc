//! Plain-buffer operations of the CPU forward passes ([`super::llama_cpu`], Gemma 3's CPU path):
//! RMS norm, rotary embeddings in both pair conventions, GELU, and causal attention over a
//! key/value cache laid out `[position][kv head][head_dim]`.

use crate::kernels::par_items;

/// `out = x / sqrt(mean(x²) + eps) · w`, row by row (rows as long as `w`).
pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    for (xr, or) in x.chunks_exact(w.len()).zip(out.chunks_exact_mut(w.len())) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * inv * g;
        }
    }
}

/// [`rms_norm`] in place.
pub(crate) fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    for xr in x.chunks_exact_mut(w.len()) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for (v, &g) in xr.iter_mut().zip(w) {
            *v *= inv * g;
        }
    }
}

/// Dot product in eight lanes (auto-vectorized).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
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

/// Rotary embedding of one head, pairs `(2i, 2i+1)` (GGUF llama's convention).
pub(crate) fn rope_interleaved(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    for ((pair, &c), &s) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
        let (a, b) = (pair[0], pair[1]);
        pair[0] = a * c - b * s;
        pair[1] = a * s + b * c;
    }
}

/// Rotary embedding of one head, pairs `(i, i + d/2)` (the NeoX convention Gemma uses).
pub(crate) fn rope_halves(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let (lo, hi) = head.split_at_mut(cos.len());
    for (((a, b), &c), &s) in lo.iter_mut().zip(hi.iter_mut()).zip(cos).zip(sin) {
        let (x, y) = (*a, *b);
        *a = x * c - y * s;
        *b = x * s + y * c;
    }
}

/// GELU, tanh approximation (as candle's `gelu`).
pub(crate) fn gelu_tanh(v: f32) -> f32 {
    const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
    0.5 * v * (1.0 + (SQRT_TWO_OVER_PI * v * (1.0 + 0.044_715 * v * v)).tanh())
}

/// `(cos, sin)` of `positions · inv_freq / scale`, `[position][freq]`.
pub(crate) fn rope_tables(
    inv_freq: &[f64],
    scale: f64,
    pos: usize,
    t: usize,
) -> (Vec<f32>, Vec<f32>) {
    let mut cos = Vec::with_capacity(t * inv_freq.len());
    let mut sin = Vec::with_capacity(t * inv_freq.len());
    for p in pos..pos + t {
        let p = p as f64 / scale;
        for f in inv_freq {
            let a = p * f;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    (cos, sin)
}

/// Heads and scaling of one attention layer.
pub(crate) struct AttentionShape {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    /// Logit scale.
    pub scale: f32,
    /// A query sees keys less than this many positions back (sliding-window layers).
    pub window: Option<usize>,
}

/// Causal attention of `t` queries at positions `pos..pos + t` over a cache whose first entry is
/// at absolute position `first`. Queries are read from `q_rows` (row `i` starts at `i·q_stride`,
/// heads one after another); `out` gets `t` rows of `n_head·head_dim`. One work item per
/// (query, head), spread over the thread pool when the work pays for it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend(
    shape: &AttentionShape,
    q_rows: &[f32],
    q_stride: usize,
    k_cache: &[f32],
    v_cache: &[f32],
    first: usize,
    pos: usize,
    t: usize,
    out: &mut [f32],
) {
    let (nh, hd) = (shape.n_head, shape.head_dim);
    let kv_width = shape.n_kv_head * hd;
    let rep = nh / shape.n_kv_head;
    let cached = k_cache.len() / kv_width;
    let work = t * nh * cached * hd * 2;
    par_items(out, t * nh, hd, work, |item, out| {
        let (i, head) = (item / nh, item % nh);
        let kvh = head / rep;
        let q = &q_rows[i * q_stride + head * hd..][..hd];
        let qi = pos + i;
        // Keys at absolute positions lo..=qi.
        let lo = shape
            .window
            .map_or(first, |w| (qi + 1).saturating_sub(w).max(first));
        let mut scores: Vec<f32> = (lo..=qi)
            .map(|p| dot(q, &k_cache[(p - first) * kv_width + kvh * hd..][..hd]) * shape.scale)
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0f32;
        for s in &mut scores {
            *s = (*s - max).exp();
            total += *s;
        }
        out.fill(0.0);
        for (j, s) in scores.iter().enumerate() {
            let w = s / total;
            let p = lo + j - first;
            for (o, &v) in out
                .iter_mut()
                .zip(&v_cache[p * kv_width + kvh * hd..][..hd])
            {
                *o += w * v;
            }
        }
    });
}
