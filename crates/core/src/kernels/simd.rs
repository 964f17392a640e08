//! The vector primitives of the SAE step's hot loops: [`dot`], [`dot4`], [`axpy`] and the norms of a
//! vector's bf16 rounding. Sums run in 16 fixed lanes, so every build and thread count gives the same bits.

/// Σ a_i·b_i in 16 independent lanes, summed in a fixed order at the end. A plain `.sum()` over f32 is one
/// serial chain of adds (the compiler may not reorder it), which made the gradient pass latency-bound.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU has AVX-512F (checked).
        return unsafe { dot_avx512(a, b) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked).
        return unsafe { dot_avx2(a, b) };
    }
    dot_lanes(a, b)
}

/// y += a·x.
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU has AVX-512F (checked).
        return unsafe { axpy_avx512(a, x, y) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked).
        return unsafe { axpy_avx2(a, x, y) };
    }
    axpy_plain(a, x, y)
}

/// Asks the CPU to bring `v` into L1 (a hint: no effect on results). The SAE step's sparse loops walk
/// rows chosen by the data (a token's gradient, a latent's decoder row), which the hardware prefetcher
/// cannot guess; fetching the next row while the current one is summed hides part of their load stalls.
#[inline]
pub fn prefetch(v: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in v.chunks(16) {
        // SAFETY: a prefetch never faults and changes no state the program can observe.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr().cast(),
            )
        };
    }
}

/// Whether the hot loops can run their AVX-512 builds (one register per 16 lanes; ~10% off a TopK step
/// against AVX2's two on an Intel Xeon). Same arithmetic, same bits.
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn avx512() -> bool {
    super::avx512()
}

/// Whether the hot loops can run their AVX2 builds. The crate is compiled for the x86-64 baseline (SSE2):
/// building it all for x86-64-v3 made these loops 2–4× faster but the model forward (candle) ~6% slower,
/// so only these few leaf functions get AVX2 and AVX-512 copies, chosen at run time. The arithmetic is the
/// same (no FMA contraction), so every copy gives the same bits.
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (a_body, b_body) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = a_body
        .remainder()
        .iter()
        .zip(b_body.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_body.zip(b_body) {
        for l in 0..16 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// [`dot`] of `x` with four rows at once: the same lanes and order per row (so the same bits), four
/// independent chains of adds instead of one.
pub fn dot4(x: &[f32], rows: [&[f32]; 4]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU has AVX-512F (checked).
        return unsafe { dot4_avx512(x, rows) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked).
        return unsafe { dot4_avx2(x, rows) };
    }
    dot4_lanes(x, rows)
}

#[inline(always)]
fn dot4_lanes(x: &[f32], [r0, r1, r2, r3]: [&[f32]; 4]) -> [f32; 4] {
    let d = x.len();
    assert!(r0.len() == d && r1.len() == d && r2.len() == d && r3.len() == d);
    // Four separate arrays, not one [[f32; 16]; 4] borrowed in parts: that kept the sums in memory, each
    // add waiting on the previous one's store (3× slower).
    let (mut l0, mut l1, mut l2, mut l3) = ([0f32; 16], [0f32; 16], [0f32; 16], [0f32; 16]);
    let chunks = x
        .chunks_exact(16)
        .zip(r0.chunks_exact(16))
        .zip(r1.chunks_exact(16).zip(r2.chunks_exact(16)))
        .zip(r3.chunks_exact(16));
    for (((xs, a), (b, c)), e) in chunks {
        for l in 0..16 {
            l0[l] += xs[l] * a[l];
            l1[l] += xs[l] * b[l];
            l2[l] += xs[l] * c[l];
            l3[l] += xs[l] * e[l];
        }
    }
    let body = d - d % 16;
    let rows = [r0, r1, r2, r3];
    let lanes = [l0, l1, l2, l3];
    std::array::from_fn(|r| {
        let tail: f32 = x[body..]
            .iter()
            .zip(&rows[r][body..])
            .map(|(x, y)| x * y)
            .sum();
        lanes[r].iter().sum::<f32>() + tail
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot4_avx2(x: &[f32], rows: [&[f32]; 4]) -> [f32; 4] {
    dot4_lanes(x, rows)
}

/// ‖v‖², ‖ṽ‖² and ‖v − ṽ‖² for ṽ the bf16 rounding of v (to nearest even, as the bf16 product packs it).
/// f32 sums in 16 lanes: relative error ≤ len·2⁻²⁴, far inside the 1% the bound that uses them adds.
pub(crate) fn bf16_rounding_norms(v: &[f32]) -> [f32; 3] {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU has AVX-512F (checked).
        return unsafe { bf16_rounding_norms_avx512(v) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked).
        return unsafe { bf16_rounding_norms_avx2(v) };
    }
    bf16_rounding_norms_lanes(v)
}

#[inline(always)]
fn bf16_rounding_norms_lanes(v: &[f32]) -> [f32; 3] {
    // The rounding the bf16 product packs with.
    rounding_norms_lanes(v, |x| {
        f32::from_bits(crate::kernels::gemm::bf16_bits(x) << 16)
    })
}

/// ‖v‖², ‖ṽ‖² and ‖v − ṽ‖² for ṽ = `round` of each value, f32 sums in 16 lanes (value i in lane i mod 16).
#[inline(always)]
pub(crate) fn rounding_norms_lanes(v: &[f32], round: impl Fn(f32) -> f32) -> [f32; 3] {
    let mut acc = [[0f32; 16]; 3];
    let chunks = v.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..16 {
            let r = round(c[l]);
            acc[0][l] += c[l] * c[l];
            acc[1][l] += r * r;
            acc[2][l] += (c[l] - r) * (c[l] - r);
        }
    }
    for (l, &x) in tail.iter().enumerate() {
        let r = round(x);
        acc[0][l] += x * x;
        acc[1][l] += r * r;
        acc[2][l] += (x - r) * (x - r);
    }
    acc.map(|a| a.iter().sum())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn bf16_rounding_norms_avx2(v: &[f32]) -> [f32; 3] {
    bf16_rounding_norms_lanes(v)
}

#[inline(always)]
fn axpy_plain(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_avx2(a: f32, x: &[f32], y: &mut [f32]) {
    axpy_plain(a, x, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot4_avx512(x: &[f32], rows: [&[f32]; 4]) -> [f32; 4] {
    dot4_lanes(x, rows)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn axpy_avx512(a: f32, x: &[f32], y: &mut [f32]) {
    axpy_plain(a, x, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn bf16_rounding_norms_avx512(v: &[f32]) -> [f32; 3] {
    bf16_rounding_norms_lanes(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_data::random;

    #[test]
    fn every_build_of_the_hot_loops_gives_the_portable_bits() {
        let (a, b) = (random(1003, 1, 1.0), random(1003, 2, 1.0));
        let rows = [&b[..], &a[..], &b[..], &a[..]];
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let axpy_with = |f: &dyn Fn(&mut [f32])| {
            let mut y = b.clone();
            f(&mut y);
            bits(&y)
        };
        let want = (
            dot_lanes(&a, &b).to_bits(),
            bits(&dot4_lanes(&a, rows)),
            axpy_with(&|y| axpy_plain(0.37, &a, y)),
            bits(&bf16_rounding_norms_lanes(&a)),
        );
        // The dispatched build (the best this CPU has), then each x86 build the CPU can run.
        let dispatched = (
            dot(&a, &b).to_bits(),
            bits(&dot4(&a, rows)),
            axpy_with(&|y| axpy(0.37, &a, y)),
            bits(&bf16_rounding_norms(&a)),
        );
        assert_eq!(dispatched, want);
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY (all): each build runs only where its features were detected.
            if avx2() {
                let got = unsafe {
                    (
                        dot_avx2(&a, &b).to_bits(),
                        bits(&dot4_avx2(&a, rows)),
                        axpy_with(&|y| axpy_avx2(0.37, &a, y)),
                        bits(&bf16_rounding_norms_avx2(&a)),
                    )
                };
                assert_eq!(got, want, "AVX2");
            }
            if avx512() {
                let got = unsafe {
                    (
                        dot_avx512(&a, &b).to_bits(),
                        bits(&dot4_avx512(&a, rows)),
                        axpy_with(&|y| axpy_avx512(0.37, &a, y)),
                        bits(&bf16_rounding_norms_avx512(&a)),
                    )
                };
                assert_eq!(got, want, "AVX-512");
            }
        }
    }

    #[test]
    fn dot4_gives_dots_bits() {
        for d in [1, 15, 16, 577] {
            let x = random(d, 1, 1.0);
            let rows: Vec<Vec<f32>> = (0..4).map(|r| random(d, 10 + r, 1.0)).collect();
            let four = dot4(&x, std::array::from_fn(|r| rows[r].as_slice()));
            for r in 0..4 {
                assert_eq!(
                    four[r].to_bits(),
                    dot(&x, &rows[r]).to_bits(),
                    "d {d} row {r}"
                );
                assert_eq!(
                    four[r].to_bits(),
                    dot_lanes(&x, &rows[r]).to_bits(),
                    "d {d} row {r}"
                );
            }
        }
    }
}
