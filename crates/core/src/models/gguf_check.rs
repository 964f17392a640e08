//! A bounds-checking walk over a GGUF header, run before candle reads the file.
//!
//! Hand-written because candle's `gguf_file::Content::read` trusts parts of the header that a corrupt or
//! hostile file controls: `general.alignment = 0` divides by zero; tensor dimensions whose product
//! overflows panic (or wrap in release builds, defeating later size checks); an empty tensor is read
//! through a dangling, misaligned pointer (undefined behaviour; found by fuzzing); and tensor extents are
//! only checked when a tensor is read. This walk checks every declared string/array length against the
//! bytes left, caps nesting, and checks every tensor's extent against the file size, so the file fails
//! with an error naming what is wrong before candle (or anything else) allocates or reads.

use std::io::{Read, Seek, SeekFrom};

use anyhow::{bail, Context};
use candle_core::quantized::GgmlDType;

/// Deepest array-of-arrays nesting accepted in metadata (real files use one level).
const MAX_DEPTH: u32 = 8;
/// Most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;

/// The ggml tensor types candle reads, by their GGUF id.
fn ggml_dtype(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

struct Walk<'r, R> {
    r: &'r mut R,
    pos: u64,
    len: u64,
    /// Length prefixes are u32 in GGUF v1, u64 after.
    v1: bool,
}

impl<R: Read> Walk<'_, R> {
    fn bytes<const N: usize>(&mut self, what: &str) -> anyhow::Result<[u8; N]> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).with_context(|| {
            format!(
                "GGUF header is truncated (reading {what} at offset {})",
                self.pos
            )
        })?;
        self.pos += N as u64;
        Ok(b)
    }
    fn u32(&mut self, what: &str) -> anyhow::Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }
    fn u64(&mut self, what: &str) -> anyhow::Result<u64> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }
    fn length(&mut self, what: &str) -> anyhow::Result<u64> {
        if self.v1 {
            Ok(self.u32(what)?.into())
        } else {
            self.u64(what)
        }
    }
    /// Fails unless `n` bytes remain.
    fn need(&self, n: u64, what: &str) -> anyhow::Result<()> {
        let left = self.len.saturating_sub(self.pos);
        if n > left {
            bail!(
                "GGUF {what} claims {n} bytes at offset {} but only {left} remain",
                self.pos
            );
        }
        Ok(())
    }
    fn skip(&mut self, n: u64, what: &str) -> anyhow::Result<()> {
        self.need(n, what)?;
        let got = std::io::copy(&mut self.r.by_ref().take(n), &mut std::io::sink())?;
        if got != n {
            bail!(
                "GGUF header is truncated (in {what} at offset {})",
                self.pos
            );
        }
        self.pos += n;
        Ok(())
    }
    fn string(&mut self, what: &str) -> anyhow::Result<Vec<u8>> {
        let n = self.length(what)?;
        self.need(n, what)?;
        let mut b = vec![0u8; n as usize];
        self.r.read_exact(&mut b)?;
        self.pos += n;
        Ok(b)
    }
    fn skip_string(&mut self, what: &str) -> anyhow::Result<()> {
        let n = self.length(what)?;
        self.skip(n, what)
    }
    /// Skips one metadata value of type `ty`; returns it when it is an unsigned or signed integer.
    fn value(&mut self, ty: u32, key: &str, depth: u32) -> anyhow::Result<Option<i128>> {
        let fixed = |ty| match ty {
            0 | 1 | 7 => Some(1u64),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        };
        if let Some(size) = fixed(ty) {
            let mut b = [0u8; 8];
            self.need(size, key)?;
            self.r.read_exact(&mut b[..size as usize])?;
            self.pos += size;
            let u = u64::from_le_bytes(b);
            return Ok(match ty {
                0 | 2 | 4 | 10 => Some(u.into()),
                1 => Some((b[0] as i8).into()),
                3 => Some(i16::from_le_bytes([b[0], b[1]]).into()),
                5 => Some(i32::from_le_bytes([b[0], b[1], b[2], b[3]]).into()),
                11 => Some((u as i64).into()),
                _ => None,
            });
        }
        match ty {
            8 => self.skip_string(key)?,
            9 => {
                if depth >= MAX_DEPTH {
                    bail!("GGUF metadata `{key}`: arrays nested deeper than {MAX_DEPTH}");
                }
                let elem = self.u32(key)?;
                let n = self.length(key)?;
                let min = match (fixed(elem), elem) {
                    (Some(size), _) => size,
                    (None, 8) => {
                        if self.v1 {
                            4
                        } else {
                            8
                        }
                    }
                    (None, 9) => 4 + if self.v1 { 4 } else { 8 },
                    (None, other) => {
                        bail!("GGUF metadata `{key}`: unknown array element type {other}")
                    }
                };
                self.need(n.saturating_mul(min), key)?;
                match fixed(elem) {
                    Some(size) => self.skip(n * size, key)?,
                    None => {
                        for _ in 0..n {
                            self.value(elem, key, depth + 1)?;
                        }
                    }
                }
            }
            other => bail!("GGUF metadata `{key}`: unknown value type {other}"),
        }
        Ok(None)
    }
}

/// Checks a GGUF file's header and tensor extents (reading from the reader's start), then seeks back to
/// the start. An error names what is wrong; `Ok` means candle can read the header and every tensor
/// without running past the file or dividing by zero.
pub fn check<R: Read + Seek>(r: &mut R) -> anyhow::Result<()> {
    let len = r.seek(SeekFrom::End(0))?;
    r.seek(SeekFrom::Start(0))?;
    let mut w = Walk {
        r: &mut std::io::BufReader::new(&mut *r),
        pos: 0,
        len,
        v1: false,
    };
    let magic = w.u32("magic")?;
    if magic != 0x4655_4747 && magic != 0x4747_5546 {
        bail!("not a GGUF file (magic 0x{magic:08x})");
    }
    let version = w.u32("version")?;
    if !(1..=3).contains(&version) {
        bail!("GGUF version {version} is not supported");
    }
    w.v1 = version == 1;
    let n_tensors = w.length("tensor count")?;
    let n_kv = w.length("metadata count")?;
    // Every entry takes at least a length prefix and a type: counts larger than the file are refused.
    w.need(
        n_tensors.saturating_add(n_kv).saturating_mul(5),
        "header counts",
    )?;
    let mut alignment = 32u64;
    for _ in 0..n_kv {
        // Read as candle reads keys (trailing NULs dropped), so `general.alignment\0` is checked too.
        let mut raw = w.string("metadata key")?;
        while raw.last() == Some(&0) {
            raw.pop();
        }
        let key = String::from_utf8_lossy(&raw).into_owned();
        let ty = w.u32(&key)?;
        let v = w.value(ty, &key, 0)?;
        // candle honours only 8/16/32-bit integer alignments, but refuse every zero.
        if key == "general.alignment" && ty != 9 {
            match v {
                Some(0) => bail!("GGUF `general.alignment` is 0"),
                Some(a) if matches!(ty, 0..=5) && a > 0 => alignment = a as u64,
                _ => {}
            }
        }
    }
    let mut tensors = Vec::new();
    for _ in 0..n_tensors {
        let name = String::from_utf8_lossy(&w.string("tensor name")?).into_owned();
        let n_dims = w.u32(&name)?;
        if n_dims > MAX_DIMS {
            bail!("GGUF tensor `{name}` has {n_dims} dimensions (at most {MAX_DIMS})");
        }
        let mut dims = Vec::new();
        for _ in 0..n_dims {
            dims.push(w.length(&name)?);
        }
        let ty = w.u32(&name)?;
        let dtype = ggml_dtype(ty)
            .with_context(|| format!("GGUF tensor `{name}` has unknown type {ty}"))?;
        let offset = w.u64(&name)?;
        // No real file holds an empty tensor, and candle reads one through a dangling pointer (undefined
        // behaviour, an abort in debug builds): refuse zeros. The dimensions must then multiply without
        // overflow (candle multiplies them unchecked).
        if dims.contains(&0) {
            bail!("GGUF tensor `{name}` has a zero dimension ({dims:?})");
        }
        let elems = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .with_context(|| format!("GGUF tensor `{name}`: dimensions {dims:?} overflow"))?;
        let block = dtype.block_size() as u64;
        if elems % block != 0 {
            bail!("GGUF tensor `{name}`: {elems} elements are not a multiple of the block size {block}");
        }
        let bytes = (elems / block)
            .checked_mul(dtype.type_size() as u64)
            .with_context(|| format!("GGUF tensor `{name}` is too large"))?;
        tensors.push((name, offset, bytes));
    }
    let data_start = w
        .pos
        .div_ceil(alignment)
        .checked_mul(alignment)
        .context("GGUF tensor data offset overflows")?;
    for (name, offset, bytes) in tensors {
        let end = data_start
            .checked_add(offset)
            .and_then(|s| s.checked_add(bytes));
        if end.is_none_or(|e| e > len) {
            bail!(
                "GGUF tensor `{name}` ({bytes} bytes at data offset {offset}) extends past the end of the \
                 {len}-byte file (truncated or corrupt)"
            );
        }
    }
    r.seek(SeekFrom::Start(0))?;
    Ok(())
}

/// The inputs fuzzing once crashed on for `target` (`tests/fuzz_regressions/<target>/*`), by file name.
#[cfg(test)]
pub(crate) fn fuzz_regressions(target: &str) -> Vec<(String, Vec<u8>)> {
    files_in(&format!("tests/fuzz_regressions/{target}"))
}

/// The fuzzer's seed inputs for `target` (`fuzz/seeds/<target>/*`, valid files), by file name.
#[cfg(test)]
pub(crate) fn fuzz_seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let files = files_in(&format!("fuzz/seeds/{target}"));
    assert!(!files.is_empty(), "no seeds for {target}");
    files
}

#[cfg(test)]
fn files_in(dir: &str) -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(dir);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let bytes = std::fs::read(e.path()).expect("readable file");
            (e.file_name().to_string_lossy().into_owned(), bytes)
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF v3 header with `kv` metadata entries (already encoded) and `tensors` tensor infos.
    fn header(n_kv: u64, kv: &[u8], n_tensors: u64, tensors: &[u8]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&n_tensors.to_le_bytes());
        b.extend_from_slice(&n_kv.to_le_bytes());
        b.extend_from_slice(kv);
        b.extend_from_slice(tensors);
        b
    }

    fn string(s: &str) -> Vec<u8> {
        let mut b = (s.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(s.as_bytes());
        b
    }

    fn tensor(name: &str, dims: &[u64], ty: u32, offset: u64) -> Vec<u8> {
        let mut b = string(name);
        b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
        b
    }

    fn check_bytes(b: &[u8]) -> anyhow::Result<()> {
        check(&mut std::io::Cursor::new(b))
    }

    #[test]
    fn zero_alignment_is_an_error_not_a_division_by_zero() {
        // candle computes the data offset as position.div_ceil(alignment): 0 panicked.
        let mut kv = string("general.alignment");
        kv.extend_from_slice(&4u32.to_le_bytes()); // u32
        kv.extend_from_slice(&0u32.to_le_bytes());
        let b = header(1, &kv, 0, &[]);
        let err = format!("{:#}", check_bytes(&b).unwrap_err());
        assert!(err.contains("`general.alignment` is 0"), "{err}");
        let mut r = std::io::Cursor::new(&b);
        assert!(crate::models::llama::read_gguf(&mut r, "x.gguf").is_err());
    }

    #[test]
    fn overflowing_dimensions_are_an_error() {
        let t = tensor("t", &[1 << 40, 1 << 40], 0, 0);
        let err = format!("{:#}", check_bytes(&header(0, &[], 1, &t)).unwrap_err());
        assert!(err.contains("overflow"), "{err}");
        // [0, 2^40, 2^40] has no elements, but candle multiplies the reversed dims and overflows first.
        let t = tensor("t", &[0, 1 << 40, 1 << 40], 0, 0);
        let err = format!("{:#}", check_bytes(&header(0, &[], 1, &t)).unwrap_err());
        assert!(err.contains("zero dimension"), "{err}");
    }

    #[test]
    fn a_file_claiming_a_1tb_tensor_fails_fast() {
        let t = tensor("huge", &[1 << 18, 1 << 20], 0, 0); // 2^38 f32 = 1 TiB
        let err = format!("{:#}", check_bytes(&header(0, &[], 1, &t)).unwrap_err());
        assert!(
            err.contains("`huge`") && err.contains("past the end"),
            "{err}"
        );
    }

    #[test]
    fn declared_lengths_beyond_the_file_are_errors() {
        // A metadata key claiming 2^60 bytes, an array claiming 2^40 strings, and header counts.
        let mut kv = (1u64 << 60).to_le_bytes().to_vec();
        kv.extend_from_slice(b"k");
        assert!(check_bytes(&header(1, &kv, 0, &[])).is_err());
        let mut kv = string("tokenizer.ggml.tokens");
        kv.extend_from_slice(&9u32.to_le_bytes());
        kv.extend_from_slice(&8u32.to_le_bytes());
        kv.extend_from_slice(&(1u64 << 40).to_le_bytes());
        let err = format!("{:#}", check_bytes(&header(1, &kv, 0, &[])).unwrap_err());
        assert!(err.contains("tokenizer.ggml.tokens"), "{err}");
        assert!(check_bytes(&header(u64::MAX, &[], u64::MAX, &[])).is_err());
    }

    #[test]
    fn the_seed_file_passes_and_truncations_fail() {
        let seed = include_bytes!("../../../../fuzz/seeds/gguf_header/llama-tiny.gguf");
        check_bytes(seed).unwrap();
        let mut r = std::io::Cursor::new(&seed[..]);
        let content = crate::models::llama::read_gguf(&mut r, "seed").unwrap();
        assert_eq!(content.tensor_infos.len(), 4);
        // Any cut before the last tensor's padding loses bytes a tensor or the header needs.
        for cut in (0..seed.len() - 24).step_by(7) {
            assert!(check_bytes(&seed[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn every_seed_reads() {
        for (name, bytes) in fuzz_seeds("gguf_header") {
            let mut r = std::io::Cursor::new(&bytes);
            crate::models::llama::read_gguf(&mut r, &name).unwrap();
        }
    }

    #[test]
    #[cfg_attr(missing = "shared", ignore = "needs ../shared")]
    fn a_real_model_passes_and_its_truncation_is_named() {
        // SmolLM2-135M (Q4_1, a 49k-token vocabulary in its metadata).
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(
            "../../../shared/models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf",
        );
        let file = std::fs::File::open(&path).unwrap();
        check(&mut std::io::BufReader::new(file)).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let err = format!("{:#}", check_bytes(&bytes[..bytes.len() / 3]).unwrap_err());
        assert!(err.contains("(truncated or corrupt)"), "{err}");
    }

    #[test]
    fn fuzz_regressions_fail_cleanly() {
        for (name, bytes) in fuzz_regressions("gguf_header") {
            let r = crate::models::llama::read_gguf(&mut std::io::Cursor::new(&bytes), &name);
            assert!(r.is_err(), "{name}");
        }
    }
}
