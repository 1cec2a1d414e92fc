//! Reading the header of a GGUF file that someone else produced, refusing a hostile one with a
//! clear error instead of a panic or an allocation the file cannot back.
//!
//! candle's reader already bounds every string and array it allocates by the bytes left in
//! the file. Two holes remain, both found by feeding it forged headers: a `general.alignment`
//! of 0 divides by zero, and the tensor table is trusted, so dimensions whose product
//! overflows, or a tensor that ends past the end of the file, fail only when the tensor is
//! read (or wrap around in a release build and reach the loader with a wrong size). This
//! module reads the header with candle, turns a panic inside that third-party parser into an
//! error, and checks every tensor's extent against the file before anything is loaded.

use std::io::{Read, Seek, SeekFrom};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use ferry_core::{Error, Result};

/// The header of the GGUF file open as `reader` (at `path`, named in errors), with every
/// tensor's data checked to lie inside the file.
pub fn read_checked<R: Read + Seek>(reader: &mut R, path: &Path) -> Result<Content> {
    let invalid = |reason: String| Error::InvalidFile {
        what: "GGUF file",
        path: path.to_path_buf(),
        reason,
    };
    reader
        .seek(SeekFrom::Start(0))
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let content = match catch_unwind(AssertUnwindSafe(|| Content::read(reader))) {
        Ok(Ok(content)) => content,
        Ok(Err(e)) => return Err(invalid(e.to_string())),
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "the header parser failed".into());
            return Err(invalid(format!("malformed header ({why})")));
        }
    };
    if let Some(v) = content.metadata.get("general.alignment") {
        if !matches!(alignment(v), Some(a) if a > 0) {
            return Err(invalid(format!(
                "general.alignment must be a positive integer, not {v:?}"
            )));
        }
    }
    let file_bytes = reader
        .seek(SeekFrom::End(0))
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let data_bytes = file_bytes.saturating_sub(content.tensor_data_offset);
    for (name, info) in &content.tensor_infos {
        let elems = info
            .shape
            .dims()
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .filter(|&n| n <= usize::MAX as u64)
            .ok_or_else(|| {
                invalid(format!(
                    "tensor `{name}` has dimensions {:?} whose product overflows",
                    info.shape.dims()
                ))
            })?;
        let block = info.ggml_dtype.block_size() as u64;
        if elems % block != 0 {
            return Err(invalid(format!(
                "tensor `{name}` has {elems} elements, not a multiple of its {:?} block of {block}",
                info.ggml_dtype
            )));
        }
        let bytes = (elems / block)
            .checked_mul(info.ggml_dtype.type_size() as u64)
            .ok_or_else(|| invalid(format!("tensor `{name}` is larger than any file")))?;
        let end = info.offset.checked_add(bytes);
        if end.is_none_or(|end| end > data_bytes) {
            return Err(invalid(format!(
                "tensor `{name}` needs {bytes} bytes at data offset {}, the file holds {data_bytes} bytes of tensor data",
                info.offset
            )));
        }
    }
    Ok(content)
}

/// The alignment a metadata value sets, as candle reads it (any integer type).
fn alignment(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x.into()),
        Value::U16(x) => Some(x.into()),
        Value::U32(x) => Some(x.into()),
        Value::U64(x) => Some(x),
        Value::I8(x) => u64::try_from(x).ok(),
        Value::I16(x) => u64::try_from(x).ok(),
        Value::I32(x) => u64::try_from(x).ok(),
        Value::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    use proptest::prelude::*;
    use std::io::Cursor;

    /// A valid GGUF: two f32 tensors and a little metadata.
    fn valid() -> Vec<u8> {
        let dev = Device::Cpu;
        let a = QTensor::quantize(
            &Tensor::ones((4, 8), candle_core::DType::F32, &dev).unwrap(),
            GgmlDType::F32,
        )
        .unwrap();
        let b = QTensor::quantize(
            &Tensor::zeros(16, candle_core::DType::F32, &dev).unwrap(),
            GgmlDType::F32,
        )
        .unwrap();
        let arch = Value::String("llama".into());
        let ctx = Value::U32(128);
        let mut buf = Cursor::new(Vec::new());
        gguf_file::write(
            &mut buf,
            &[
                ("general.architecture", &arch),
                ("llama.context_length", &ctx),
            ],
            &[("a", &a), ("b", &b)],
        )
        .unwrap();
        buf.into_inner()
    }

    fn check(bytes: &[u8]) -> Result<Content> {
        read_checked(&mut Cursor::new(bytes), Path::new("forged.gguf"))
    }

    /// Offset of the first occurrence of `needle`.
    fn find(hay: &[u8], needle: &[u8]) -> usize {
        hay.windows(needle.len()).position(|w| w == needle).unwrap()
    }

    fn refused(bytes: &[u8], why: &str) {
        match check(bytes) {
            Err(Error::InvalidFile { reason, .. }) => {
                assert!(reason.contains(why), "{reason:?} does not say {why:?}")
            }
            other => panic!(
                "accepted or wrong error: {:?}",
                other.map(|c| c.tensor_infos.len())
            ),
        }
    }

    #[test]
    fn a_valid_file_reads() {
        let c = check(&valid()).unwrap();
        assert_eq!(c.tensor_infos.len(), 2);
    }

    #[test]
    fn absurd_dimensions_are_refused() {
        // Tensor `a`'s dims follow its name and n_dims (u32 = 2): (8, 4) as u64s.
        let mut f = valid();
        let at = find(&f, b"\x01\x00\x00\x00\x00\x00\x00\x00a\x02\x00\x00\x00") + 13;
        f[at..at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        f[at + 8..at + 16].copy_from_slice(&(1u64 << 40).to_le_bytes());
        refused(&f, "overflows");
        let mut f = valid();
        f[at..at + 8].copy_from_slice(&(1u64 << 30).to_le_bytes());
        refused(&f, "tensor data");
    }

    #[test]
    fn an_offset_past_the_end_is_refused() {
        let mut f = valid();
        // `b`'s info ends with its u64 offset (after n_dims 1, dim 16, dtype f32 = 0).
        let at = find(
            &f,
            b"b\x01\x00\x00\x00\x10\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
        ) + 17;
        f[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        refused(&f, "tensor data");
    }

    #[test]
    fn a_zero_alignment_is_refused_not_a_panic() {
        let dev = Device::Cpu;
        let a = QTensor::quantize(
            &Tensor::ones(32, candle_core::DType::F32, &dev).unwrap(),
            GgmlDType::F32,
        )
        .unwrap();
        let mut buf = Cursor::new(Vec::new());
        gguf_file::write(
            &mut buf,
            &[("general.alignment", &Value::U32(0))],
            &[("a", &a)],
        )
        .unwrap();
        refused(&buf.into_inner(), "malformed header");
    }

    #[test]
    fn a_huge_tensor_count_and_every_truncation_are_refused() {
        let mut f = valid();
        f[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        refused(&f, "");
        let full = valid();
        let c = check(&full).unwrap();
        let data_end = c.tensor_data_offset as usize + 4 * 32 + 4 * 16;
        assert!(data_end <= full.len());
        for cut in 0..data_end {
            assert!(
                check(&full[..cut]).is_err(),
                "truncated at {cut} of {data_end} was accepted"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
        /// Any corruption of a valid file is read or refused, never a panic, and what is read
        /// has every tensor inside the file.
        #[test]
        fn corrupted_headers_never_panic(
            edits in proptest::collection::vec((0usize..400, any::<u8>()), 1..8),
        ) {
            let mut f = valid();
            let n = f.len();
            for (at, byte) in edits {
                f[at % n] = byte;
            }
            if let Ok(c) = check(&f) {
                for info in c.tensor_infos.values() {
                    prop_assert!(info.offset < n as u64);
                }
            }
        }
    }
}
