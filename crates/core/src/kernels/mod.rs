//! Hand-written CPU kernels for the loops that dominate training and inference: the f32/bf16 GEMM
//! ([`gemm`], with bf16 on AMX tiles in [`amx`]), causal attention ([`attention`]), vectorised row-wise math ([`vector`]: `exp`, SwiGLU,
//! RMSNorm, softmax) and the SAE step's dot products and axpy ([`simd`]). Each has a portable fallback;
//! tensors on other devices use candle's ops, except where [`cuda`] (with the `cuda` feature) has a kernel.

pub mod amx;
pub mod attention;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod gemm;
pub mod simd;
#[cfg(test)]
pub(crate) mod test_data;
pub mod vector;
