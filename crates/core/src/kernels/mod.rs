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

/// Whether the AVX-512 kernels may run: the CPU has AVX-512F and `SAEFLOW_AVX512=0` does not say no. The
/// switch runs a CPU without AVX-512's paths (candle's matmul for the model's layers, the `gemm` crate,
/// AVX2 loops) on one that has it, for tests and measurements; every kernel asks this, not the CPU.
pub fn avx512() -> bool {
    static ALLOWED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ALLOWED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        let has = std::arch::is_x86_feature_detected!("avx512f");
        #[cfg(not(target_arch = "x86_64"))]
        let has = false;
        has && std::env::var("SAEFLOW_AVX512").as_deref() != Ok("0")
    })
}
