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

use std::mem::MaybeUninit;

/// `len` floats, every one written by `write` (given the vector's spare capacity) before anything reads
/// it. The outputs of the model's row-wise ops are never zeroed first: `vec![0.0; n]` zeroes on the calling
/// thread while the pool waits, and that zeroing was ~2% of a SmolLM2 forward on an AMD Zen 3 (`perf`: the
/// main thread's `memset`).
///
/// # Safety
/// `write` writes every element of the slice it is given.
pub(crate) unsafe fn written(len: usize, write: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    write(&mut out.spare_capacity_mut()[..len]);
    // SAFETY: all `len` floats were written (the caller's promise); a panic in `write` leaves the vector at
    // length 0.
    unsafe { out.set_len(len) };
    out
}

/// `values`, every one of which has been written, as floats.
///
/// # Safety
/// Every element of `values` is initialised.
pub(crate) unsafe fn assume_written(values: &[MaybeUninit<f32>]) -> &[f32] {
    // SAFETY: `MaybeUninit<f32>` has f32's layout, and every element is initialised (the caller's promise).
    unsafe { &*(values as *const [MaybeUninit<f32>] as *const [f32]) }
}

/// Floats to overwrite, as the kernels that take storage not yet written ask for it.
///
/// # Safety
/// Nothing writes `MaybeUninit::uninit()` (or any other uninitialised value) through the returned slice:
/// `values` must stay initialised floats.
pub(crate) unsafe fn to_overwrite(values: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: the same layout; writers keep every element initialised (the caller's promise).
    unsafe { &mut *(values as *mut [f32] as *mut [MaybeUninit<f32>]) }
}

/// Whether the CPU is AMD's (CPUID vendor "AuthenticAMD"): its bf16 dot product runs at a different rate
/// from Intel's ([`gemm::Precision::bf16_faster`]).
pub fn amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: CPUID leaf 0 exists on every x86-64 CPU.
        #[allow(unused_unsafe)]
        let leaf0 = unsafe { std::arch::x86_64::__cpuid(0) };
        // The vendor string is EBX, EDX, ECX: "Auth" "enti" "cAMD".
        [leaf0.ebx, leaf0.edx, leaf0.ecx] == [0x6874_7541, 0x6974_6e65, 0x444d_4163]
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

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

/// Which vector width a kernel's build uses: the widest the CPU has ([`Isa::best`]); tests force each
/// in turn ([`Isa::available`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// 16 lanes (AVX-512F, allowed by [`avx512`]).
    Avx512,
    /// 8 lanes (AVX2 + FMA: every x86-64 server since 2013, AMD's Zen 1–3 among them).
    Avx2,
    /// Scalar Rust (and libm).
    Portable,
}

impl Isa {
    /// The widest build this CPU runs.
    pub(crate) fn best() -> Isa {
        [Isa::Avx512, Isa::Avx2]
            .into_iter()
            .find(|isa| isa.runs())
            .unwrap_or(Isa::Portable)
    }

    /// Every build this CPU can run, widest first.
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Isa> {
        [Isa::Avx512, Isa::Avx2, Isa::Portable]
            .into_iter()
            .filter(|isa| isa.runs())
            .collect()
    }

    /// Whether this CPU runs the build.
    fn runs(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => avx512(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => simd::avx2(),
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx512 | Isa::Avx2 => false,
            Isa::Portable => true,
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn the_vendor_is_the_one_linux_reports() {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let vendor = cpuinfo.lines().find_map(|l| l.strip_prefix("vendor_id"));
        let Some(vendor) = vendor else {
            eprintln!("SKIPPED: /proc/cpuinfo names no vendor_id (not x86)");
            return;
        };
        assert_eq!(
            super::amd(),
            vendor.trim_start_matches([' ', '\t', ':']) == "AuthenticAMD"
        );
    }
}
