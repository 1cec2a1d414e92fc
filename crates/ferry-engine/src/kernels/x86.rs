//! The x86-64 kernels: one function per instruction set, chosen once at run time.
//!
//! Each block is unpacked to 32 unsigned bytes in a 256-bit register and dotted with the
//! activation block; the per-block scales go into a float accumulator, the offsets into a scalar
//! one (see the parent module for the algebra). 256-bit registers hold exactly one block, which
//! keeps one code path for every format. Weights whose rows fill groups of sixteen are held
//! interleaved instead, and `groups` multiplies them sixteen rows per 512-bit register, or eight
//! per 256-bit one.
// SIMD intrinsics and raw-pointer loads need `unsafe`; every pointer is derived from slices
// whose lengths `QWeight::from_qtensor` and `QuantizedActs::quantize` checked.
#![allow(unsafe_code)]

use std::arch::x86_64::*;
use std::ops::Range;
use std::sync::OnceLock;

use half::f16;

use super::{Format, QWeight, QuantizedActs, BLOCK, GROUP};

mod groups;

/// Instruction sets the kernels are compiled for, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// `vpdpbusd` on 256-bit registers from AVX-512 VNNI (with VL).
    Avx512Vnni,
    /// `vpdpbusd` from AVX-VNNI (VEX-encoded).
    AvxVnni,
    /// Widening multiply-adds (`vpmaddwd`) on AVX2.
    Avx2,
}

impl Isa {
    /// Short name for logs and benchmark tables.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512Vnni => "avx512-vnni",
            Isa::AvxVnni => "avx-vnni",
            Isa::Avx2 => "avx2",
        }
    }
}

/// Every instruction set this CPU runs, best first.
pub fn available() -> Vec<Isa> {
    let mut out = Vec::new();
    if !(is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c"))
    {
        return out;
    }
    if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
        out.push(Isa::Avx512Vnni);
    }
    if is_x86_feature_detected!("avxvnni") {
        out.push(Isa::AvxVnni);
    }
    out.push(Isa::Avx2);
    out
}

/// Environment variable naming the instruction set the kernels use instead of the best one
/// (`avx512-vnni`, `avx-vnni`, `avx2`), or `candle` for candle's products everywhere: to measure
/// the paths a CPU without AVX-512 takes, or to rule the kernels out when chasing a bug.
pub const ISA_ENV: &str = "FERRY_KERNEL_ISA";

/// The instruction set the kernels run with: the best of this CPU, or the one `FERRY_KERNEL_ISA`
/// names if this CPU has it; `None` without AVX2/FMA/F16C (or with `FERRY_KERNEL_ISA=candle`).
pub fn detect() -> Option<Isa> {
    static CHOSEN: OnceLock<Option<Isa>> = OnceLock::new();
    *CHOSEN.get_or_init(|| choose(&available(), std::env::var(ISA_ENV).ok().as_deref()))
}

/// `wide(arg)` run inside a function compiled for AVX-512 where the kernels use it, `narrow(arg)`
/// elsewhere: a loop left to the compiler, inlined into `wide`, gets sixteen lanes and 32
/// registers instead of the build's AVX2 baseline.
pub fn with_avx512<A, T>(arg: A, wide: impl FnOnce(A) -> T, narrow: impl FnOnce(A) -> T) -> T {
    if detect() == Some(Isa::Avx512Vnni) {
        // SAFETY: `detect` chose AVX-512 VNNI, so the CPU has AVX-512 F and VL.
        unsafe { in_avx512(arg, wide) }
    } else {
        narrow(arg)
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
unsafe fn in_avx512<A, T>(arg: A, f: impl FnOnce(A) -> T) -> T {
    f(arg)
}

/// The instruction set for a `FERRY_KERNEL_ISA` value among those this CPU has (best first).
fn choose(have: &[Isa], wanted: Option<&str>) -> Option<Isa> {
    let best = have.first().copied();
    let Some(wanted) = wanted.map(str::trim).filter(|w| !w.is_empty()) else {
        return best;
    };
    if wanted == "candle" {
        return None;
    }
    match have.iter().find(|isa| isa.name() == wanted) {
        Some(&isa) => Some(isa),
        None => {
            tracing::warn!(
                wanted,
                available = ?have.iter().map(|i| i.name()).collect::<Vec<_>>(),
                "{ISA_ENV} names an instruction set this CPU lacks or ferry does not know \
                 (avx512-vnni, avx-vnni, avx2, candle); using the best available"
            );
            best
        }
    }
}

/// Whether `isa`'s kernels read `format` in the interleaved layout: every format on the VNNI
/// sets; on plain AVX2 all but Q8_0, whose unsigned bytes would overflow `vpmaddubsw`'s 16-bit
/// sums.
pub fn interleaves(isa: Isa, format: Format) -> bool {
    isa != Isa::Avx2 || format != Format::Q8_0
}

/// Products smaller than this many multiply-adds run on the calling thread: waking the pool
/// costs more than it saves.
pub(super) const PARALLEL_MIN_MACS: usize = 1 << 15;

/// The output buffer, shared by the pool's threads; each writes only the rows it was handed.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: threads write disjoint rows (`execute_chunked` hands out non-overlapping ranges).
unsafe impl Send for Out {}
// SAFETY: as above.
unsafe impl Sync for Out {}

impl Out {
    /// The pointer (a method, so closures capture the `Sync` wrapper, not the raw field).
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// `out[j·rows + r]` for every weight row `r` and activation row `j < m`.
pub fn matmul(isa: Isa, w: &QWeight, acts: &QuantizedActs, m: usize, out: &mut [f32]) {
    assert_eq!(out.len(), m * w.rows);
    assert_eq!(acts.q.len(), m * w.cols);
    assert_eq!(
        w.stored().len(),
        w.rows * w.cols / BLOCK * w.format.block_bytes()
    );
    if w.interleaved {
        if !interleaves(isa, w.format) {
            // Tests ask every instruction set of the CPU for every layout.
            return matmul(isa, &w.to_rows(), acts, m, out);
        }
        assert_eq!(w.rows % GROUP, 0);
        let dst = Out(out.as_mut_ptr());
        let run = |groups: Range<usize>| {
            macro_rules! by_format {
                ($($module:ident)::+) => {
                    match w.format {
                        Format::Q4_0 => $($module)::+::rows::<Q4_0>(w, acts, m, groups, dst.ptr()),
                        Format::Q4_1 => $($module)::+::rows::<Q4_1>(w, acts, m, groups, dst.ptr()),
                        Format::Q5_0 => $($module)::+::rows::<Q5_0>(w, acts, m, groups, dst.ptr()),
                        Format::Q8_0 => $($module)::+::rows::<Q8_0>(w, acts, m, groups, dst.ptr()),
                    }
                };
            }
            // SAFETY: the asserts above bound every pointer; `isa` was detected on this CPU and
            // reads this format interleaved (`interleaves`).
            unsafe {
                match isa {
                    Isa::Avx512Vnni => by_format!(groups),
                    Isa::AvxVnni => by_format!(groups::avxvnni),
                    Isa::Avx2 => by_format!(groups::avx2),
                }
            }
        };
        if w.rows * w.cols * m < PARALLEL_MIN_MACS {
            run(0..w.rows / GROUP);
        } else {
            candle_core::utils::barrier_pool().execute_chunked(w.rows / GROUP, run);
        }
        return;
    }
    let dst = Out(out.as_mut_ptr());
    let run = |rows: Range<usize>| {
        // SAFETY: the asserts above bound every pointer the kernel forms; `isa` was detected
        // on this CPU (`available`), so its instructions exist.
        unsafe { dispatch(isa, w, acts, m, rows, dst.ptr()) }
    };
    if w.rows * w.cols * m < PARALLEL_MIN_MACS {
        run(0..w.rows);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(w.rows, run);
    }
}

/// [`QuantizedActs::quantize`] eight lanes at a time, with the same results: the block's
/// largest magnitude, the same scalar scale and inverse, and `vcvtps2dq`'s default rounding
/// (to nearest, ties to even, as the scalar loop's `round_ties_even`).
pub fn quantize(x: &[f32], out: &mut QuantizedActs) {
    assert_eq!(x.len(), out.q.len());
    assert_eq!(x.len(), out.d.len() * BLOCK);
    assert_eq!(out.d.len(), out.sum.len());
    assert_eq!(out.d.len(), out.scaled_sum.len());
    // SAFETY: lengths asserted above; AVX2 is present wherever `detect` returned an ISA.
    unsafe { quantize_avx2(x, out) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_avx2(x: &[f32], out: &mut QuantizedActs) {
    let sign = _mm256_set1_ps(-0.0);
    // `packs` interleaves the 128-bit lanes; this puts the four groups of eight back in order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for b in 0..out.d.len() {
        let xs = x.as_ptr().add(b * BLOCK);
        let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(xs.add(8 * i)));
        let a = v.map(|v| _mm256_andnot_ps(sign, v));
        let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let scale = amax / 127.0;
        let inv = _mm256_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
        let i = v.map(|v| _mm256_cvtps_epi32(_mm256_mul_ps(v, inv)));
        let bytes = _mm256_packs_epi16(
            _mm256_packs_epi32(i[0], i[1]),
            _mm256_packs_epi32(i[2], i[3]),
        );
        let bytes = _mm256_permutevar8x32_epi32(bytes, order);
        _mm256_storeu_si256(out.q.as_mut_ptr().add(b * BLOCK) as *mut __m256i, bytes);
        let total = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
        let t = _mm_add_epi32(
            _mm256_castsi256_si128(total),
            _mm256_extracti128_si256(total, 1),
        );
        let t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0b01_00_11_10));
        let t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0b10_11_00_01));
        *out.d.get_unchecked_mut(b) = scale;
        let sum = _mm_cvtsi128_si32(t);
        *out.sum.get_unchecked_mut(b) = sum;
        *out.scaled_sum.get_unchecked_mut(b) = scale * sum as f32;
    }
}

/// Eight f16 values from element `i` of `base`, widened to f32 by F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn widen8(base: *const f16, i: usize) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(base.add(i) as *const __m128i))
}

/// Attention scores: `out[j] = scale · Σ_c q[c]·keys[j·stride + c]` for `j < out.len()`, four
/// keys at a time (four independent chains of multiply-adds, the query loaded once for them).
/// `q.len()` must be a multiple of 8.
pub fn scaled_dots(q: &[f32], keys: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
    check_rows(q.len(), out.len(), keys.len(), stride);
    // SAFETY: bounds checked above; AVX2, FMA and F16C are present wherever `detect` returned
    // an ISA, which the caller checked.
    unsafe { scaled_dots_avx2(q, keys.as_ptr(), stride, scale, out) }
}

/// Panics unless `n` rows of `width` elements, `stride` apart, fit in `len` elements, and
/// `width` is a multiple of 8 (what the attention kernels' loads assume).
fn check_rows(width: usize, n: usize, len: usize, stride: usize) {
    assert_eq!(width % 8, 0);
    assert!(n == 0 || len >= (n - 1) * stride + width);
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scaled_dots_avx2(
    q: &[f32],
    keys: *const f32,
    stride: usize,
    scale: f32,
    out: &mut [f32],
) {
    let (hd, n) = (q.len(), out.len());
    let qp = q.as_ptr();
    let mut j = 0;
    while j + 4 <= n {
        let mut acc = [_mm256_setzero_ps(); 4];
        for c in (0..hd).step_by(8) {
            let qv = _mm256_loadu_ps(qp.add(c));
            for (t, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(qv, _mm256_loadu_ps(keys.add((j + t) * stride + c)), *acc);
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            *out.get_unchecked_mut(j + t) = hsum(*acc) * scale;
        }
        j += 4;
    }
    while j < n {
        let mut acc = _mm256_setzero_ps();
        for c in (0..hd).step_by(8) {
            acc = _mm256_fmadd_ps(
                _mm256_loadu_ps(qp.add(c)),
                _mm256_loadu_ps(keys.add(j * stride + c)),
                acc,
            );
        }
        *out.get_unchecked_mut(j) = hsum(acc) * scale;
        j += 1;
    }
}

/// Attention's weighted values: `out[c] = scale · Σ_j weights[j]·values[j·stride + c]`, up to
/// 64 columns at a time in eight registers held across every row. `out.len()` must be a multiple
/// of 8.
pub fn weighted_sum(weights: &[f32], values: &[f32], stride: usize, scale: f32, out: &mut [f32]) {
    check_rows(out.len(), weights.len(), values.len(), stride);
    // SAFETY: as for `scaled_dots`.
    unsafe { weighted_sum_avx2(weights, values.as_ptr(), stride, scale, out) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_sum_avx2(
    weights: &[f32],
    values: *const f32,
    stride: usize,
    scale: f32,
    out: &mut [f32],
) {
    let (hd, dst) = (out.len(), out.as_mut_ptr());
    let mut start = 0;
    // Blocks of a fixed width, so the compiler keeps the accumulators in registers (with a
    // run-time width they lived on the stack: a load and a store around every multiply-add).
    while start + 64 <= hd {
        weighted_block::<8>(weights, values, stride, start, scale, dst);
        start += 64;
    }
    while start + 16 <= hd {
        weighted_block::<2>(weights, values, stride, start, scale, dst);
        start += 16;
    }
    while start < hd {
        weighted_block::<1>(weights, values, stride, start, scale, dst);
        start += 8;
    }
}

/// Columns `start..start + 8·LANES` of [`weighted_sum`], `LANES` registers held across every row.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_block<const LANES: usize>(
    weights: &[f32],
    values: *const f32,
    stride: usize,
    start: usize,
    scale: f32,
    out: *mut f32,
) {
    let mut acc = [_mm256_setzero_ps(); LANES];
    for (j, &w) in weights.iter().enumerate() {
        let wv = _mm256_set1_ps(w);
        let row = j * stride + start;
        for (i, acc) in acc.iter_mut().enumerate() {
            *acc = _mm256_fmadd_ps(wv, _mm256_loadu_ps(values.add(row + 8 * i)), *acc);
        }
    }
    let sv = _mm256_set1_ps(scale);
    for (i, acc) in acc.iter().enumerate() {
        _mm256_storeu_ps(out.add(start + 8 * i), _mm256_mul_ps(*acc, sv));
    }
}

/// Attention scores of `g` queries sharing one key/value head, over keys held as f16:
/// `out[r·n + j] = scale · qs[r·hd..][..hd] · keys[j·stride..][..hd]` with `n = out.len() / g`.
/// Each key is read and widened once for all the queries (up to four at a time), rather than
/// once per query head. The keys a few rows ahead, and the value rows beside them (`values`,
/// same layout), are prefetched: a step reads each sequence's cache once, long after the
/// weights streamed through have evicted it. `hd` must be a multiple of 8.
pub fn grouped_dots_f16(
    qs: &[f32],
    g: usize,
    keys: &[f16],
    values: &[f16],
    stride: usize,
    scale: f32,
    out: &mut [f32],
) {
    let hd = qs.len() / g;
    assert_eq!(qs.len(), g * hd);
    assert_eq!(out.len() % g, 0);
    let n = out.len() / g;
    check_rows(hd, n, keys.len(), stride);
    check_rows(hd, n, values.len(), stride);
    let k = keys.as_ptr();
    query_blocks(g, |r, take| {
        // The first block of queries prefetches the value rows, for the pass after the scores.
        let rows = (k, if r == 0 { values.as_ptr() } else { k });
        let (q, o) = (
            &qs[r * hd..(r + take) * hd],
            &mut out[r * n..(r + take) * n],
        );
        // SAFETY: bounds checked above (each query block reads `n` keys of `hd`); AVX2, FMA and
        // F16C are present wherever `detect` returned an ISA, which the caller checked.
        unsafe {
            match take {
                1 => grouped_dots_avx2::<1, 8>(q, hd, rows, stride, scale, o),
                2 => grouped_dots_avx2::<2, 4>(q, hd, rows, stride, scale, o),
                3 => grouped_dots_avx2::<3, 3>(q, hd, rows, stride, scale, o),
                _ => grouped_dots_avx2::<4, 2>(q, hd, rows, stride, scale, o),
            }
        }
    });
}

/// Calls `f(first, count)` for consecutive blocks of at most four of `g` query heads: what the
/// grouped kernels hold in registers at once.
fn query_blocks(g: usize, mut f: impl FnMut(usize, usize)) {
    let mut r = 0;
    while r < g {
        let take = (g - r).min(4);
        f(r, take);
        r += take;
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn grouped_dots_avx2<const G: usize, const K: usize>(
    qs: &[f32],
    hd: usize,
    (keys, values): (*const f16, *const f16),
    stride: usize,
    scale: f32,
    out: &mut [f32],
) {
    let n = out.len() / G;
    let (qp, op) = (qs.as_ptr(), out.as_mut_ptr());
    let sv = _mm_set1_ps(scale);
    let mut j = 0;
    // K keys at a time: G·K independent chains of multiply-adds (eight or more keep both FMA
    // ports busy through their latency; two keys for three queries left them a third idle).
    while j + K <= n {
        let ahead = (j + PREFETCH_KEYS).min(n)..(j + PREFETCH_KEYS + K).min(n);
        prefetch_rows(keys, ahead.clone(), hd, stride);
        if values != keys {
            prefetch_rows(values, ahead, hd, stride);
        }
        let mut acc = [[_mm256_setzero_ps(); K]; G];
        for c in (0..hd).step_by(8) {
            let mut k = [_mm256_setzero_ps(); K];
            for (i, k) in k.iter_mut().enumerate() {
                *k = widen8(keys, (j + i) * stride + c);
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let q = _mm256_loadu_ps(qp.add(r * hd + c));
                for (a, k) in acc.iter_mut().zip(&k) {
                    *a = _mm256_fmadd_ps(q, *k, *a);
                }
            }
        }
        // Four keys' sums per horizontal-add tree (one sum at a time was a third of the time).
        for (r, acc) in acc.iter().enumerate() {
            for (i0, quad) in acc.chunks(4).enumerate() {
                let lane = |i: usize| quad.get(i).copied().unwrap_or(_mm256_setzero_ps());
                let sums = _mm_mul_ps(hsum4(lane(0), lane(1), lane(2), lane(3)), sv);
                let dst = op.add(r * n + j + 4 * i0);
                if quad.len() == 4 {
                    _mm_storeu_ps(dst, sums);
                } else {
                    let mut tmp = [0f32; 4];
                    _mm_storeu_ps(tmp.as_mut_ptr(), sums);
                    std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, quad.len());
                }
            }
        }
        j += K;
    }
    while j < n {
        let mut acc = [_mm256_setzero_ps(); G];
        for c in (0..hd).step_by(8) {
            let k0 = widen8(keys, j * stride + c);
            for (r, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(r * hd + c)), k0, *acc);
            }
        }
        // The same sum tree as a block's lanes: where the blocks end depends on the group
        // size, and a sequence's scores must not depend on whether it decodes alone.
        let zero = _mm256_setzero_ps();
        for (r, acc) in acc.iter().enumerate() {
            let sums = _mm_mul_ps(hsum4(*acc, zero, zero, zero), sv);
            *op.add(r * n + j) = _mm_cvtss_f32(sums);
        }
        j += 1;
    }
}

/// Rows ahead of the key being read that the scores kernel prefetches (keys and values): the
/// rows are a stride apart, which the hardware prefetcher follows only after a few misses, and
/// the values would otherwise be missed again in the pass after the scores.
const PREFETCH_KEYS: usize = 8;

/// Prefetches the f16 rows `rows` of `hd` values each, `stride` apart (rows that exist: the
/// caller clamps the range).
#[inline(always)]
unsafe fn prefetch_rows(base: *const f16, rows: Range<usize>, hd: usize, stride: usize) {
    for r in rows {
        let row = base.add(r * stride) as *const i8;
        let bytes = hd * 2;
        let mut off = 0;
        while off < bytes {
            _mm_prefetch::<_MM_HINT_T0>(row.add(off));
            off += 64;
        }
        _mm_prefetch::<_MM_HINT_T0>(row.add(bytes - 1));
    }
}

/// Attention outputs of `g` queries sharing one key/value head, over values held as f16:
/// `out[r·hd + c] = scales[r] · Σ_j weights[r·n + j]·values[j·stride + c]` with
/// `n = weights.len() / g`; each value row is widened once for all the queries (up to four at
/// a time). `hd = out.len() / g` must be a multiple of 8.
pub fn grouped_sums_f16(
    weights: &[f32],
    g: usize,
    values: &[f16],
    stride: usize,
    scales: &[f32],
    out: &mut [f32],
) {
    let hd = out.len() / g;
    assert_eq!(out.len(), g * hd);
    assert_eq!(weights.len() % g, 0);
    assert_eq!(scales.len(), g);
    let n = weights.len() / g;
    check_rows(hd, n, values.len(), stride);
    let v = values.as_ptr();
    query_blocks(g, |r, take| {
        let w = &weights[r * n..(r + take) * n];
        let (sc, o) = (&scales[r..r + take], &mut out[r * hd..(r + take) * hd]);
        // SAFETY: as for `grouped_dots_f16`.
        unsafe {
            match take {
                1 => grouped_sums_avx2::<1, 8>(w, v, stride, sc, o),
                2 => grouped_sums_avx2::<2, 4>(w, v, stride, sc, o),
                3 => grouped_sums_avx2::<3, 2>(w, v, stride, sc, o),
                _ => grouped_sums_avx2::<4, 2>(w, v, stride, sc, o),
            }
        }
    });
}

/// [`grouped_sums_f16`] for `G` queries, `8·LANES` columns at a time (`G·LANES` accumulators
/// in registers), then narrower blocks for the rest.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn grouped_sums_avx2<const G: usize, const LANES: usize>(
    weights: &[f32],
    values: *const f16,
    stride: usize,
    scales: &[f32],
    out: &mut [f32],
) {
    let hd = out.len() / G;
    let mut start = 0;
    while start + 8 * LANES <= hd {
        grouped_block::<G, LANES>(weights, values, stride, start, scales, hd, out.as_mut_ptr());
        start += 8 * LANES;
    }
    while start < hd {
        grouped_block::<G, 1>(weights, values, stride, start, scales, hd, out.as_mut_ptr());
        start += 8;
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn grouped_block<const G: usize, const LANES: usize>(
    weights: &[f32],
    values: *const f16,
    stride: usize,
    start: usize,
    scales: &[f32],
    hd: usize,
    out: *mut f32,
) {
    let n = weights.len() / G;
    let wp = weights.as_ptr();
    let mut acc = [[_mm256_setzero_ps(); LANES]; G];
    for j in 0..n {
        let mut v = [_mm256_setzero_ps(); LANES];
        for (i, v) in v.iter_mut().enumerate() {
            *v = widen8(values, j * stride + start + 8 * i);
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let w = _mm256_broadcast_ss(&*wp.add(r * n + j));
            for (a, v) in acc.iter_mut().zip(&v) {
                *a = _mm256_fmadd_ps(w, *v, *a);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let sv = _mm256_set1_ps(*scales.get_unchecked(r));
        for (i, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.add(r * hd + start + 8 * i), _mm256_mul_ps(*a, sv));
        }
    }
}

/// Appends `src` to `dst` rounded to f16 (to nearest, ties to even, as `half` rounds), eight
/// values per F16C conversion.
pub fn extend_f16(dst: &mut Vec<f16>, src: &[f32]) {
    let old = dst.len();
    dst.resize(old + src.len(), f16::ZERO);
    let out = &mut dst[old..];
    let whole = src.len() / 8 * 8;
    // SAFETY: `out` and `src` have the same length and `whole` ≤ it; F16C is present wherever
    // `detect` returned an ISA, which the caller checked.
    unsafe { to_f16_avx2(&src[..whole], out.as_mut_ptr() as *mut u8) };
    for (o, &x) in out[whole..].iter_mut().zip(&src[whole..]) {
        *o = f16::from_f32(x);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn to_f16_avx2(src: &[f32], dst: *mut u8) {
    for (i, chunk) in src.chunks_exact(8).enumerate() {
        let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(chunk.as_ptr()));
        _mm_storeu_si128(dst.add(16 * i) as *mut __m128i, h);
    }
}

/// One f32 activation row against every weight row (see `QWeight::matvec_f32`); `sums` holds
/// the activation's per-block sums.
pub fn matvec_f32(w: &QWeight, x: &[f32], sums: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), w.cols);
    assert_eq!(sums.len(), w.cols / BLOCK);
    assert_eq!(out.len(), w.rows);
    let dst = Out(out.as_mut_ptr());
    let run = |rows: Range<usize>| {
        // SAFETY: lengths asserted above; AVX2/FMA/F16C checked by `detect` before any call,
        // AVX-512F/BW where `Isa::Avx512Vnni` was detected (it implies both).
        unsafe {
            if detect() == Some(Isa::Avx512Vnni) {
                return match w.format {
                    Format::Q4_0 => f32_rows_512::<Q4_0>(w, x, sums, rows, dst.ptr()),
                    Format::Q4_1 => f32_rows_512::<Q4_1>(w, x, sums, rows, dst.ptr()),
                    Format::Q5_0 => f32_rows_512::<Q5_0>(w, x, sums, rows, dst.ptr()),
                    Format::Q8_0 => f32_rows_512::<Q8_0>(w, x, sums, rows, dst.ptr()),
                };
            }
            match w.format {
                Format::Q4_0 => f32_rows::<Q4_0>(w, x, sums, rows, dst.ptr()),
                Format::Q4_1 => f32_rows::<Q4_1>(w, x, sums, rows, dst.ptr()),
                Format::Q5_0 => f32_rows::<Q5_0>(w, x, sums, rows, dst.ptr()),
                Format::Q8_0 => f32_rows::<Q8_0>(w, x, sums, rows, dst.ptr()),
            }
        }
    };
    if w.rows * w.cols < PARALLEL_MIN_MACS {
        run(0..w.rows);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(w.rows, run);
    }
}

/// The f32-activation kernel at one register width: per weight row, `Σ_b d_w·(u_b · x_b)` in
/// `$acc` lanes plus `Σ_b c_w·Σx_b` in a scalar. Only the block's dot (`$block`, from the
/// unpacked bytes `u` and the block's activations `xb`), the scale-and-add and the final sum
/// differ between widths, so both kernels are this one loop (a macro, not a generic: the
/// intrinsics need the caller's `target_feature`).
macro_rules! f32_rows_kernel {
    (
        $(#[$doc:meta])*
        $name:ident, $features:literal, zero: $zero:expr,
        block: |$u:ident, $xb:ident| $block:block,
        scale_add: |$blk:ident, $dw:ident, $acc:ident| $scale_add:expr,
        reduce: $reduce:expr
    ) => {
        $(#[$doc])*
        #[target_feature(enable = $features)]
        unsafe fn $name<const F: u8>(
            w: &QWeight,
            x: &[f32],
            sums: &[f32],
            rows: Range<usize>,
            out: *mut f32,
        ) {
            let nb = w.cols / BLOCK;
            let bb = block_bytes(F);
            let base = w.stored().as_ptr();
            let xp = x.as_ptr();
            for r in rows {
                let row = base.add(r * nb * bb);
                let mut acc = $zero;
                let mut offsets = 0f32;
                for b in 0..nb {
                    let ($u, $dw, cw) = unpack::<F>(row.add(b * bb));
                    let $xb = xp.add(b * BLOCK);
                    let $blk = $block;
                    let $acc = acc;
                    acc = $scale_add;
                    offsets += cw * *sums.get_unchecked(b);
                }
                *out.add(r) = $reduce(acc) + offsets;
            }
        }
    };
}

f32_rows_kernel! {
    /// 8-lane registers (AVX2): each block's 32 bytes widened in four groups of eight.
    f32_rows, "avx2,fma,f16c", zero: _mm256_setzero_ps(),
    block: |u, xb| {
        let lo = _mm256_castsi256_si128(u);
        let hi = _mm256_extracti128_si256(u, 1);
        let mut block = _mm256_setzero_ps();
        for (i, bytes) in [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)]
            .into_iter()
            .enumerate()
        {
            let v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
            block = _mm256_fmadd_ps(v, _mm256_loadu_ps(xb.add(8 * i)), block);
        }
        block
    },
    scale_add: |block, dw, acc| _mm256_fmadd_ps(block, _mm256_set1_ps(dw), acc),
    reduce: hsum
}

/// One weight row unpacked for the prompt kernels: unsigned bytes, each block's `d_w` and
/// each block's `c_w`.
struct RowScratch {
    us: Vec<u8>,
    dws: Vec<f32>,
    cws: Vec<f32>,
}

impl RowScratch {
    fn new(blocks: usize) -> Self {
        RowScratch {
            us: vec![0; blocks * BLOCK],
            dws: vec![0.0; blocks],
            cws: vec![0.0; blocks],
        }
    }

    /// Unpacks the `nb`-block row at `row`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack<const F: u8>(&mut self, row: *const u8, nb: usize) {
        let bb = block_bytes(F);
        for b in 0..nb {
            let (u, dw, cw) = unpack::<F>(row.add(b * bb));
            _mm256_storeu_si256(self.us.as_mut_ptr().add(b * BLOCK) as *mut __m256i, u);
            self.dws[b] = dw;
            self.cws[b] = cw;
        }
    }
}

/// Walks `rows` × `m` activation rows in register tiles of `R` weight rows × `J` activation
/// rows: each weight row is unpacked once, `tile(scratch, row_at, act_at)` computes one tile, and
/// only real outputs are written to `out[j·w.rows + r]` (a short tile repeats its last weight or
/// activation row rather than taking another code path).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn walk_tiles<const F: u8, const R: usize, const J: usize>(
    w: &QWeight,
    m: usize,
    rows: Range<usize>,
    out: *mut f32,
    mut tile: impl FnMut(&[RowScratch; R], [usize; R], [usize; J]) -> [[f32; J]; R],
) {
    let nb = w.cols / BLOCK;
    let bb = block_bytes(F);
    let base = w.stored().as_ptr();
    let mut scratch: [RowScratch; R] = std::array::from_fn(|_| RowScratch::new(nb));
    let mut r = rows.start;
    while r < rows.end {
        let nr = (rows.end - r).min(R);
        let ahead = (rows.end - r - nr).min(R);
        if ahead > 0 {
            prefetch_row(base.add((r + nr) * nb * bb), ahead * nb * bb);
        }
        for (i, s) in scratch.iter_mut().take(nr).enumerate() {
            s.unpack::<F>(base.add((r + i) * nb * bb), nb);
        }
        let row_at: [usize; R] = std::array::from_fn(|i| i.min(nr - 1));
        let mut j = 0;
        while j < m {
            let nj = (m - j).min(J);
            let act_at: [usize; J] = std::array::from_fn(|k| j + k.min(nj - 1));
            let values = tile(&scratch, row_at, act_at);
            for (i, row) in values.iter().enumerate().take(nr) {
                for (k, &v) in row.iter().enumerate().take(nj) {
                    *out.add((j + k) * w.rows + r + i) = v;
                }
            }
            j += nj;
        }
        r += nr;
    }
}

f32_rows_kernel! {
    /// [`f32_rows`] with 16-lane registers: half the conversions and multiply-adds per block.
    f32_rows_512, "avx2,fma,f16c,avx512f,avx512bw,avx512vl", zero: _mm512_setzero_ps(),
    block: |u, xb| {
        let lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(u)));
        let hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(u, 1)));
        _mm512_fmadd_ps(
            hi,
            _mm512_loadu_ps(xb.add(16)),
            _mm512_mul_ps(lo, _mm512_loadu_ps(xb)),
        )
    },
    scale_add: |block, dw, acc| _mm512_fmadd_ps(block, _mm512_set1_ps(dw), acc),
    reduce: _mm512_reduce_add_ps
}

/// `f(i, &mut out[i·width..(i + 1)·width])` for every item, on the pool.
pub(super) fn par_items<F: Fn(usize, &mut [f32]) + Sync>(
    out: &mut [f32],
    items: usize,
    width: usize,
    f: &F,
) {
    let dst = Out(out.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(items, |range| {
        for i in range {
            // SAFETY: `out` holds `items · width` values (asserted by the caller) and the pool
            // hands out each item once, so the slices are in bounds and disjoint.
            let slice = unsafe { std::slice::from_raw_parts_mut(dst.ptr().add(i * width), width) };
            f(i, slice);
        }
    });
}

unsafe fn dispatch(
    isa: Isa,
    w: &QWeight,
    acts: &QuantizedActs,
    m: usize,
    rows: Range<usize>,
    out: *mut f32,
) {
    macro_rules! by_format {
        ($module:ident) => {
            match w.format {
                Format::Q4_0 => $module::rows::<Q4_0>(w, acts, m, rows, out),
                Format::Q4_1 => $module::rows::<Q4_1>(w, acts, m, rows, out),
                Format::Q5_0 => $module::rows::<Q5_0>(w, acts, m, rows, out),
                Format::Q8_0 => $module::rows::<Q8_0>(w, acts, m, rows, out),
            }
        };
    }
    match isa {
        Isa::Avx512Vnni => by_format!(avx512vnni),
        Isa::AvxVnni => by_format!(avxvnni),
        Isa::Avx2 => by_format!(avx2),
    }
}

// Format tags for the kernels' const parameter.
const Q4_0: u8 = 0;
const Q4_1: u8 = 1;
const Q5_0: u8 = 2;
const Q8_0: u8 = 3;

const fn format_of(f: u8) -> Format {
    match f {
        Q4_0 => Format::Q4_0,
        Q4_1 => Format::Q4_1,
        Q5_0 => Format::Q5_0,
        _ => Format::Q8_0,
    }
}

const fn block_bytes(f: u8) -> usize {
    format_of(f).block_bytes()
}

/// Asks for the `bytes` at `p` (the next weight row) to be brought into the cache: the kernels
/// call it a row ahead, so the current row's products hide the next one's memory latency (on
/// this VM the hardware prefetcher alone left the loads of each block's scale waiting: +12 %
/// aggregate at eight streams).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn prefetch_row(p: *const u8, bytes: usize) {
    let mut off = 0;
    while off < bytes {
        _mm_prefetch::<_MM_HINT_T0>(p.add(off) as *const i8);
        off += 64;
    }
}

/// f16 at `p` (little-endian) as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn half(p: *const u8) -> f32 {
    let bits = u16::from_le(std::ptr::read_unaligned(p as *const u16));
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// 16 bytes of packed nibbles to 32 bytes: low nibbles first (values 0–15), then high ones.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles(qs: *const u8) -> __m256i {
    let v = _mm_loadu_si128(qs as *const __m128i);
    let mask = _mm_set1_epi8(0x0f);
    let lo = _mm_and_si128(v, mask);
    let hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
    _mm256_set_m128i(hi, lo)
}

/// Byte `j` is 0x10 where bit `j` of `qh` is set (Q5_0's fifth bits).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fifth_bits(qh: u32) -> __m256i {
    let v = _mm256_set1_epi32(qh as i32);
    // Bytes 0–7 take byte 0 of qh, 8–15 byte 1 (low lane), 16–23 byte 2, 24–31 byte 3 (high
    // lane; the broadcast puts qh's bytes in both lanes).
    let pick = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3,
        3, 3,
    );
    let bytes = _mm256_shuffle_epi8(v, pick);
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// One block at `p` as unsigned bytes with `(d_w, c_w)`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack<const F: u8>(p: *const u8) -> (__m256i, f32, f32) {
    let d = half(p);
    match F {
        Q4_0 => (nibbles(p.add(2)), d, -8.0 * d),
        Q4_1 => (nibbles(p.add(4)), d, half(p.add(2))),
        Q5_0 => {
            let qh = u32::from_le(std::ptr::read_unaligned(p.add(2) as *const u32));
            let u = _mm256_or_si256(nibbles(p.add(6)), fifth_bits(qh));
            (u, d, -16.0 * d)
        }
        _ => {
            let q = _mm256_loadu_si256(p.add(2) as *const __m256i);
            (
                _mm256_xor_si256(q, _mm256_set1_epi8(i8::MIN)),
                d,
                -128.0 * d,
            )
        }
    }
}

/// The sums of four vectors' lanes, `[Σa, Σb, Σc, Σd]`, by a tree of horizontal adds.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum4(a: __m256, b: __m256, c: __m256, d: __m256) -> __m128 {
    let abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// The kernels for one instruction set: `$dp(u, q)` sums `u·q` over groups of four bytes into
/// eight i32 lanes.
macro_rules! kernels {
    ($name:ident, $features:literal, |$u:ident, $q:ident| $dp:expr) => {
        mod $name {
            use super::*;

            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn dot($u: __m256i, $q: __m256i) -> __m256i {
                $dp
            }

            /// Rows `rows` of `w` against `m` activation rows, into `out[j·w.rows + r]`.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn rows<const F: u8>(
                w: &QWeight,
                acts: &QuantizedActs,
                m: usize,
                rows: Range<usize>,
                out: *mut f32,
            ) {
                let nb = w.cols / BLOCK;
                let bb = block_bytes(F);
                let q = acts.q.as_ptr();
                let d = acts.d.as_ptr();
                let s = acts.sum.as_ptr();
                let base = w.stored().as_ptr();
                if m == 1 {
                    // Two accumulators (even and odd blocks): one chain of multiply-adds would
                    // wait out its latency at every block, and decoding is this loop.
                    let block = |row: *const u8, b: usize, acc: __m256, offsets: f32| {
                        let (u, dw, cw) = unpack::<F>(row.add(b * bb));
                        let a = _mm256_loadu_si256(q.add(b * BLOCK) as *const __m256i);
                        let da = *d.add(b);
                        let p = _mm256_cvtepi32_ps(dot(u, a));
                        (
                            _mm256_fmadd_ps(p, _mm256_set1_ps(dw * da), acc),
                            offsets + cw * da * *s.add(b) as f32,
                        )
                    };
                    for r in rows.clone() {
                        let row = base.add(r * nb * bb);
                        if r + 1 < rows.end {
                            prefetch_row(row.add(nb * bb), nb * bb);
                        }
                        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                        let (mut off0, mut off1) = (0f32, 0f32);
                        let mut b = 0;
                        while b + 1 < nb {
                            (acc0, off0) = block(row, b, acc0, off0);
                            (acc1, off1) = block(row, b + 1, acc1, off1);
                            b += 2;
                        }
                        if b < nb {
                            (acc0, off0) = block(row, b, acc0, off0);
                        }
                        *out.add(r) = hsum(_mm256_add_ps(acc0, acc1)) + off0 + off1;
                    }
                    return;
                }
                // A prompt: unpack each weight row once, then dot it with the activation rows
                // in register tiles of 2 weight rows × 4 activation rows (16 registers: each
                // loaded activation block serves two weight rows, each weight block four).
                const R: usize = 2;
                const J: usize = 4;
                walk_tiles::<F, R, J>(w, m, rows, out, |scratch, row_at, act_at| {
                    let mut acc = [[_mm256_setzero_ps(); J]; R];
                    let mut offsets = [[0f32; J]; R];
                    for b in 0..nb {
                        let mut a = [_mm256_setzero_si256(); J];
                        let mut da = [0f32; J];
                        let mut das = [0f32; J];
                        for k in 0..J {
                            let ab = act_at[k] * nb + b;
                            a[k] = _mm256_loadu_si256(q.add(ab * BLOCK) as *const __m256i);
                            da[k] = *d.add(ab);
                            das[k] = da[k] * *s.add(ab) as f32;
                        }
                        for i in 0..R {
                            let row = &scratch[row_at[i]];
                            let u = _mm256_loadu_si256(
                                row.us.as_ptr().add(b * BLOCK) as *const __m256i
                            );
                            let (dw, cw) = (row.dws[b], row.cws[b]);
                            for k in 0..J {
                                let p = _mm256_cvtepi32_ps(dot(u, a[k]));
                                acc[i][k] =
                                    _mm256_fmadd_ps(p, _mm256_set1_ps(dw * da[k]), acc[i][k]);
                                offsets[i][k] += cw * das[k];
                            }
                        }
                    }
                    let mut values = [[0f32; J]; R];
                    for i in 0..R {
                        for k in 0..J {
                            values[i][k] = hsum(acc[i][k]) + offsets[i][k];
                        }
                    }
                    values
                });
            }
        }
    };
}

kernels!(
    avx512vnni,
    "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
    |u, q| _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, q)
);
kernels!(avxvnni, "avx2,fma,f16c,avxvnni", |u, q| {
    _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, q)
});
kernels!(avx2, "avx2,fma,f16c", |u, q| {
    // u ≤ 255 and |q| ≤ 127: widen to 16 bits so the pairwise sums cannot saturate.
    let lo = _mm256_madd_epi16(
        _mm256_cvtepu8_epi16(_mm256_castsi256_si128(u)),
        _mm256_cvtepi8_epi16(_mm256_castsi256_si128(q)),
    );
    let hi = _mm256_madd_epi16(
        _mm256_cvtepu8_epi16(_mm256_extracti128_si256(u, 1)),
        _mm256_cvtepi8_epi16(_mm256_extracti128_si256(q, 1)),
    );
    _mm256_add_epi32(lo, hi)
});

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    #[test]
    fn the_environment_picks_an_instruction_set_only_among_those_the_cpu_has() {
        let have = [Isa::AvxVnni, Isa::Avx2];
        assert_eq!(choose(&have, None), Some(Isa::AvxVnni));
        assert_eq!(choose(&have, Some("")), Some(Isa::AvxVnni));
        assert_eq!(choose(&have, Some("avx2")), Some(Isa::Avx2));
        assert_eq!(choose(&have, Some(" avx2 ")), Some(Isa::Avx2));
        assert_eq!(choose(&have, Some("candle")), None);
        // Not on this CPU, or not a name: the best one, never an instruction the CPU lacks.
        assert_eq!(choose(&have, Some("avx512-vnni")), Some(Isa::AvxVnni));
        assert_eq!(choose(&have, Some("sse2")), Some(Isa::AvxVnni));
        assert_eq!(choose(&[], Some("avx2")), None);
    }

    #[test]
    fn attention_helpers_agree_with_plain_sums() {
        if !available().contains(&Isa::Avx2) {
            return;
        }
        for (hd, n, stride) in [
            (64, 0, 192),
            (64, 1, 64),
            (64, 7, 192),
            (256, 9, 256),
            (8, 5, 24),
        ] {
            let keys: Vec<f32> = (0..n * stride + hd)
                .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 3.0)
                .collect();
            let q: Vec<f32> = (0..hd).map(|i| (i as f32 * 0.37).sin()).collect();
            let mut got = vec![0f32; n];
            scaled_dots(&q, &keys, stride, 0.125, &mut got);
            for (j, g) in got.iter().enumerate() {
                let want: f32 = (0..hd).map(|c| q[c] * keys[j * stride + c]).sum::<f32>() * 0.125;
                assert!((g - want).abs() < 1e-4, "hd {hd} key {j}: {g} vs {want}");
            }
            let weights: Vec<f32> = (0..n).map(|j| 1.0 / (1 + j) as f32).collect();
            let mut out = vec![f32::NAN; hd];
            weighted_sum(&weights, &keys, stride, 0.5, &mut out);
            for (c, o) in out.iter().enumerate() {
                let want: f32 = (0..n)
                    .map(|j| weights[j] * keys[j * stride + c])
                    .sum::<f32>()
                    * 0.5;
                assert!((o - want).abs() < 1e-4, "hd {hd} column {c}: {o} vs {want}");
            }
        }
    }

    #[test]
    fn vector_quantisation_gives_the_scalar_loops_bytes() {
        if !available().contains(&Isa::Avx2) {
            return;
        }
        let (rows, cols) = (3, 256);
        let mut x: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 104729 % 997) as f32 / 997.0 - 0.5) * (1 + i % 7) as f32)
            .collect();
        // A block of zeros, one with a tie at .5 steps, one of huge and tiny values.
        x[32..64].fill(0.0);
        for (i, v) in x[64..96].iter_mut().enumerate() {
            *v = (i as f32 - 16.0) * 127.0 / 31.0 + 0.5;
        }
        x[96] = 3e30;
        x[97] = -1e-30;
        let blank = || QuantizedActs {
            q: vec![0; rows * cols],
            d: vec![0.0; rows * cols / BLOCK],
            sum: vec![0; rows * cols / BLOCK],
            scaled_sum: vec![0.0; rows * cols / BLOCK],
            blocks: cols / BLOCK,
        };
        let (mut scalar, mut vector) = (blank(), blank());
        scalar.fill_scalar(&x);
        quantize(&x, &mut vector);
        assert_eq!(vector.q, scalar.q);
        assert_eq!(vector.d, scalar.d);
        assert_eq!(vector.sum, scalar.sum);
        assert_eq!(vector.scaled_sum, scalar.scaled_sum);
    }

    #[test]
    fn both_f32_activation_paths_agree_with_the_scalar_loop() {
        if !available().contains(&Isa::Avx2) {
            return;
        }
        let (rows, cols) = (21, 352);
        let w = weights(rows, cols);
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0)
            .collect();
        let sums: Vec<f32> = x.chunks_exact(BLOCK).map(|b| b.iter().sum()).collect();
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q8_0,
        ] {
            let qw = QWeight::from_qtensor(&QTensor::quantize(&w, dtype).unwrap())
                .unwrap()
                .unwrap();
            let mut want = vec![0f32; rows];
            qw.matvec_f32_reference(&x, &sums, &mut want);
            let mut avx2 = vec![0f32; rows];
            // SAFETY: AVX2/FMA/F16C are present (checked above); lengths match the weight.
            unsafe {
                match dtype {
                    GgmlDType::Q4_0 => f32_rows::<Q4_0>(&qw, &x, &sums, 0..rows, avx2.as_mut_ptr()),
                    GgmlDType::Q4_1 => f32_rows::<Q4_1>(&qw, &x, &sums, 0..rows, avx2.as_mut_ptr()),
                    GgmlDType::Q5_0 => f32_rows::<Q5_0>(&qw, &x, &sums, 0..rows, avx2.as_mut_ptr()),
                    _ => f32_rows::<Q8_0>(&qw, &x, &sums, 0..rows, avx2.as_mut_ptr()),
                }
            }
            let mut best = vec![0f32; rows];
            matvec_f32(&qw, &x, &sums, &mut best);
            for ((a, b), w) in avx2.iter().zip(&best).zip(&want) {
                assert!(
                    (a - w).abs() <= 1e-3 * w.abs().max(1.0),
                    "{dtype:?} avx2: {a} vs {w}"
                );
                assert!(
                    (b - w).abs() <= 1e-3 * w.abs().max(1.0),
                    "{dtype:?} best: {b} vs {w}"
                );
            }
        }
    }

    /// A `rows × cols` weight matrix of spread, deterministic values in [-1.5, 1.5).
    fn weights(rows: usize, cols: usize) -> Tensor {
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 3.0)
            .collect();
        Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap()
    }

    /// The weight in both layouts: rows as in the file, and interleaved.
    fn both_layouts(w: &Tensor, dtype: GgmlDType) -> [QWeight; 2] {
        let qw = QWeight::from_qtensor(&QTensor::quantize(w, dtype).unwrap())
            .unwrap()
            .unwrap();
        let rows = qw.to_rows();
        let inter = rows.interleaved().expect("whole groups");
        [rows, inter]
    }

    #[test]
    fn every_instruction_set_of_this_cpu_agrees_with_the_scalar_loop() {
        let (rows, cols) = (48, 640);
        let w = weights(rows, cols);
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q8_0,
        ] {
            for qw in both_layouts(&w, dtype) {
                // One row (decode), the few-row kernel's groups of four (with remainders), and the
                // prompt kernels past it.
                for m in [1, 2, 3, 4, 5, 8, 9, 13, 17] {
                    let x: Vec<f32> = (0..m * cols)
                        .map(|i| ((i * 104729 % 997) as f32 / 997.0 - 0.5) * 2.0)
                        .collect();
                    let acts = QuantizedActs::quantize(&x, m, cols);
                    let mut want = vec![0f32; m * rows];
                    qw.matmul_reference(&acts, m, &mut want);
                    for isa in available() {
                        let mut got = vec![0f32; m * rows];
                        matmul(isa, &qw, &acts, m, &mut got);
                        for (g, w) in got.iter().zip(&want) {
                            assert!(
                                (g - w).abs() <= 1e-3 * w.abs().max(1.0),
                                "{dtype:?} {isa:?} m={m} interleaved {}: {g} vs {w}",
                                qw.is_interleaved()
                            );
                        }
                    }
                }
            }
        }
    }

    /// A prompt row comes out the same whatever rows share the call: a prompt's rows, hence its
    /// first token, do not depend on what it was batched with. Over interleaved weights (the
    /// VNNI kernels) the same holds for any row, a lone decode row included.
    #[test]
    fn the_kernels_round_a_row_the_same_in_any_company() {
        for isa in available() {
            company_check(isa, 37, 352, false);
            if isa != Isa::Avx2 {
                company_check(isa, 48, 352, true);
            }
        }
    }

    fn company_check(isa: Isa, rows: usize, cols: usize, interleaved: bool) {
        let w = weights(rows, cols);
        let m = 11;
        let x: Vec<f32> = (0..m * cols)
            .map(|i| ((i * 104729 % 997) as f32 / 997.0 - 0.5) * 2.0)
            .collect();
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q8_0,
        ] {
            let qw = QWeight::from_qtensor(&QTensor::quantize(&w, dtype).unwrap())
                .unwrap()
                .unwrap()
                .to_rows();
            let qw = if interleaved {
                qw.interleaved().unwrap()
            } else {
                qw
            };
            let product = |x: &[f32], m: usize| {
                let mut out = vec![0f32; m * rows];
                matmul(isa, &qw, &QuantizedActs::quantize(x, m, cols), m, &mut out);
                out
            };
            let all = product(&x, m);
            let lone: &[(usize, usize)] = if interleaved {
                &[(4, 1), (m - 1, 1)]
            } else {
                &[]
            };
            for &(start, n) in [(0, 2), (3, 5), (2, 8)].iter().chain(lone) {
                let part = product(&x[start * cols..(start + n) * cols], n);
                assert_eq!(
                    part[..],
                    all[start * rows..(start + n) * rows],
                    "{isa:?} {dtype:?}: rows {start}..{} alone differ from the same rows among {m}",
                    start + n
                );
            }
        }
    }
}
