//! The device-resident engine (`Engine::Dense`), on the CPU device: it trains every architecture to the
//! sparse CPU engine's weights, moves only the batch and a few scalars per step, and trains a group on one
//! pass with each member's bits as alone. The same code runs on CUDA, where `bench/gpu.sh` checks it.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use candle_core::Device;
use saeflow_core::data::activations::ActivationStore;
use saeflow_core::kernels::gemm::Precision;
use saeflow_core::sae::step::{Sparsity, Weights};
use saeflow_core::sae::trainer::{
    train, train_group, Callbacks, Engine, Run, State, Traffic, TrainConfig,
};

use common::{
    architectures, relative, sparse_rows, train_config as config, uniform, write_capture,
};

const D: usize = 16;
const HOOK: &str = "blocks.0.hook_resid_post";
const BATCH: usize = common::TRAIN_BATCH;

/// A capture of 4096 rows, each a sum of 3 of 48 hidden atoms.
fn capture(dir: &std::path::Path) -> ActivationStore {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let atoms: Vec<f32> = (0..48 * D).map(|_| uniform(&mut state)).collect();
    write_capture(dir, HOOK, D, &sparse_rows(&atoms, D, 3, 4096, &mut state));
    ActivationStore::open(dir, HOOK).unwrap()
}

/// Records what a run reports.
#[derive(Default)]
struct Record {
    traffic: Mutex<Vec<(Traffic, Traffic)>>,
}

impl Callbacks for Record {
    fn traffic(&self, steps: Traffic, state_copies: Traffic) {
        self.traffic.lock().unwrap().push((steps, state_copies));
    }
}

/// Which latents each row of `x` keeps, as sorted index lists.
fn selected(w: &Weights, x: &[f32], sparsity: Sparsity) -> Vec<Vec<u32>> {
    let n = x.len() / w.d_in;
    let (_, pre) = w.pre_activations(x, n);
    let sel = w.select(&pre, sparsity);
    (0..n)
        .map(|t| {
            let mut kept: Vec<u32> = (sel.offsets[t]..sel.offsets[t + 1])
                .filter(|&e| sel.value[e] > 0.0)
                .map(|e| sel.index[e])
                .collect();
            kept.sort_unstable();
            kept
        })
        .collect()
}

#[test]
fn the_device_engine_trains_every_architecture_to_the_sparse_engines_weights() {
    let dir = tempfile::tempdir().unwrap();
    let store = capture(&dir.path().join("capture"));
    let fixed: Vec<f32> = {
        let mut state = 99u64;
        let atoms: Vec<f32> = (0..48 * D).map(|_| uniform(&mut state)).collect();
        sparse_rows(&atoms, D, 3, 256, &mut state)
    };
    for (name, sparsity) in architectures(4) {
        let run = |engine: Engine, sub: &str| -> State {
            let cfg = config(sparsity, engine, 50);
            train(&store, &cfg, &dir.path().join(sub), &Record::default()).unwrap()
        };
        let sparse = run(Engine::Sparse(Precision::F32), &format!("{name}-sparse"));
        let dense = run(Engine::Dense(Device::Cpu), &format!("{name}-dense"));
        assert_eq!(dense.step, 50, "{name}");
        let (a, b) = (&sparse.weights, &dense.weights);
        for (part, u, v) in [
            ("w_enc", &a.w_enc, &b.w_enc),
            ("b_enc", &a.b_enc, &b.b_enc),
            ("w_dec", &a.w_dec, &b.w_dec),
            ("b_dec", &a.b_dec, &b.b_dec),
            ("threshold", &a.threshold, &b.threshold),
        ] {
            let r = relative(u, v);
            assert!(r <= 1e-4, "{name}: {part} differs by {r:e} (relative)");
        }
        // The run changed the weights (so agreeing is not agreeing on the initialisation).
        let init = State::init(
            &config(sparsity, Engine::Dense(Device::Cpu), 50),
            D,
            &[0.0; D],
        );
        assert!(relative(&init.weights.w_enc, &b.w_enc) > 1e-2, "{name}");
        assert_eq!(sparse.since_fired, dense.since_fired, "{name}");
        assert_eq!(sparse.fired_total, dense.fired_total, "{name}");
        let tolerance = 1e-4 * sparse.threshold.abs().max(1e-9);
        assert!(
            (sparse.threshold - dense.threshold).abs() <= tolerance,
            "{name}: BatchTopK threshold {} vs {}",
            sparse.threshold,
            dense.threshold
        );
        let inference =
            sparse.inference_sparsity(&config(sparsity, Engine::Dense(Device::Cpu), 50));
        let kept = selected(a, &fixed, inference);
        assert!(kept.iter().any(|k| !k.is_empty()), "{name} keeps nothing");
        assert_eq!(
            kept,
            selected(b, &fixed, inference),
            "{name}: selected latents"
        );
        let losses = |s: &State| s.log.iter().map(|r| r.loss).collect::<Vec<_>>();
        for (u, v) in losses(&sparse).iter().zip(losses(&dense)) {
            assert!((u - v).abs() <= 1e-4 * u.abs(), "{name}: loss {u} vs {v}");
        }
    }
}

#[test]
fn a_device_step_moves_the_batch_in_and_a_few_scalars_out() {
    let dir = tempfile::tempdir().unwrap();
    let store = capture(&dir.path().join("capture"));
    let steps = 30;
    let (record_a, record_b) = (Record::default(), Record::default());
    let cfg_a = TrainConfig {
        checkpoint_every: 10,
        ..config(Sparsity::TopK(4), Engine::Dense(Device::Cpu), steps)
    };
    let cfg_b = TrainConfig {
        d_sae: 128,
        ..config(Sparsity::BatchTopK(2), Engine::Dense(Device::Cpu), steps)
    };
    let runs = [
        Run {
            cfg: &cfg_a,
            checkpoints: dir.path().join("a"),
            callbacks: &record_a,
        },
        Run {
            cfg: &cfg_b,
            checkpoints: dir.path().join("b"),
            callbacks: &record_b,
        },
    ];
    for result in train_group(&store, &runs) {
        result.unwrap();
    }
    let (a, b) = (
        record_a.traffic.lock().unwrap()[0],
        record_b.traffic.lock().unwrap()[0],
    );
    let batch = (BATCH * D * 4) as u64;
    // The group shares one copy of each batch (counted for its first member); each member fetches 7
    // f64 scalars a step.
    assert_eq!(a.0.to_device, steps * batch, "{a:?}");
    assert_eq!(b.0.to_device, 0, "{b:?}");
    assert_eq!(a.0.to_host, steps * 7 * 8, "{a:?}");
    assert_eq!(b.0.to_host, steps * 7 * 8, "{b:?}");
    // Whole-state copies: one upload; downloads at the checkpoints of steps 10 and 20, and at the end.
    let state_bytes = |m: u64| {
        let weights = 2 * m * D as u64 + m + D as u64;
        4 * weights + 8 * weights + 16 * m
    };
    assert_eq!(a.1.to_device, state_bytes(64), "{a:?}");
    assert_eq!(a.1.to_host, 3 * state_bytes(64), "{a:?}");
    assert_eq!(b.1.to_host, state_bytes(128), "{b:?}");
}

#[test]
fn a_device_group_trains_each_member_to_its_bits_alone_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let store = capture(&dir.path().join("capture"));
    let configs: Vec<TrainConfig> = architectures(4)
        .into_iter()
        .map(|(_, s)| config(s, Engine::Dense(Device::Cpu), 20))
        .collect();
    let record = Record::default();
    let runs: Vec<Run> = configs
        .iter()
        .enumerate()
        .map(|(i, cfg)| Run {
            cfg,
            checkpoints: dir.path().join(format!("group-{i}")),
            callbacks: &record,
        })
        .collect();
    let grouped: Vec<State> = train_group(&store, &runs)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    for (i, cfg) in configs.iter().enumerate() {
        let alone = train(&store, cfg, &dir.path().join(format!("alone-{i}")), &record).unwrap();
        assert_eq!(alone.weights, grouped[i].weights, "member {i}");
        assert_eq!(alone.log, grouped[i].log, "member {i}");
    }
    // Cancelled after step 10 (the state comes off the device into a checkpoint) and resumed: the same
    // bits as straight through.
    let resumed_dir = dir.path().join("resumed");
    let stop = CancelAfter(10, AtomicU64::new(0));
    let err = train(&store, &configs[0], &resumed_dir, &stop).unwrap_err();
    assert!(err.to_string().contains("stopped at step 10"), "{err:#}");
    let resumed = train(&store, &configs[0], &resumed_dir, &record).unwrap();
    assert_eq!(resumed.weights, grouped[0].weights);
    assert_eq!(resumed.log, grouped[0].log);
}

/// A group mixing the engines (a host member steps while the device member's step is queued, and the next
/// batch is read before its scalars come back) gives each member its bits alone; a non-finite activation
/// read ahead stops both with the capture row named, after the steps before it.
#[test]
fn a_mixed_group_is_each_member_alone_and_a_bad_batch_stops_both() {
    let dir = tempfile::tempdir().unwrap();
    let store = capture(&dir.path().join("capture"));
    let configs = [
        config(Sparsity::TopK(4), Engine::Sparse(Precision::F32), 20),
        config(Sparsity::TopK(4), Engine::Dense(Device::Cpu), 20),
    ];
    let record = Record::default();
    let runs: Vec<Run> = configs
        .iter()
        .enumerate()
        .map(|(i, cfg)| Run {
            cfg,
            checkpoints: dir.path().join(format!("mixed-{i}")),
            callbacks: &record,
        })
        .collect();
    let grouped: Vec<State> = train_group(&store, &runs)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    for (i, cfg) in configs.iter().enumerate() {
        let alone = train(&store, cfg, &dir.path().join(format!("alone-{i}")), &record).unwrap();
        assert_eq!(alone.weights, grouped[i].weights, "member {i}");
    }

    let mut state = 0x2545_f491_4f6c_dd1du64;
    let atoms: Vec<f32> = (0..48 * D).map(|_| uniform(&mut state)).collect();
    let mut rows = sparse_rows(&atoms, D, 3, 4096, &mut state);
    rows[1000 * D + 3] = f32::NAN;
    write_capture(&dir.path().join("bad"), HOOK, D, &rows);
    let bad = ActivationStore::open(&dir.path().join("bad"), HOOK).unwrap();
    let long: Vec<TrainConfig> = configs
        .iter()
        .map(|cfg| TrainConfig {
            steps: 200, // past the bad row's batch: 64 batches an epoch
            checkpoint_every: 1,
            ..cfg.clone()
        })
        .collect();
    let runs: Vec<Run> = long
        .iter()
        .enumerate()
        .map(|(i, cfg)| Run {
            cfg,
            checkpoints: dir.path().join(format!("bad-{i}")),
            callbacks: &record,
        })
        .collect();
    for (i, result) in train_group(&bad, &runs).into_iter().enumerate() {
        let err = format!("{:#}", result.unwrap_err());
        assert!(
            err.contains("non-finite activation in tokens.parquet row 1000 (column 3)"),
            "member {i}: {err}"
        );
        // Every step before the bad batch was taken and checkpointed.
        let saved = State::load_checkpoint(&dir.path().join(format!("bad-{i}")), D, 64).unwrap();
        assert!(saved.is_some_and(|s| s.step > 0), "member {i}");
    }
}

/// Asks to stop once `.0` steps are done.
struct CancelAfter(u64, AtomicU64);

impl Callbacks for CancelAfter {
    fn progress(&self, step: u64) {
        self.1.store(step, Ordering::SeqCst);
    }
    fn cancelled(&self) -> bool {
        self.1.load(Ordering::SeqCst) >= self.0
    }
}

#[test]
fn a_batch_split_into_chunks_trains_as_the_whole_batch() {
    use saeflow_core::sae::trainer::{upload_batch, Resident};
    let mut rng = 0x5eed_u64;
    let atoms: Vec<f32> = (0..48 * D).map(|_| uniform(&mut rng)).collect();
    let batches: Vec<Vec<f32>> = (0..10)
        .map(|_| sparse_rows(&atoms, D, 3, BATCH, &mut rng))
        .collect();
    let dev = Device::Cpu;
    for (name, sparsity) in architectures(4) {
        let cfg = config(sparsity, Engine::Dense(dev.clone()), 10);
        let state = State::init(&cfg, D, &batches[0]);
        let train = |chunk: usize| -> State {
            let mut resident = Resident::new(&state, &cfg, &dev, None)
                .unwrap()
                .with_chunk_tokens(chunk);
            let mut out = state.clone();
            for (t, x) in batches.iter().enumerate() {
                let variance = saeflow_core::sae::step::total_variance(x, D);
                let (batch, _) = upload_batch(x, D, &dev).unwrap();
                resident.step(&cfg, t as u64 + 1, &batch, variance).unwrap();
            }
            resident.download(&mut out).unwrap();
            out
        };
        // 64 tokens in chunks of 7: nine full chunks and one of 1.
        let (whole, chunked) = (train(BATCH), train(7));
        for (part, u, v) in [
            ("w_enc", &whole.weights.w_enc, &chunked.weights.w_enc),
            ("w_dec", &whole.weights.w_dec, &chunked.weights.w_dec),
            ("b_dec", &whole.weights.b_dec, &chunked.weights.b_dec),
            (
                "threshold",
                &whole.weights.threshold,
                &chunked.weights.threshold,
            ),
        ] {
            let r = relative(u, v);
            assert!(r <= 1e-5, "{name}: {part} differs by {r:e} when chunked");
        }
        assert_eq!(whole.fired_total, chunked.fired_total, "{name}");
        assert_eq!(whole.since_fired, chunked.since_fired, "{name}");
    }
}
