//! Quantized matrix products on the CPU that read GGUF weight blocks as the file stores them.
//!
//! candle 0.11 multiplies Q4_1, Q5_0 and Q5_1 with a scalar loop on x86, and its fast paths need
//! row lengths that are multiples of 256, which neither default model has (576 and 640). ferry
//! used to requantise such weights to Q8_0 at load, reading 1.5x the file's bytes per decoded
//! token. Here one kernel serves Q4_0, Q4_1, Q5_0 and Q8_0 without repacking:
//!
//! - The activations are quantised once per product into 32-value blocks: int8 values `q`, a
//!   scale `d_a` and the block's integer sum `Σq`.
//! - Every weight block is unpacked in registers to 32 *unsigned* bytes `u` with a scale `d_w`
//!   and an offset coefficient `c_w`, so that `w = d_w·u + c_w` (Q4_1: `c_w` is its minimum;
//!   Q4_0/Q5_0/Q8_0: `-8·d_w`, `-16·d_w`, `-128·d_w`). Then
//!   `Σ w·a = d_a·(d_w·Σ u·q + c_w·Σq)`, and `Σ u·q` is one unsigned-by-signed byte dot:
//!   `vpdpbusd` where the CPU has AVX-512 VNNI or AVX-VNNI (chosen at run time), widening
//!   multiply-adds on plain AVX2.
//! - Weight rows are split across candle's thread pool, so one product uses every core.
//! - For a prompt (several activation rows) each weight row is unpacked once and dotted with
//!   every activation row, so the weights stream from memory once per product, not once per token.
//!
//! - The weights are held in an interleaved layout ([`GROUP`] rows' blocks side by side, the
//!   file's bytes reordered at load): one `vpdpbusd` then yields sixteen rows' partial dots
//!   (eight in 256-bit registers), the unpacked weights serve every activation row of a step, and
//!   no horizontal sums are left. This is what lets a decode step of several sequences cost
//!   little more than one. (Plain AVX2 keeps Q8_0 in rows: its byte products would overflow.)
//!
//! [`QLinear`] is the seam: a candle custom op on x86-64 CPUs with AVX2 and FMA, candle's own
//! `QMatMul` everywhere else (other formats, accelerators, other architectures such as the
//! Jetson's ARM cores, where candle has NEON kernels).

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Module, Result, Shape, Tensor};
use half::f16;

mod interleave;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use interleave::GROUP;

/// Output-head rows recomputed with f32 activations after the int8 product
/// ([`QWeight::head_logits`]). Rounding the head's input to int8 moves logits by a few tenths;
/// the leading candidates are then exact, so greedy choice is the f32 one whenever the f32
/// winner is among the int8 product's top 16 (its 16th logit sits several units under the top).
pub const HEAD_EXACT_CANDIDATES: usize = 16;

/// Values per quantisation block, in every format this module reads.
pub const BLOCK: usize = 32;

/// Weight formats the kernel reads in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// f16 scale, 32 4-bit values, offset 8.
    Q4_0,
    /// f16 scale, f16 minimum, 32 4-bit values.
    Q4_1,
    /// f16 scale, 32 high bits, 32 4-bit values, offset 16.
    Q5_0,
    /// f16 scale, 32 signed bytes.
    Q8_0,
}

impl Format {
    /// The format of a GGML type, when this module has a kernel for it.
    pub fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_0 => Some(Format::Q4_0),
            GgmlDType::Q4_1 => Some(Format::Q4_1),
            GgmlDType::Q5_0 => Some(Format::Q5_0),
            GgmlDType::Q8_0 => Some(Format::Q8_0),
            _ => None,
        }
    }

    /// Bytes of one 32-value block, as GGML lays it out.
    pub const fn block_bytes(self) -> usize {
        match self {
            Format::Q4_0 => 18,
            Format::Q4_1 => 20,
            Format::Q5_0 => 22,
            Format::Q8_0 => 34,
        }
    }
}

/// Activations quantised for one product: `rows` rows of `cols` values in 32-value blocks.
#[derive(Debug, Default)]
pub struct QuantizedActs {
    /// int8 values, row-major.
    pub q: Vec<i8>,
    /// One scale per block.
    pub d: Vec<f32>,
    /// One integer sum per block: the kernels fold a weight format's whole-number offset
    /// (`c_w = −off·d_w`) into the integer dot as `−off·sum`.
    pub sum: Vec<i32>,
    /// `d · sum` per block: the factor of a float weight offset (Q4_1's minimum), read by the
    /// kernels as a broadcast from memory rather than a product per weight group.
    pub scaled_sum: Vec<f32>,
    /// Blocks per row.
    pub blocks: usize,
}

impl QuantizedActs {
    /// Quantises `rows` rows of `cols` values (`cols` a multiple of 32) to int8 with one scale
    /// per 32-value block: `d = max|x| / 127`, `q = round(x / d)`.
    pub fn quantize(x: &[f32], rows: usize, cols: usize) -> Self {
        debug_assert_eq!(x.len(), rows * cols);
        debug_assert_eq!(cols % BLOCK, 0);
        let blocks = cols / BLOCK;
        let mut out = QuantizedActs {
            q: vec![0; rows * cols],
            d: vec![0.0; rows * blocks],
            sum: vec![0; rows * blocks],
            scaled_sum: vec![0.0; rows * blocks],
            blocks,
        };
        #[cfg(target_arch = "x86_64")]
        if x86::detect().is_some() {
            x86::quantize(x, &mut out);
            return out;
        }
        out.fill_scalar(x);
        out
    }

    /// The quantisation as a plain loop (CPUs without AVX2, and the vector version's test).
    pub(crate) fn fill_scalar(&mut self, x: &[f32]) {
        for (((xs, qs), (d, sum)), scaled_sum) in x
            .chunks_exact(BLOCK)
            .zip(self.q.chunks_exact_mut(BLOCK))
            .zip(self.d.iter_mut().zip(self.sum.iter_mut()))
            .zip(self.scaled_sum.iter_mut())
        {
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = amax / 127.0;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            // Ties to even (one vector instruction) rather than `round`'s ties away from zero,
            // which compiles to a scalar call per value; |v·inv| ≤ 127 by construction.
            let mut s = 0i32;
            for (q, &v) in qs.iter_mut().zip(xs) {
                let r = (v * inv).round_ties_even() as i8;
                *q = r;
                s += r as i32;
            }
            *d = scale;
            *sum = s;
            *scaled_sum = scale * s as f32;
        }
    }
}

/// One quantized weight matrix (`rows` outputs × `cols` inputs) in a format the kernel reads.
#[derive(Debug)]
pub struct QWeight {
    format: Format,
    rows: usize,
    cols: usize,
    /// The blocks, possibly shared with a stacked weight this one is a view of.
    data: Arc<[u8]>,
    /// Where this weight's rows start in `data`, in bytes.
    offset: usize,
    /// Whether `data` holds the rows interleaved by [`GROUP`] (see `interleave`) rather than
    /// one after another as in the file.
    interleaved: bool,
}

impl QWeight {
    /// Takes the raw blocks of `qt` (shape `(rows, cols)`), or `None` when its format or shape
    /// has no kernel here.
    pub fn from_qtensor(qt: &QTensor) -> Result<Option<Self>> {
        let Some(format) = Format::from_ggml(qt.dtype()) else {
            return Ok(None);
        };
        let Ok((rows, cols)) = qt.shape().dims2() else {
            return Ok(None);
        };
        if cols % BLOCK != 0 {
            return Ok(None);
        }
        let raw = qt.data()?;
        if raw.len() != rows * cols / BLOCK * format.block_bytes() {
            candle_core::bail!(
                "{format:?} weight of {rows}x{cols} holds {} bytes, expected {}",
                raw.len(),
                rows * cols / BLOCK * format.block_bytes()
            );
        }
        // Laid out straight from the tensor's bytes: one copy, not one per layout.
        let interleaved = interleave_pays(format, rows);
        let data: Arc<[u8]> = if interleaved {
            Arc::from(interleave::interleave(format, &raw, rows, cols))
        } else {
            Arc::from(&*raw)
        };
        Ok(Some(QWeight {
            format,
            rows,
            cols,
            data,
            offset: 0,
            interleaved,
        }))
    }

    /// This weight in the layout the kernels of this CPU read best (see [`interleave_pays`]).
    fn prepared(self) -> Self {
        if interleave_pays(self.format, self.rows) {
            return self.interleaved().unwrap_or(self);
        }
        self
    }

    /// A copy in the interleaved layout, or `None` when the rows do not fill whole
    /// [`GROUP`]s or the weight already is interleaved.
    pub fn interleaved(&self) -> Option<QWeight> {
        if self.interleaved || !self.rows.is_multiple_of(GROUP) || self.rows == 0 {
            return None;
        }
        let data = interleave::interleave(self.format, self.stored(), self.rows, self.cols);
        Some(QWeight {
            data: Arc::from(data),
            offset: 0,
            interleaved: true,
            ..*self
        })
    }

    /// Whether the rows are held interleaved (see [`GROUP`]).
    pub fn is_interleaved(&self) -> bool {
        self.interleaved
    }

    /// The same weight with its rows one after another, as in the file (shared when it
    /// already is).
    pub fn to_rows(&self) -> QWeight {
        if !self.interleaved {
            return QWeight {
                data: self.data.clone(),
                ..*self
            };
        }
        let mut data = Vec::with_capacity(self.stored().len());
        for r in 0..self.rows {
            data.extend_from_slice(&self.row(r));
        }
        QWeight {
            data: Arc::from(data),
            offset: 0,
            interleaved: false,
            ..*self
        }
    }

    /// Output rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The blocks as held: row after row as in the file, or interleaved.
    fn stored(&self) -> &[u8] {
        let len = self.rows * self.row_bytes();
        &self.data[self.offset..self.offset + len]
    }

    /// Bytes of one row's blocks.
    fn row_bytes(&self) -> usize {
        self.cols / BLOCK * self.format.block_bytes()
    }

    /// Row `r`'s blocks as the file stores them.
    pub fn row(&self, r: usize) -> Cow<'_, [u8]> {
        assert!(r < self.rows, "row {r} of a {}-row weight", self.rows);
        if self.interleaved {
            Cow::Owned(interleave::row(self.format, self.stored(), self.cols, r))
        } else {
            Cow::Borrowed(&self.stored()[r * self.row_bytes()..(r + 1) * self.row_bytes()])
        }
    }

    /// Rows `rows` of this weight: sharing its blocks where the range keeps whole groups of an
    /// interleaved weight (or any range of a row-layout one), a row-layout copy otherwise.
    pub fn view(&self, rows: std::ops::Range<usize>) -> QWeight {
        assert!(rows.start <= rows.end && rows.end <= self.rows);
        if self.interleaved
            && (!rows.start.is_multiple_of(GROUP) || !rows.end.is_multiple_of(GROUP))
        {
            let mut data = Vec::with_capacity(rows.len() * self.row_bytes());
            for r in rows.clone() {
                data.extend_from_slice(&self.row(r));
            }
            return QWeight {
                rows: rows.len(),
                data: Arc::from(data),
                offset: 0,
                interleaved: false,
                ..*self
            };
        }
        QWeight {
            rows: rows.len(),
            data: self.data.clone(),
            offset: self.offset + rows.start * self.row_bytes(),
            ..*self
        }
    }

    /// The GGML type of the blocks.
    pub fn ggml_dtype(&self) -> GgmlDType {
        match self.format {
            Format::Q4_0 => GgmlDType::Q4_0,
            Format::Q4_1 => GgmlDType::Q4_1,
            Format::Q5_0 => GgmlDType::Q5_0,
            Format::Q8_0 => GgmlDType::Q8_0,
        }
    }

    /// The weight as a candle tensor again (a copy), for candle's own product.
    pub fn to_qtensor(&self, device: &candle_core::Device) -> Result<QTensor> {
        candle_core::quantized::ggml_file::qtensor_from_ggml(
            self.ggml_dtype(),
            self.to_rows().stored(),
            vec![self.rows, self.cols],
            device,
        )
    }

    /// Bytes of this weight's blocks (the file's own bytes).
    pub fn bytes(&self) -> usize {
        self.stored().len()
    }

    /// The rows of several weights of one format and width stacked into one matrix, so that
    /// layers reading the same input (query/key/value, gate/up) run as one product.
    pub fn stack(parts: &[&QWeight]) -> Option<QWeight> {
        let first = parts.first()?;
        if parts
            .iter()
            .any(|p| p.format != first.format || p.cols != first.cols)
        {
            return None;
        }
        // Interleaved groups are self-contained, so interleaved parts stack as they are;
        // otherwise the rows are stacked as in the file and the whole laid out afresh.
        let interleaved = parts.iter().all(|p| p.interleaved);
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.bytes()).sum());
        for p in parts {
            if interleaved {
                data.extend_from_slice(p.stored());
            } else {
                data.extend_from_slice(p.to_rows().stored());
            }
        }
        let stacked = QWeight {
            format: first.format,
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            data: Arc::from(data),
            offset: 0,
            interleaved,
        };
        Some(if interleaved {
            stacked
        } else {
            stacked.prepared()
        })
    }

    /// `out[j·rows + r] = Σ_c W[r, c] · x[j·cols + c]` for `m` activation rows.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        debug_assert_eq!(x.len(), m * self.cols);
        debug_assert_eq!(out.len(), m * self.rows);
        let acts = QuantizedActs::quantize(x, m, self.cols);
        #[cfg(target_arch = "x86_64")]
        if let Some(isa) = x86::detect() {
            x86::matmul(isa, self, &acts, m, out);
            return;
        }
        self.matmul_reference(&acts, m, out);
    }

    /// `out[r] = Σ_c W[r, c] · x[c]` for one activation row kept in f32 (the weights are
    /// still read as stored). For the output head: rounding its input to int8 moves every logit
    /// by up to a few tenths, enough to flip the choice between near-tied tokens.
    pub fn matvec_f32(&self, x: &[f32], out: &mut [f32]) {
        assert_eq!(x.len(), self.cols);
        assert_eq!(out.len(), self.rows);
        if self.interleaved {
            // Only the head's few leading rows come here (`head_logits_rows`, on row copies).
            return self.to_rows().matvec_f32(x, out);
        }
        let sums: Vec<f32> = x.chunks_exact(BLOCK).map(|b| b.iter().sum()).collect();
        #[cfg(target_arch = "x86_64")]
        if x86::detect().is_some() {
            x86::matvec_f32(self, x, &sums, out);
            return;
        }
        self.matvec_f32_reference(x, &sums, out);
    }

    /// Logits of an output head for one f32 row: the int8 product over every row, then the
    /// [`HEAD_EXACT_CANDIDATES`] largest recomputed with f32 activations. As fast as the int8
    /// product on a large vocabulary (Gemma's head is 72 % of its bytes), as exact as the f32
    /// one where the choice is made.
    pub fn head_logits(&self, x: &[f32]) -> Vec<f32> {
        self.head_logits_rows(x, 1).pop().unwrap_or_default()
    }

    /// [`QWeight::head_logits`] for `m` rows at once (one per sequence of a batch): the head's
    /// weights are read once for all of them.
    pub fn head_logits_rows(&self, x: &[f32], m: usize) -> Vec<Vec<f32>> {
        let mut all = vec![0f32; m * self.rows];
        self.matmul(x, m, &mut all);
        // Each row's candidates over the pool (a step of eight sequences scans eight
        // vocabularies); a lone row stays on the calling thread.
        let work = if m > 1 { m * self.rows } else { 0 };
        par_items(&mut all, m, self.rows, work, |j, logits| {
            let row = &x[j * self.cols..][..self.cols];
            let mut exact = [0f32; 1];
            for r in top_indices(logits, HEAD_EXACT_CANDIDATES) {
                self.view(r..r + 1).matvec_f32(row, &mut exact);
                logits[r] = exact[0];
            }
        });
        all.chunks_exact(self.rows.max(1))
            .map(<[f32]>::to_vec)
            .collect()
    }

    pub(crate) fn matvec_f32_reference(&self, x: &[f32], sums: &[f32], out: &mut [f32]) {
        let nb = self.cols / BLOCK;
        let bb = self.format.block_bytes();
        let mut u = [0u8; BLOCK];
        for (r, o) in out.iter_mut().enumerate() {
            let row = self.row(r);
            let mut total = 0f32;
            for b in 0..nb {
                let (dw, cw) = unpack_block(self.format, &row[b * bb..(b + 1) * bb], &mut u);
                let dot: f32 = u
                    .iter()
                    .zip(&x[b * BLOCK..(b + 1) * BLOCK])
                    .map(|(&u, &x)| u as f32 * x)
                    .sum();
                total += dw * dot + cw * sums[b];
            }
            *o = total;
        }
    }

    /// The same product through a plain scalar loop over unpacked blocks (CPUs without AVX2,
    /// and the kernels' own tests).
    pub fn matmul_reference(&self, acts: &QuantizedActs, m: usize, out: &mut [f32]) {
        let nb = self.cols / BLOCK;
        let bb = self.format.block_bytes();
        let mut u = [0u8; BLOCK];
        for r in 0..self.rows {
            let row = self.row(r);
            for j in 0..m {
                let mut total = 0f32;
                for b in 0..nb {
                    let (dw, cw) = unpack_block(self.format, &row[b * bb..(b + 1) * bb], &mut u);
                    let q = &acts.q[(j * nb + b) * BLOCK..(j * nb + b + 1) * BLOCK];
                    let dot: i32 = u.iter().zip(q).map(|(&u, &q)| u as i32 * q as i32).sum();
                    let ab = j * nb + b;
                    total += acts.d[ab] * (dw * dot as f32 + cw * acts.sum[ab] as f32);
                }
                out[j * self.rows + r] = total;
            }
        }
    }
}

/// Whether a `rows`-row weight of `format` is best held interleaved on this CPU: where its
/// kernels read the format so and the rows fill whole groups.
fn interleave_pays(format: Format, rows: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    if let Some(isa) = x86::detect() {
        return x86::interleaves(isa, format) && rows > 0 && rows.is_multiple_of(GROUP);
    }
    let _ = (format, rows);
    false
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// IEEE half to single precision (exact; subnormals included).
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let mant = (h & 0x3ff) as u32;
    let bits = match (exp, mant) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: value = m · 2^-24.
            let v = m as f32 * f32::from_bits(0x3380_0000);
            return if sign != 0 { -v } else { v };
        }
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// Unpacks one block into unsigned bytes and returns `(d_w, c_w)` with `w = d_w·u + c_w`.
fn unpack_block(format: Format, b: &[u8], u: &mut [u8; BLOCK]) -> (f32, f32) {
    match format {
        Format::Q4_0 | Format::Q4_1 => {
            let qs = if format == Format::Q4_0 {
                &b[2..18]
            } else {
                &b[4..20]
            };
            for j in 0..16 {
                u[j] = qs[j] & 0x0f;
                u[j + 16] = qs[j] >> 4;
            }
            let d = f16_at(b, 0);
            if format == Format::Q4_0 {
                (d, -8.0 * d)
            } else {
                (d, f16_at(b, 2))
            }
        }
        Format::Q5_0 => {
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            let qs = &b[6..22];
            for j in 0..16 {
                u[j] = (qs[j] & 0x0f) | ((((qh >> j) & 1) as u8) << 4);
                u[j + 16] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
            }
            let d = f16_at(b, 0);
            (d, -16.0 * d)
        }
        Format::Q8_0 => {
            for j in 0..BLOCK {
                u[j] = (b[2 + j] as i8 as i16 + 128) as u8;
            }
            let d = f16_at(b, 0);
            (d, -128.0 * d)
        }
    }
}

/// Indices of the `k` largest values (any order), in one pass. Runs of 16 values none of which
/// beats the current floor are passed over by one branch-free test (it vectorises), so a
/// vocabulary costs little more than reading it.
fn top_indices(values: &[f32], k: usize) -> Vec<usize> {
    const RUN: usize = 16;
    let mut best: Vec<(f32, usize)> = Vec::with_capacity(k + 1);
    let mut floor = f32::NEG_INFINITY;
    for (c, run) in values.chunks(RUN).enumerate() {
        if best.len() == k && !run.iter().fold(false, |any, &v| any | (v > floor)) {
            continue;
        }
        for (o, &v) in run.iter().enumerate() {
            if best.len() < k {
                best.push((v, c * RUN + o));
                if best.len() == k {
                    floor = best.iter().map(|b| b.0).fold(f32::INFINITY, f32::min);
                }
            } else if v > floor {
                if let Some(slot) = best.iter_mut().find(|b| b.0 == floor) {
                    *slot = (v, c * RUN + o);
                }
                floor = best.iter().map(|b| b.0).fold(f32::INFINITY, f32::min);
            }
        }
    }
    best.into_iter().map(|b| b.1).collect()
}

/// Fills `out`, `items` slices of `width` values, by calling `f(item, slice)` for each, spread
/// over candle's thread pool when `work` (the caller's estimate of multiply-adds) pays for it.
pub fn par_items<F: Fn(usize, &mut [f32]) + Sync>(
    out: &mut [f32],
    items: usize,
    width: usize,
    work: usize,
    f: F,
) {
    assert_eq!(out.len(), items * width);
    #[cfg(target_arch = "x86_64")]
    if work >= x86::PARALLEL_MIN_MACS {
        x86::par_items(out, items, width, &f);
        return;
    }
    let _ = work;
    for (i, chunk) in out.chunks_exact_mut(width.max(1)).enumerate().take(items) {
        f(i, chunk);
    }
}

/// Attention scores `out[j] = scale · q·keys[j·stride..][..q.len()]` with the CPU's vector
/// units, or `false` (nothing written) where this CPU or the head size (a multiple of 8) has no
/// vector path.
pub fn attention_scores(
    q: &[f32],
    keys: &[f32],
    stride: usize,
    scale: f32,
    out: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if kernel_available() && q.len().is_multiple_of(8) {
        x86::scaled_dots(q, keys, stride, scale, out);
        return true;
    }
    let _ = (q, keys, stride, scale, out);
    false
}

/// Attention scores of the `g` query heads that share one key/value head (`qs` holds them one
/// after another), over keys held as f16: `out[r·n + j]` is query `r`'s scaled score of key `j`,
/// `n = out.len() / g`. Each key is read once for the group. The rows of `values` (laid out as
/// the keys) are prefetched on the way, for the pass that weighs them. `false` (nothing
/// written) where there is no vector path.
pub fn grouped_attention_scores(
    qs: &[f32],
    g: usize,
    keys: &[f16],
    values: &[f16],
    stride: usize,
    scale: f32,
    out: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if kernel_available() && g > 0 && (qs.len() / g).is_multiple_of(8) {
        x86::grouped_dots_f16(qs, g, keys, values, stride, scale, out);
        return true;
    }
    let _ = (qs, g, keys, values, stride, scale, out);
    false
}

/// The outputs of the `g` query heads sharing one key/value head:
/// `out[r·hd..][..hd] = scales[r] · Σ_j weights[r·n + j]·values[j·stride..][..hd]`, each value
/// row read once for the group. `false` (nothing written) where there is no vector path.
pub fn grouped_attention_values(
    weights: &[f32],
    g: usize,
    values: &[f16],
    stride: usize,
    scales: &[f32],
    out: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if kernel_available() && g > 0 && (out.len() / g).is_multiple_of(8) {
        x86::grouped_sums_f16(weights, g, values, stride, scales, out);
        return true;
    }
    let _ = (weights, g, values, stride, scales, out);
    false
}

/// Appends `src` to `dst` rounded to f16 (nearest, ties to even), with the CPU's conversion
/// instructions where it has them.
pub fn extend_f16(dst: &mut Vec<f16>, src: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if kernel_available() {
        x86::extend_f16(dst, src);
        return;
    }
    dst.extend(src.iter().map(|&x| f16::from_f32(x)));
}

/// `wide(arg)` compiled for AVX-512 where the CPU (and `FERRY_KERNEL_ISA`) has the kernels use
/// it, `narrow(arg)` elsewhere; `wide` should inline the code it is for (`#[inline(always)]`).
pub fn with_avx512<A, T>(arg: A, wide: impl FnOnce(A) -> T, narrow: impl FnOnce(A) -> T) -> T {
    #[cfg(target_arch = "x86_64")]
    {
        x86::with_avx512(arg, wide, narrow)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = wide;
        narrow(arg)
    }
}

/// Attention's output `out = scale · Σ_j weights[j]·values[j·stride..][..out.len()]` with the
/// CPU's vector units, or `false` (nothing written) where there is no vector path.
pub fn attention_values(
    weights: &[f32],
    values: &[f32],
    stride: usize,
    scale: f32,
    out: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if kernel_available() && out.len().is_multiple_of(8) {
        x86::weighted_sum(weights, values, stride, scale, out);
        return true;
    }
    let _ = (weights, values, stride, scale, out);
    false
}

/// The product `x · Wᵀ` as a candle op over the kernel's weights.
#[derive(Debug, Clone)]
struct KernelOp(Arc<QWeight>);

impl CustomOp1 for KernelOp {
    fn name(&self) -> &'static str {
        "ferry-qmatmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let w = &self.0;
        let x = match storage {
            CpuStorage::F32(v) => v.as_slice(),
            other => candle_core::bail!("ferry-qmatmul takes f32 input, got {:?}", other.dtype()),
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("ferry-qmatmul input is not contiguous {layout:?}");
        };
        let mut dims = layout.shape().dims().to_vec();
        match dims.last() {
            Some(&k) if k == w.cols => {}
            _ => candle_core::bail!(
                "ferry-qmatmul input {:?} does not end in {} columns",
                layout.shape(),
                w.cols
            ),
        }
        let x = &x[start..end];
        let m = x.len() / w.cols;
        let mut out = vec![0f32; m * w.rows];
        w.matmul(x, m, &mut out);
        if let Some(last) = dims.last_mut() {
            *last = w.rows;
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// A quantized linear layer: ferry's kernel where it applies, candle's `QMatMul` elsewhere.
#[derive(Debug, Clone)]
pub enum QLinear {
    /// Blocks read in place by this module's kernel (x86-64 CPU with AVX2 and FMA).
    Kernel(Arc<QWeight>),
    /// candle's quantized product (other formats, devices and architectures).
    Candle(QMatMul),
}

impl QLinear {
    /// Wraps `qt`, choosing ferry's kernel when the tensor is on the CPU, its format has a
    /// kernel and this CPU runs it.
    pub fn from_qtensor(qt: QTensor) -> Result<Self> {
        if qt.device().is_cpu() && kernel_available() {
            if let Some(w) = QWeight::from_qtensor(&qt)? {
                return Ok(QLinear::Kernel(Arc::new(w)));
            }
        }
        Ok(QLinear::Candle(QMatMul::from_qtensor(qt)?))
    }

    /// Wraps a shared tensor (a tied embedding used as the output head).
    pub fn from_arc(qt: Arc<QTensor>) -> Result<Self> {
        if qt.device().is_cpu() && kernel_available() {
            if let Some(w) = QWeight::from_qtensor(&qt)? {
                return Ok(QLinear::Kernel(Arc::new(w)));
            }
        }
        Ok(QLinear::Candle(QMatMul::from_arc(qt)?))
    }

    /// The same layer with its weight dequantized to f32 (tests: f32 logits do not depend on
    /// how a prompt is split into forward passes).
    pub fn dequantized(&self) -> Result<Self> {
        let dense = match self {
            QLinear::Kernel(w) => {
                let device = candle_core::Device::Cpu;
                w.to_qtensor(&device)?.dequantize(&device)?
            }
            QLinear::Candle(QMatMul::QTensor(q)) => q.dequantize(&q.device())?,
            QLinear::Candle(other) => return Ok(QLinear::Candle(other.clone())),
        };
        Ok(QLinear::Candle(QMatMul::Tensor(dense)))
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        match self {
            QLinear::Kernel(w) => w.rows,
            QLinear::Candle(m) => match m {
                QMatMul::QTensor(q) => q.shape().dims().first().copied().unwrap_or(0),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => {
                    t.dims().first().copied().unwrap_or(0)
                }
            },
        }
    }

    /// `out = x · Wᵀ` on plain buffers (`m` rows of input); candle's product goes through
    /// tensors.
    pub fn matmul_f32(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        match self {
            QLinear::Kernel(w) => {
                w.matmul(x, m, out);
                Ok(())
            }
            QLinear::Candle(q) => {
                let k = x.len() / m.max(1);
                let y = q.forward(&Tensor::from_slice(x, (m, k), &candle_core::Device::Cpu)?)?;
                let y = y.flatten_all()?.to_vec1::<f32>()?;
                if y.len() != out.len() {
                    candle_core::bail!("product gave {} values for {}", y.len(), out.len());
                }
                out.copy_from_slice(&y);
                Ok(())
            }
        }
    }

    /// The output head on one f32 row: on ferry's kernel its leading logits are exact
    /// ([`QWeight::head_logits`]).
    pub fn head_logits(&self, x: &[f32]) -> Result<Vec<f32>> {
        Ok(self.head_logits_rows(x, 1)?.pop().unwrap_or_default())
    }

    /// [`QLinear::head_logits`] for `m` rows at once.
    pub fn head_logits_rows(&self, x: &[f32], m: usize) -> Result<Vec<Vec<f32>>> {
        match self {
            QLinear::Kernel(w) => Ok(w.head_logits_rows(x, m)),
            QLinear::Candle(_) => {
                let n = self.out_features();
                let mut out = vec![0f32; m * n];
                self.matmul_f32(x, m, &mut out)?;
                Ok(out.chunks_exact(n.max(1)).map(<[f32]>::to_vec).collect())
            }
        }
    }

    /// Whether ferry's kernel serves this layer.
    pub fn uses_kernel(&self) -> bool {
        matches!(self, QLinear::Kernel(_))
    }
}

impl Module for QLinear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            QLinear::Kernel(w) => xs.contiguous()?.apply_op1_no_bwd(&KernelOp(w.clone())),
            QLinear::Candle(m) => m.forward(xs),
        }
    }
}

/// Whether this CPU runs ferry's kernels (x86-64 with AVX2, FMA and F16C).
pub fn kernel_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        x86::detect().is_some()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The instruction set the kernels run with on this CPU, for logs and benchmarks.
pub fn kernel_isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        x86::detect().map(x86::Isa::name).unwrap_or("none (candle)")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        "none (candle)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A pseudo-random matrix with a spread of magnitudes and signs.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = ((s >> 33) as f32) / (1u64 << 31) as f32;
                (u - 0.5) * 4.0
            })
            .collect()
    }

    /// candle's reference: dequantize the weight, multiply in f32.
    fn reference(qt: &QTensor, x: &[f32], m: usize) -> Vec<f32> {
        let (rows, cols) = qt.shape().dims2().unwrap();
        let w = qt.dequantize(&Device::Cpu).unwrap();
        let x = Tensor::from_slice(x, (m, cols), &Device::Cpu).unwrap();
        let y = x.matmul(&w.t().unwrap()).unwrap();
        assert_eq!(y.dims(), &[m, rows]);
        y.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn check(dtype: GgmlDType, rows: usize, cols: usize, m: usize) {
        let w = Tensor::from_vec(values(rows * cols, 7), (rows, cols), &Device::Cpu).unwrap();
        let qt = QTensor::quantize(&w, dtype).unwrap();
        let x = values(m * cols, 11);
        let want = reference(&qt, &x, m);
        let kw = QWeight::from_qtensor(&qt)
            .unwrap()
            .expect("format has a kernel");
        let mut got = vec![0f32; m * rows];
        kw.matmul(&x, m, &mut got);
        let mut scalar = vec![0f32; m * rows];
        kw.matmul_reference(&QuantizedActs::quantize(&x, m, cols), m, &mut scalar);
        // The only difference from the reference is the activations' int8 rounding: at most
        // half a step (max|x|/254) per value, so the error grows like sqrt(cols).
        let scale: f32 = want.iter().map(|v| v.abs()).fold(0.0, f32::max);
        for (i, ((g, s), w)) in got.iter().zip(&scalar).zip(&want).enumerate() {
            assert!(
                (g - s).abs() <= 1e-3 * scale.max(1.0),
                "{dtype:?} {rows}x{cols} m={m}: kernel {g} vs scalar {s} at {i}"
            );
            assert!(
                (g - w).abs() <= 0.02 * scale.max(1.0),
                "{dtype:?} {rows}x{cols} m={m}: kernel {g} vs candle {w} at {i}"
            );
        }
    }

    #[test]
    fn every_format_matches_candles_dequantized_product() {
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q8_0,
        ] {
            for &(rows, cols) in &[(1, 32), (7, 64), (576, 576), (33, 1536)] {
                for m in [1, 2, 5, 8, 9, 16] {
                    check(dtype, rows, cols, m);
                }
            }
        }
    }

    #[test]
    fn the_f32_activation_product_matches_candle_closely() {
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q8_0,
        ] {
            let (rows, cols) = (77, 640);
            let w = Tensor::from_vec(values(rows * cols, 13), (rows, cols), &Device::Cpu).unwrap();
            let qt = QTensor::quantize(&w, dtype).unwrap();
            let x = values(cols, 17);
            let want = reference(&qt, &x, 1);
            let kw = QWeight::from_qtensor(&qt).unwrap().unwrap();
            let mut got = vec![0f32; rows];
            kw.matvec_f32(&x, &mut got);
            for (g, w) in got.iter().zip(&want) {
                // Only summation order differs from candle's f32 product.
                assert!(
                    (g - w).abs() <= 1e-3 * w.abs().max(1.0),
                    "{dtype:?}: {g} vs {w}"
                );
            }
        }
    }

    /// The skipping scan picks exactly what a value-by-value scan picks, ties included.
    #[test]
    fn top_indices_skips_runs_without_changing_the_pick() {
        let plain = |values: &[f32], k: usize| {
            let mut best: Vec<(f32, usize)> = Vec::new();
            let mut floor = f32::NEG_INFINITY;
            for (i, &v) in values.iter().enumerate() {
                if best.len() < k {
                    best.push((v, i));
                    if best.len() == k {
                        floor = best.iter().map(|b| b.0).fold(f32::INFINITY, f32::min);
                    }
                } else if v > floor {
                    if let Some(slot) = best.iter_mut().find(|b| b.0 == floor) {
                        *slot = (v, i);
                    }
                    floor = best.iter().map(|b| b.0).fold(f32::INFINITY, f32::min);
                }
            }
            best.into_iter().map(|b| b.1).collect::<Vec<_>>()
        };
        for (n, salt) in [(0, 1), (5, 2), (16, 3), (17, 4), (1000, 5), (49_152, 6)] {
            let mut v = values(n, salt);
            // Ties: every seventh value repeats its neighbour.
            for i in (7..n).step_by(7) {
                v[i] = v[i - 1];
            }
            for k in [1, 4, 16] {
                assert_eq!(top_indices(&v, k), plain(&v, k), "n {n} k {k}");
            }
        }
    }

    #[test]
    fn the_heads_leading_logits_are_exact_and_the_rest_int8() {
        let (rows, cols) = (300, 256);
        let w = Tensor::from_vec(values(rows * cols, 23), (rows, cols), &Device::Cpu).unwrap();
        let qt = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let kw = QWeight::from_qtensor(&qt).unwrap().unwrap();
        let x = values(cols, 29);
        let mut exact = vec![0f32; rows];
        kw.matvec_f32(&x, &mut exact);
        let mut int8 = vec![0f32; rows];
        kw.matmul(&x, 1, &mut int8);
        let got = kw.head_logits(&x);
        let top = top_indices(&int8, HEAD_EXACT_CANDIDATES);
        assert_eq!(top.len(), HEAD_EXACT_CANDIDATES);
        let floor = top.iter().map(|&i| int8[i]).fold(f32::INFINITY, f32::min);
        assert_eq!(
            int8.iter().filter(|&&v| v > floor).count(),
            HEAD_EXACT_CANDIDATES - 1
        );
        for r in 0..rows {
            let want = if top.contains(&r) { exact[r] } else { int8[r] };
            assert_eq!(got[r], want, "row {r}");
        }
        let argmax = |v: &[f32]| (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap();
        assert_eq!(argmax(&got), argmax(&exact));
    }

    #[test]
    fn the_candle_op_keeps_leading_dimensions() {
        let w = Tensor::from_vec(values(64 * 96, 3), (64, 96), &Device::Cpu).unwrap();
        let qt = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let lin = QLinear::from_qtensor(qt).unwrap();
        let x = Tensor::from_vec(values(2 * 3 * 96, 5), (2, 3, 96), &Device::Cpu).unwrap();
        let y = lin.forward(&x).unwrap();
        assert_eq!(y.dims(), &[2, 3, 64]);
        // Non-contiguous input is made contiguous first.
        let xt = Tensor::from_vec(values(96 * 3, 9), (96, 3), &Device::Cpu)
            .unwrap()
            .t()
            .unwrap();
        assert_eq!(lin.forward(&xt).unwrap().dims(), &[3, 64]);
    }

    #[test]
    fn half_precision_decodes_exactly() {
        for (bits, want) in [
            (0x0000u16, 0.0f32),
            (0x3c00, 1.0),
            (0xc000, -2.0),
            (0x3555, 0.333_251_95),
            (0x0001, 5.960_464_5e-8),
            (0x7bff, 65504.0),
        ] {
            assert_eq!(f16_to_f32(bits), want, "{bits:#06x}");
        }
    }
}
