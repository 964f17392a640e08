//! Products with a TopK-sparse operand (`sparse.cu`): work proportional to the nonzeros, not to d_sae.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use super::{contiguous_f32, ptx};

/// The sparse-product kernels' source.
pub const SPARSE_SOURCE: &str = include_str!("sparse.cu");
const MODULE: &str = "saeflow_sparse";
/// `THREADS` in `sparse.cu`.
const THREADS: u32 = 256;

fn sparse_ptx() -> candle_core::Result<&'static str> {
    static PTX: OnceLock<Result<String, String>> = OnceLock::new();
    ptx(&PTX, SPARSE_SOURCE, "sparse.cu")
}

/// One block of `THREADS` per row.
fn per_row(rows: usize) -> candle_core::Result<LaunchConfig> {
    if rows == 0 || rows > i32::MAX as usize {
        candle_core::bail!("sparse kernels: {rows} rows outside 1..=2³¹−1");
    }
    Ok(LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

fn as_u32(n: usize, what: &str) -> candle_core::Result<u32> {
    u32::try_from(n)
        .map_err(|_| candle_core::Error::Msg(format!("sparse kernels: {what} {n} > 2³²−1")))
}

/// `s [rows, cols] · b [cols, d]`.
struct SparseRowsMatmul;

impl CustomOp2 for SparseRowsMatmul {
    fn name(&self) -> &'static str {
        "sparse_rows_matmul"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("sparse_rows_matmul is a CUDA kernel; on the CPU use matmul")
    }

    fn cuda_fwd(
        &self,
        s: &CudaStorage,
        s_layout: &Layout,
        b: &CudaStorage,
        b_layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (rows, cols) = s_layout.shape().dims2()?;
        let (b_rows, d) = b_layout.shape().dims2()?;
        if b_rows != cols {
            candle_core::bail!("sparse_rows_matmul: [{rows}, {cols}] · [{b_rows}, {d}]");
        }
        let (s_view, b_view) = (
            contiguous_f32(s, s_layout, self.name())?,
            contiguous_f32(b, b_layout, self.name())?,
        );
        let dev = s.device();
        if rows == 0 || d == 0 {
            let out = dev.alloc_zeros::<f32>(rows * d)?;
            return Ok((
                CudaStorage::wrap_cuda_slice(out, dev.clone()),
                Shape::from((rows, d)),
            ));
        }
        let func = dev.get_or_load_custom_func("sparse_rows_matmul", MODULE, sparse_ptx()?)?;
        // SAFETY: the kernel writes every element (zeros for an empty row).
        let out = unsafe { dev.alloc::<f32>(rows * d)? };
        let (cols32, d32) = (as_u32(cols, "cols")?, as_u32(d, "d")?);
        let mut launch = func.builder();
        launch
            .arg(&s_view)
            .arg(&b_view)
            .arg(&out)
            .arg(&cols32)
            .arg(&d32);
        // SAFETY: arguments match the kernel's signature; one block per row of `s`.
        unsafe { launch.launch(per_row(rows)?) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((rows, d)),
        ))
    }
}

/// `s · b` for CUDA tensors `s [rows, cols]`, mostly zeros (any layout: made contiguous), and `b [cols, d]`:
/// each output row sums only its row's nonzeros, in column order.
pub fn sparse_rows_matmul(s: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    s.contiguous()?
        .apply_op2_no_bwd(&b.contiguous()?, &SparseRowsMatmul)
}

/// `(a [rows, d] · b [cols, d]ᵀ) ⊙ mask [rows, cols]`, computed only where the mask is nonzero.
struct MaskedRowDots;

impl CustomOp3 for MaskedRowDots {
    fn name(&self) -> &'static str {
        "masked_row_dots"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("masked_row_dots is a CUDA kernel; on the CPU use matmul and mul")
    }

    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        a_layout: &Layout,
        b: &CudaStorage,
        b_layout: &Layout,
        mask: &CudaStorage,
        mask_layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (rows, d) = a_layout.shape().dims2()?;
        let (cols, b_d) = b_layout.shape().dims2()?;
        let mask_dims = mask_layout.shape().dims2()?;
        if b_d != d || mask_dims != (rows, cols) {
            candle_core::bail!(
                "masked_row_dots: [{rows}, {d}] · [{cols}, {b_d}]ᵀ ⊙ {:?}",
                mask_dims
            );
        }
        let name = self.name();
        let (a_view, b_view, mask_view) = (
            contiguous_f32(a, a_layout, name)?,
            contiguous_f32(b, b_layout, name)?,
            contiguous_f32(mask, mask_layout, name)?,
        );
        let dev = a.device();
        // Zeros where the mask is: the kernel writes only the kept entries.
        let out = dev.alloc_zeros::<f32>(rows * cols)?;
        if rows > 0 && cols > 0 {
            let func = dev.get_or_load_custom_func("masked_row_dots", MODULE, sparse_ptx()?)?;
            let (cols32, d32) = (as_u32(cols, "cols")?, as_u32(d, "d")?);
            let mut launch = func.builder();
            launch
                .arg(&a_view)
                .arg(&b_view)
                .arg(&mask_view)
                .arg(&out)
                .arg(&cols32)
                .arg(&d32);
            // SAFETY: arguments match the kernel's signature; one block per row of `a`.
            unsafe { launch.launch(per_row(rows)?) }.w()?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((rows, cols)),
        ))
    }
}

/// `(a · bᵀ) ⊙ mask` for CUDA tensors `a [rows, d]`, `b [cols, d]`, `mask [rows, cols]` (mostly zeros):
/// one dot product per nonzero of the mask, summed over `d` in order.
pub fn masked_row_dots(a: &Tensor, b: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    a.contiguous()?
        .apply_op3_no_bwd(&b.contiguous()?, &mask.contiguous()?, &MaskedRowDots)
}
