//! `out = a · bᵀ` for row-major f32 matrices: the encoder product of every training step and the language
//! models' linear layers.
//!
//! Written by hand because it is the step's only dense product (~95% of its FLOPs) and on its shape
//! (4096 × 576 · (4608 × 576)ᵀ) the `gemm` crate reaches ~140 GFLOP/s of this CPU's ~230, this ~200 (its
//! AVX-512 kernels are slower still). On the language models' smaller products the two measured the same
//! on AMD EPYC, but on Intel Xeon this one runs them 1.3–1.9× faster (`saeflow bench gemm`), so the model
//! uses it too. This is the BLIS
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
/// Packed depth steps per block. Blocking the depth lets a `b` panel stay in L1 while it meets every `a`
/// panel of a thread's block, but at this crate's widths (d_in ≤ 1024) one block measured fastest: 576
/// split into 2–8 blocks was 5–20% slower, f32 and bf16 alike.
const KC: usize = 1024;
/// Rows of `a` per thread task (a multiple of MR): the packed `a` block (≤ 90 KiB) stays in L2.
const MC: usize = 120;

/// How the encoder product multiplies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 products, f32 sums.
    #[default]
    F32,
    /// Inputs rounded to bfloat16 (to nearest even), products summed in f32: on AMX tiles where the CPU
    /// has them ([`super::amx`], ~4× the f32 rate), else twice the f32 rate on CPUs with AVX512-BF16
    /// (`vdpbf16ps`); ~3 significant digits per product. Elsewhere the f32 product.
    Bf16,
}

impl Precision {
    /// Whether this CPU multiplies bfloat16 natively (otherwise [`Precision::Bf16`] computes in f32).
    pub fn bf16_native() -> bool {
        Kernel::Amx.available() || Kernel::Avx512Bf16.available()
    }
}

/// Which implementation multiplies. [`Kernel::best`] chooses per call from what the CPU has; tests and
/// benchmarks force each in turn with [`matmul_nt_bias_with`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// bf16 inputs on AMX tiles ([`super::amx`]).
    Amx,
    /// bf16 input pairs with AVX512-BF16 `vdpbf16ps` (this file's micro-kernel).
    Avx512Bf16,
    /// f32 with AVX-512F FMAs (this file's micro-kernel).
    Avx512,
    /// The `gemm` crate (f32; any CPU).
    Portable,
}

impl Kernel {
    /// Every kernel, fastest first.
    pub const ALL: [Kernel; 4] = [
        Kernel::Amx,
        Kernel::Avx512Bf16,
        Kernel::Avx512,
        Kernel::Portable,
    ];

    /// Whether this CPU (and, for AMX, Linux) can run it.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        let avx512 = std::arch::is_x86_feature_detected!("avx512f");
        #[cfg(not(target_arch = "x86_64"))]
        let avx512 = false;
        match self {
            Kernel::Amx => super::amx::available(),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Bf16 => avx512 && std::arch::is_x86_feature_detected!("avx512bf16"),
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Avx512Bf16 => false,
            Kernel::Avx512 => avx512,
            Kernel::Portable => true,
        }
    }

    /// Whether it rounds its inputs to bf16.
    pub fn is_bf16(self) -> bool {
        matches!(self, Kernel::Amx | Kernel::Avx512Bf16)
    }

    /// The fastest available kernel of `precision` (bf16 falls back to f32 where the CPU has no bf16).
    pub fn best(precision: Precision) -> Kernel {
        Kernel::ALL
            .into_iter()
            .find(|k| k.available() && (precision == Precision::Bf16 || !k.is_bf16()))
            .unwrap_or(Kernel::Portable)
    }
}

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
    matmul_nt_bias_in(Precision::F32, a, b, bias, out, n, m, d)
}

/// [`matmul_nt_bias`] at a chosen precision.
#[allow(clippy::too_many_arguments)]
pub fn matmul_nt_bias_in(
    precision: Precision,
    a: &[f32],
    b: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    n: usize,
    m: usize,
    d: usize,
) {
    matmul_nt_bias_with(Kernel::best(precision), a, b, bias, out, n, m, d)
}

/// [`matmul_nt_bias`] on a chosen kernel.
///
/// # Panics
/// If the kernel is not [`Kernel::available`] here, or the extents disagree.
#[allow(clippy::too_many_arguments)]
pub fn matmul_nt_bias_with(
    kernel: Kernel,
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
    assert!(
        kernel.available(),
        "the {kernel:?} GEMM kernel needs a CPU feature this one lacks"
    );
    if n == 0 || m == 0 {
        return;
    }
    if d > 0 {
        match kernel {
            Kernel::Amx => return super::amx::matmul_nt_bias(a, b, bias, out, n, m, d),
            Kernel::Avx512Bf16 => return blocked::<Bf16Pairs>(a, b, bias, out, m, d),
            Kernel::Avx512 => return blocked::<F32s>(a, b, bias, out, m, d),
            Kernel::Portable => {}
        }
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

/// A packed operand format and the micro-kernel that consumes it.
trait Packing {
    /// One packed depth step of one row.
    type Elem: Copy + Default + Send + Sync;
    /// Depth values per packed element.
    const STEP: usize;
    /// The packed element at depth step `p` of `row` (zeros past its end).
    fn elem(row: &[f32], p: usize) -> Self::Elem;
    /// c[MR × NR] = start + a-panel · b-panel over `kc` packed depth steps.
    ///
    /// # Safety
    /// The CPU has the kernel's features; `a` holds kc × MR elements, `b` kc × NR, and `c` MR rows of
    /// NR floats `ldc` apart.
    unsafe fn kernel(
        kc: usize,
        a: *const Self::Elem,
        b: *const Self::Elem,
        c: *mut f32,
        ldc: usize,
        start: Start,
    );
}

/// Plain f32, one depth value per element (AVX-512F FMA).
struct F32s;

impl Packing for F32s {
    type Elem = f32;
    const STEP: usize = 1;
    #[inline(always)]
    fn elem(row: &[f32], p: usize) -> f32 {
        row[p]
    }
    unsafe fn kernel(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        start: Start,
    ) {
        #[cfg(target_arch = "x86_64")]
        kernel_f32(kc, a, b, c, ldc, start);
    }
}

/// Pairs of depth-adjacent bfloat16 values in one u32 (low half first), the operand of `vdpbf16ps`.
struct Bf16Pairs;

impl Packing for Bf16Pairs {
    type Elem = u32;
    const STEP: usize = 2;
    #[inline(always)]
    fn elem(row: &[f32], p: usize) -> u32 {
        let high = row.get(2 * p + 1).map_or(0, |&v| bf16_bits(v));
        bf16_bits(row[2 * p]) | high << 16
    }
    unsafe fn kernel(
        kc: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        start: Start,
    ) {
        #[cfg(target_arch = "x86_64")]
        kernel_bf16(kc, a, b, c, ldc, start);
    }
}

/// The bfloat16 nearest to `x` (ties to even; NaN stays NaN), as its 16 bits. Branch-free so packing
/// vectorises; the same rounding as `half::bf16::from_f32`.
#[inline(always)]
pub(crate) fn bf16_bits(x: f32) -> u32 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    if x.is_nan() {
        (b >> 16) | 0x40
    } else {
        rounded
    }
}

/// Depth blocks of at most KC packed steps, as even as possible (2100 → 3 × 700).
fn depth_blocks(steps: usize) -> Vec<(usize, usize)> {
    let count = steps.div_ceil(KC);
    let size = steps.div_ceil(count);
    (0..count)
        .map(|i| (i * size, size.min(steps - i * size)))
        .collect()
}

/// `b [m × d]` packed for the micro-kernel: per 32-row panel, per depth block, `len × 32` elements
/// depth-major (zero-padded past m).
struct Packed<K: Packing> {
    data: Vec<K::Elem>,
    m: usize,
    d: usize,
    steps: usize,
    blocks: Vec<(usize, usize)>,
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn pack<K: Packing>(b: &[f32], m: usize, d: usize) -> Packed<K> {
    let steps = d.div_ceil(K::STEP);
    let blocks = depth_blocks(steps);
    let panels = m.div_ceil(NR);
    let mut data = vec![K::Elem::default(); panels * NR * steps];
    data.par_chunks_mut(NR * steps)
        .enumerate()
        .for_each(|(panel, dst)| {
            let rows: Vec<&[f32]> = (panel * NR..m.min(panel * NR + NR))
                .map(|r| &b[r * d..][..d])
                .collect();
            let mut at = 0;
            for &(start, len) in &blocks {
                for p in 0..len {
                    let out = &mut dst[at + p * NR..][..NR];
                    for (o, row) in out.iter_mut().zip(&rows) {
                        *o = K::elem(row, start + p);
                    }
                }
                at += len * NR;
            }
        });
    Packed {
        data,
        m,
        d,
        steps,
        blocks,
    }
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn blocked<K: Packing>(
    a: &[f32],
    b: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    m: usize,
    d: usize,
) {
    multiply(a, &pack::<K>(b, m, d), bias, out);
}

/// `out = a · bᵀ + bias` with `b` packed. The split into tasks never changes a sum's order.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn multiply<K: Packing>(a: &[f32], b: &Packed<K>, bias: Option<&[f32]>, out: &mut [f32]) {
    let (m, d) = (b.m, b.d);
    let panels = m.div_ceil(NR);
    // The bias, zero-padded to whole panels; added by the first depth block's tiles.
    let mut padded_bias = vec![0f32; panels * NR];
    if let Some(bias) = bias {
        padded_bias[..m].copy_from_slice(bias);
    }
    let parts = row_tasks(out, m, MR, MC);
    parts.into_par_iter().for_each(|(row0, out)| {
        let a = &a[row0 * d..][..out.len() / m * d];
        block(a, b, &padded_bias, out);
    });
}

/// `out` (rows of `m` values) split into tasks of whole groups of `unit` rows, at most `max_rows` rows each
/// unless that leaves a thread idle: several per thread (the last task of an uneven split would idle the
/// others), sizes differing by at most one group with the larger ones spread out, so rayon's halving gives
/// each thread the same work. Each task is its first row and its rows of `out`.
pub(crate) fn row_tasks(
    out: &mut [f32],
    m: usize,
    unit: usize,
    max_rows: usize,
) -> Vec<(usize, &mut [f32])> {
    let n = out.len() / m;
    let groups = n.div_ceil(unit);
    let tasks = groups
        .min(4 * rayon::current_num_threads())
        .max(groups.div_ceil((max_rows / unit).max(1)));
    let mut parts = Vec::with_capacity(tasks);
    let mut rest = out;
    for t in 0..tasks {
        let row0 = t * groups / tasks * unit;
        let rows = (((t + 1) * groups / tasks) * unit).min(n) - row0;
        let (here, after) = rest.split_at_mut(rows * m);
        parts.push((row0, here));
        rest = after;
    }
    parts
}

/// The rows of `a` times `b`, into the same rows of `out`.
fn block<K: Packing>(a: &[f32], b: &Packed<K>, padded_bias: &[f32], out: &mut [f32]) {
    let (m, d) = (b.m, b.d);
    let rows = out.len() / m;
    let a_panels = rows.div_ceil(MR);
    let deepest = b.blocks.iter().map(|b| b.1).max().unwrap_or(0);
    // Filled in order (no zeroing pass over a buffer that packing overwrites anyway).
    let mut packed_a = Vec::with_capacity(a_panels * MR * deepest);
    let mut b_at = 0;
    for (bi, &(start, len)) in b.blocks.iter().enumerate() {
        packed_a.clear();
        for panel in 0..a_panels {
            let first = panel * MR;
            let a_rows: Vec<&[f32]> = (first..first + MR.min(rows - first))
                .map(|r| &a[r * d..][..d])
                .collect();
            for p in start..start + len {
                packed_a.extend(a_rows.iter().map(|row| K::elem(row, p)));
                // Rows past the block's end: zeros, feeding tile rows that are never stored.
                packed_a.extend((a_rows.len()..MR).map(|_| K::Elem::default()));
            }
        }
        for j in 0..m.div_ceil(NR) {
            let bp = &b.data[j * NR * b.steps + b_at..][..NR * len];
            let width = NR.min(m - j * NR);
            for i in 0..a_panels {
                let ap = &packed_a[i * MR * len..(i + 1) * MR * len];
                let tile_rows = MR.min(rows - i * MR);
                let c = &mut out[i * MR * m + j * NR..];
                let start = if bi == 0 {
                    Start::Bias(&padded_bias[j * NR..][..NR])
                } else {
                    Start::Accumulate
                };
                tile::<K>(len, ap, bp, c, m, tile_rows, width, start);
            }
        }
        b_at += len * NR;
    }
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
#[allow(clippy::too_many_arguments)]
fn tile<K: Packing>(
    kc: usize,
    a: &[K::Elem],
    b: &[K::Elem],
    c: &mut [f32],
    ldc: usize,
    rows: usize,
    cols: usize,
    start: Start,
) {
    assert!(a.len() >= kc * MR && b.len() >= kc * NR);
    // SAFETY (both calls): `blocked` runs only where the kernels' features were detected; the panels'
    // extents were just checked and the tile's rows and columns lie inside `c` (asserted) or the scratch.
    if rows == MR && cols == NR {
        assert!(c.len() >= (MR - 1) * ldc + NR);
        unsafe { K::kernel(kc, a.as_ptr(), b.as_ptr(), c.as_mut_ptr(), ldc, start) };
        return;
    }
    let mut scratch = [0f32; MR * NR];
    for r in 0..rows {
        scratch[r * NR..r * NR + cols].copy_from_slice(&c[r * ldc..r * ldc + cols]);
    }
    unsafe { K::kernel(kc, a.as_ptr(), b.as_ptr(), scratch.as_mut_ptr(), NR, start) };
    for r in 0..rows {
        c[r * ldc..r * ldc + cols].copy_from_slice(&scratch[r * NR..r * NR + cols]);
    }
}

/// c[12 × 32] = start + a-panel · b-panel over `kc` depth steps; `a` is depth-major 12 floats per step,
/// `b` 32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel_f32(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    start: Start,
) {
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
    store(&acc, c, ldc, start);
}

/// [`kernel_f32`] on bf16 pairs: each `vdpbf16ps` adds two depth steps' products to 16 f32 sums.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel_bf16(
    kc: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    start: Start,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    let (mut a, mut b) = (a, b);
    for _ in 0..kc {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.cast()));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(16).cast()));
        for (r, acc) in acc.iter_mut().enumerate() {
            let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(r) as i32));
            acc[0] = _mm512_dpbf16_ps(acc[0], x, b0);
            acc[1] = _mm512_dpbf16_ps(acc[1], x, b1);
        }
        a = a.add(MR);
        b = b.add(NR);
    }
    store(&acc, c, ldc, start);
}

/// Adds a tile's sums to its start and stores them. Always inlined into the kernels (which enable
/// AVX-512F), so the sums stay in registers: as a call, the kernel zeroed and spilled a 1.5 KB array per
/// tile (~2% of a product).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn store(acc: &[[std::arch::x86_64::__m512; 2]; MR], c: *mut f32, ldc: usize, start: Start) {
    use std::arch::x86_64::*;
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
    use crate::kernels::test_data::random;

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
            let a = random(n * d, 1, 1.0);
            let b = random(m * d, 2, 1.0);
            let bias = random(m, 5, 1.0);
            let mut out = vec![f32::NAN; n * m];
            // The best f32 kernel here (AVX-512 where present), checked against f64 and the gemm crate.
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
    fn bf16_rounding_is_halfs_to_nearest_even() {
        let mut values = random(10_000, 7, 3.0);
        values.extend([
            0.0,
            -0.0,
            1.0,
            f32::from_bits(0x3f80_8000), // halfway between two bf16: ties to the even one below
            f32::from_bits(0x3f81_8000), // halfway, odd below: rounds up
            f32::from_bits(0x3f80_8001),
            f32::MAX,
            f32::MIN_POSITIVE / 3.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ]);
        for v in values {
            assert_eq!(
                bf16_bits(v),
                half::bf16::from_f32(v).to_bits() as u32,
                "{v:e}"
            );
        }
        assert!(f32::from_bits(bf16_bits(f32::NAN) << 16).is_nan());
    }

    #[test]
    #[cfg_attr(missing = "avx512bf16", ignore = "needs a CPU with AVX512-BF16")]
    fn the_avx512_bf16_product_sums_the_rounded_inputs_within_f32_rounding() {
        bf16_kernel_sums_the_rounded_inputs(Kernel::Avx512Bf16);
    }

    #[test]
    #[cfg_attr(missing = "amx", ignore = "needs a CPU with AMX")]
    fn the_amx_product_sums_the_rounded_inputs_within_f32_rounding() {
        bf16_kernel_sums_the_rounded_inputs(Kernel::Amx);
    }

    #[test]
    fn the_bf16_precision_picks_the_fastest_kernel_the_cpu_has() {
        let best = Kernel::best(Precision::Bf16);
        let expected = if Kernel::Amx.available() {
            Kernel::Amx
        } else if Kernel::Avx512Bf16.available() {
            Kernel::Avx512Bf16
        } else if Kernel::Avx512.available() {
            Kernel::Avx512
        } else {
            Kernel::Portable
        };
        assert_eq!(best, expected);
        assert!(!Kernel::best(Precision::F32).is_bf16());
        assert_eq!(Precision::bf16_native(), best.is_bf16());
    }

    fn bf16_kernel_sums_the_rounded_inputs(kernel: Kernel) {
        assert!(
            kernel.available(),
            "{kernel:?}: built on a CPU that has it, but not usable now (another CPU? touch crates/core/build.rs)"
        );
        // Odd depths leave half a pair; ragged edges as in the f32 test; one AMX tile step (32), and
        // several of its 256-deep chunks (2101).
        for &(n, m, d) in &[
            (1, 1, 1),
            (13, 33, 7),
            (33, 70, 32),
            (121, 70, 193),
            (250, 64, 577),
            (30, 40, 2101),
        ] {
            let a = random(n * d, 1, 1.0);
            let b = random(m * d, 2, 1.0);
            let bias = random(m, 5, 1.0);
            let mut out = vec![f32::NAN; n * m];
            matmul_nt_bias_with(kernel, &a, &b, Some(&bias), &mut out, n, m, d);
            let round = |v: &[f32]| -> Vec<f32> {
                v.iter()
                    .map(|&x| f32::from_bits(bf16_bits(x) << 16))
                    .collect()
            };
            let want = naive(&round(&a), &round(&b), n, m, d);
            let abs = naive(
                &a.iter().map(|x| x.abs()).collect::<Vec<_>>(),
                &b.iter().map(|x| x.abs()).collect::<Vec<_>>(),
                n,
                m,
                d,
            );
            let mut f32_out = vec![0f32; n * m];
            matmul_nt_bias(&a, &b, Some(&bias), &mut f32_out, n, m, d);
            let mut differs = false;
            for i in 0..n * m {
                let want = want[i] + bias[i % m] as f64;
                // f32 accumulation of d products and the bias: γ(d + 1)·Σ|terms|.
                let tolerance =
                    (d + 1) as f64 * 2f64.powi(-24) * (abs[i] + bias[i % m].abs() as f64);
                assert!(
                    (out[i] as f64 - want).abs() <= tolerance * 1.01 + 1e-30,
                    "{kernel:?} ({n}, {m}, {d}) element {i}: {} vs {want}",
                    out[i]
                );
                differs |= out[i] != f32_out[i];
            }
            assert!(
                differs || d == 1,
                "({n}, {m}, {d}): the bf16 product equals the f32 one"
            );
        }
    }

    #[test]
    fn the_result_does_not_depend_on_the_thread_count() {
        let (n, m, d) = (300, 100, 250);
        let a = random(n * d, 3, 1.0);
        let b = random(m * d, 4, 1.0);
        let run = |threads, kernel| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut out = vec![0f32; n * m];
            pool.install(|| matmul_nt_bias_with(kernel, &a, &b, None, &mut out, n, m, d));
            out
        };
        // Every kernel this CPU has (the portable one always; it is the gemm crate's, bits not promised).
        for kernel in Kernel::ALL.into_iter().filter(|k| k.available()) {
            if kernel == Kernel::Portable {
                continue;
            }
            let one = run(1, kernel);
            assert!(
                one.iter()
                    .zip(run(3, kernel))
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{kernel:?}"
            );
        }
    }

    #[test]
    fn matmul_nt_multiplies_by_the_transpose() {
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]; // 2×3
        let b = [1.0, 0.0, -1.0, 0.5, 0.5, 0.5]; // 2×3
        let mut out = [0.0; 4];
        matmul_nt(&a, &b, &mut out, 2, 2, 3);
        assert_eq!(out, [-2.0, 3.0, -2.0, 7.5]);
    }
}
