//! Hand-written CPU kernels for the loops that dominate training and inference: the f32/bf16 GEMM
//! ([`gemm`]), causal attention ([`attention`]) and vectorised row-wise math ([`vector`]: `exp`, SwiGLU,
//! RMSNorm, softmax). Each has a portable fallback; tensors on other devices use candle's ops.

pub mod attention;
pub mod gemm;
pub mod vector;
