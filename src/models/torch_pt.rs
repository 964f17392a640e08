//! Reading PyTorch `torch.save` checkpoints (zip + pickle) into candle tensors without executing pickle code.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};

use super::pickle::{self, Value};

/// The only globals a state-dict pickle may name.
const ALLOWED: &[&str] = &[
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
            x.as_int()
                .and_then(|i| usize::try_from(i).ok())
                .with_context(|| format!("{what} holds a non-integer"))
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
    if s.len() > 80 {
        format!("{}…", &s[..80])
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
    let mut zip = zip::ZipArchive::new(file).with_context(|| {
        format!(
            "{}: not a torch zip checkpoint (truncated or corrupt?)",
            path.display()
        )
    })?;
    let pkl_name = (0..zip.len())
        .filter_map(|i| zip.name_for_index(i).map(str::to_string))
        .find(|n| n.ends_with("/data.pkl") || n == "data.pkl")
        .with_context(|| format!("{}: no data.pkl inside", path.display()))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    if let Ok(mut f) = zip.by_name(&format!("{prefix}byteorder")) {
        let mut order = String::new();
        f.read_to_string(&mut order)?;
        if order.trim() != "little" {
            bail!(
                "{}: big-endian checkpoints are not supported",
                path.display()
            );
        }
    }
    let mut pkl = Vec::new();
    zip.by_name(&pkl_name)?
        .read_to_end(&mut pkl)
        .with_context(|| format!("{}: cannot read data.pkl", path.display()))?;
    let root = pickle::parse(&pkl, ALLOWED)
        .with_context(|| format!("{}: unsafe or malformed pickle", path.display()))?;
    let Value::Dict(items) = root else {
        bail!("{}: the pickle is not a state dict", path.display())
    };
    let mut out = BTreeMap::new();
    let mut extras = BTreeMap::new();
    for (k, v) in items {
        let name = k
            .as_str()
            .with_context(|| format!("{}: a state-dict key is not a string", path.display()))?
            .to_string();
        if matches!(
            &v,
            Value::Str(_) | Value::Int(_) | Value::Float(_) | Value::Dict(_)
        ) {
            extras.insert(name, v);
            continue;
        }
        let r = tensor_ref(&v).with_context(|| format!("{}: entry `{name}`", path.display()))?;
        let mut entry = zip
            .by_name(&format!("{prefix}data/{}", r.storage))
            .with_context(|| {
                format!(
                    "{}: storage {} of `{name}` is missing",
                    path.display(),
                    r.storage
                )
            })?;
        let numel: usize = r.shape.iter().product();
        let contiguous: Vec<usize> = {
            let mut s = vec![1; r.shape.len()];
            for i in (0..r.shape.len().saturating_sub(1)).rev() {
                s[i] = s[i + 1] * r.shape[i + 1];
            }
            s
        };
        if numel > 0 && r.stride != contiguous {
            bail!(
                "{}: `{name}` is not contiguous (stride {:?}); re-save it with .contiguous()",
                path.display(),
                r.stride
            );
        }
        // Check sizes before allocating: a file claiming a huge tensor fails here, not in the allocator.
        let need = (r.offset + numel)
            .checked_mul(r.element_size)
            .context("tensor size overflows")?;
        if (entry.size() as usize) < need {
            bail!(
                "{}: `{name}` needs {need} bytes but its storage holds {}",
                path.display(),
                entry.size()
            );
        }
        let mut bytes = vec![0u8; entry.size() as usize];
        entry
            .read_exact(&mut bytes)
            .with_context(|| format!("{}: cannot read storage of `{name}`", path.display()))?;
        let data = &bytes[r.offset * r.element_size..need];
        let t = Tensor::from_raw_buffer(data, r.dtype, &r.shape, device)?;
        out.insert(name, t);
    }
    Ok((out, extras))
}
