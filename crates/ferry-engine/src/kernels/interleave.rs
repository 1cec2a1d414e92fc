//! The interleaved weight layout of the 512-bit kernel: the same bytes as the file, reordered.
//!
//! In the file each weight row is a run of 32-value blocks. Here [`GROUP`] rows are held
//! together: for each block column the sixteen rows' scales sit side by side, then their values
//! in 4-byte groups, row after row — so one 64-byte load holds four values of each of sixteen
//! rows, and one `vpdpbusd` against four broadcast activation bytes yields a partial dot for all
//! sixteen rows at once (no horizontal sums, and the unpacked weights serve every activation
//! row of a batch). Nothing is widened: a chunk of sixteen blocks takes exactly sixteen blocks'
//! bytes.
//!
//! One chunk (sixteen rows, one block column), by format:
//! - every format: the sixteen f16 scales `d` (32 bytes);
//! - Q4_1: then the sixteen f16 minimums (32 bytes);
//! - Q5_0: then eight 64-bit masks, mask `k` bit `4i + t` = row `i`'s fifth bit of value
//!   `4k + t` (64 bytes);
//! - Q4_0/Q4_1/Q5_0: then four 64-byte vectors of packed nibbles, vector `k` bytes `4i..4i + 4`
//!   = row `i`'s bytes `4k..4k + 4` (low nibbles: values `4k..4k + 4`, high: `16 + 4k..`);
//! - Q8_0: then eight 64-byte vectors, vector `k` bytes `4i..4i + 4` = row `i`'s values
//!   `4k..4k + 4` with the sign bit flipped (unsigned bytes, offset 128, as `vpdpbusd` takes
//!   them).

use super::{Format, BLOCK};

/// Weight rows held together in the interleaved layout.
pub const GROUP: usize = 16;

/// Where a chunk's values start, after its scales (and minimums or fifth bits).
pub(super) const fn values_at(format: Format) -> usize {
    match format {
        Format::Q4_0 | Format::Q8_0 => 32,
        Format::Q4_1 => 64,
        Format::Q5_0 => 96,
    }
}

/// `rows` rows (a multiple of [`GROUP`]) of `cols` values, stored in the file's row layout in
/// `data`, in the interleaved layout.
pub(super) fn interleave(format: Format, data: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    debug_assert_eq!(rows % GROUP, 0);
    let bb = format.block_bytes();
    let nb = cols / BLOCK;
    let row_bytes = nb * bb;
    debug_assert_eq!(data.len(), rows * row_bytes);
    let mut out = vec![0u8; data.len()];
    for (src, dst) in data
        .chunks_exact(GROUP * row_bytes)
        .zip(out.chunks_exact_mut(GROUP * row_bytes))
    {
        for (b, chunk) in dst.chunks_exact_mut(GROUP * bb).enumerate() {
            let block = |i: usize| &src[i * row_bytes + b * bb..i * row_bytes + (b + 1) * bb];
            pack_chunk(format, block, chunk);
        }
    }
    out
}

/// Row `r` of interleaved `data` (`cols` values per row) in the file's row layout.
pub(super) fn row(format: Format, data: &[u8], cols: usize, r: usize) -> Vec<u8> {
    let bb = format.block_bytes();
    let nb = cols / BLOCK;
    let group = &data[(r / GROUP) * GROUP * nb * bb..(r / GROUP + 1) * GROUP * nb * bb];
    let mut out = vec![0u8; nb * bb];
    for (b, block) in out.chunks_exact_mut(bb).enumerate() {
        unpack_chunk_row(
            format,
            &group[b * GROUP * bb..(b + 1) * GROUP * bb],
            r % GROUP,
            block,
        );
    }
    out
}

/// Fills one chunk from the sixteen rows' blocks `block(i)`.
fn pack_chunk<'a>(format: Format, block: impl Fn(usize) -> &'a [u8], chunk: &mut [u8]) {
    let vals = values_at(format);
    for i in 0..GROUP {
        let b = block(i);
        chunk[2 * i..2 * i + 2].copy_from_slice(&b[..2]);
        match format {
            Format::Q4_0 => nibble_quads(&b[2..18], i, &mut chunk[vals..]),
            Format::Q4_1 => {
                chunk[32 + 2 * i..32 + 2 * i + 2].copy_from_slice(&b[2..4]);
                nibble_quads(&b[4..20], i, &mut chunk[vals..]);
            }
            Format::Q5_0 => {
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                for k in 0..8 {
                    let at = 32 + 8 * k;
                    let mut mask =
                        u64::from_le_bytes(chunk[at..at + 8].try_into().unwrap_or([0; 8]));
                    for t in 0..4 {
                        if qh >> (4 * k + t) & 1 == 1 {
                            mask |= 1 << (4 * i + t);
                        }
                    }
                    chunk[at..at + 8].copy_from_slice(&mask.to_le_bytes());
                }
                nibble_quads(&b[6..22], i, &mut chunk[vals..]);
            }
            Format::Q8_0 => {
                for k in 0..8 {
                    let at = vals + 64 * k + 4 * i;
                    chunk[at..at + 4].copy_from_slice(&flip_signs(&b[2 + 4 * k..6 + 4 * k]));
                }
            }
        }
    }
}

/// Four bytes with each one's top bit flipped (signed ↔ offset-128 unsigned).
fn flip_signs(four: &[u8]) -> [u8; 4] {
    let word = u32::from_le_bytes([four[0], four[1], four[2], four[3]]);
    (word ^ 0x8080_8080).to_le_bytes()
}

/// Row `i`'s 16 packed-nibble bytes into the four vectors of a chunk.
fn nibble_quads(qs: &[u8], i: usize, vectors: &mut [u8]) {
    for k in 0..4 {
        vectors[64 * k + 4 * i..64 * k + 4 * i + 4].copy_from_slice(&qs[4 * k..4 * k + 4]);
    }
}

/// Row `i`'s block back out of a chunk, as the file lays it out.
fn unpack_chunk_row(format: Format, chunk: &[u8], i: usize, block: &mut [u8]) {
    let vals = values_at(format);
    block[..2].copy_from_slice(&chunk[2 * i..2 * i + 2]);
    let quads = |out: &mut [u8]| {
        for k in 0..4 {
            out[4 * k..4 * k + 4].copy_from_slice(&chunk[vals + 64 * k + 4 * i..][..4]);
        }
    };
    match format {
        Format::Q4_0 => quads(&mut block[2..18]),
        Format::Q4_1 => {
            block[2..4].copy_from_slice(&chunk[32 + 2 * i..32 + 2 * i + 2]);
            quads(&mut block[4..20]);
        }
        Format::Q5_0 => {
            let mut qh = 0u32;
            for k in 0..8 {
                let at = 32 + 8 * k;
                let mask = u64::from_le_bytes(chunk[at..at + 8].try_into().unwrap_or([0; 8]));
                for t in 0..4 {
                    if mask >> (4 * i + t) & 1 == 1 {
                        qh |= 1 << (4 * k + t);
                    }
                }
            }
            block[2..6].copy_from_slice(&qh.to_le_bytes());
            quads(&mut block[6..22]);
        }
        Format::Q8_0 => {
            for k in 0..8 {
                let at = vals + 64 * k + 4 * i;
                block[2 + 4 * k..6 + 4 * k].copy_from_slice(&flip_signs(&chunk[at..at + 4]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_comes_back_as_the_file_stored_it() {
        for format in [Format::Q4_0, Format::Q4_1, Format::Q5_0, Format::Q8_0] {
            let (rows, cols) = (2 * GROUP, 96);
            let bytes = rows * cols / BLOCK * format.block_bytes();
            let data: Vec<u8> = (0..bytes).map(|i| (i * 7919 % 251) as u8).collect();
            let inter = interleave(format, &data, rows, cols);
            assert_eq!(
                inter.len(),
                data.len(),
                "{format:?}: the layout adds no bytes"
            );
            assert_ne!(inter, data);
            let row_bytes = cols / BLOCK * format.block_bytes();
            for r in 0..rows {
                assert_eq!(
                    row(format, &inter, cols, r),
                    data[r * row_bytes..(r + 1) * row_bytes],
                    "{format:?} row {r}"
                );
            }
        }
    }
}
