//! TopK's per-row mask and BatchTopK's cut (`topk.cu`).

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Shape, Tensor};

use super::{contiguous_f32, ptx};

/// The selection kernels' source.
pub const TOPK_SOURCE: &str = include_str!("topk.cu");
const MODULE: &str = "saeflow_topk";
const BLOCK: u32 = 512;
/// For the kernels that one thread runs (`for_num_elems(1)` would start a block of 1024).
const ONE_THREAD: LaunchConfig = LaunchConfig {
    grid_dim: (1, 1, 1),
    block_dim: (1, 1, 1),
    shared_mem_bytes: 0,
};

fn topk_ptx() -> candle_core::Result<&'static str> {
    static PTX: OnceLock<Result<String, String>> = OnceLock::new();
    ptx(&PTX, TOPK_SOURCE, "topk.cu")
}

/// `[n, m]` → 0/1 mask of each row's `k` largest.
struct TopKRows(usize);

impl CustomOp1 for TopKRows {
    fn name(&self) -> &'static str {
        "topk_rows_mask"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!(
            "topk_rows_mask is a CUDA kernel; on the CPU use sae::dense::top_k_mask_reference"
        )
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (n, m) = layout.shape().dims2()?;
        let k = self.0;
        if k == 0 || k > m {
            candle_core::bail!("topk_rows_mask: k = {k} outside 1..={m}");
        }
        let x = contiguous_f32(storage, layout, self.name())?;
        let dev = storage.device();
        let func = dev.get_or_load_custom_func("topk_rows_mask", MODULE, topk_ptx()?)?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<f32>(n * m)? };
        let (m32, k32) = (m as u32, k as u32);
        let mut launch = func.builder();
        launch.arg(&x).arg(&out).arg(&m32).arg(&k32);
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match the kernel's signature; one block per row of `x`.
        unsafe { launch.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((n, m)),
        ))
    }
}

/// A 0/1 f32 mask of the `k` largest entries of each row of the CUDA tensor `x` `[n, m]` among the columns
/// `allowed` (`[1, m]` u8) marks (ties: lower column first).
pub fn top_k_mask(x: &Tensor, k: usize, allowed: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let x = match allowed {
        Some(mask) => {
            let neg = Tensor::full(f32::NEG_INFINITY, x.dims(), x.device())?;
            mask.broadcast_as(x.dims())?.where_cond(x, &neg)?
        }
        None => x.contiguous()?,
    };
    x.apply_op1_no_bwd(&TopKRows(k))
}

/// A vector → its `k`-th largest entry, `[1]`.
struct KthLargest(usize);

impl CustomOp1 for KthLargest {
    fn name(&self) -> &'static str {
        "kth_largest"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("kth_largest is a CUDA kernel; on the CPU sort instead")
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let len = layout.shape().elem_count();
        let k = self.0;
        if k == 0 || k > len || k > u32::MAX as usize {
            candle_core::bail!("kth_largest: k = {k} outside 1..={len}");
        }
        let x = contiguous_f32(storage, layout, self.name())?;
        let dev = storage.device();
        let histogram = dev.get_or_load_custom_func("radix_histogram", MODULE, topk_ptx()?)?;
        let pick = dev.get_or_load_custom_func("radix_pick", MODULE, topk_ptx()?)?;
        // {prefix, remaining, fixed-bit mask}, built on the device: only kernel arguments cross.
        let state = dev.alloc_zeros::<u32>(3)?;
        let hist = dev.alloc_zeros::<u32>(256)?;
        let out = dev.alloc_zeros::<f32>(1)?;
        let set_k = dev.get_or_load_custom_func("radix_init", MODULE, topk_ptx()?)?;
        let k32 = k as u32;
        let mut launch = set_k.builder();
        launch.arg(&state).arg(&k32);
        // SAFETY: one thread writes the three state words.
        unsafe { launch.launch(ONE_THREAD) }.w()?;
        let len64 = len as u64;
        let blocks = len.div_ceil(BLOCK as usize).clamp(1, 1024) as u32;
        for shift in [24u32, 16, 8, 0] {
            let mut launch = histogram.builder();
            launch
                .arg(&x)
                .arg(&len64)
                .arg(&state)
                .arg(&hist)
                .arg(&shift);
            let cfg = LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: arguments match the kernel's signature; grid-stride over `len` elements.
            unsafe { launch.launch(cfg) }.w()?;
            let mut launch = pick.builder();
            launch.arg(&state).arg(&hist).arg(&shift).arg(&out);
            // SAFETY: one thread updates the state and clears the histogram.
            unsafe { launch.launch(ONE_THREAD) }.w()?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from(1),
        ))
    }
}

/// The `k`-th largest entry (1-based) of the CUDA tensor `v` (any shape, read flat), as a `[1]` tensor.
pub fn kth_largest(v: &Tensor, k: usize) -> candle_core::Result<Tensor> {
    v.contiguous()?.apply_op1_no_bwd(&KthLargest(k))
}
