//! Hand-written CUDA kernels for the device-resident SAE trainer, where candle's ops fall short:
//! - [`topk`]: TopK selection over rows of tens of thousands of latents (candle's CUDA `arg_sort` holds a
//!   row in shared memory and fails past ~12k columns) and BatchTopK's cut over a whole `[batch, d_sae]`
//!   matrix;
//! - [`sparse`]: the products whose one operand is TopK-sparse (the decoder, its gradient, the encoder's
//!   gradient), which cuBLAS would compute densely: d_sae / k times the work.
//!
//! The sources (`*.cu` beside this file) are compiled at run time by NVRTC, so building saeflow needs no
//! CUDA toolkit; the PTX is compiled once per process and loaded once per device. Every kernel is
//! deterministic (no float atomics).
//!
//! The candle-op versions in [`crate::sae::dense`] are the reference these are tested against
//! (`crates/core/tests/cuda.rs` on a GPU; `crates/core/tests/cuda_emulated.rs` runs the same sources on
//! the CPU under a small emulation of CUDA's threads) and the fallback: `SAEFLOW_CUDA_KERNELS=0` turns
//! these off.

mod sparse;
mod topk;

pub use sparse::{masked_row_dots, sparse_rows_matmul, SPARSE_SOURCE};
pub use topk::{kth_largest, top_k_mask, TOPK_SOURCE};

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::CudaView;
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::{CudaStorage, DType, Layout};

/// Whether the kernels are used on CUDA tensors (default yes; `SAEFLOW_CUDA_KERNELS=0` selects candle's
/// ops instead).
pub fn enabled() -> bool {
    std::env::var("SAEFLOW_CUDA_KERNELS").map_or(true, |v| v != "0")
}

/// NVRTC's PTX for `source` (portable PTX, JIT-compiled by the driver for the GPU at load).
pub fn compile(source: &str, name: &str) -> Result<String, String> {
    let opts = CompileOptions {
        name: Some(name.to_string()),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    compile_ptx_with_opts(source, opts)
        .map(|ptx| ptx.to_src())
        .map_err(|e| format!("NVRTC could not compile {name}: {e:?}"))
}

/// The PTX of `source`, compiled on first use and kept for the process (`cell` is the caller's).
fn ptx(
    cell: &'static OnceLock<Result<String, String>>,
    source: &str,
    name: &str,
) -> candle_core::Result<&'static str> {
    cell.get_or_init(|| compile(source, name))
        .as_deref()
        .map_err(|e| candle_core::Error::Msg(e.clone()))
}

/// The f32 elements of a contiguous CUDA tensor's storage, from its layout's start.
fn contiguous_f32<'a>(
    storage: &'a CudaStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<CudaView<'a, f32>> {
    if !layout.is_contiguous() || storage.dtype() != DType::F32 {
        candle_core::bail!("{op}: needs a contiguous f32 tensor");
    }
    Ok(storage
        .as_cuda_slice::<f32>()?
        .slice(layout.start_offset()..))
}
