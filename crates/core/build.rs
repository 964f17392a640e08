//! Test preconditions (see `preconditions.rs`): saeflow-core's own tests need `../shared`, a C++20
//! compiler to run the CUDA kernels under emulation, with the `cuda` feature a GPU, and the CPU kernels'
//! tests of AVX2, AVX-512, AVX512-BF16 and AMX a CPU that has them.
include!("preconditions.rs");

fn main() {
    Preconditions::new()
        .shared()
        .tool("cxx", &["g++"], "apt-get install g++")
        .gpu()
        .cpu("avx2", cpu_has("avx2"), "AVX2 and FMA")
        .cpu("avx512f", cpu_has("avx512f"), "AVX-512")
        .cpu("avx512bf16", cpu_has("avx512bf16"), "AVX512-BF16")
        .cpu("amx", cpu_has("amx"), "AMX-BF16 tiles")
        .finish();
}

/// Whether the CPU building this (the one the tests run on) has `feature`.
fn cpu_has(feature: &str) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__cpuid_count, __get_cpuid_max};
        return match feature {
            "avx2" => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
            "avx512bf16" => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bf16")
            }
            "amx" => {
                // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE (Rust's detection of them is unstable).
                #[allow(unused_unsafe)]
                // SAFETY: CPUID exists on every x86-64 CPU; leaf 7 read only where reported.
                let edx = unsafe {
                    if __get_cpuid_max(0).0 >= 7 {
                        __cpuid_count(7, 0).edx
                    } else {
                        0
                    }
                };
                edx >> 22 & 1 == 1 && edx >> 24 & 1 == 1
            }
            _ => false,
        };
    }
    #[allow(unreachable_code)]
    false
}
