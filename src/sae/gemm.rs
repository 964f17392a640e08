//! `out = a · bᵀ` for row-major f32 matrices: the encoder product of every training step.
//!
//! Written by hand because it is the step's only dense product (~95% of its FLOPs) and the `gemm` crate
//! reaches ~100 GFLOP/s of this CPU's ~230 (its AVX-512 kernels are slower still here). This is the BLIS
//! scheme with an AVX-512 12×32 micro-kernel: `b` is packed once into 32-column panels per depth block,
//! each thread packs 12-row panels of its own block of `a` rows, and the micro-kernel keeps a 12×32 tile
//! of `out` in 24 registers while it walks the depth. Every output element is summed in the same order
//! whatever the thread count, so results are bit-identical across runs and thread counts. Without AVX-512
//! the `gemm` crate does the work.

use rayon::prelude::*;

/// Rows of `a` per micro-tile.
const MR: usize = 12;
/// Columns of `out` (rows of `b`) per micro-tile: two 16-float registers.
const NR: usize = 32;
/// Depth per block: a `b` panel (KC × 32 floats, 24 KiB) stays in the 32 KiB L1 while it meets every
/// `a` panel of the thread's block.
const KC: usize = 1024;
/// Rows of `a` per thread task (a multiple of MR): the packed `a` block (≤ 90 KiB) stays in L2.
const MC: usize = 120;

/// `out[n × m] = a[n × d] · b[m × d]ᵀ`, all row-major and contiguous.
pub fn matmul_nt(a: &[f32], b: &[f32], out: &mut [f32], n: usize, m: usize, d: usize) {
    matmul_nt_bias(a, b, None, out, n, m, d)
}

/// `out[n × m] = a[n × d] · b[m × d]ᵀ + bias[m]` (the bias added to every row, as the tile is stored).
pub fn matmul_nt_bias(
    a: &[f32],
    b: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    n: usize,
    m: usize,
    d: usize,
) {
    assert!(a.len() == n * d && b.len() == m * d && out.len() == n * m);
    assert!(bias.is_none_or(|bias| bias.len() == m));
    if n == 0 || m == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if d > 0 && std::arch::is_x86_feature_detected!("avx512f") {
        return blocked(a, b, bias, out, m, d);
    }
    if d == 0 {
        out.fill(0.0);
    } else {
        fallback(a, b, out, n, m, d);
    }
    if let Some(bias) = bias {
        out.par_chunks_mut(m).for_each(|row| {
            row.iter_mut().zip(bias).for_each(|(o, b)| *o += b);
        });
    }
}

/// Depth blocks of at most KC, as even as possible (576 → 3 × 192).
fn depth_blocks(d: usize) -> Vec<(usize, usize)> {
    let count = d.div_ceil(KC);
    let size = d.div_ceil(count);
    (0..count)
        .map(|i| (i * size, size.min(d - i * size)))
        .collect()
}

#[cfg(target_arch = "x86_64")]
fn blocked(a: &[f32], b: &[f32], bias: Option<&[f32]>, out: &mut [f32], m: usize, d: usize) {
    let blocks = depth_blocks(d);
    let panels = m.div_ceil(NR);
    // The bias, zero-padded to whole panels; added by the first depth block's tiles.
    let mut padded_bias = vec![0f32; panels * NR];
    if let Some(bias) = bias {
        padded_bias[..m].copy_from_slice(bias);
    }
    // Packed b: per depth block, per 32-row panel, `len × 32` floats depth-major (zero-padded past m).
    let mut packed_b = vec![0f32; panels * NR * d];
    packed_b
        .par_chunks_mut(NR * d)
        .enumerate()
        .for_each(|(panel, dst)| {
            let mut at = 0;
            for &(start, len) in &blocks {
                for p in 0..len {
                    for l in 0..NR {
                        let row = panel * NR + l;
                        dst[at + p * NR + l] = if row < m { b[row * d + start + p] } else { 0.0 };
                    }
                }
                at += len * NR;
            }
        });
    out.par_chunks_mut(MC * m)
        .enumerate()
        .for_each(|(block, out_rows)| {
            let row0 = block * MC;
            let rows = out_rows.len() / m;
            let a_panels = rows.div_ceil(MR);
            let mut packed_a = vec![0f32; a_panels * MR * KC];
            let mut b_at = 0;
            for (bi, &(start, len)) in blocks.iter().enumerate() {
                for panel in 0..a_panels {
                    let dst = &mut packed_a[panel * MR * len..(panel + 1) * MR * len];
                    for r in 0..MR {
                        let row = panel * MR + r;
                        for p in 0..len {
                            dst[p * MR + r] = if row < rows {
                                a[(row0 + row) * d + start + p]
                            } else {
                                0.0
                            };
                        }
                    }
                }
                for j in 0..panels {
                    let bp = &packed_b[j * NR * d + b_at..][..NR * len];
                    let cols = NR.min(m - j * NR);
                    for i in 0..a_panels {
                        let ap = &packed_a[i * MR * len..(i + 1) * MR * len];
                        let tile_rows = MR.min(rows - i * MR);
                        let c = &mut out_rows[i * MR * m + j * NR..];
                        // SAFETY: avx512f was detected; the panels hold len × MR / len × NR floats and the
                        // tile's rows and columns lie inside `c` (checked by the kernel's bounds).
                        let start = if bi == 0 {
                            Start::Bias(&padded_bias[j * NR..][..NR])
                        } else {
                            Start::Accumulate
                        };
                        unsafe { tile(len, ap, bp, c, m, tile_rows, cols, start) };
                    }
                }
                b_at += len * NR;
            }
        });
}

/// What a tile's sums are added to.
#[derive(Clone, Copy)]
enum Start<'a> {
    /// The tile's columns of the bias (the first depth block).
    Bias(&'a [f32]),
    /// What `c` holds (later depth blocks).
    Accumulate,
}

/// One MR × NR tile: full tiles go straight to `c`, edge tiles through a scratch tile.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn tile(
    kc: usize,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    ldc: usize,
    rows: usize,
    cols: usize,
    start: Start,
) {
    debug_assert!(a.len() >= kc * MR && b.len() >= kc * NR);
    if rows == MR && cols == NR {
        assert!(c.len() >= (MR - 1) * ldc + NR);
        kernel(kc, a.as_ptr(), b.as_ptr(), c.as_mut_ptr(), ldc, start);
        return;
    }
    let mut scratch = [0f32; MR * NR];
    for r in 0..rows {
        scratch[r * NR..r * NR + cols].copy_from_slice(&c[r * ldc..r * ldc + cols]);
    }
    kernel(kc, a.as_ptr(), b.as_ptr(), scratch.as_mut_ptr(), NR, start);
    for r in 0..rows {
        c[r * ldc..r * ldc + cols].copy_from_slice(&scratch[r * NR..r * NR + cols]);
    }
}

/// c[12 × 32] = start + a-panel · b-panel over `kc` depth steps; `a` is depth-major 12 floats per step,
/// `b` 32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, start: Start) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    let (mut a, mut b) = (a, b);
    for _ in 0..kc {
        let b0 = _mm512_loadu_ps(b);
        let b1 = _mm512_loadu_ps(b.add(16));
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = _mm512_set1_ps(*a.add(r));
            acc[0] = _mm512_fmadd_ps(x, b0, acc[0]);
            acc[1] = _mm512_fmadd_ps(x, b1, acc[1]);
        }
        a = a.add(MR);
        b = b.add(NR);
    }
    let bias = match start {
        Start::Bias(bias) => Some((
            _mm512_loadu_ps(bias.as_ptr()),
            _mm512_loadu_ps(bias.as_ptr().add(16)),
        )),
        Start::Accumulate => None,
    };
    for (r, acc) in acc.iter().enumerate() {
        let row = c.add(r * ldc);
        let (lo, hi) = match bias {
            Some((b0, b1)) => (_mm512_add_ps(acc[0], b0), _mm512_add_ps(acc[1], b1)),
            None => (
                _mm512_add_ps(acc[0], _mm512_loadu_ps(row)),
                _mm512_add_ps(acc[1], _mm512_loadu_ps(row.add(16))),
            ),
        };
        _mm512_storeu_ps(row, lo);
        _mm512_storeu_ps(row.add(16), hi);
    }
}

/// The `gemm` crate (no AVX-512).
fn fallback(a: &[f32], b: &[f32], out: &mut [f32], n: usize, m: usize, d: usize) {
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the slices have exactly the extents the strides describe (checked by the caller) and `out`
    // does not alias the inputs (distinct borrows).
    unsafe {
        gemm::gemm(
            n,
            m,
            d,
            out.as_mut_ptr(),
            1,
            m as isize,
            false,
            a.as_ptr(),
            1,
            d as isize,
            b.as_ptr(),
            d as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], n: usize, m: usize, d: usize) -> Vec<f64> {
        let mut out = vec![0f64; n * m];
        for i in 0..n {
            for j in 0..m {
                out[i * m + j] = (0..d)
                    .map(|p| a[i * d + p] as f64 * b[j * d + p] as f64)
                    .sum();
            }
        }
        out
    }

    #[test]
    fn matches_a_naive_product_on_ragged_shapes() {
        // Edges in every direction: rows not a multiple of 12 or of a thread block, columns not a multiple
        // of 32, depths below, at and above one block.
        for &(n, m, d) in &[
            (1, 1, 1),
            (13, 33, 7),
            (121, 70, 192),
            (250, 64, 577),
            (24, 96, 400),
            (30, 40, 2100),
        ] {
            let a = crate::sae::step::tests::random(n * d, 1, 1.0);
            let b = crate::sae::step::tests::random(m * d, 2, 1.0);
            let bias = crate::sae::step::tests::random(m, 5, 1.0);
            let mut out = vec![f32::NAN; n * m];
            matmul_nt_bias(&a, &b, Some(&bias), &mut out, n, m, d);
            let mut want = naive(&a, &b, n, m, d);
            for (i, w) in want.iter_mut().enumerate() {
                *w += bias[i % m] as f64;
            }
            for (i, (&got, &want)) in out.iter().zip(&want).enumerate() {
                let tolerance = 1e-5 * (d as f64).sqrt() * (1.0 + want.abs());
                assert!(
                    (got as f64 - want).abs() < tolerance,
                    "({n}, {m}, {d}) element {i}: {got} vs {want}"
                );
            }
            let mut fallback_out = vec![0f32; n * m];
            fallback(&a, &b, &mut fallback_out, n, m, d);
            for (i, o) in fallback_out.iter_mut().enumerate() {
                *o += bias[i % m];
            }
            let worst = out
                .iter()
                .zip(&fallback_out)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(
                worst < 1e-4,
                "({n}, {m}, {d}): differs from the gemm crate by {worst}"
            );
        }
    }

    #[test]
    fn the_result_does_not_depend_on_the_thread_count() {
        let (n, m, d) = (300, 100, 250);
        let a = crate::sae::step::tests::random(n * d, 3, 1.0);
        let b = crate::sae::step::tests::random(m * d, 4, 1.0);
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut out = vec![0f32; n * m];
            pool.install(|| matmul_nt(&a, &b, &mut out, n, m, d));
            out
        };
        let one = run(1);
        assert!(one
            .iter()
            .zip(run(3))
            .all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}
