//! Reading PyTorch `torch.save` checkpoints (zip + pickle) into candle tensors without executing pickle code.

use std::collections::BTreeMap;
use std::io::{Read, Seek};
use std::path::Path;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};

use super::pickle::{self, Value};

/// The only globals a state-dict pickle may name.
pub const ALLOWED: &[&str] = &[
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch.FloatStorage",
    "torch.BFloat16Storage",
    "torch.HalfStorage",
    "torch.DoubleStorage",
    "torch.IntStorage",
    "torch.LongStorage",
    "torch.ShortStorage",
    "torch.CharStorage",
    "torch.ByteStorage",
    "torch.BoolStorage",
];

/// A tensor's description in the pickle, before its bytes are read.
struct TensorRef {
    storage: String,
    dtype: DType,
    element_size: usize,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

fn storage_dtype(class: &str) -> anyhow::Result<(DType, usize)> {
    Ok(match class {
        "torch.FloatStorage" => (DType::F32, 4),
        "torch.BFloat16Storage" => (DType::BF16, 2),
        "torch.HalfStorage" => (DType::F16, 2),
        "torch.DoubleStorage" => (DType::F64, 8),
        "torch.LongStorage" => (DType::I64, 8),
        "torch.IntStorage" => (DType::U32, 4), // int32 read as its bits; only used for sizes, never math
        "torch.ByteStorage" | "torch.BoolStorage" => (DType::U8, 1),
        other => bail!("unsupported tensor storage `{other}`"),
    })
}

fn usizes(v: &Value, what: &str) -> anyhow::Result<Vec<usize>> {
    v.as_seq()
        .with_context(|| format!("{what} is not a tuple"))?
        .iter()
        .map(|x| {
            let i = x
                .as_int()
                .with_context(|| format!("{what} holds a non-integer"))?;
            usize::try_from(i).map_err(|_| anyhow::anyhow!("{what} holds a negative integer ({i})"))
        })
        .collect()
}

fn tensor_ref(value: &Value) -> anyhow::Result<TensorRef> {
    let (class, args) = match value {
        Value::Object { class, args, .. } => (class.as_str(), args),
        other => bail!("expected a tensor, found {}", short(other)),
    };
    if class == "torch._utils._rebuild_parameter" {
        return tensor_ref(args.first().context("empty parameter")?);
    }
    if class != "torch._utils._rebuild_tensor_v2" || args.len() < 4 {
        bail!("expected torch._utils._rebuild_tensor_v2(...), found {class}");
    }
    let Value::PersistentId(pid) = &args[0] else {
        bail!("tensor storage is not a persistent id")
    };
    let pid = pid.as_seq().context("storage id is not a tuple")?;
    let (storage_class, key) = match pid {
        [Value::Str(kind), Value::Global(class), key, _location, _numel] if kind == "storage" => {
            (class, key)
        }
        _ => bail!("unexpected storage id layout"),
    };
    let key = match key {
        Value::Str(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        _ => bail!("storage key is neither a string nor an integer"),
    };
    let (dtype, element_size) = storage_dtype(storage_class)?;
    let offset = args[1]
        .as_int()
        .and_then(|o| usize::try_from(o).ok())
        .context("bad storage offset")?;
    Ok(TensorRef {
        storage: key,
        dtype,
        element_size,
        offset,
        shape: usizes(&args[2], "size")?,
        stride: usizes(&args[3], "stride")?,
    })
}

fn short(v: &Value) -> String {
    let s = format!("{v:?}");
    if s.chars().count() > 80 {
        format!("{}…", s.chars().take(80).collect::<String>())
    } else {
        s
    }
}

/// Reads every tensor of a state-dict checkpoint (`{name: tensor}`) onto `device`, as stored.
pub fn read_state_dict(path: &Path, device: &Device) -> anyhow::Result<BTreeMap<String, Tensor>> {
    let (tensors, extras) = read_checkpoint(path, device)?;
    if let Some(name) = extras.keys().next() {
        bail!(
            "{}: entry `{name}` is not a tensor (expected a state dict of tensors)",
            path.display()
        );
    }
    Ok(tensors)
}

/// Reads a checkpoint dict: its tensors onto `device`, and its other entries (strings, numbers, nested
/// dicts, as OpenAI's SAE checkpoints carry) as plain pickle values.
pub fn read_checkpoint(
    path: &Path,
    device: &Device,
) -> anyhow::Result<(BTreeMap<String, Tensor>, BTreeMap<String, Value>)> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    read_checkpoint_from(
        std::io::BufReader::new(file),
        &path.display().to_string(),
        device,
    )
}

/// [`read_checkpoint`] over any seekable reader (a file, or bytes in a `Cursor`); `what` names the input
/// in errors. Declared sizes are checked against the archive's length before anything is allocated.
pub fn read_checkpoint_from<R: Read + Seek>(
    mut reader: R,
    what: &str,
    device: &Device,
) -> anyhow::Result<(BTreeMap<String, Tensor>, BTreeMap<String, Value>)> {
    let archive_len = reader
        .seek(std::io::SeekFrom::End(0))
        .with_context(|| format!("{what}: cannot seek"))?;
    reader.seek(std::io::SeekFrom::Start(0))?;
    let mut zip = zip::ZipArchive::new(reader)
        .with_context(|| format!("{what}: not a torch zip checkpoint (truncated or corrupt?)"))?;
    let pkl_name = (0..zip.len())
        .filter_map(|i| zip.name_for_index(i).map(str::to_string))
        .find(|n| n.ends_with("/data.pkl") || n == "data.pkl")
        .with_context(|| format!("{what}: no data.pkl inside"))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    // Entries are stored uncompressed: none can hold more bytes than the archive itself, and reads are
    // capped at that, so a header claiming a huge entry fails before any allocation.
    let entry_ok = |name: &str, size: u64| -> anyhow::Result<()> {
        if size > archive_len {
            bail!("{what}: entry `{name}` claims {size} bytes but the archive holds {archive_len}");
        }
        Ok(())
    };
    if let Ok(f) = zip.by_name(&format!("{prefix}byteorder")) {
        let mut order = String::new();
        f.take(64).read_to_string(&mut order)?;
        if order.trim() != "little" {
            bail!("{what}: big-endian checkpoints are not supported");
        }
    }
    let mut pkl = Vec::new();
    {
        let f = zip
            .by_name(&pkl_name)
            .with_context(|| format!("{what}: cannot open data.pkl"))?;
        entry_ok(&pkl_name, f.size())?;
        f.take(archive_len)
            .read_to_end(&mut pkl)
            .with_context(|| format!("{what}: cannot read data.pkl"))?;
    }
    let root = pickle::parse(&pkl, ALLOWED)
        .with_context(|| format!("{what}: unsafe or malformed pickle"))?;
    let Value::Dict(items) = root else {
        bail!("{what}: the pickle is not a state dict")
    };
    let mut out = BTreeMap::new();
    let mut extras = BTreeMap::new();
    for (k, v) in items {
        let name = k
            .as_str()
            .with_context(|| format!("{what}: a state-dict key is not a string"))?
            .to_string();
        if matches!(
            &v,
            Value::Str(_) | Value::Int(_) | Value::Float(_) | Value::Dict(_)
        ) {
            extras.insert(name, v);
            continue;
        }
        let r = tensor_ref(&v).with_context(|| format!("{what}: entry `{name}`"))?;
        let storage_name = format!("{prefix}data/{}", r.storage);
        let entry = zip
            .by_name(&storage_name)
            .with_context(|| format!("{what}: storage {} of `{name}` is missing", r.storage))?;
        let size = entry.size();
        entry_ok(&storage_name, size)?;
        let too_big = || anyhow::anyhow!("{what}: `{name}` has shape {:?}, too large", r.shape);
        // Nonzero dimensions must multiply without overflow in any order (candle computes strides from
        // them even for an empty tensor); then the element count is safe to compute.
        r.shape
            .iter()
            .filter(|&&d| d != 0)
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(too_big)?;
        let numel: usize = r.shape.iter().product();
        let mut contiguous = vec![1usize; r.shape.len()];
        for i in (0..r.shape.len().saturating_sub(1)).rev() {
            // Cannot overflow: the nonzero dimensions multiply without overflow (checked above).
            contiguous[i] = contiguous[i + 1].saturating_mul(r.shape[i + 1]);
        }
        if numel > 0 && r.stride != contiguous {
            bail!(
                "{what}: `{name}` is not contiguous (stride {:?}); re-save it with .contiguous()",
                r.stride
            );
        }
        // Check sizes before allocating: a file claiming a huge tensor fails here, not in the allocator.
        let start = r.offset.checked_mul(r.element_size).ok_or_else(too_big)?;
        let need = r
            .offset
            .checked_add(numel)
            .and_then(|n| n.checked_mul(r.element_size))
            .ok_or_else(too_big)?;
        if size < need as u64 {
            bail!("{what}: `{name}` needs {need} bytes but its storage holds {size}");
        }
        let mut bytes = vec![0u8; need];
        entry
            .take(need as u64)
            .read_exact(&mut bytes)
            .with_context(|| format!("{what}: cannot read storage of `{name}`"))?;
        let t = Tensor::from_raw_buffer(&bytes[start..], r.dtype, &r.shape, device)
            .with_context(|| format!("{what}: `{name}`"))?;
        out.insert(name, t);
    }
    Ok((out, extras))
}

#[cfg(test)]
mod tests {
    use std::io::{Cursor, Write};

    use super::*;

    /// A pickled `{"w": _rebuild_tensor_v2(storage "0", offset, shape, stride)}` (protocol 2).
    fn state_dict_pickle(
        value: Option<&[u8]>,
        offset: i64,
        shape: &[i64],
        stride: &[i64],
    ) -> Vec<u8> {
        let int = |p: &mut Vec<u8>, v: i64| {
            p.extend_from_slice(&[0x8a, 8]);
            p.extend_from_slice(&v.to_le_bytes());
        };
        let mut p = b"\x80\x02}(X\x01\x00\x00\x00w".to_vec();
        if let Some(v) = value {
            p.extend_from_slice(v);
        } else {
            p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n(");
            p.extend_from_slice(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu");
            int(&mut p, 6);
            p.extend_from_slice(b"tQ");
            int(&mut p, offset);
            for dims in [shape, stride] {
                p.push(b'(');
                for &d in dims {
                    int(&mut p, d);
                }
                p.push(b't');
            }
            p.extend_from_slice(b"\x89}tR");
        }
        p.extend_from_slice(b"u.");
        p
    }

    /// A stored (uncompressed) zip of `entries`, laid out as torch.save does.
    fn checkpoint(pkl: &[u8], storage: &[u8]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for (name, data) in [("archive/data.pkl", pkl), ("archive/data/0", storage)] {
            w.start_file(name, opts).unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    fn read(bytes: &[u8]) -> anyhow::Result<(BTreeMap<String, Tensor>, BTreeMap<String, Value>)> {
        read_checkpoint_from(Cursor::new(bytes), "t.pt", &Device::Cpu)
    }

    #[test]
    fn reads_a_small_checkpoint() {
        let floats: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let pt = checkpoint(&state_dict_pickle(None, 3, &[3], &[1]), &floats);
        let (t, _) = read(&pt).unwrap();
        assert_eq!(t["w"].to_vec1::<f32>().unwrap(), [3.0, 4.0, 5.0]);
        let seed = include_bytes!("../../../../fuzz/seeds/torch_pt/state-dict.pt");
        let (t, _) = read(seed).unwrap();
        assert_eq!(t["w"].dims(), [2, 3]);
        assert_eq!(t["row"].to_vec1::<f32>().unwrap(), [3.0, 4.0, 5.0]);
        for (name, bytes) in crate::models::gguf_check::fuzz_seeds("torch_pt") {
            read(&bytes).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        }
    }

    #[test]
    fn a_checkpoint_claiming_a_1tb_tensor_fails_fast() {
        let pt = checkpoint(
            &state_dict_pickle(None, 0, &[1 << 18, 1 << 20], &[1 << 20, 1]),
            &[0; 24],
        );
        let err = format!("{:#}", read(&pt).unwrap_err());
        assert!(
            err.contains("needs 1099511627776 bytes but its storage holds 24"),
            "{err}"
        );
    }

    #[test]
    fn overflowing_shapes_and_offsets_are_errors_not_panics() {
        let shapes: [(i64, &[i64], &[i64]); 3] = [
            (0, &[1 << 40, 1 << 40], &[1 << 40, 1]),
            (1 << 62, &[1], &[1]),
            (0, &[0, 1 << 40, 1 << 40], &[0, 0, 0]),
        ];
        for (offset, shape, stride) in shapes {
            let pt = checkpoint(&state_dict_pickle(None, offset, shape, stride), &[0; 24]);
            let err = format!("{:#}", read(&pt).unwrap_err());
            assert!(err.contains("too large"), "{shape:?}: {err}");
        }
    }

    #[test]
    fn negative_sizes_are_named() {
        let pt = checkpoint(&state_dict_pickle(None, 0, &[-1], &[1]), &[0; 24]);
        let err = format!("{:#}", read(&pt).unwrap_err());
        assert!(err.contains("size holds a negative integer (-1)"), "{err}");
    }

    #[test]
    fn non_ascii_values_in_messages_do_not_panic() {
        // A non-tensor entry whose debug text has a multi-byte character across byte 80: the message
        // used to cut the text at byte 80 and panicked.
        let mut v = b"(X\xc8\x00\x00\x00".to_vec();
        v.extend("é".repeat(100).as_bytes());
        v.push(b'l');
        let pt = checkpoint(&state_dict_pickle(Some(&v), 0, &[], &[]), &[]);
        let err = format!("{:#}", read(&pt).unwrap_err());
        assert!(err.contains("expected a tensor, found List"), "{err}");
    }

    #[test]
    fn fuzz_regressions_fail_cleanly() {
        for (name, bytes) in crate::models::gguf_check::fuzz_regressions("torch_pt") {
            assert!(read(&bytes).is_err(), "{name}");
        }
    }
}
