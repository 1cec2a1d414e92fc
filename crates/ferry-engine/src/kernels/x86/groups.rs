//! The 512-bit kernel over interleaved weights (see `kernels::interleave`): sixteen weight rows
//! per register, for any number of activation rows.
//!
//! Per block column of a group, the sixteen rows' values are unpacked once into eight registers
//! (`V_k`: four values of each row), then each activation row costs eight `vpdpbusd` against its
//! eight broadcast 4-byte groups, a conversion, a product and a multiply-add — about 12 vector
//! instructions per 512 multiply-adds, where the row-at-a-time kernels spend four per 64 plus
//! the unpacking. The weights' offset (`w = d_w·(u − off)`) costs no float work where it is a
//! whole number (Q8_0, Q4_0, Q5_0): the integer dot starts at `−off·Σq`. Every
//! output is computed by the same instructions in the same order whatever the number of rows in
//! the call, so a row's result does not depend on its company (decode, a step of many sequences
//! and a prompt all round alike).
//!
//! CPUs without AVX-512 take the same layout in 256-bit registers (`avxvnni`, `avx2`): eight
//! rows per register, each chunk in two halves.

use std::arch::x86_64::*;
use std::ops::Range;

use super::{block_bytes, format_of, prefetch_row, Q4_0, Q4_1, Q5_0, Q8_0};
use crate::kernels::{interleave, QWeight, QuantizedActs, BLOCK, GROUP};

/// Activation rows multiplied together against one unpacked block column: eight accumulators
/// plus the eight unpacked registers and temporaries fit the 32 vector registers.
const TILE: usize = 8;

/// Groups `groups` of interleaved `w` against `m` activation rows, into `out[j·w.rows + r]`.
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL and VNNI; `w` must be interleaved, `acts` must hold `m`
/// rows of `w.cols` values and `out` `m · w.rows` values.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn rows<const F: u8>(
    w: &QWeight,
    acts: &QuantizedActs,
    m: usize,
    groups: Range<usize>,
    out: *mut f32,
) {
    walk::<TILE, 1>(w, acts, m, groups, out, |at, n, _| match n {
        // SAFETY: as for this function.
        8 => unsafe { tile::<F, 8>(at) },
        7 => unsafe { tile::<F, 7>(at) },
        6 => unsafe { tile::<F, 6>(at) },
        5 => unsafe { tile::<F, 5>(at) },
        4 => unsafe { tile::<F, 4>(at) },
        3 => unsafe { tile::<F, 3>(at) },
        2 => unsafe { tile::<F, 2>(at) },
        _ => unsafe { tile::<F, 1>(at) },
    });
}

/// Calls `tile(at, n, part)` for every group of `groups`, every one of its `PARTS` (row blocks
/// of `GROUP / PARTS` rows, one register's worth) and every run of at most `MOST` activation
/// rows (`n` of them). The first tile of a group prefetches the next group.
#[inline(always)]
unsafe fn walk<const MOST: usize, const PARTS: usize>(
    w: &QWeight,
    acts: &QuantizedActs,
    m: usize,
    groups: Range<usize>,
    out: *mut f32,
    mut tile: impl FnMut(Tile<'_>, usize, usize),
) {
    let nb = w.cols / BLOCK;
    let group_bytes = nb * GROUP * w.format.block_bytes();
    let base = w.stored().as_ptr();
    for g in groups.clone() {
        let group = base.add(g * group_bytes);
        // The next group is asked for while this one is multiplied, one chunk per block.
        let next = (g + 1 < groups.end).then(|| group.add(group_bytes));
        for part in 0..PARTS {
            let mut j = 0;
            while j < m {
                let n = (m - j).min(MOST);
                let at = Tile {
                    group,
                    nb,
                    acts,
                    j0: j,
                    out: out.add(j * w.rows + g * GROUP + part * GROUP / PARTS),
                    out_stride: w.rows,
                    ahead: if j == 0 && part == 0 { next } else { None },
                };
                tile(at, n, part);
                j += n;
            }
        }
    }
}

/// Where one tile reads and writes.
#[derive(Clone, Copy)]
struct Tile<'a> {
    /// The group's first chunk.
    group: *const u8,
    /// Blocks per row.
    nb: usize,
    acts: &'a QuantizedActs,
    /// The tile's first activation row.
    j0: usize,
    /// Output of activation row `j0`, first row of the tile's part of the group.
    out: *mut f32,
    /// Values between two activation rows' outputs.
    out_stride: usize,
    /// The next group, to prefetch.
    ahead: Option<*const u8>,
}

/// Sixteen weight rows × `J` activation rows.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile<const F: u8, const J: usize>(t: Tile<'_>) {
    let chunk = GROUP * block_bytes(F);
    let cols = t.nb * BLOCK;
    let q = t.acts.q.as_ptr();
    let d = t.acts.d.as_ptr();
    let s = t.acts.sum.as_ptr();
    let ds = t.acts.scaled_sum.as_ptr();
    let mut acc = [_mm512_setzero_ps(); J];
    for b in 0..t.nb {
        let c = t.group.add(b * chunk);
        if let Some(next) = t.ahead {
            prefetch_row(next.add(b * chunk), chunk);
        }
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(c as *const __m256i));
        let (v, cw) = unpack::<F>(c, dw);
        for (k, acc) in acc.iter_mut().enumerate() {
            let row = t.j0 + k;
            let qa = q.add(row * cols + b * BLOCK) as *const i32;
            let quad = |i: usize| _mm512_set1_epi32(std::ptr::read_unaligned(qa.add(i)));
            let ab = row * t.nb + b;
            let sa = *s.add(ab);
            // The offset starts the integer dot (exact), where it would cost a float product
            // and a multiply-add per row and block.
            let start = _mm512_set1_epi32(whole_offset::<F>().wrapping_mul(sa).wrapping_neg());
            let dot = if J >= 4 {
                // Four or more rows keep the multiply-add unit busy: one chain each.
                let mut dot = start;
                for (i, v) in v.iter().enumerate() {
                    dot = _mm512_dpbusd_epi32(dot, *v, quad(i));
                }
                dot
            } else {
                // Two chains of four, so a lone row's dot does not wait out eight latencies.
                let mut lo = _mm512_dpbusd_epi32(start, v[0], quad(0));
                let mut hi = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v[4], quad(4));
                for i in 1..4 {
                    lo = _mm512_dpbusd_epi32(lo, v[i], quad(i));
                    hi = _mm512_dpbusd_epi32(hi, v[4 + i], quad(4 + i));
                }
                _mm512_add_epi32(lo, hi)
            };
            let da = *d.add(ab);
            *acc = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(dot),
                _mm512_mul_ps(dw, _mm512_set1_ps(da)),
                *acc,
            );
            if whole_offset::<F>() == 0 {
                *acc = _mm512_fmadd_ps(cw, _mm512_set1_ps(*ds.add(ab)), *acc);
            }
        }
    }
    for (k, acc) in acc.iter().enumerate() {
        _mm512_storeu_ps(t.out.add(k * t.out_stride), *acc);
    }
}

/// The weight offset of formats whose values are unsigned integers a whole number `off` above
/// the signed ones (`w = d_w·(u − off)`), or 0 where the offset is a float of its own (Q4_1's
/// minimum): with activation sum `s`, `Σ u·q − off·s` is the signed dot, in integers.
#[inline(always)]
const fn whole_offset<const F: u8>() -> i32 {
    match F {
        Q8_0 => 128,
        Q4_0 => 8,
        Q5_0 => 16,
        _ => 0,
    }
}

/// One chunk's values as eight registers of unsigned bytes (`V_k`: values `4k..4k + 4` of
/// each of the sixteen rows) and the rows' offset coefficients `c_w` (`w = d_w·u + c_w`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn unpack<const F: u8>(c: *const u8, dw: __m512) -> ([__m512i; 8], __m512) {
    let vals = c.add(interleave::values_at(format_of(F)));
    let load = |k: usize| _mm512_loadu_si512(vals.add(64 * k) as *const __m512i);
    if F == Q8_0 {
        return (
            std::array::from_fn(load),
            _mm512_mul_ps(dw, _mm512_set1_ps(-128.0)),
        );
    }
    let low = _mm512_set1_epi8(0x0f);
    let mut v = [_mm512_setzero_si512(); 8];
    for k in 0..4 {
        let packed = load(k);
        v[k] = _mm512_and_si512(packed, low);
        v[k + 4] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low);
    }
    let cw = match F {
        Q4_0 => _mm512_mul_ps(dw, _mm512_set1_ps(-8.0)),
        Q4_1 => _mm512_cvtph_ps(_mm256_loadu_si256(c.add(32) as *const __m256i)),
        _ => {
            debug_assert_eq!(F, Q5_0);
            let fifth = _mm512_set1_epi8(0x10);
            for (k, v) in v.iter_mut().enumerate() {
                let mask = std::ptr::read_unaligned(c.add(32 + 8 * k) as *const u64);
                // A nibble is at most 15, so adding 16 sets the fifth bit.
                *v = _mm512_mask_add_epi8(*v, mask, *v, fifth);
            }
            _mm512_mul_ps(dw, _mm512_set1_ps(-16.0))
        }
    };
    (v, cw)
}

/// Activation rows per tile of the 256-bit kernels: with sixteen registers, four rows' integer
/// dots and float sums plus the unpacked values and scales fill them.
const NARROW_TILE: usize = 4;

/// The 256-bit kernels over the same interleaved layout, for CPUs without AVX-512: a 32-byte
/// register holds four values of each of eight rows, so each chunk is taken as two halves of
/// eight rows. `$dot(acc, u, q)` adds the four-byte dots of unsigned `u` and signed `q` to the
/// eight lanes of `acc`.
macro_rules! narrow_kernels {
    ($name:ident, $features:literal, |$acc:ident, $u:ident, $q:ident| $dot:expr) => {
        pub(in crate::kernels::x86) mod $name {
            use super::*;
            use crate::kernels::x86::fifth_bits;

            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn dot($acc: __m256i, $u: __m256i, $q: __m256i) -> __m256i {
                $dot
            }

            /// Groups `groups` of interleaved `w` against `m` activation rows, into
            /// `out[j·w.rows + r]`.
            ///
            /// # Safety
            /// As [`super::rows`], with this module's instruction sets in place of AVX-512.
            #[target_feature(enable = $features)]
            pub(in crate::kernels::x86) unsafe fn rows<const F: u8>(
                w: &QWeight,
                acts: &QuantizedActs,
                m: usize,
                groups: Range<usize>,
                out: *mut f32,
            ) {
                walk::<NARROW_TILE, 2>(w, acts, m, groups, out, |at, n, half| match n {
                    // SAFETY: as for this function.
                    4 => unsafe { tile::<F, 4>(at, half) },
                    3 => unsafe { tile::<F, 3>(at, half) },
                    2 => unsafe { tile::<F, 2>(at, half) },
                    _ => unsafe { tile::<F, 1>(at, half) },
                });
            }

            /// Rows `8·half..8·half + 8` of a group × `J` activation rows.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn tile<const F: u8, const J: usize>(t: Tile<'_>, half: usize) {
                let chunk = GROUP * block_bytes(F);
                let cols = t.nb * BLOCK;
                let (q, d, s) = (t.acts.q.as_ptr(), t.acts.d.as_ptr(), t.acts.sum.as_ptr());
                let ds = t.acts.scaled_sum.as_ptr();
                let low = _mm256_set1_epi8(0x0f);
                let mut acc = [_mm256_setzero_ps(); J];
                for b in 0..t.nb {
                    let c = t.group.add(b * chunk);
                    if let Some(next) = t.ahead {
                        prefetch_row(next.add(b * chunk), chunk);
                    }
                    let vals = c.add(interleave::values_at(format_of(F)));
                    let quad = |j: usize, k: usize| {
                        let at = q.add((t.j0 + j) * cols + b * BLOCK + 4 * k) as *const i32;
                        _mm256_set1_epi32(std::ptr::read_unaligned(at))
                    };
                    let load = |k: usize| {
                        _mm256_loadu_si256(vals.add(64 * k + 32 * half) as *const __m256i)
                    };
                    // The offset starts each integer dot (see `whole_offset`).
                    let mut dots: [__m256i; J] = std::array::from_fn(|j| {
                        let sa = *s.add((t.j0 + j) * t.nb + b);
                        _mm256_set1_epi32(whole_offset::<F>().wrapping_mul(sa).wrapping_neg())
                    });
                    if F == Q8_0 {
                        for k in 0..8 {
                            let u = load(k);
                            for (j, dots) in dots.iter_mut().enumerate() {
                                *dots = dot(*dots, u, quad(j, k));
                            }
                        }
                    } else {
                        for k in 0..4 {
                            let packed = load(k);
                            let mut lo = _mm256_and_si256(packed, low);
                            let mut hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
                            if F == Q5_0 {
                                let mask = |k: usize| {
                                    let m =
                                        std::ptr::read_unaligned(c.add(32 + 8 * k) as *const u64);
                                    (m >> (32 * half)) as u32
                                };
                                lo = _mm256_or_si256(lo, fifth_bits(mask(k)));
                                hi = _mm256_or_si256(hi, fifth_bits(mask(k + 4)));
                            }
                            for (j, dots) in dots.iter_mut().enumerate() {
                                *dots = dot(dot(*dots, lo, quad(j, k)), hi, quad(j, k + 4));
                            }
                        }
                    }
                    let dw = _mm256_cvtph_ps(_mm_loadu_si128(c.add(16 * half) as *const __m128i));
                    for (j, acc) in acc.iter_mut().enumerate() {
                        let ab = (t.j0 + j) * t.nb + b;
                        let da = *d.add(ab);
                        let p = _mm256_cvtepi32_ps(dots[j]);
                        *acc = _mm256_fmadd_ps(p, _mm256_mul_ps(dw, _mm256_set1_ps(da)), *acc);
                        if whole_offset::<F>() == 0 {
                            // Q4_1's minimum: a float offset of its own.
                            let cw = _mm256_cvtph_ps(_mm_loadu_si128(
                                c.add(32 + 16 * half) as *const __m128i
                            ));
                            *acc = _mm256_fmadd_ps(cw, _mm256_set1_ps(*ds.add(ab)), *acc);
                        }
                    }
                }
                for (j, acc) in acc.iter().enumerate() {
                    _mm256_storeu_ps(t.out.add(j * t.out_stride), *acc);
                }
            }
        }
    };
}

narrow_kernels!(avxvnni, "avx2,fma,f16c,avxvnni", |acc, u, q| {
    _mm256_dpbusd_avx_epi32(acc, u, q)
});
// `vpmaddubsw` sums two u8·i8 products into i16 without overflow only while u·|q|·2 fits:
// 4- and 5-bit values do (31·127·2), Q8_0's unsigned bytes do not, so plain AVX2 never holds
// Q8_0 interleaved (`super::interleaves`).
narrow_kernels!(avx2, "avx2,fma,f16c", |acc, u, q| {
    _mm256_add_epi32(
        acc,
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, q), _mm256_set1_epi16(1)),
    )
});
