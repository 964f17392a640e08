//! NumPy `.npz` archives of plain numeric arrays (how Gemma Scope publishes its SAEs), read without trusting
//! them.
//!
//! Written by hand rather than with candle's `Tensor::read_npz` because that reader allocates whatever shape
//! a header declares before reading a byte, so a hostile header could exhaust memory; here every array's
//! declared size must equal the bytes its archive entry holds before anything is allocated. Only what
//! `np.savez` writes is accepted: stored (uncompressed) entries, little-endian f16/f32/f64 arrays in C order.
//! Object arrays (pickles) are refused: an untrusted file never runs code.

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};

/// Most arrays an archive may hold (Gemma Scope's hold 5).
const MAX_ARRAYS: usize = 64;

/// The arrays of an `.npz` file, by name (the entry name without `.npy`), as tensors of their own dtype.
pub fn read(path: &Path, device: &Device) -> anyhow::Result<Vec<(String, Tensor)>> {
    let what = path.display();
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {what}"))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| anyhow::anyhow!("{what}: not a .npz (zip) archive: {e}"))?;
    if zip.len() > MAX_ARRAYS {
        bail!(
            "{what}: {} entries; a .npz of SAE arrays has a handful",
            zip.len()
        );
    }
    let mut out = Vec::new();
    for i in 0..zip.len() {
        let mut entry = zip
            .by_index(i)
            .map_err(|e| anyhow::anyhow!("{what}: entry {i}: {e}"))?;
        let name = entry.name().to_string();
        let array = name.strip_suffix(".npy").unwrap_or(&name).to_string();
        if entry.compression() != zip::CompressionMethod::Stored {
            bail!("{what}: array `{array}` is compressed (np.savez_compressed); save it with np.savez");
        }
        let size = entry.size();
        let (dtype, shape, header_len) =
            header(&mut entry).with_context(|| format!("{what}: array `{array}`"))?;
        let count = shape
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
            .filter(|n| n.checked_mul(dtype.size_in_bytes() as u64) == size.checked_sub(header_len))
            .with_context(|| {
                format!(
                    "{what}: array `{array}` declares shape {shape:?} of {dtype:?}, which its {} bytes do \
                     not hold",
                    size.saturating_sub(header_len)
                )
            })?;
        let mut bytes = vec![0u8; (count as usize) * dtype.size_in_bytes()];
        entry
            .read_exact(&mut bytes)
            .with_context(|| format!("{what}: array `{array}` is truncated"))?;
        let tensor = match dtype {
            DType::F16 => Tensor::from_vec(
                bytes
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]))
                    .collect::<Vec<_>>(),
                shape,
                device,
            )?,
            DType::F64 => Tensor::from_vec(
                bytes
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
                    .collect::<Vec<_>>(),
                shape,
                device,
            )?,
            _ => Tensor::from_vec(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                    .collect::<Vec<_>>(),
                shape,
                device,
            )?,
        };
        out.push((array, tensor));
    }
    Ok(out)
}

/// Reads an `.npy` header: (dtype, shape, bytes the header took).
fn header(r: &mut impl Read) -> anyhow::Result<(DType, Vec<usize>, u64)> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).context("not an .npy array")?;
    if &magic[..6] != b"\x93NUMPY" {
        bail!("not an .npy array (bad magic)");
    }
    let (len, prefix) = match magic[6] {
        1 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b)?;
            (u16::from_le_bytes(b) as usize, 10)
        }
        2 | 3 => {
            let mut b = [0u8; 4];
            r.read_exact(&mut b)?;
            (u32::from_le_bytes(b) as usize, 12)
        }
        v => bail!(".npy format version {v} is not supported"),
    };
    if len > 1 << 16 {
        bail!(".npy header of {len} bytes is implausibly long");
    }
    let mut text = vec![0u8; len];
    r.read_exact(&mut text)?;
    let text = String::from_utf8(text).context(".npy header is not text")?;
    // The header is a Python dict literal: {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }
    let field = |key: &str| -> anyhow::Result<&str> {
        let at = text
            .find(&format!("'{key}':"))
            .with_context(|| format!(".npy header has no `{key}`"))?;
        Ok(text[at + key.len() + 3..].trim_start())
    };
    let descr = field("descr")?;
    let dtype = if descr.starts_with("'<f4'") {
        DType::F32
    } else if descr.starts_with("'<f2'") {
        DType::F16
    } else if descr.starts_with("'<f8'") {
        DType::F64
    } else {
        let shown: String = descr.chars().take(12).collect();
        bail!("dtype {shown}… is not a little-endian float array (<f2, <f4, <f8); object arrays are refused")
    };
    if !field("fortran_order")?.starts_with("False") {
        bail!("Fortran-order arrays are not supported");
    }
    let shape = field("shape")?;
    let inner = shape
        .strip_prefix('(')
        .and_then(|s| s.split_once(')'))
        .context(".npy `shape` is not a tuple")?
        .0;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .context(".npy `shape` holds a non-integer")
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((dtype, shape, (prefix + len) as u64))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// An `.npy` v1 array: header dict `dict`, then `data`.
    fn npy(dict: &str, data: &[u8]) -> Vec<u8> {
        let mut header = dict.to_string();
        // numpy pads the header with spaces to a multiple of 64 bytes, ending in a newline.
        while !(10 + header.len() + 1).is_multiple_of(64) {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend((header.len() as u16).to_le_bytes());
        out.extend(header.as_bytes());
        out.extend(data);
        out
    }

    /// A stored zip of (name, bytes) entries, as `np.savez` writes it.
    fn npz(entries: &[(&str, Vec<u8>)]) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut w = zip::ZipWriter::new(file.reopen().unwrap());
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for (name, data) in entries {
            w.start_file(*name, opts).unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap();
        file
    }

    fn floats(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn reads_float_arrays_by_name() {
        let f = npz(&[
            (
                "a.npy",
                npy(
                    "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
                    &floats(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
                ),
            ),
            (
                "b.npy",
                npy(
                    "{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }",
                    &2.5f64.to_le_bytes(),
                ),
            ),
        ]);
        let arrays = read(f.path(), &Device::Cpu).unwrap();
        assert_eq!(arrays[0].0, "a");
        assert_eq!(
            arrays[0].1.to_vec2::<f32>().unwrap(),
            [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
        );
        assert_eq!(
            (arrays[1].0.as_str(), arrays[1].1.to_vec1::<f64>().unwrap()),
            ("b", vec![2.5])
        );
    }

    #[test]
    fn hostile_headers_fail_before_anything_is_allocated() {
        let cases = [
            // 2^40 floats declared, 8 bytes present: refused before allocating 4 TiB.
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776,), }",
                "declares shape [1099511627776]",
            ),
            // A product of dimensions that overflows u64.
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, 16), }",
                "which its 8 bytes do not hold",
            ),
            (
                "{'descr': '|O', 'fortran_order': False, 'shape': (2,), }",
                "object arrays are refused",
            ),
            (
                "{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }",
                "not a little-endian float array",
            ),
            (
                "{'descr': '<f4', 'fortran_order': True, 'shape': (2,), }",
                "Fortran-order",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (2, x), }",
                "non-integer",
            ),
        ];
        for (dict, want) in cases {
            let f = npz(&[("W_enc.npy", npy(dict, &floats(&[1.0, 2.0])))]);
            let e = format!("{:#}", read(f.path(), &Device::Cpu).unwrap_err());
            assert!(
                e.contains("array `W_enc`") && e.contains(want),
                "{dict}: {e}"
            );
        }
    }
}
