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

/// A `[rows, cols]` matrix with `per_row` nonzeros in most rows, none in row 1, every column in row 0
/// (past the kernels' shared list), NaN-free.
fn sparse_matrix(rows: usize, cols: usize, per_row: usize, seed: u64) -> Vec<f32> {
    let mut state = seed | 1;
    let mut s = vec![0f32; rows * cols];
    for (r, row) in s.chunks_mut(cols).enumerate() {
        for v in row.iter_mut() {
            let keep = match r {
                0 => true,
                1 => false,
                _ => ((uniform(&mut state) + 0.5) * cols as f32) < per_row as f32,
            };
            if keep {
                *v = uniform(&mut state) + 0.75; // never 0
            }
        }
    }
    s
}

#[test]
#[cfg_attr(missing = "gpu", ignore = "needs an NVIDIA GPU")]
fn the_sparse_product_kernels_compute_the_dense_products() {
    let dev = gpu();
    let cpu =
        |v: Vec<f32>, shape: (usize, usize)| Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
    for (rows, cols, d, per_row) in [
        (5, 7, 3, 2),
        (64, 4096, 576, 32),
        (40, 3000, 1000, 300), // lists spent more than once
        (300, 65_536, 256, 64),
    ] {
        let s = cpu(
            sparse_matrix(rows, cols, per_row, cols as u64),
            (rows, cols),
        );
        let b = cpu(values(cols * d, d as u64, false), (cols, d));
        let a = cpu(values(rows * d, rows as u64, false), (rows, d));
        let expected = host(&s.matmul(&b).unwrap());
        let got = host(
            &cuda::sparse_rows_matmul(&s.to_device(&dev).unwrap(), &b.to_device(&dev).unwrap())
                .unwrap(),
        );
        let r = relative(&expected, &got);
        assert!(r <= 1e-5, "s·b [{rows}, {cols}]·[{cols}, {d}]: {r:e}");
        // The transposed operand (the decoder's gradient): any layout goes in.
        let expected = host(&s.t().unwrap().matmul(&a).unwrap());
        let got = host(
            &cuda::sparse_rows_matmul(
                &s.to_device(&dev).unwrap().t().unwrap(),
                &a.to_device(&dev).unwrap(),
            )
            .unwrap(),
        );
        let r = relative(&expected, &got);
        assert!(r <= 1e-5, "sᵀ·a: {r:e}");
        let expected = host(&(a.matmul(&b.t().unwrap()).unwrap() * &s).unwrap());
        let got = host(
            &cuda::masked_row_dots(
                &a.to_device(&dev).unwrap(),
                &b.to_device(&dev).unwrap(),
                &s.to_device(&dev).unwrap(),
            )
            .unwrap(),
        );
        let r = relative(&expected, &got);
        assert!(r <= 1e-5, "(a·bᵀ)⊙s: {r:e}");
        // Deterministic: the same bits twice.
        let again = host(
            &cuda::masked_row_dots(
                &a.to_device(&dev).unwrap(),
                &b.to_device(&dev).unwrap(),
                &s.to_device(&dev).unwrap(),
            )
            .unwrap(),
        );
        assert_eq!(got, again);
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

/// NVRTC (what compiles the kernels at run time; it needs no GPU, so CI runs this) accepts every kernel
/// source, and names the source it rejects.
#[test]
fn nvrtc_compiles_every_kernel_source() {
    let broken = cuda::compile(
        "extern \"C\" __global__ void f() { undeclared(); }",
        "broken.cu",
    );
    assert!(broken.is_err_and(|e| e.contains("broken.cu")));
    for (source, name) in [
        (cuda::TOPK_SOURCE, "topk.cu"),
        (cuda::SPARSE_SOURCE, "sparse.cu"),
    ] {
        if let Err(e) = cuda::compile(source, name) {
            panic!("{e}");
        }
    }
}
