//! Vectorised elementwise and row-wise math for the transformer on CPU: `exp`, SwiGLU (`silu(gate)·up`),
//! RMSNorm and softmax.
//!
//! Written by hand because candle's CPU versions call libm's scalar `expf` element by element (its SiLU on
//! one thread too): on SmolLM2 at batch 8 × 128 they took ~8 ms of each layer's ~50. The vector `exp` is
//! SLEEF's `expf_u10` (same range reduction and polynomial, ≤ 1 ulp) on AVX-512 or AVX2 + FMA; without
//! either the scalar libm one. Lanes are independent, so results do not depend on the thread count.

use rayon::prelude::*;

use std::mem::MaybeUninit;

use super::{assume_written, Isa};

/// Elements per parallel task: large enough to amortise the task, small enough to balance two threads.
const CHUNK: usize = 1 << 14;

/// SwiGLU on rows that hold the gate and up projections side by side: row `r` of `x` is
/// `[gate (width) | up (width)]`, row `r` of `out` is `silu(gate) · up` with `silu(g) = g / (1 + e^−g)`.
pub fn swiglu(x: &[f32], width: usize, out: &mut [f32]) {
    swiglu_on(Isa::best(), x, width, out)
}

fn swiglu_on(isa: Isa, x: &[f32], width: usize, out: &mut [f32]) {
    assert!(width > 0 && x.len() == 2 * out.len() && out.len().is_multiple_of(width));
    let rows_per_task = (CHUNK / width).max(1);
    out.par_chunks_mut(rows_per_task * width)
        .zip(x.par_chunks(rows_per_task * 2 * width))
        .for_each(|(out, x)| {
            for (out, x) in out.chunks_exact_mut(width).zip(x.chunks_exact(2 * width)) {
                let (gate, up) = x.split_at(width);
                silu_mul(isa, gate, up, out);
            }
        });
}

/// `out[i] = silu(gate[i]) · up[i]` on one thread.
fn silu_mul(isa: Isa, gate: &[f32], up: &[f32], out: &mut [f32]) {
    // SAFETY (both): `isa` is one the CPU has (`Isa::best` or the tests' `Isa::available`); the slices
    // have equal lengths (split by the caller).
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::silu_mul(gate, up, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::silu_mul(gate, up, out) },
        _ => {
            for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                *o = g / (1.0 + (-g).exp()) * u;
            }
        }
    }
}

/// RMSNorm of each row of `x` (rows of `weight.len()`): `x / √(mean(x²) + eps) · weight`, into `out`
/// (every element written; it need not be initialised).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [MaybeUninit<f32>]) {
    rms_norm_on(Isa::best(), x, weight, eps, out)
}

fn rms_norm_on(isa: Isa, x: &[f32], weight: &[f32], eps: f32, out: &mut [MaybeUninit<f32>]) {
    let width = weight.len();
    assert!(width > 0 && x.len() == out.len() && x.len().is_multiple_of(width));
    let rows_per_task = (CHUNK / width).max(1);
    out.par_chunks_mut(rows_per_task * width)
        .zip(x.par_chunks(rows_per_task * width))
        .for_each(|(out, x)| rms_norm_rows(isa, x, weight, eps, out));
}

/// [`rms_norm`] of whole rows on one thread.
fn rms_norm_rows(isa: Isa, x: &[f32], weight: &[f32], eps: f32, out: &mut [MaybeUninit<f32>]) {
    let width = weight.len();
    for (out, x) in out.chunks_exact_mut(width).zip(x.chunks_exact(width)) {
        // SAFETY (both): `isa` is one the CPU has; the three rows have the same width.
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { avx512::rms_norm_row(x, weight, eps, out) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { avx2::rms_norm_row(x, weight, eps, out) },
            _ => {
                let mean = x.iter().map(|v| v * v).sum::<f32>() / width as f32;
                let inv = 1.0 / (mean + eps).sqrt();
                for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
                    o.write(v * inv * w);
                }
            }
        }
    }
}

/// `sum = x + y` and its RMSNorm ([`rms_norm`]) in one pass over the rows: a transformer's residual add and
/// the next norm, which read the sum back from memory when they were two passes. The same bits as the add
/// followed by [`rms_norm`]. Every element of `sum` and `normed` is written (they need not be initialised).
pub fn add_rms_norm(
    x: &[f32],
    y: &[f32],
    weight: &[f32],
    eps: f32,
    sum: &mut [MaybeUninit<f32>],
    normed: &mut [MaybeUninit<f32>],
) {
    add_rms_norm_on(Isa::best(), x, y, weight, eps, sum, normed)
}

fn add_rms_norm_on(
    isa: Isa,
    x: &[f32],
    y: &[f32],
    weight: &[f32],
    eps: f32,
    sum: &mut [MaybeUninit<f32>],
    normed: &mut [MaybeUninit<f32>],
) {
    let width = weight.len();
    let n = x.len();
    assert!(width > 0 && n.is_multiple_of(width));
    assert!(y.len() == n && sum.len() == n && normed.len() == n);
    let chunk = (CHUNK / width).max(1) * width;
    sum.par_chunks_mut(chunk)
        .zip(normed.par_chunks_mut(chunk))
        .zip(x.par_chunks(chunk).zip(y.par_chunks(chunk)))
        .for_each(|((sum, normed), (x, y))| {
            for ((s, &a), &b) in sum.iter_mut().zip(x).zip(y) {
                s.write(a + b);
            }
            // SAFETY: every element of this chunk of `sum` was written just above.
            let sum = unsafe { assume_written(sum) };
            rms_norm_rows(isa, sum, weight, eps, normed);
        });
}

/// `row ← softmax(scale · row)` in place.
pub(crate) fn softmax_row(row: &mut [f32], scale: f32) {
    softmax_row_on(Isa::best(), row, scale)
}

fn softmax_row_on(isa: Isa, row: &mut [f32], scale: f32) {
    if row.is_empty() {
        return;
    }
    // SAFETY (both): `isa` is one the CPU has.
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::softmax_row(row, scale) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::softmax_row(row, scale) },
        _ => {
            // max(scale·x) = scale·max(x) for scale > 0; NaN propagates through the sum.
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let mut sum = 0f32;
            for x in row.iter_mut() {
                *x = ((*x - max) * scale).exp();
                sum += *x;
            }
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|x| *x *= inv);
        }
    }
}

/// `e^x` for every element, in place (the vector `exp`'s test harness).
#[cfg(test)]
fn exp_in_place(isa: Isa, x: &mut [f32]) {
    // SAFETY (both): `isa` is one the CPU has.
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::exp_in_place(x) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::exp_in_place(x) },
        _ => x.iter_mut().for_each(|v| *v = v.exp()),
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// Lanes as a mask for the first `len` (≤ 16) elements.
    #[inline(always)]
    fn lanes(len: usize) -> __mmask16 {
        ((1u32 << len) - 1) as __mmask16
    }

    /// `e^x` per lane: SLEEF's `xexpf` (sleef/src/libm/sleefsimdsp.c, `expf_u10`), ≤ 1 ulp. Below −104
    /// the result is 0, above ~88.72 it overflows to ∞ (by `scalef`), NaN stays NaN.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp16(x: __m512) -> __m512 {
        const R_LN2: f32 = std::f32::consts::LOG2_E;
        // SLEEF's L2Uf (0.693145751953125, exact in f32) and L2Lf: ln 2 = L2U + L2L to ~2⁻⁴⁸.
        const L2U: f32 = 0.693_145_75;
        const L2L: f32 = 1.428_606_8e-6;
        // max/min return their second operand when one is NaN, so NaN passes the clamp.
        let d = _mm512_min_ps(
            _mm512_set1_ps(104.0),
            _mm512_max_ps(_mm512_set1_ps(-104.0), x),
        );
        let q = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(d, _mm512_set1_ps(R_LN2)),
        );
        let s = _mm512_fnmadd_ps(q, _mm512_set1_ps(L2U), d);
        let s = _mm512_fnmadd_ps(q, _mm512_set1_ps(L2L), s);
        let mut u = _mm512_set1_ps(0.000_198_527_62);
        for c in [
            0.001_393_043_6,
            0.008_333_361,
            0.041_666_485,
            0.166_666_67,
            0.5,
        ] {
            u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(c));
        }
        u = _mm512_add_ps(
            _mm512_set1_ps(1.0),
            _mm512_fmadd_ps(_mm512_mul_ps(s, s), u, s),
        );
        let u = _mm512_scalef_ps(u, q);
        let below = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(-104.0));
        _mm512_mask_mov_ps(u, below, _mm512_setzero_ps())
    }

    #[cfg(test)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_in_place(x: &mut [f32]) {
        for chunk in x.chunks_mut(16) {
            let m = lanes(chunk.len());
            let v = _mm512_maskz_loadu_ps(m, chunk.as_ptr());
            _mm512_mask_storeu_ps(chunk.as_mut_ptr(), m, exp16(v));
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let one = _mm512_set1_ps(1.0);
        for ((o, g), u) in out.chunks_mut(16).zip(gate.chunks(16)).zip(up.chunks(16)) {
            let m = lanes(o.len());
            let g = _mm512_maskz_loadu_ps(m, g.as_ptr());
            let u = _mm512_maskz_loadu_ps(m, u.as_ptr());
            let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
            let silu = _mm512_div_ps(g, _mm512_add_ps(one, e));
            _mm512_mask_storeu_ps(o.as_mut_ptr(), m, _mm512_mul_ps(silu, u));
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn rms_norm_row(x: &[f32], weight: &[f32], eps: f32, out: &mut [MaybeUninit<f32>]) {
        let mut sum = _mm512_setzero_ps();
        for c in x.chunks(16) {
            let v = _mm512_maskz_loadu_ps(lanes(c.len()), c.as_ptr());
            sum = _mm512_fmadd_ps(v, v, sum);
        }
        let mean = _mm512_reduce_add_ps(sum) / x.len() as f32;
        let inv = _mm512_set1_ps(1.0 / (mean + eps).sqrt());
        for ((o, x), w) in out.chunks_mut(16).zip(x.chunks(16)).zip(weight.chunks(16)) {
            let m = lanes(o.len());
            let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x.as_ptr()), inv);
            let w = _mm512_maskz_loadu_ps(m, w.as_ptr());
            _mm512_mask_storeu_ps(o.as_mut_ptr().cast(), m, _mm512_mul_ps(v, w));
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn softmax_row(row: &mut [f32], scale: f32) {
        let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
        for c in row.chunks(16) {
            let m = lanes(c.len());
            max = _mm512_mask_max_ps(max, m, max, _mm512_maskz_loadu_ps(m, c.as_ptr()));
        }
        let max = _mm512_set1_ps(_mm512_reduce_max_ps(max));
        let scale = _mm512_set1_ps(scale);
        let mut sum = _mm512_setzero_ps();
        for c in row.chunks_mut(16) {
            let m = lanes(c.len());
            let x = _mm512_maskz_loadu_ps(m, c.as_ptr());
            let e = exp16(_mm512_mul_ps(_mm512_sub_ps(x, max), scale));
            sum = _mm512_mask_add_ps(sum, m, sum, e);
            _mm512_mask_storeu_ps(c.as_mut_ptr(), m, e);
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
        for c in row.chunks_mut(16) {
            let m = lanes(c.len());
            let x = _mm512_maskz_loadu_ps(m, c.as_ptr());
            _mm512_mask_storeu_ps(c.as_mut_ptr(), m, _mm512_mul_ps(x, inv));
        }
    }
}

/// [`avx512`]'s functions on 8 lanes, for CPUs with AVX2 and FMA only (AMD Zen 1–3, Intel before
/// Skylake-SP). AVX2 has neither masked loads that cost nothing nor `scalef`: tails go through a small
/// buffer, and `2^q` is built in the exponent bits.
#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    use crate::kernels::to_overwrite;

    /// Up to 8 values, the lanes past `v`'s end set to `fill`.
    #[inline(always)]
    unsafe fn load(v: &[f32], fill: f32) -> __m256 {
        if v.len() == 8 {
            return _mm256_loadu_ps(v.as_ptr());
        }
        let mut lanes = [fill; 8];
        lanes[..v.len()].copy_from_slice(v);
        _mm256_loadu_ps(lanes.as_ptr())
    }

    /// The first `v.len()` (≤ 8) lanes of `x` into `v`.
    #[inline(always)]
    unsafe fn store(v: &mut [f32], x: __m256) {
        // SAFETY: `write` writes only lanes of `x`, initialised floats.
        write(unsafe { to_overwrite(v) }, x)
    }

    /// [`store`] into floats that need not be initialised yet.
    #[inline(always)]
    unsafe fn write(v: &mut [MaybeUninit<f32>], x: __m256) {
        if v.len() == 8 {
            return _mm256_storeu_ps(v.as_mut_ptr().cast(), x);
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), x);
        for (v, &lane) in v.iter_mut().zip(&lanes) {
            v.write(lane);
        }
    }

    /// The sum of the 8 lanes (pairwise: high half onto low, then within the low half).
    #[inline(always)]
    unsafe fn sum(x: __m256) -> f32 {
        let half = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
        let pairs = _mm_add_ps(half, _mm_movehl_ps(half, half));
        _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehdup_ps(pairs)))
    }

    /// The largest of the 8 lanes.
    #[inline(always)]
    unsafe fn max(x: __m256) -> f32 {
        let half = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
        let pairs = _mm_max_ps(half, _mm_movehl_ps(half, half));
        _mm_cvtss_f32(_mm_max_ss(pairs, _mm_movehdup_ps(pairs)))
    }

    /// `2^q` for integral `q` in −126..=127, from its exponent bits.
    #[inline(always)]
    unsafe fn pow2(q: __m256i) -> __m256 {
        _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            q,
            _mm256_set1_epi32(127),
        )))
    }

    /// `e^x` per lane: [`super::avx512::exp16`]'s SLEEF `expf_u10` (≤ 1 ulp), with SLEEF's `vldexp2` for
    /// the scaling: `u · 2^q` as `u · 2^(q/2) · 2^(q − q/2)`, each factor a normal float for |q| ≤ 150.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp8(x: __m256) -> __m256 {
        const R_LN2: f32 = std::f32::consts::LOG2_E;
        const L2U: f32 = 0.693_145_75;
        const L2L: f32 = 1.428_606_8e-6;
        // max/min return their second operand when one is NaN, so NaN passes the clamp.
        let d = _mm256_min_ps(
            _mm256_set1_ps(104.0),
            _mm256_max_ps(_mm256_set1_ps(-104.0), x),
        );
        let q = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(d, _mm256_set1_ps(R_LN2)),
        );
        let s = _mm256_fnmadd_ps(q, _mm256_set1_ps(L2U), d);
        let s = _mm256_fnmadd_ps(q, _mm256_set1_ps(L2L), s);
        let mut u = _mm256_set1_ps(0.000_198_527_62);
        for c in [
            0.001_393_043_6,
            0.008_333_361,
            0.041_666_485,
            0.166_666_67,
            0.5,
        ] {
            u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(c));
        }
        u = _mm256_add_ps(
            _mm256_set1_ps(1.0),
            _mm256_fmadd_ps(_mm256_mul_ps(s, s), u, s),
        );
        // A NaN `q` converts to i32::MIN: garbage factors, but `u` is NaN already.
        let q = _mm256_cvtps_epi32(q);
        let half = _mm256_srai_epi32::<1>(q);
        let u = _mm256_mul_ps(
            _mm256_mul_ps(u, pow2(half)),
            pow2(_mm256_sub_epi32(q, half)),
        );
        let below = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(-104.0));
        _mm256_andnot_ps(below, u)
    }

    #[cfg(test)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_in_place(x: &mut [f32]) {
        for chunk in x.chunks_mut(8) {
            let e = exp8(load(chunk, 0.0));
            store(chunk, e);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
        for ((o, g), u) in out.chunks_mut(8).zip(gate.chunks(8)).zip(up.chunks(8)) {
            store(o, silu_mul8(load(g, 0.0), load(u, 0.0)));
        }
    }

    /// `silu(gate) · up` per lane, as [`silu_mul`] computes it (the GEMM's fused SwiGLU store calls this
    /// too, so both give the same bits).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_mul8(gate: __m256, up: __m256) -> __m256 {
        let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gate));
        let silu = _mm256_div_ps(gate, _mm256_add_ps(_mm256_set1_ps(1.0), e));
        _mm256_mul_ps(silu, up)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn rms_norm_row(x: &[f32], weight: &[f32], eps: f32, out: &mut [MaybeUninit<f32>]) {
        let mut squares = _mm256_setzero_ps();
        for c in x.chunks(8) {
            let v = load(c, 0.0);
            squares = _mm256_fmadd_ps(v, v, squares);
        }
        let mean = sum(squares) / x.len() as f32;
        let inv = _mm256_set1_ps(1.0 / (mean + eps).sqrt());
        for ((o, x), w) in out.chunks_mut(8).zip(x.chunks(8)).zip(weight.chunks(8)) {
            let v = _mm256_mul_ps(load(x, 0.0), inv);
            write(o, _mm256_mul_ps(v, load(w, 0.0)));
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn softmax_row(row: &mut [f32], scale: f32) {
        // Lanes past the row's end hold −∞: they leave the max alone and add e^−∞ = 0 to the sum.
        let mut most = _mm256_set1_ps(f32::NEG_INFINITY);
        for c in row.chunks(8) {
            // (A NaN in the row may be lost here, but its e^x makes the sum, so every value, NaN.)
            most = _mm256_max_ps(most, load(c, f32::NEG_INFINITY));
        }
        let most = max(most);
        let (most, scale) = (_mm256_set1_ps(most), _mm256_set1_ps(scale));
        let mut total = _mm256_setzero_ps();
        for c in row.chunks_mut(8) {
            let x = load(c, f32::NEG_INFINITY);
            let e = exp8(_mm256_mul_ps(_mm256_sub_ps(x, most), scale));
            total = _mm256_add_ps(total, e);
            store(c, e);
        }
        let inv = _mm256_set1_ps(1.0 / sum(total));
        for c in row.chunks_mut(8) {
            let x = _mm256_mul_ps(load(c, 0.0), inv);
            store(c, x);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{to_overwrite, written};

    /// Distance in units in the last place between an f32 and the exact value.
    fn ulps(got: f32, exact: f64) -> f64 {
        let nearest = exact as f32;
        let ulp = (f32::from_bits(nearest.abs().to_bits() + 1) - nearest.abs()) as f64;
        (got as f64 - exact).abs() / ulp
    }

    #[test]
    fn exp_is_within_one_ulp_over_the_whole_range() {
        let mut xs: Vec<f32> = (0..200_001)
            .map(|i| -87.0 + 175.0 * i as f32 / 200_000.0)
            .collect();
        xs.extend([0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 88.7, -87.3]);
        for isa in Isa::available() {
            let mut got = xs.clone();
            exp_in_place(isa, &mut got);
            let worst = xs
                .iter()
                .zip(&got)
                .map(|(&x, &e)| ulps(e, (x as f64).exp()))
                .fold(0f64, f64::max);
            assert!(worst <= 1.0, "{isa:?}: {worst} ulp");
        }
    }

    #[test]
    fn exp_edges_are_zero_infinity_and_nan() {
        for isa in Isa::available() {
            // Nine values: a whole vector of 8 and a tail, for the 8-lane build.
            let mut x = [
                f32::NEG_INFINITY,
                -200.0,
                -104.5,
                89.0,
                f32::INFINITY,
                f32::NAN,
                -103.0,
                0.0,
                88.0,
            ];
            exp_in_place(isa, &mut x);
            assert_eq!(
                x[..5],
                [0.0, 0.0, 0.0, f32::INFINITY, f32::INFINITY],
                "{isa:?}"
            );
            assert!(x[5].is_nan(), "{isa:?}");
            // e^−103 ≈ 1.4e−45 is the smallest subnormal's neighbourhood: 0 or a subnormal, never more.
            assert!(x[6] < 1e-44, "{isa:?}: {}", x[6]);
            assert_eq!(x[7], 1.0, "{isa:?}");
            assert!(ulps(x[8], 88f64.exp()) <= 1.0, "{isa:?}: {}", x[8]);
        }
    }

    #[test]
    fn swiglu_matches_the_formula_in_f64() {
        // Rows of 2 × 37 (two vectors and a tail each) over several tasks; gates from −60 to 60 cross
        // both saturations.
        let (width, rows) = (37, CHUNK / 37 * 3 + 5);
        let n = rows * width;
        let gate: Vec<f32> = (0..n)
            .map(|i| -60.0 + 120.0 * i as f32 / n as f32)
            .collect();
        let up: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0)
            .collect();
        let x: Vec<f32> = (0..rows)
            .flat_map(|r| [&gate[r * width..][..width], &up[r * width..][..width]].concat())
            .collect();
        for isa in Isa::available() {
            let mut out = vec![f32::NAN; n];
            swiglu_on(isa, &x, width, &mut out);
            for i in 0..n {
                let g = gate[i] as f64;
                let want = g / (1.0 + (-g).exp()) * up[i] as f64;
                assert!(
                    (out[i] as f64 - want).abs() <= 4.0 * f32::EPSILON as f64 * want.abs() + 1e-30,
                    "{isa:?}: gate {g}, up {}: {} vs {want}",
                    up[i],
                    out[i]
                );
            }
        }
    }

    #[test]
    fn rms_norm_matches_the_formula_in_f64() {
        // Width 37 (two vectors and a tail), rows over several tasks, one row of zeros (eps only).
        let (width, rows) = (37, CHUNK / 37 * 2 + 3);
        let mut x: Vec<f32> = (0..rows * width)
            .map(|i| ((i * 7919) % 2001) as f32 / 100.0 - 10.0)
            .collect();
        x[..width].fill(0.0);
        let weight: Vec<f32> = (0..width).map(|i| 0.5 + i as f32 / 10.0).collect();
        let eps = 1e-5;
        for isa in Isa::available() {
            // NaN until written: an element left unwritten fails the comparison.
            let mut out = vec![f32::NAN; x.len()];
            // SAFETY: `rms_norm_on` writes only floats.
            rms_norm_on(isa, &x, &weight, eps, unsafe { to_overwrite(&mut out) });
            for (r, (row, got)) in x.chunks(width).zip(out.chunks(width)).enumerate() {
                let mean = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / width as f64;
                let inv = 1.0 / (mean + eps as f64).sqrt();
                for j in 0..width {
                    let want = row[j] as f64 * inv * weight[j] as f64;
                    assert!(
                        (got[j] as f64 - want).abs() <= 1e-6 * want.abs() + 1e-30,
                        "{isa:?}: row {r} col {j}: {} vs {want}",
                        got[j]
                    );
                }
            }
        }
    }

    #[test]
    fn add_rms_norm_is_the_sum_then_rms_norm_bit_for_bit() {
        // Width 37 (a tail), rows over several tasks; the sum exactly `x + y`, the norm `rms_norm`'s
        // bits of that sum (itself checked against f64 above), on every build this CPU runs.
        let (width, rows) = (37, CHUNK / 37 * 2 + 3);
        let x: Vec<f32> = (0..rows * width)
            .map(|i| ((i * 7919) % 2001) as f32 / 100.0 - 10.0)
            .collect();
        let y: Vec<f32> = (0..rows * width)
            .map(|i| ((i * 104_729) % 997) as f32 / 37.0 - 13.0)
            .collect();
        let weight: Vec<f32> = (0..width).map(|i| 0.5 + i as f32 / 10.0).collect();
        let want_sum: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a + b).collect();
        for isa in Isa::available() {
            // SAFETY (both): the kernels write only floats.
            let want = unsafe {
                written(x.len(), |want| {
                    rms_norm_on(isa, &want_sum, &weight, 1e-5, want)
                })
            };
            let (mut sum, mut normed) = (vec![f32::NAN; x.len()], vec![f32::NAN; x.len()]);
            let (sum_out, normed_out) =
                unsafe { (to_overwrite(&mut sum), to_overwrite(&mut normed)) };
            add_rms_norm_on(isa, &x, &y, &weight, 1e-5, sum_out, normed_out);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&sum), bits(&want_sum), "{isa:?} sum");
            assert_eq!(bits(&normed), bits(&want), "{isa:?} norm");
        }
    }

    #[test]
    fn softmax_matches_the_formula_in_f64() {
        // Lengths around the 8- and 16-lane widths, a row with −∞ (a masked key) and one with a NaN.
        for isa in Isa::available() {
            for len in [1, 7, 8, 9, 16, 17, 37, 130] {
                let row: Vec<f32> = (0..len)
                    .map(|i| ((i * 7919) % 101) as f32 / 4.0 - 12.0)
                    .collect();
                let scale = 0.125;
                let mut got = row.clone();
                softmax_row_on(isa, &mut got, scale);
                let most = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
                let e: Vec<f64> = row
                    .iter()
                    .map(|&x| ((x as f64 - most) * scale as f64).exp())
                    .collect();
                let total: f64 = e.iter().sum();
                for (j, (&g, &e)) in got.iter().zip(&e).enumerate() {
                    let want = e / total;
                    assert!(
                        (g as f64 - want).abs() <= 1e-6 * want,
                        "{isa:?}: len {len}, [{j}]: {g} vs {want}"
                    );
                }
            }
            let mut masked = [f32::NEG_INFINITY, 1.0, 1.0, f32::NEG_INFINITY, 3.0];
            softmax_row_on(isa, &mut masked, 1.0);
            let z = 2.0 + 2f64.exp();
            let want = [0.0, 1.0 / z, 1.0 / z, 0.0, 2f64.exp() / z];
            for (g, w) in masked.iter().zip(want) {
                assert!((*g as f64 - w).abs() <= 1e-6, "{isa:?}: {masked:?}");
            }
            let mut nan = [1.0, f32::NAN, 2.0];
            softmax_row_on(isa, &mut nan, 1.0);
            assert!(nan.iter().all(|x| x.is_nan()), "{isa:?}: {nan:?}");
        }
    }

    #[test]
    fn the_results_do_not_depend_on_the_thread_count() {
        let n = 101 * 900; // several tasks of whole 101-wide rows (and 2 × 101 for SwiGLU), vector tails
        let gate: Vec<f32> = (0..n).map(|i| (i % 97) as f32 / 9.0 - 5.0).collect();
        let run = |isa, threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut out = vec![0f32; n / 2];
            let mut norm = vec![0f32; n];
            pool.install(|| {
                swiglu_on(isa, &gate, 101, &mut out);
                // SAFETY: `rms_norm_on` writes only floats.
                rms_norm_on(isa, &gate, &gate[..101], 1e-5, unsafe {
                    to_overwrite(&mut norm)
                });
            });
            (out, norm)
        };
        for isa in Isa::available() {
            assert_eq!(run(isa, 1), run(isa, 3), "{isa:?}");
        }
    }
}
