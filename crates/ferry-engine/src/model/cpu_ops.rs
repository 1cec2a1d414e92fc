//! Plain-buffer operations of the CPU forward passes ([`super::llama_cpu`], Gemma 3's CPU path,
//! the quantized sentence encoder): RMS and layer norm, rotary embeddings in both pair
//! conventions, GELU (tanh and erf forms), one query's softmax attention, and causal attention
//! over a key/value cache laid out `[position][kv head][head_dim]` (in f16: held in f32, at
//! eight streams, the caches were a third of the bytes a decode step read), and the bookkeeping of a
//! batch of sequences fed through one pass ([`Segment`]).

#[cfg(doc)]
use crate::kernels::with_avx512;
use half::f16;

use crate::kernels::{
    attention_scores, attention_values, grouped_attention_scores, grouped_attention_values,
    par_items,
};

/// `out = x / sqrt(mean(x²) + eps) · w`, row by row (rows as long as `w`).
pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    for (xr, or) in x.chunks_exact(w.len()).zip(out.chunks_exact_mut(w.len())) {
        let ms = lanes_sum(xr, |v| v * v) / w.len() as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * inv * g;
        }
    }
}

/// [`rms_norm`] in place.
pub(crate) fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    for xr in x.chunks_exact_mut(w.len()) {
        let ms = lanes_sum(xr, |v| v * v) / w.len() as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for (v, &g) in xr.iter_mut().zip(w) {
            *v *= inv * g;
        }
    }
}

/// `Σ f(v)` in eight lanes: a plain `f32` sum is one chain of dependent additions.
fn lanes_sum(v: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().map(|&x| f(x)).sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += f(c[i]);
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// The largest value (−∞ for none), in eight lanes.
pub(crate) fn lanes_max(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = v.chunks_exact(8);
    let rest = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for i in 0..8 {
            acc[i] = acc[i].max(c[i]);
        }
    }
    acc.iter().copied().fold(rest, f32::max)
}

/// `out = (x − mean) / sqrt(var + eps) · w + b` in place, row by row (rows as long as `w`).
/// The sums run in eight lanes ([`lanes_sum`]).
pub(crate) fn layer_norm_in_place(x: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
    let n = w.len() as f32;
    for xr in x.chunks_exact_mut(w.len()) {
        let mean = lanes_sum(xr, |v| v) / n;
        let var = lanes_sum(xr, |v| (v - mean) * (v - mean)) / n;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, &g), &o) in xr.iter_mut().zip(w).zip(b) {
            *v = (*v - mean) * inv * g + o;
        }
    }
}

/// Rows of keys (or value columns) a [`full_attention_head`] block takes at once.
pub(crate) const ATTENTION_BLOCK: usize = 16;

/// Queries a [`full_attention_head`] block takes at once (`q` is padded to a multiple of it
/// with zero rows). Eight would keep more multiply-adds in flight, but the compiler then keeps
/// the 8×16 accumulators in memory: the pass took five times as long.
pub(crate) const ATTENTION_QUERIES: usize = 4;

/// Full (unmasked) attention of one head over `n` tokens, as two small register-blocked
/// matrix products: `q` holds `n` rows of `hd` values (then zero rows up to a multiple of
/// [`ATTENTION_QUERIES`]), `kt` the keys transposed (`hd` rows of `np` values, `np` = `n`
/// rounded up to [`ATTENTION_BLOCK`], zero-padded), `v` `n` rows of `hd`; `out` gets `n` rows
/// of `hd`. `hd` must be a multiple of [`ATTENTION_BLOCK`]. One query at a time over strided
/// keys spent most of its time in horizontal sums and in chains of dependent additions; here
/// every multiply-add is into one of 4×16 independent accumulators: one AVX-512 register per
/// query where the caller runs it through [`crate::kernels::with_avx512`] (always inlined, so
/// it is compiled there), two AVX2 registers otherwise (15 % slower).
#[inline(always)]
pub(crate) fn full_attention_head(
    q: &[f32],
    kt: &[f32],
    v: &[f32],
    n: usize,
    hd: usize,
    scale: f32,
    out: &mut [f32],
) {
    const B: usize = ATTENTION_BLOCK;
    const R: usize = ATTENTION_QUERIES;
    let np = n.div_ceil(B) * B;
    debug_assert!(hd.is_multiple_of(B) && kt.len() >= hd * np && out.len() >= n * hd);
    debug_assert!(q.len() >= n.div_ceil(R) * R * hd);
    let mut probs = vec![0f32; n.div_ceil(R) * R * np];
    // Scores: R queries × B keys per block (a block's last queries may be past n: `q` holds
    // zero rows there).
    for i0 in (0..n).step_by(R) {
        let block = &q[i0 * hd..][..R * hd];
        for j0 in (0..np).step_by(B) {
            let mut acc = [[0f32; B]; R];
            for d in 0..hd {
                let k: &[f32; B] = kt[d * np + j0..][..B].try_into().expect("block");
                let qd: [f32; R] = std::array::from_fn(|r| block[r * hd + d]);
                for r in 0..R {
                    for l in 0..B {
                        acc[r][l] = qd[r].mul_add(k[l], acc[r][l]);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate() {
                probs[(i0 + r) * np + j0..][..B].copy_from_slice(a);
            }
        }
    }
    // Softmax of each query's first n scores (the padding keys get weight 0), its maximum and
    // sum in eight lanes (one chain of n dependent steps each was as slow as the products).
    for row in probs.chunks_exact_mut(np).take(n) {
        let (live, pad) = row.split_at_mut(n);
        let max = lanes_max(live) * scale;
        for s in live.iter_mut() {
            *s = exp_fast(*s * scale - max);
        }
        let inv = 1.0 / lanes_sum(live, |s| s);
        live.iter_mut().for_each(|s| *s *= inv);
        pad.iter_mut().for_each(|s| *s = 0.0);
    }
    // Outputs: R queries × B of the head's values per block.
    for i0 in (0..n).step_by(R) {
        let rows: [&[f32]; R] = std::array::from_fn(|r| &probs[(i0 + r) * np..][..n]);
        for d0 in (0..hd).step_by(B) {
            let mut acc = [[0f32; B]; R];
            for j in 0..n {
                let vals: &[f32; B] = v[j * hd + d0..][..B].try_into().expect("block");
                let p: [f32; R] = std::array::from_fn(|r| rows[r][j]);
                for r in 0..R {
                    for l in 0..B {
                        acc[r][l] = p[r].mul_add(vals[l], acc[r][l]);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate().take(R.min(n - i0)) {
                out[(i0 + r) * hd + d0..][..B].copy_from_slice(a);
            }
        }
    }
}

/// Dot product in eight lanes (auto-vectorized). (Two chains of eight lanes, inlined, made an
/// eight-stream decode 5 % slower.)
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

/// GELU, tanh approximation (as candle's `gelu`), written as `v·σ(2y)` with
/// `y = √(2/π)(v + 0.044715v³)` (the same function: `½(1 + tanh y) = σ(2y)`) so that it runs on
/// [`exp_fast`] and vectorises; libm's `tanhf` took 9 % of a Gemma prefill.
#[inline]
pub(crate) fn gelu_tanh(v: f32) -> f32 {
    const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
    let y = SQRT_TWO_OVER_PI * v * (1.0 + 0.044_715 * v * v);
    v / (1.0 + exp_fast(-2.0 * y))
}

/// GELU in its exact form, `½v(1 + erf(v/√2))` (BERT's `gelu`), with erf from Abramowitz &
/// Stegun 7.1.26 (absolute error < 1.5e-7) on [`exp_fast`], so loops over it vectorise.
#[inline]
pub(crate) fn gelu_erf(v: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152,
        1.061_405_4,
    ];
    let x = v * std::f32::consts::FRAC_1_SQRT_2;
    let ax = x.abs();
    let t = 1.0 / (1.0 + P * ax);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let erf_abs = 1.0 - poly * exp_fast(-ax * ax);
    0.5 * v * (1.0 + erf_abs.copysign(x))
}

/// What one activation (SiLU, GELU: an exponential or a tanh and a few products) costs, in
/// multiply-adds, for the pool's is-it-worth-it estimate ([`par_items`]'s `work`).
pub(crate) const ACTIVATION_MACS: usize = 16;

/// SiLU, `v·σ(v)`, on [`exp_fast`].
#[inline]
pub(crate) fn silu(v: f32) -> f32 {
    v / (1.0 + exp_fast(-v))
}

/// `eˣ` to within a few units in the last place (relative error < 1e-6 where the result is a
/// normal float), without a libm call, so loops over it vectorise: `x = n·ln2 + r` with the
/// product taken in two parts (Cody–Waite, so `r` keeps its precision for large `|x|`),
/// `2ⁿ` set in the exponent bits and `eʳ` (|r| ≤ ln2/2) a degree-7 polynomial. Inputs are
/// clamped to [-87, 88]: below, the result is under 1.7e-38 (treated as zero by every caller:
/// softmax weights and sigmoid tails); above, it would overflow.
#[inline]
pub(crate) fn exp_fast(x: f32) -> f32 {
    // 355/512 = 0.693359375: few mantissa bits, so n·LN2_HI is exact for the n that occur.
    const LN2_HI: f32 = 355.0 / 512.0;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5·2²³ rounds to the nearest integer (ties to even, as `round_ties_even`) and
    // leaves it in the low mantissa bits, so `2ⁿ` comes from integer lane operations: a
    // float-to-int conversion (`n as i32`) did not vectorise.
    const SHIFTER: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * std::f32::consts::LOG2_E + SHIFTER;
    let n = shifted - SHIFTER;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r / 5040.0))))));
    let two_n = (shifted
        .to_bits()
        .wrapping_sub(SHIFTER.to_bits())
        .wrapping_add(127))
        << 23;
    f32::from_bits(two_n) * p
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

/// One sequence's part of [`attend`]: its `t` queries at positions `pos..pos + t` (rows
/// `row..row + t` of the batch) over its cache, whose first entry is at absolute position
/// `first`.
pub(crate) struct AttendSeq<'a> {
    pub k_cache: &'a [f16],
    pub v_cache: &'a [f16],
    pub first: usize,
    pub pos: usize,
    pub t: usize,
}

/// Causal attention of every sequence of a batch over its own cache. Queries are read from
/// `q_rows` (row `i` starts at `i·q_stride`, heads one after another, the sequences' rows one
/// after another); `out` gets a row of `n_head·head_dim` per query. One work item per query and
/// group of query heads sharing a key/value head (so each cached key is read once for its
/// group), or per query and head when that leaves too few items to share; the items of every
/// sequence are spread over the thread pool together when the work pays for it (a decode step
/// of eight sequences is eight queries: alone, none would be worth the pool).
pub(crate) fn attend(
    shape: &AttentionShape,
    q_rows: &[f32],
    q_stride: usize,
    seqs: &[AttendSeq<'_>],
    out: &mut [f32],
) {
    let (nh, hd) = (shape.n_head, shape.head_dim);
    let kv_width = shape.n_kv_head * hd;
    let rep = nh / shape.n_kv_head;
    let rows: usize = seqs.iter().map(|s| s.t).sum();
    let work: usize = seqs
        .iter()
        .map(|s| s.t * nh * (s.k_cache.len() / kv_width) * hd * 2)
        .sum();
    // Whole groups unless that leaves fewer than `MIN_ATTENTION_ITEMS` items.
    let g = if rows * shape.n_kv_head >= MIN_ATTENTION_ITEMS {
        rep
    } else {
        1
    };
    let groups = nh / g;
    // The batch row where each sequence starts.
    let starts: Vec<usize> = seqs
        .iter()
        .scan(0, |row, s| {
            let start = *row;
            *row += s.t;
            Some(start)
        })
        .collect();
    par_items(out, rows * groups, g * hd, work, |item, out| {
        let (row, head) = (item / groups, item % groups * g);
        let n = starts.partition_point(|&start| start <= row) - 1;
        let seq = &seqs[n];
        let i = row - starts[n];
        let (k_cache, v_cache, first) = (seq.k_cache, seq.v_cache, seq.first);
        let kvh = head / rep;
        let qs = &q_rows[row * q_stride + head * hd..][..g * hd];
        let qi = seq.pos + i;
        // Keys at absolute positions lo..=qi.
        let lo = shape
            .window
            .map_or(first, |w| (qi + 1).saturating_sub(w).max(first));
        let keys = &k_cache[(lo - first) * kv_width + kvh * hd..];
        let values = &v_cache[(lo - first) * kv_width + kvh * hd..];
        attend_group(qs, g, keys, values, kv_width, shape.scale, qi + 1 - lo, out);
    });
}

/// Fewest (query, head group) items [`attend`] hands the pool: with fewer it splits the groups
/// into single heads (a one-stream decode step of a model with one key/value head would
/// otherwise be one item, on one core).
const MIN_ATTENTION_ITEMS: usize = 4;

/// [`attend_row`] for the `g` queries in `qs` (one after another) that share the keys and
/// values, reading each cached key and value once for all of them; `out` gets their outputs one
/// after another.
#[allow(clippy::too_many_arguments)]
fn attend_group(
    qs: &[f32],
    g: usize,
    keys: &[f16],
    values: &[f16],
    stride: usize,
    scale: f32,
    count: usize,
    out: &mut [f32],
) {
    let hd = qs.len() / g;
    let grouped = SCORES.with_borrow_mut(|buf| {
        buf.clear();
        buf.resize(g * count + g, 0.0);
        let (scores, scales) = buf.split_at_mut(g * count);
        if !grouped_attention_scores(qs, g, keys, values, stride, scale, scores) {
            return false;
        }
        for (row, inv_total) in scores.chunks_exact_mut(count).zip(scales.iter_mut()) {
            let max = lanes_max(row);
            for s in row.iter_mut() {
                *s = exp_fast(*s - max);
            }
            *inv_total = 1.0 / lanes_sum(row, |v| v);
        }
        if !grouped_attention_values(scores, g, values, stride, scales, out) {
            for ((w, &sc), out) in scores
                .chunks_exact(count)
                .zip(scales.iter())
                .zip(out.chunks_exact_mut(hd))
            {
                weighted_rows(w, values, stride, sc, out);
            }
        }
        true
    });
    // Without the vector path, head by head (after the scores buffer is released: `attend_row`
    // uses it too).
    if !grouped {
        for (q, out) in qs.chunks_exact(hd).zip(out.chunks_exact_mut(hd)) {
            attend_row(q, keys, values, stride, scale, count, out);
        }
    }
}

/// What keys and values may be stored as: f32 (the encoder's fresh projections, with the CPU's
/// vector path) or f16 (the decoders' caches, whose vector path is [`attend_group`]'s), each
/// with a portable path.
pub(crate) trait KvElement: Copy {
    /// As f32.
    fn widen(self) -> f32;
    /// `q · key` without the vector path.
    fn plain_dot(q: &[f32], key: &[Self]) -> f32 {
        q.iter().zip(key).map(|(a, b)| a * b.widen()).sum()
    }
    /// [`attention_scores`] where this element type has a vector path for a single row.
    fn vector_scores(q: &[f32], keys: &[Self], stride: usize, scale: f32, out: &mut [f32]) -> bool;
    /// [`attention_values`] where this element type has a vector path for a single row.
    fn vector_values(
        weights: &[f32],
        values: &[Self],
        stride: usize,
        scale: f32,
        out: &mut [f32],
    ) -> bool;
}

impl KvElement for f32 {
    fn widen(self) -> f32 {
        self
    }
    fn plain_dot(q: &[f32], key: &[f32]) -> f32 {
        dot(q, key)
    }
    fn vector_scores(q: &[f32], keys: &[f32], stride: usize, scale: f32, out: &mut [f32]) -> bool {
        attention_scores(q, keys, stride, scale, out)
    }
    fn vector_values(
        w: &[f32],
        values: &[f32],
        stride: usize,
        scale: f32,
        out: &mut [f32],
    ) -> bool {
        attention_values(w, values, stride, scale, out)
    }
}

impl KvElement for f16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
    // The caches' vector path is the grouped one ([`attend_group`]); a row over f16 comes here
    // only where that path is missing.
    fn vector_scores(_: &[f32], _: &[f16], _: usize, _: f32, _: &mut [f32]) -> bool {
        false
    }
    fn vector_values(_: &[f32], _: &[f16], _: usize, _: f32, _: &mut [f32]) -> bool {
        false
    }
}

/// One query's attention over `count` keys and values, key `j` at `keys[j·stride..][..q.len()]`
/// (values likewise): softmax of the scaled scores, then the weighted sum of the values into
/// `out`.
pub(crate) fn attend_row<E: KvElement>(
    q: &[f32],
    keys: &[E],
    values: &[E],
    stride: usize,
    scale: f32,
    count: usize,
    out: &mut [f32],
) {
    let hd = q.len();
    SCORES.with_borrow_mut(|scores| {
        scores.clear();
        scores.resize(count, 0.0);
        if !E::vector_scores(q, keys, stride, scale, scores) {
            for (j, s) in scores.iter_mut().enumerate() {
                *s = E::plain_dot(q, &keys[j * stride..][..hd]) * scale;
            }
        }
        let max = lanes_max(scores);
        // Two loops: the exponentials vectorise only without the running sum beside them.
        for s in scores.iter_mut() {
            *s = exp_fast(*s - max);
        }
        let total = lanes_sum(scores, |v| v);
        if !E::vector_values(scores, values, stride, 1.0 / total, out) {
            weighted_rows(scores, values, stride, 1.0 / total, out);
        }
    });
}

thread_local! {
    /// One attention row's scores, kept per thread so a (query, head) item allocates nothing.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `out = scale · Σ_j weights[j] · values[j·stride..][..out.len()]`, summed in chunks of 16
/// lanes held in registers across all rows (rather than the whole output read and written back
/// once per row).
fn weighted_rows<E: KvElement>(
    weights: &[f32],
    values: &[E],
    stride: usize,
    scale: f32,
    out: &mut [f32],
) {
    const LANES: usize = 16;
    let mut start = 0;
    for chunk in out.chunks_mut(LANES) {
        let mut acc = [0f32; LANES];
        if chunk.len() == LANES {
            for (j, &w) in weights.iter().enumerate() {
                let v = &values[j * stride + start..][..LANES];
                for (a, &v) in acc.iter_mut().zip(v) {
                    *a += w * v.widen();
                }
            }
        } else {
            for (j, &w) in weights.iter().enumerate() {
                let v = &values[j * stride + start..][..chunk.len()];
                for (a, &v) in acc.iter_mut().zip(v) {
                    *a += w * v.widen();
                }
            }
        }
        for (o, a) in chunk.iter_mut().zip(acc) {
            *o = a * scale;
        }
        start += chunk.len();
    }
}

/// One sequence's rows in a batched forward pass: `t` tokens at positions `pos..pos + t`,
/// attending over (and appending to) its own cache.
pub(crate) struct Segment<'a, C> {
    pub cache: &'a mut C,
    pub pos: usize,
    pub t: usize,
}

/// Rotary tables of every row of a batch, each row at its own sequence's position, `half`
/// values per row.
pub(crate) fn batch_rope_tables<C>(
    segs: &[Segment<'_, C>],
    inv_freq: &[f64],
    scale: f64,
) -> (Vec<f32>, Vec<f32>) {
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for s in segs {
        let (c, si) = rope_tables(inv_freq, scale, s.pos, s.t);
        cos.extend(c);
        sin.extend(si);
    }
    (cos, sin)
}

/// The last row of each segment of `x` (rows of `hidden` values), passed through `norm`, one
/// after another: the input of the output head.
pub(crate) fn last_rows_normed<C>(
    x: &[f32],
    segs: &[Segment<'_, C>],
    hidden: usize,
    norm: impl Fn(&[f32], &mut [f32]),
) -> Vec<f32> {
    let mut normed = vec![0f32; segs.len() * hidden];
    let mut end = 0;
    for (seg, out) in segs.iter().zip(normed.chunks_exact_mut(hidden)) {
        end += seg.t;
        norm(&x[(end - 1) * hidden..end * hidden], out);
    }
    normed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_the_plain_sum_at_every_length() {
        for n in 0..70 {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (*x as f64) * (*y as f64))
                .sum();
            assert!((dot(&a, &b) as f64 - want).abs() < 1e-4, "length {n}");
        }
    }

    #[test]
    fn the_fast_exponential_is_within_a_few_ulps_of_libm() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let (got, want) = (exp_fast(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_3;
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
        assert_eq!(exp_fast(0.0), 1.0);
        assert!(exp_fast(-1e9) < 1e-37 && exp_fast(-1e9) >= 0.0);
        assert!(exp_fast(1e9).is_finite());
    }

    #[test]
    fn gelu_and_silu_match_their_libm_definitions() {
        for i in -4000..4000 {
            let v = i as f32 / 400.0;
            let gelu = 0.5 * v * (1.0 + (0.797_884_6 * v * (1.0 + 0.044_715 * v * v)).tanh());
            assert!(
                (gelu_tanh(v) - gelu).abs() <= 1e-6 * gelu.abs().max(1.0),
                "gelu({v})"
            );
            let silu_ref = v / (1.0 + (-v).exp());
            assert!(
                (silu(v) - silu_ref).abs() <= 1e-6 * silu_ref.abs().max(1.0),
                "silu({v})"
            );
        }
    }

    /// erf by its Maclaurin series in f64 (exact enough for |x| ≤ 3.6).
    fn erf_series(x: f64) -> f64 {
        let (mut term, mut sum) = (x, x);
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn gelu_erf_matches_the_exact_gelu() {
        for i in -2000..=2000 {
            let v = i as f64 / 400.0;
            let exact = 0.5 * v * (1.0 + erf_series(v / std::f64::consts::SQRT_2));
            let got = f64::from(gelu_erf(v as f32));
            assert!(
                (got - exact).abs() <= 2e-6 * exact.abs().max(1.0),
                "gelu({v}): {got} vs {exact}"
            );
        }
        assert_eq!(gelu_erf(0.0), 0.0);
        assert!((gelu_erf(12.0) - 12.0).abs() < 1e-5 && gelu_erf(-12.0).abs() < 1e-5);
    }

    #[test]
    fn layer_norm_centres_and_scales_each_row() {
        let mut x = vec![1.0f32, 2.0, 3.0, 4.0, -2.0, 0.0, 2.0, 4.0];
        layer_norm_in_place(&mut x, &[1.0, 1.0, 2.0, 2.0], &[0.0, 0.0, 0.0, 1.0], 1e-12);
        for row in x.chunks(4) {
            // Unit weights give a mean-0, variance-1 row; here the last two are scaled and shifted.
            let plain = [row[0], row[1], row[2] / 2.0, (row[3] - 1.0) / 2.0];
            let mean: f32 = plain.iter().sum::<f32>() / 4.0;
            let var: f32 = plain.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / 4.0;
            assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5, "{row:?}");
        }
    }

    /// The exponent trick gives exactly the `2ⁿ` a rounding conversion gives (the passes'
    /// numbers did not move when it replaced `round_ties_even` and `as i32`).
    #[test]
    fn the_fast_exponential_rounds_its_exponent_as_round_ties_even() {
        let converted = |x: f32| {
            let x = x.clamp(-87.0, 88.0);
            let n = (x * std::f32::consts::LOG2_E).round_ties_even();
            let r = (x - n * (355.0 / 512.0)) - n * -2.121_944_4e-4;
            (n, r)
        };
        for i in -200_000..=200_000 {
            let x = i as f32 / 2000.0;
            let (n, r) = converted(x);
            let p = 1.0
                + r * (1.0
                    + r * (0.5
                        + r * (1.0 / 6.0
                            + r * (1.0 / 24.0
                                + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r / 5040.0))))));
            let want = f32::from_bits(((n as i32 + 127) << 23) as u32) * p;
            assert_eq!(exp_fast(x).to_bits(), want.to_bits(), "exp({x})");
        }
    }

    /// The caches' f16: values round as `half` rounds them (ties to even, overflow to
    /// infinity, subnormals kept), and a row attended over f16 keys and values (the portable
    /// path; [`grouped_attention_matches_each_head_alone`] holds the vector one to it) is the
    /// softmax attention of the widened values, summed in f64.
    #[test]
    fn attention_over_an_f16_cache_is_attention_over_its_widened_values() {
        let mut odd = vec![
            0.1f32,
            -2.5,
            65504.0,
            65520.0,
            1e-7,
            -6.1e-5,
            1.0 + 1.0 / 2048.0,
        ];
        odd.extend((0..20).map(|i| (i as f32 - 9.5) * 0.37));
        let mut cached = Vec::new();
        crate::kernels::extend_f16(&mut cached, &odd[..3]);
        crate::kernels::extend_f16(&mut cached, &odd[3..]);
        let want: Vec<u16> = odd.iter().map(|&x| f16::from_f32(x).to_bits()).collect();
        assert_eq!(cached.iter().map(|h| h.to_bits()).collect::<Vec<_>>(), want);

        let (hd, stride) = (64, 192);
        let val = |i: usize, salt: usize| ((i * 7919 + salt * 104_729) % 997) as f32 / 997.0 - 0.5;
        for n in [1usize, 3, 4, 5, 9, 37] {
            let q: Vec<f32> = (0..hd).map(|i| val(i, 1) * 3.0).collect();
            let (mut k, mut v) = (Vec::new(), Vec::new());
            let kf: Vec<f32> = (0..n * stride).map(|i| val(i, 2)).collect();
            let vf: Vec<f32> = (0..n * stride).map(|i| val(i, 3)).collect();
            crate::kernels::extend_f16(&mut k, &kf);
            crate::kernels::extend_f16(&mut v, &vf);
            let mut out = vec![0f32; hd];
            attend_row(&q, &k, &v, stride, 0.125, n, &mut out);
            let wide = |h: &[f16], j: usize, d: usize| f64::from(h[j * stride + d].to_f32());
            let scores: Vec<f64> = (0..n)
                .map(|j| {
                    0.125
                        * (0..hd)
                            .map(|d| f64::from(q[d]) * wide(&k, j, d))
                            .sum::<f64>()
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = w.iter().sum();
            for (d, got) in out.iter().enumerate() {
                let want = (0..n).map(|j| w[j] * wide(&v, j, d)).sum::<f64>() / total;
                assert!(
                    (f64::from(*got) - want).abs() < 1e-5,
                    "n {n} dim {d}: {got} vs {want}"
                );
            }
        }
    }

    /// A group of query heads sharing a key/value head, attended in one pass over the cache,
    /// gets what each head gets alone (group sizes across the kernel's blocks of four, head
    /// sizes across its column blocks).
    #[test]
    fn grouped_attention_matches_each_head_alone() {
        let val = |i: usize, salt: usize| ((i * 7919 + salt * 104_729) % 997) as f32 / 997.0 - 0.5;
        for (g, hd) in [(1, 64), (2, 24), (3, 64), (4, 256), (5, 40), (8, 16)] {
            let stride = 3 * hd;
            for n in [1usize, 2, 3, 7, 9, 17, 40] {
                let qs: Vec<f32> = (0..g * hd).map(|i| val(i, 1) * 3.0).collect();
                let (mut k, mut v) = (Vec::new(), Vec::new());
                let kf: Vec<f32> = (0..n * stride).map(|i| val(i, 2)).collect();
                let vf: Vec<f32> = (0..n * stride).map(|i| val(i, 3)).collect();
                crate::kernels::extend_f16(&mut k, &kf);
                crate::kernels::extend_f16(&mut v, &vf);
                let mut grouped = vec![0f32; g * hd];
                attend_group(&qs, g, &k, &v, stride, 0.2, n, &mut grouped);
                // Bit for bit the same as each head through the group kernel alone (a lone
                // decode row splits its groups into single heads, a batch does not).
                for r in 0..g {
                    let mut single = vec![0f32; hd];
                    attend_group(&qs[r * hd..][..hd], 1, &k, &v, stride, 0.2, n, &mut single);
                    assert_eq!(
                        single.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                        grouped[r * hd..][..hd]
                            .iter()
                            .map(|x| x.to_bits())
                            .collect::<Vec<_>>(),
                        "g {g} hd {hd} n {n} head {r}: one head alone"
                    );
                }
                for r in 0..g {
                    let mut alone = vec![0f32; hd];
                    attend_row(&qs[r * hd..][..hd], &k, &v, stride, 0.2, n, &mut alone);
                    for (d, (a, b)) in grouped[r * hd..][..hd].iter().zip(&alone).enumerate() {
                        assert!((a - b).abs() < 1e-5, "g {g} hd {hd} n {n} head {r} dim {d}");
                    }
                }
            }
        }
    }

    #[test]
    fn full_attention_matches_plain_softmax_attention() {
        let hd = 32;
        for n in [1usize, 3, 4, 5, 16, 17, 54] {
            let np = n.div_ceil(ATTENTION_BLOCK) * ATTENTION_BLOCK;
            let val =
                |i: usize, salt: usize| ((i * 7919 + salt * 104_729) % 997) as f32 / 997.0 - 0.5;
            let mut q = vec![0f32; n.div_ceil(4) * 4 * hd];
            q[..n * hd]
                .iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x = val(i, 1) * 3.0);
            let k: Vec<f32> = (0..n * hd).map(|i| val(i, 2)).collect();
            let v: Vec<f32> = (0..n * hd).map(|i| val(i, 3)).collect();
            let mut kt = vec![0f32; hd * np];
            for j in 0..n {
                for d in 0..hd {
                    kt[d * np + j] = k[j * hd + d];
                }
            }
            let mut out = vec![0f32; n * hd];
            full_attention_head(&q, &kt, &v, n, hd, 0.3, &mut out);
            for i in 0..n {
                let scores: Vec<f64> = (0..n)
                    .map(|j| {
                        0.3 * (0..hd)
                            .map(|d| f64::from(q[i * hd + d]) * f64::from(k[j * hd + d]))
                            .sum::<f64>()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = w.iter().sum();
                for d in 0..hd {
                    let want: f64 =
                        (0..n).map(|j| w[j] * f64::from(v[j * hd + d])).sum::<f64>() / total;
                    let got = f64::from(out[i * hd + d]);
                    assert!(
                        (got - want).abs() < 1e-5,
                        "n {n} query {i} dim {d}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
