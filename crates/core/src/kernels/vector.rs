//! Vectorised elementwise and row-wise math for the transformer on CPU: `exp`, SwiGLU (`silu(gate)·up`),
//! RMSNorm and softmax.
//!
//! Written by hand because candle's CPU versions call libm's scalar `expf` element by element (its SiLU on
//! one thread too): on SmolLM2 at batch 8 × 128 they took ~8 ms of each layer's ~50. The AVX-512 `exp` is
//! SLEEF's `expf_u10` (same range reduction and polynomial, ≤ 1 ulp); without AVX-512 the scalar libm one.
//! Lanes are independent, so results do not depend on the thread count.

use rayon::prelude::*;

/// Elements per parallel task: large enough to amortise the task, small enough to balance two threads.
const CHUNK: usize = 1 << 14;

/// SwiGLU on rows that hold the gate and up projections side by side: row `r` of `x` is
/// `[gate (width) | up (width)]`, row `r` of `out` is `silu(gate) · up` with `silu(g) = g / (1 + e^−g)`.
pub fn swiglu(x: &[f32], width: usize, out: &mut [f32]) {
    assert!(width > 0 && x.len() == 2 * out.len() && out.len().is_multiple_of(width));
    let rows_per_task = (CHUNK / width).max(1);
    out.par_chunks_mut(rows_per_task * width)
        .zip(x.par_chunks(rows_per_task * 2 * width))
        .for_each(|(out, x)| {
            for (out, x) in out.chunks_exact_mut(width).zip(x.chunks_exact(2 * width)) {
                let (gate, up) = x.split_at(width);
                silu_mul(gate, up, out);
            }
        });
}

/// `out[i] = silu(gate[i]) · up[i]` on one thread.
fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::avx512() {
        // SAFETY: AVX-512F was just detected; the slices have equal lengths (split by the caller).
        unsafe { avx512::silu_mul(gate, up, out) };
        return;
    }
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// RMSNorm of each row of `x` (rows of `weight.len()`): `x / √(mean(x²) + eps) · weight`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let width = weight.len();
    assert!(width > 0 && x.len() == out.len() && x.len().is_multiple_of(width));
    let rows_per_task = (CHUNK / width).max(1);
    out.par_chunks_mut(rows_per_task * width)
        .zip(x.par_chunks(rows_per_task * width))
        .for_each(|(out, x)| {
            for (out, x) in out.chunks_exact_mut(width).zip(x.chunks_exact(width)) {
                #[cfg(target_arch = "x86_64")]
                if super::avx512() {
                    // SAFETY: AVX-512F was just detected; the three rows have the same width.
                    unsafe { avx512::rms_norm_row(x, weight, eps, out) };
                    continue;
                }
                let mean = x.iter().map(|v| v * v).sum::<f32>() / width as f32;
                let inv = 1.0 / (mean + eps).sqrt();
                for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
                    *o = v * inv * w;
                }
            }
        });
}

/// `row ← softmax(scale · row)` in place.
pub(crate) fn softmax_row(row: &mut [f32], scale: f32) {
    if row.is_empty() {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::avx512() {
        // SAFETY: AVX-512F was just detected.
        unsafe { avx512::softmax_row(row, scale) };
        return;
    }
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

/// `e^x` for every element, in place (the vector `exp`'s test harness).
#[cfg(test)]
fn exp_in_place(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::avx512() {
        // SAFETY: AVX-512F was just detected.
        unsafe { avx512::exp_in_place(x) };
        return;
    }
    x.iter_mut().for_each(|v| *v = v.exp());
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

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
    pub unsafe fn rms_norm_row(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
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
            _mm512_mask_storeu_ps(o.as_mut_ptr(), m, _mm512_mul_ps(v, w));
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut got = xs.clone();
        exp_in_place(&mut got);
        let worst = xs
            .iter()
            .zip(&got)
            .map(|(&x, &e)| ulps(e, (x as f64).exp()))
            .fold(0f64, f64::max);
        assert!(worst <= 1.0, "{worst} ulp");
    }

    #[test]
    fn exp_edges_are_zero_infinity_and_nan() {
        let mut x = [f32::NEG_INFINITY, -200.0, 89.0, f32::INFINITY, f32::NAN];
        exp_in_place(&mut x);
        assert_eq!(x[..4], [0.0, 0.0, f32::INFINITY, f32::INFINITY]);
        assert!(x[4].is_nan());
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
        let mut out = vec![f32::NAN; n];
        swiglu(&x, width, &mut out);
        for i in 0..n {
            let g = gate[i] as f64;
            let want = g / (1.0 + (-g).exp()) * up[i] as f64;
            assert!(
                (out[i] as f64 - want).abs() <= 4.0 * f32::EPSILON as f64 * want.abs() + 1e-30,
                "gate {g}, up {}: {} vs {want}",
                up[i],
                out[i]
            );
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
        let mut out = vec![f32::NAN; x.len()];
        rms_norm(&x, &weight, eps, &mut out);
        for (r, (row, got)) in x.chunks(width).zip(out.chunks(width)).enumerate() {
            let mean = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / width as f64;
            let inv = 1.0 / (mean + eps as f64).sqrt();
            for j in 0..width {
                let want = row[j] as f64 * inv * weight[j] as f64;
                assert!(
                    (got[j] as f64 - want).abs() <= 1e-6 * want.abs() + 1e-30,
                    "row {r} col {j}: {} vs {want}",
                    got[j]
                );
            }
        }
    }

    #[test]
    fn the_results_do_not_depend_on_the_thread_count() {
        let n = 101 * 900; // several tasks of whole 101-wide rows (and 2 × 101 for SwiGLU), vector tails
        let gate: Vec<f32> = (0..n).map(|i| (i % 97) as f32 / 9.0 - 5.0).collect();
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut out = vec![0f32; n / 2];
            let mut norm = vec![0f32; n];
            pool.install(|| {
                swiglu(&gate, 101, &mut out);
                rms_norm(&gate, &gate[..101], 1e-5, &mut norm);
            });
            (out, norm)
        };
        assert_eq!(run(1), run(3));
    }
}
