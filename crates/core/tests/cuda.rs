//! On a GPU (`--features cuda` and an NVIDIA device): the selection kernels against candle's ops on the
//! CPU, the device-resident engine on CUDA against the sparse CPU engine, and the model's forward on CUDA
//! against the CPU. Without a GPU the tests are ignored with their reason (`cargo test` lists them);
//! `SAEFLOW_REQUIRE_CUDA=1` (set by `bench/gpu.sh`) makes a missing GPU a build failure instead.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor};
use saeflow_core::data::activations::ActivationStore;
use saeflow_core::kernels::cuda;
use saeflow_core::kernels::gemm::Precision;
use saeflow_core::sae::dense::top_k_mask_reference;
use saeflow_core::sae::trainer::{train, Callbacks, Engine, State, TrainConfig};

use common::{relative, sparse_rows, uniform};

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device (the build script found /dev/nvidiactl)")
}

/// Deterministic values in [-0.5, 0.5), or small integers (many ties) when `ties`.
fn values(len: usize, seed: u64, ties: bool) -> Vec<f32> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            let u = uniform(&mut state);
            if ties {
                (u * 8.0).round()
            } else {
                u
            }
        })
        .collect()
}

fn host(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
#[cfg_attr(missing = "gpu", ignore = "needs an NVIDIA GPU")]
fn the_topk_kernel_keeps_what_candle_keeps_ties_included() {
    let dev = gpu();
    for (n, m, k, ties) in [
        (7, 100, 1, false),
        (64, 4096, 32, false),
        (33, 40_000, 64, false),
        (16, 1000, 20, true),
        (8, 131_072, 128, true),
    ] {
        let x = values(n * m, (m + k) as u64, ties);
        let cpu = Tensor::from_vec(x, (n, m), &Device::Cpu).unwrap();
        let allowed: Vec<u8> = (0..m).map(|j| u8::from(j % 3 != 1)).collect();
        let allowed_cpu = Tensor::from_vec(allowed, (1, m), &Device::Cpu).unwrap();
        for mask in [None, Some(&allowed_cpu)] {
            let expected = host(&top_k_mask_reference(&cpu, k, mask).unwrap());
            let mask_gpu = mask.map(|t| t.to_device(&dev).unwrap());
            let got =
                cuda::top_k_mask(&cpu.to_device(&dev).unwrap(), k, mask_gpu.as_ref()).unwrap();
            assert_eq!(host(&got), expected, "n {n} m {m} k {k} ties {ties}");
        }
    }
}

#[test]
#[cfg_attr(missing = "gpu", ignore = "needs an NVIDIA GPU")]
fn the_cut_kernel_finds_the_kth_largest_entry() {
    let dev = gpu();
    for (len, ties) in [(1000, false), (3_000_000, false), (1_000_000, true)] {
        let x = values(len, len as u64, ties);
        let mut sorted = x.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let v = Tensor::from_vec(x, len, &dev).unwrap();
        for k in [1, 2, len / 3, len - 1, len] {
            let cut = host(&cuda::kth_largest(&v, k).unwrap());
            assert_eq!(cut, [sorted[k - 1]], "len {len} k {k} ties {ties}");
        }
    }
}

struct Quiet;
impl Callbacks for Quiet {}

#[test]
#[cfg_attr(missing = "gpu", ignore = "needs an NVIDIA GPU")]
fn the_device_engine_on_cuda_trains_to_the_sparse_engines_weights() {
    const D: usize = 64;
    let dir = tempfile::tempdir().unwrap();
    let mut state = 0x9e37_79b9u64;
    let atoms: Vec<f32> = (0..256 * D).map(|_| uniform(&mut state)).collect();
    common::write_capture(
        &dir.path().join("capture"),
        "blocks.0.hook_resid_post",
        D,
        &sparse_rows(&atoms, D, 4, 32_768, &mut state),
    );
    let store =
        ActivationStore::open(&dir.path().join("capture"), "blocks.0.hook_resid_post").unwrap();
    for (_, sparsity) in common::architectures(8) {
        let cfg = |engine| TrainConfig {
            d_sae: 16_384, // past candle's CUDA arg_sort (a row in shared memory)
            lr: 1e-3,
            batch_size: 512,
            steps: 50,
            dead_tokens: 2048,
            seed: 3,
            buffer_rows: 4096,
            ..common::train_config(sparsity, engine, 50)
        };
        let run = |engine, sub: &str| -> State {
            train(&store, &cfg(engine), &dir.path().join(sub), &Quiet).unwrap()
        };
        let name = format!("{sparsity:?}");
        let sparse = run(Engine::Sparse(Precision::F32), &format!("{name}-cpu"));
        let dense = run(Engine::Dense(gpu()), &format!("{name}-gpu"));
        // cuBLAS sums in other orders than the CPU's GEMM: 1e-3 (1e-4 on the CPU device, tests/device_engine.rs).
        for (part, u, v) in [
            ("w_enc", &sparse.weights.w_enc, &dense.weights.w_enc),
            ("w_dec", &sparse.weights.w_dec, &dense.weights.w_dec),
            ("b_dec", &sparse.weights.b_dec, &dense.weights.b_dec),
        ] {
            let r = relative(u, v);
            assert!(r <= 1e-3, "{name}: {part} differs by {r:e}");
        }
        assert_eq!(
            sparse.fired_total.iter().sum::<u64>(),
            dense.fired_total.iter().sum::<u64>(),
            "{name}"
        );
    }
}

#[test]
#[cfg_attr(
    any(missing = "gpu", missing = "shared"),
    ignore = "needs an NVIDIA GPU and ../shared"
)]
fn smollm2_on_cuda_captures_what_the_cpu_captures() {
    use saeflow_core::models::transformer::{Hook, HookPoint, Hooks};
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf");
    let hook = Hook {
        layer: 15,
        point: HookPoint::ResidPost,
    };
    let capture = |device: &Device| -> Vec<f32> {
        let model = saeflow_core::models::load(&path, None, device).unwrap();
        let ids: Vec<u32> = (0..256u32).map(|i| 1 + (i * 37) % 40_000).collect();
        let tokens = Tensor::from_vec(ids, (2, 128), device).unwrap();
        let out = model
            .transformer
            .forward(&tokens, &Hooks::capture([hook]), None)
            .unwrap();
        host(&out.activations[&hook].to_dtype(DType::F32).unwrap())
    };
    let (cpu, gpu) = (capture(&Device::Cpu), capture(&gpu()));
    let scale = cpu.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = cpu
        .iter()
        .zip(&gpu)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        worst <= 1e-3 * scale,
        "max |cpu − gpu| {worst} of max |act| {scale}"
    );
}
