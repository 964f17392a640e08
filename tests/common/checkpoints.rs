//! Small model checkpoints written by hand, in the formats the loaders read.

use std::io::Write;
use std::path::Path;

use candle_core::{Device, Tensor};

/// Writes a torch-format zip checkpoint: a protocol-2 state-dict pickle and one f32 storage per tensor.
pub fn write_torch_checkpoint(path: &Path, tensors: &[(String, Tensor)], dtype_storage: &str) {
    write_torch_checkpoint_with(path, tensors, dtype_storage, &[])
}

/// [`write_torch_checkpoint`] with extra protocol-2 pickle (key, value) pairs appended to the dict, for
/// checkpoints that carry non-tensor entries.
pub fn write_torch_checkpoint_with(
    path: &Path,
    tensors: &[(String, Tensor)],
    dtype_storage: &str,
    extra_items: &[u8],
) {
    let mut pkl: Vec<u8> = vec![0x80, 2, b'}', b'('];
    let unicode = |p: &mut Vec<u8>, s: &str| {
        p.push(b'X');
        p.extend((s.len() as u32).to_le_bytes());
        p.extend(s.as_bytes());
    };
    let int = |p: &mut Vec<u8>, v: usize| {
        p.push(b'J');
        p.extend((v as i32).to_le_bytes());
    };
    for (i, (name, t)) in tensors.iter().enumerate() {
        unicode(&mut pkl, name);
        pkl.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        pkl.push(b'(');
        unicode(&mut pkl, "storage");
        pkl.extend(format!("ctorch\n{dtype_storage}\n").as_bytes());
        unicode(&mut pkl, &i.to_string());
        unicode(&mut pkl, "cpu");
        int(&mut pkl, t.elem_count());
        pkl.extend(b"tQ");
        int(&mut pkl, 0);
        pkl.push(b'(');
        for d in t.dims() {
            int(&mut pkl, *d);
        }
        pkl.extend(b"t(");
        let mut stride = 1;
        let mut strides = vec![0; t.dims().len()];
        for (j, d) in t.dims().iter().enumerate().rev() {
            strides[j] = stride;
            stride *= d;
        }
        for s in strides {
            int(&mut pkl, s);
        }
        pkl.extend(b"t\x89ccollections\nOrderedDict\n)RtR");
    }
    pkl.extend(extra_items);
    pkl.extend(b"u.");
    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", opts).unwrap();
    zip.write_all(&pkl).unwrap();
    zip.start_file("archive/byteorder", opts).unwrap();
    zip.write_all(b"little").unwrap();
    for (i, (_, t)) in tensors.iter().enumerate() {
        zip.start_file(format!("archive/data/{i}"), opts).unwrap();
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        for x in v {
            zip.write_all(&x.to_le_bytes()).unwrap();
        }
    }
    zip.finish().unwrap();
}

pub fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut s = seed;
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// A nanochat checkpoint directory with other dimensions; `kv_heads` key/value heads (the k/v weights of
/// `kv_weights` are tiled to that many heads), `_orig_mod.`-prefixed keys, plus `extra` keys.
pub fn make_nanochat(dir: &Path, kv_heads: usize, extra: &[&str]) {
    make_nanochat_with(dir, kv_heads, extra, None)
}

/// [`make_nanochat`] whose layer `overflow_layer` has MLP input weights scaled by 1e20: every weight is
/// finite, but ReLU² overflows f32, so that layer's output is infinite or NaN at every position.
pub fn make_nanochat_with(
    dir: &Path,
    kv_heads: usize,
    extra: &[&str],
    overflow_layer: Option<usize>,
) {
    let (d, heads, head_dim, layers, vocab) = (96, 3, 32, 2, 4096);
    std::fs::create_dir_all(dir).unwrap();
    let wte = random(&[vocab, d], 1);
    let mut tensors = vec![("_orig_mod.transformer.wte.weight".to_string(), wte)];
    for l in 0..layers {
        let p = |s: &str| format!("_orig_mod.transformer.h.{l}.{s}");
        let kv = |seed| {
            let one = random(&[head_dim, d], seed);
            Tensor::cat(&vec![one; kv_heads], 0).unwrap() // every kv head identical: MQA and MHA must agree
        };
        tensors.push((
            p("attn.c_q.weight"),
            random(&[heads * head_dim, d], 10 + l as u64),
        ));
        tensors.push((p("attn.c_k.weight"), kv(20 + l as u64)));
        tensors.push((p("attn.c_v.weight"), kv(30 + l as u64)));
        tensors.push((
            p("attn.c_proj.weight"),
            random(&[d, heads * head_dim], 40 + l as u64),
        ));
        let mut c_fc = random(&[4 * d, d], 50 + l as u64);
        if overflow_layer == Some(l) {
            c_fc = (c_fc * 1e20).unwrap();
        }
        tensors.push((p("mlp.c_fc.weight"), c_fc));
        tensors.push((p("mlp.c_proj.weight"), random(&[d, 4 * d], 60 + l as u64)));
    }
    tensors.push((
        "_orig_mod.lm_head.weight".to_string(),
        random(&[vocab, d], 2),
    ));
    for e in extra {
        tensors.push((e.to_string(), random(&[4, 4], 3)));
    }
    write_torch_checkpoint(&dir.join("model_000010.pt"), &tensors, "FloatStorage");
    let meta = serde_json::json!({"step": 10, "model_config": {"sequence_len": 64, "vocab_size": vocab, "n_layer": layers, "n_head": heads, "n_kv_head": kv_heads, "n_embd": d}});
    std::fs::write(dir.join("meta_000010.json"), meta.to_string()).unwrap();
    std::fs::copy(
        super::nanochat_d4().join("tokenizer/tokenizer.pkl"),
        dir.join("tokenizer.pkl"),
    )
    .unwrap();
}
