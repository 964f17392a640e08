//! `saeflow bench`: throughput measurements behind BENCHMARKS.md.

use std::path::Path;

/// Peak resident memory of this process in MiB (Linux `VmHWM`).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
}

pub fn forward(
    path: &Path,
    batch: usize,
    seq: usize,
    layer: Option<usize>,
    iters: usize,
    device: saeflow_core::models::spec::DeviceSpec,
    dtype: saeflow_core::models::WeightFormat,
) -> anyhow::Result<()> {
    use saeflow_core::models::transformer::{Hook, HookPoint, Hooks};
    let device = saeflow_core::models::device(device)?;
    let model = saeflow_core::models::load_with(path, None, dtype, &device)?;
    let vocab = model.transformer.config.vocab_size as u64;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let ids: Vec<u32> = (0..batch * seq)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % vocab) as u32
        })
        .collect();
    let input = candle_core::Tensor::from_vec(ids, (batch, seq), &device)?;
    let hooks = match layer {
        Some(l) => Hooks::capture([Hook {
            layer: l,
            point: HookPoint::ResidPost,
        }]),
        None => Hooks::logits(),
    };
    model.transformer.forward(&input, &hooks, None)?; // warm-up
    let started = std::time::Instant::now();
    for _ in 0..iters {
        let out = model.transformer.forward(&input, &hooks, None)?;
        // Make sure the work is done (lazy devices): read one value back.
        let t = out
            .logits
            .or_else(|| out.activations.into_values().next())
            .expect("an output");
        t.flatten_all()?
            .get(0)?
            .to_dtype(candle_core::DType::F32)?
            .to_scalar::<f32>()?;
    }
    let secs = started.elapsed().as_secs_f64();
    let tokens = (batch * seq * iters) as f64;
    let depth = layer.map_or_else(
        || "full depth + logits".to_string(),
        |l| format!("up to blocks.{l}"),
    );
    let config = &model.transformer.config;
    let layers = layer.map_or(config.n_layer, |l| l + 1);
    let linear_flops = 2.0 * linear_macs_per_token(config, layers, layer.is_none()) * tokens;
    println!(
        "{}: batch {batch} x {seq}, {depth}: {:.0} tokens/s ({:.3} s per pass), peak RSS {:.0} MiB, {} threads, \
         {:.1} GFLOP/s on the linear layers' FLOPs",
        path.display(),
        tokens / secs,
        secs / iters as f64,
        peak_rss_mib().unwrap_or(f64::NAN),
        rayon::current_num_threads(),
        linear_flops / secs / 1e9,
    );
    Ok(())
}

/// Multiply-adds per token in the linear layers of `layers` blocks (q, k, v, o and the MLP), plus the
/// output head with `logits`: the bulk of a forward's arithmetic, so FLOPs / time set against the CPU's
/// ceiling (`bench/peak.sh`) bound what any implementation can gain (attention's own products, ~2% at
/// 128 tokens, are left out).
fn linear_macs_per_token(
    c: &saeflow_core::models::transformer::Config,
    layers: usize,
    logits: bool,
) -> f64 {
    use saeflow_core::models::transformer::Mlp;
    let (d, q, kv) = (c.d_model, c.n_head * c.head_dim, c.n_kv_head * c.head_dim);
    let mlp_matrices = match c.mlp {
        Mlp::SwiGlu | Mlp::GeGlu => 3,
        Mlp::ReluSquared | Mlp::Gelu => 2,
    };
    let per_layer = d * (q + 2 * kv) + q * d + mlp_matrices * d * c.d_mlp;
    (layers * per_layer + if logits { d * c.vocab_size } else { 0 }) as f64
}

/// The linear layers of SmolLM2-135M's forward over `tokens` rows, as (name, in, out): q/k/v stacked,
/// attention output, gate/up stacked, down, and the 49,152-way output head.
pub const SMOLLM2_LINEARS: [(&str, usize, usize); 5] = [
    ("qkv", 576, 960),
    ("o", 576, 576),
    ("gate_up", 576, 3072),
    ("down", 1536, 576),
    ("lm_head", 576, 49152),
];

/// `y = x·Wᵀ` on SmolLM2's linear shapes: GFLOP/s per shape, best of `iters` after a warm-up, on candle's
/// matmul (the `gemm` crate), on every `kernels::gemm` kernel this CPU has with the weight packed per call
/// (the trainer's case), and with the weight packed once as the model's layers hold it (`packed`: AVX-512
/// f32 — the f32 forward's — and AMX bf16, the bf16 forward's, where the CPU has them). `bench/gemm_torch.py`
/// times PyTorch on the same shapes. `shapes` names the shapes to time (all if empty; the CLI admits only
/// [`SMOLLM2_LINEARS`]' names).
pub fn gemm(tokens: usize, iters: usize, shapes: &[String]) -> anyhow::Result<()> {
    use candle_core::{Device, Tensor};
    use saeflow_core::kernels::gemm::{matmul_nt_bias_with, Kernel};
    use saeflow_core::kernels::{amx, gemm};
    let device = Device::Cpu;
    let threads = rayon::current_num_threads();
    let best_of = |run: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<f64> {
        run()?; // warm-up
        let mut best = f64::INFINITY;
        for _ in 0..iters {
            let started = std::time::Instant::now();
            run()?;
            best = best.min(started.elapsed().as_secs_f64());
        }
        Ok(best)
    };
    let chosen = SMOLLM2_LINEARS
        .iter()
        .filter(|(name, ..)| shapes.is_empty() || shapes.iter().any(|s| s == name));
    for &(name, inner, out) in chosen {
        let x = Tensor::randn(0f32, 1.0, (tokens, inner), &device)?;
        let w = Tensor::randn(0f32, 0.05, (out, inner), &device)?;
        let wt = w.t()?;
        let flops = 2.0 * (tokens * inner * out) as f64;
        let report = |what: &str, best: f64| {
            println!(
                "{what:>25} gemm {name:>8} [{tokens}x{inner}]·[{inner}x{out}]: {:.1} GFLOP/s ({:.2} ms), {threads} threads",
                flops / best / 1e9,
                best * 1e3,
            )
        };
        report(
            "candle",
            best_of(&mut || {
                let y = x.matmul(&wt)?;
                y.get(0)?.get(0)?.to_scalar::<f32>()?;
                Ok(())
            })?,
        );
        let (a, b) = (
            x.flatten_all()?.to_vec1::<f32>()?,
            w.flatten_all()?.to_vec1::<f32>()?,
        );
        let mut y = vec![0f32; tokens * out];
        for kernel in Kernel::ALL
            .into_iter()
            .filter(|k| k.available() && *k != Kernel::Portable)
        {
            let best = best_of(&mut || {
                matmul_nt_bias_with(kernel, &a, &b, None, &mut y, tokens, out, inner);
                Ok(())
            })?;
            report(&format!("kernels {kernel:?}"), best);
        }
        if let Some(kernel) = gemm::PackedB::kernel() {
            let packed = gemm::PackedB::new(&b, out, inner);
            let best = best_of(&mut || {
                gemm::multiply(&a, &packed, None, &mut y);
                Ok(())
            })?;
            report(&format!("kernels {kernel:?} packed"), best);
        }
        if amx::available() {
            let packed = amx::PackedB::new(&b, out, inner);
            let best = best_of(&mut || {
                amx::multiply(&a, &packed, None, &mut y);
                Ok(())
            })?;
            report("kernels Amx packed", best);
        }
    }
    Ok(())
}

/// Reads an activation store in store order and shuffled, `passes` times each, and prints rows/s and GB/s.
pub fn reader(
    store: Option<&Path>,
    hook: Option<&str>,
    d_model: usize,
    rows: usize,
    dtype: &str,
    batch: usize,
    passes: usize,
) -> anyhow::Result<()> {
    use saeflow_core::data::activations::{ActivationStore, ReadOptions};
    let synthetic;
    let dir = match store {
        Some(dir) => dir.to_path_buf(),
        None => {
            let dtype: saeflow_core::data::activations::ActDtype =
                serde_json::from_value(serde_json::json!(dtype))
                    .map_err(|_| anyhow::anyhow!("--dtype must be f32, f16 or bf16"))?;
            synthetic = SyntheticStore::write(d_model, rows, dtype)?;
            synthetic.0.clone()
        }
    };
    let info = saeflow_core::data::activations::CaptureInfo::read(&dir)?;
    let hook = hook.unwrap_or(&info.hooks[0]).to_string();
    let store = ActivationStore::open(&dir, &hook)?;
    let bytes = store.rows() as f64 * (info.d_model * info.dtype.size()) as f64;
    println!(
        "{}: {hook}, {} rows x {} {}, {:.2} GB, batches of {batch}, {} threads",
        dir.display(),
        store.rows(),
        info.d_model,
        info.dtype.name(),
        bytes / 1e9,
        rayon::current_num_threads()
    );
    for (mode, shuffle) in [("store order", None), ("shuffled", Some(0u64))] {
        let mut best = f64::INFINITY;
        for pass in 0..passes {
            let options = ReadOptions {
                batch_size: batch,
                shuffle: shuffle.map(|s| s + pass as u64),
                ..ReadOptions::default()
            };
            let started = std::time::Instant::now();
            let mut n = 0usize;
            for b in store.batches(&options, &candle_core::Device::Cpu)? {
                n += b?.rows.len();
            }
            anyhow::ensure!(
                n as u64 == store.rows(),
                "read {n} rows of {}",
                store.rows()
            );
            best = best.min(started.elapsed().as_secs_f64());
        }
        println!(
            "  {mode:<12} {:>12.0} tokens/s  {:>6.2} GB/s (stored bytes; best of {passes})",
            store.rows() as f64 / best,
            bytes / best / 1e9
        );
    }
    println!("  peak RSS {:.0} MiB", peak_rss_mib().unwrap_or(f64::NAN));
    Ok(())
}

/// A synthetic activation store in a temporary directory, removed on drop.
struct SyntheticStore(std::path::PathBuf);

impl SyntheticStore {
    fn write(
        d_model: usize,
        rows: usize,
        dtype: saeflow_core::data::activations::ActDtype,
    ) -> anyhow::Result<Self> {
        use saeflow_core::data::activations::{
            act_file_name, write_act_shard, CaptureInfo, ShardInfo,
        };
        let dir = std::env::temp_dir().join(format!("saeflow-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let store = SyntheticStore(dir.clone());
        let hook = "blocks.0.hook_resid_post";
        let shard_rows = 1 << 16;
        let mut shards = Vec::new();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for (i, first) in (0..rows).step_by(shard_rows).enumerate() {
            let n = shard_rows.min(rows - first);
            let values: Vec<f32> = (0..n * d_model)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                })
                .collect();
            let t = candle_core::Tensor::from_vec(values, n * d_model, &candle_core::Device::Cpu)?
                .to_dtype(dtype.dtype())?;
            let bytes = match dtype {
                saeflow_core::data::activations::ActDtype::F32 => {
                    bytemuck::cast_slice(&t.to_vec1::<f32>()?).to_vec()
                }
                saeflow_core::data::activations::ActDtype::F16 => {
                    bytemuck::cast_slice(&t.to_vec1::<half::f16>()?).to_vec()
                }
                saeflow_core::data::activations::ActDtype::Bf16 => {
                    bytemuck::cast_slice(&t.to_vec1::<half::bf16>()?).to_vec()
                }
            };
            write_act_shard(&dir.join(act_file_name(hook, i)), bytes, d_model, dtype)?;
            shards.push(ShardInfo {
                first_row: first as u64,
                rows: n as u64,
            });
        }
        let info = CaptureInfo {
            format: saeflow_core::data::activations::FORMAT_VERSION,
            model: "synthetic".into(),
            model_key: String::new(),
            model_source: String::new(),
            hooks: vec![hook.into()],
            d_model,
            dtype,
            tokenizer: serde_json::Value::Null,
            context: 0,
            settings: serde_json::Value::Null,
            tokens: rows as u64,
            documents: 0,
            truncated_documents: 0,
            sequences: 0,
            splits: Default::default(),
            labels: Default::default(),
            mean_norm: Default::default(),
            shards,
            sinks: Default::default(),
        };
        std::fs::write(dir.join("capture.json"), serde_json::to_string(&info)?)?;
        Ok(store)
    }
}

impl Drop for SyntheticStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The training benches' configuration: TopK with AuxK, sparsify's learning rate, no schedule, no
/// checkpoints, `steps` + 3 warm-up steps.
fn bench_config(
    d_sae: usize,
    k: usize,
    batch: usize,
    steps: usize,
    engine: saeflow_core::sae::trainer::Engine,
) -> saeflow_core::sae::trainer::TrainConfig {
    saeflow_core::sae::trainer::TrainConfig {
        d_sae,
        sparsity: saeflow_core::sae::step::Sparsity::TopK(k),
        penalty_warmup_steps: 0,
        engine,
        lr: (2e-4 / (d_sae as f64 / 16384.0).sqrt()) as f32,
        warmup_steps: 0,
        decay_fraction: 0.0,
        batch_size: batch,
        steps: steps as u64 + 3,
        aux_coef: 1.0 / 32.0,
        dead_tokens: 10_000_000,
        grad_clip: 1.0,
        seed: 0,
        adam: Default::default(),
        log_every: 1,
        checkpoint_every: u64::MAX,
        train_splits: None,
        validation: None,
        scale: 1.0,
        buffer_rows: batch,
    }
}

/// TopK SAE training steps on standard-normal inputs (the shapes of `../shared/bench/sae_train_reference.py`):
/// prints tokens/s, ms per step, the final batch FVU and GFLOP/s on the work a TopK step needs (dense
/// encoder product + k-sparse decoder, backward and AuxK-free update).
pub fn train(
    d_in: usize,
    expansion: usize,
    k: usize,
    batch: usize,
    steps: usize,
    precision: saeflow_core::kernels::gemm::Precision,
) -> anyhow::Result<()> {
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};
    use saeflow_core::kernels::gemm::matmul_nt_bias_in;
    use saeflow_core::kernels::gemm::{Kernel, Precision};
    use saeflow_core::sae::step::Grads;
    use saeflow_core::sae::trainer::State;
    let d_sae = d_in * expansion;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let pool: Vec<Vec<f32>> = (0..8)
        .map(|_| {
            (0..batch * d_in)
                .map(|_| StandardNormal.sample(&mut rng))
                .collect()
        })
        .collect();
    let cfg = bench_config(
        d_sae,
        k,
        batch,
        steps,
        saeflow_core::sae::trainer::Engine::Sparse(precision),
    );
    // The encoder product alone (the step's only dense work), for the GFLOP/s it reaches on its own.
    let mut pre = vec![0f32; batch * d_sae];
    let w: Vec<f32> = (0..d_sae * d_in)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    for precision in [Precision::F32, Precision::Bf16, Precision::Int16] {
        if precision != Precision::F32 && !Kernel::best(precision).rounds() {
            continue;
        }
        let started = std::time::Instant::now();
        for _ in 0..5 {
            matmul_nt_bias_in(precision, &pool[0], &w, None, &mut pre, batch, d_sae, d_in);
        }
        let secs = started.elapsed().as_secs_f64() / 5.0;
        println!(
            "encoder product {batch} × {d_in} · ({d_sae} × {d_in})ᵀ, {precision:?}: {:.1} ms, {:.1} GFLOP/s",
            secs * 1e3,
            2.0 * (batch * d_in * d_sae) as f64 / secs / 1e9
        );
    }
    drop(pre);
    let mut state = State::init(&cfg, d_in, &pool[0]);
    let mut grads = Grads::default();
    for i in 0..3 {
        state.step(&cfg, &pool[i % 8], &mut grads)?; // warm-up
    }
    let started = std::time::Instant::now();
    let mut last = Default::default();
    for i in 0..steps {
        last = state.step(&cfg, &pool[(i + 3) % 8], &mut grads)?;
    }
    let saeflow_core::sae::step::StepStats {
        fvu,
        exact_per_token,
        ..
    } = last;
    let secs = started.elapsed().as_secs_f64();
    // Needed work per token: encoder 2·d·m, decoder forward + both sparse weight gradients 3·2·k·d,
    // the encoder's sparse gradient 2·k·d.
    let flop =
        batch as f64 * (2.0 * (d_in * d_sae) as f64 + 8.0 * (k * d_in) as f64) * steps as f64;
    println!(
        "saeflow topk, {} encoder: d_in {d_in}, d_sae {d_sae}, k {k}, batch {batch}, {} threads: {:.0} tokens/s, \
         {:.1} ms/step, {:.1} GFLOP/s on the needed work, FVU {fvu:.4}",
        match Kernel::best(precision) {
            kernel if kernel.rounds() => {
                format!("{}-ranked ({})", kernel.precision().name(), kernel.name())
            }
            _ => "f32".into(),
        },
        rayon::current_num_threads(),
        (batch * steps) as f64 / secs,
        1000.0 * secs / steps as f64,
        flop / secs / 1e9
    );
    if Kernel::best(precision).rounds() {
        println!(
            "{}-ranked TopK: {exact_per_token:.1} candidates per token recomputed in f32 (k = {k})",
            precision.name()
        );
    }
    Ok(())
}

/// [`train`] on the device-resident engine (`Engine::Dense`) on `device`: the whole state on the device, a
/// pool of 8 standard-normal batches uploaded once (as `bench/sparsify_gpu.py` does), so the time is the
/// engine's. Prints tokens/s, ms per step, the final batch FVU, the bytes each step moved, and GFLOP/s on the
/// needed work (as [`train`] counts it) and on the work the dense engine does (every product dense).
pub fn train_on_device(
    d_in: usize,
    expansion: usize,
    k: usize,
    batch: usize,
    steps: usize,
    device: saeflow_core::models::spec::DeviceSpec,
) -> anyhow::Result<()> {
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};
    use saeflow_core::sae::trainer::{upload_batch, Engine, Resident, State};
    let device = saeflow_core::models::device(device)?;
    let d_sae = d_in * expansion;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let host: Vec<Vec<f32>> = (0..8)
        .map(|_| {
            (0..batch * d_in)
                .map(|_| StandardNormal.sample(&mut rng))
                .collect()
        })
        .collect();
    let cfg = bench_config(d_sae, k, batch, steps, Engine::Dense(device.clone()));
    let state = State::init(&cfg, d_in, &host[0]);
    let mut resident = Resident::new(&state, &cfg, &device, None)?;
    let pool = host
        .iter()
        .map(|x| {
            let variance = saeflow_core::sae::step::total_variance(x, d_in);
            Ok((upload_batch(x, d_in, &device)?.0, variance))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    for t in 1..=3 {
        let (x, variance) = &pool[t as usize % 8];
        resident.step(&cfg, t, x, *variance)?; // warm-up (kernels compiled and loaded)
    }
    let before = resident.step_traffic;
    let started = std::time::Instant::now();
    let mut last = Default::default();
    for i in 0..steps {
        let (x, variance) = &pool[(i + 3) % 8];
        // Each step ends by reading its scalars back, so the device has finished it.
        last = resident.step(&cfg, i as u64 + 4, x, *variance)?.0;
    }
    let secs = started.elapsed().as_secs_f64();
    let out_per_step = (resident.step_traffic.to_host - before.to_host) / steps as u64;
    let needed =
        batch as f64 * (2.0 * (d_in * d_sae) as f64 + 8.0 * (k * d_in) as f64) * steps as f64;
    // The dense engine: encoder, decoder, AuxK decoder, their two backward products each, encoder backward.
    let dense = batch as f64 * 2.0 * (d_in * d_sae) as f64 * 8.0 * steps as f64;
    println!(
        "saeflow topk (device-resident, {device:?}): d_in {d_in}, d_sae {d_sae}, k {k}, batch {batch}: {:.0} tokens/s, \
         {:.2} ms/step, FVU {:.4}, {:.1} GFLOP/s on the needed work ({:.1} on the dense work done), \
         {out_per_step} B out per step + the batch in ({} B)",
        (batch * steps) as f64 / secs,
        1000.0 * secs / steps as f64,
        last.fvu,
        needed / secs / 1e9,
        dense / secs / 1e9,
        batch * d_in * 4,
    );
    Ok(())
}
