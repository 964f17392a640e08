//! `out = a · bᵀ` for row-major f32 matrices: the encoder product of every training step and the language
//! models' linear layers.
//!
//! Written by hand because it is the step's only dense product (~95% of its FLOPs) and on its shape
//! (4096 × 576 · (4608 × 576)ᵀ) the `gemm` crate reaches ~140 GFLOP/s of an AMD EPYC's ~230, this ~200 (its
//! AVX-512 kernels are slower still); on an Intel Xeon, with the weight packed once ([`PackedB`]), it runs
//! the language models' products at 1.8–2.1× the `gemm` crate, level with MKL (`saeflow bench gemm`).
//! The BLIS scheme with an AVX-512 12×32 micro-kernel: `b` is packed into 32-column panels per depth block
//! (per call, or once for a model's weights), `a`'s rows are read in place, and the micro-kernel keeps a
//! 12×32 tile of `out` in 24 registers while it walks the depth, prefetching `b` ahead. Tasks are
//! rectangles of `out`: blocks of rows, and of columns too when there are few rows (a decode step). Every
//! output element is summed in the same order whatever the split, so results are bit-identical across runs
//! and thread counts. Without AVX-512, an AVX2 micro-kernel runs 6×16 tiles on 16-column panels with `a`
//! packed per task (the same FMA chains, so the same bits); without AVX2 either, the `gemm` crate does the
//! work.

use rayon::prelude::*;
use std::borrow::Cow;

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
    /// Each row scaled by its own factor and rounded to 16-bit integers ([`int16_scale`]), products
    /// summed exactly in i32 and multiplied back by the rows' factors: twice the f32 rate on CPUs with AVX2
    /// but not AVX-512 (`vpmaddwd` on AMD Zen 1–3); ~4 significant digits per row. Elsewhere the f32
    /// product.
    Int16,
}

impl Precision {
    /// As configs and logs spell it: `f32`, `bf16`, `int16`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::Int16 => "int16",
        }
    }

    /// Whether this CPU multiplies bfloat16 natively (otherwise [`Precision::Bf16`] computes in f32).
    pub fn bf16_native() -> bool {
        Kernel::Amx.available() || Kernel::Avx512Bf16.available()
    }

    /// Whether bf16 products outrun f32 ones on this CPU, so a choice left to the program takes them: AMX
    /// tiles (~4× the f32 rate), or AVX512-BF16 on AMD (Zen 4 and later issue `vdpbf16ps` at the FMA
    /// rate, twice f32's flops: ~380 against ~200 GFLOP/s on the SAE step's product). Intel issues
    /// `vdpbf16ps` on one port where f32 FMAs use two: 180 against 375 GFLOP/s on a Xeon (family 6 model
    /// 207) with AMX switched off, so there bf16 without AMX is slower than f32.
    pub fn bf16_faster() -> bool {
        Kernel::Amx.available() || (Kernel::Avx512Bf16.available() && super::amd())
    }

    /// Whether int16 products outrun f32 ones on this CPU: AVX2 without AVX-512, where `vpmaddwd` does 16
    /// multiply-adds an instruction against an FMA's 8 (AMD Zen 3 issues two of each a cycle). With
    /// AVX-512 the f32 kernel already does 16 an instruction.
    pub fn int16_faster() -> bool {
        Kernel::Avx2Int16.available() && !Kernel::Avx512.available()
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
    /// Per-row scaled 16-bit integer pairs with AVX2 `vpmaddwd`, exact i32 sums ([`Precision::Int16`]).
    Avx2Int16,
    /// f32 with AVX2 FMAs (this file's micro-kernel on 8 lanes: AMD Zen 1–3 and other CPUs without
    /// AVX-512). The same sums in the same order as [`Kernel::Avx512`], so the same bits.
    Avx2,
    /// The `gemm` crate (f32; any CPU).
    Portable,
}

impl Kernel {
    /// Every kernel, fastest first.
    pub const ALL: [Kernel; 6] = [
        Kernel::Amx,
        Kernel::Avx512Bf16,
        Kernel::Avx512,
        Kernel::Avx2Int16,
        Kernel::Avx2,
        Kernel::Portable,
    ];

    /// Whether this CPU (and, for AMX, Linux) can run it.
    pub fn available(self) -> bool {
        let avx512 = super::avx512();
        match self {
            Kernel::Amx => super::amx::available(),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Bf16 => avx512 && std::arch::is_x86_feature_detected!("avx512bf16"),
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Avx512Bf16 => false,
            Kernel::Avx512 => avx512,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 | Kernel::Avx2Int16 => super::simd::avx2(),
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Avx2 | Kernel::Avx2Int16 => false,
            Kernel::Portable => true,
        }
    }

    /// The precision it multiplies at.
    pub fn precision(self) -> Precision {
        match self {
            Kernel::Amx | Kernel::Avx512Bf16 => Precision::Bf16,
            Kernel::Avx2Int16 => Precision::Int16,
            Kernel::Avx512 | Kernel::Avx2 | Kernel::Portable => Precision::F32,
        }
    }

    /// Whether it rounds its inputs (to bf16 or to scaled integers), so its products rank but are not f32's.
    pub fn rounds(self) -> bool {
        self.precision() != Precision::F32
    }

    /// The instruction set it runs on, as logs and benchmarks name it.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Amx => "AMX",
            Kernel::Avx512Bf16 => "AVX512-BF16",
            Kernel::Avx512 => "AVX-512",
            Kernel::Avx2Int16 => "AVX2 int16",
            Kernel::Avx2 => "AVX2",
            Kernel::Portable => "portable",
        }
    }

    /// The fastest available kernel of `precision`, else of f32 (where the CPU has no kernel of it).
    pub fn best(precision: Precision) -> Kernel {
        let of = |precision| {
            Kernel::ALL
                .into_iter()
                .find(move |k| k.available() && k.precision() == precision)
        };
        of(precision)
            .or(of(Precision::F32))
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

/// [`matmul_nt_bias_with`] handed task by task to `visit(first_row, rows)` right after each task's rows are
/// computed, while they are in cache; stored in `out` if given, else only in a scratch buffer each thread
/// reuses (a pass over the product, such as the SAE step's top-k scan, then costs neither the 4 bytes per
/// value written to memory nor their reading back). The values are [`matmul_nt_bias_with`]'s bits. Returns
/// what `visit` returned, in row order (one result per task; the `gemm` crate's kernel computes the whole
/// product first).
///
/// # Panics
/// As [`matmul_nt_bias_with`], or if `m` is 0.
#[allow(clippy::too_many_arguments)]
pub fn matmul_nt_bias_visit<R: Send>(
    kernel: Kernel,
    a: &[f32],
    b: &[f32],
    bias: Option<&[f32]>,
    out: Option<&mut [f32]>,
    n: usize,
    m: usize,
    d: usize,
    visit: impl Fn(usize, &[f32]) -> R + Sync,
) -> Vec<R> {
    assert!(m > 0 && a.len() == n * d && b.len() == m * d);
    assert!(out.as_ref().is_none_or(|out| out.len() == n * m));
    assert!(bias.is_none_or(|bias| bias.len() == m));
    assert!(
        kernel.available(),
        "the {kernel:?} GEMM kernel needs a CPU feature this one lacks"
    );
    if d > 0 {
        match kernel {
            Kernel::Amx => {
                let packed = super::amx::PackedB::new(b, m, d);
                return super::amx::multiply_visit(a, n, &packed, bias, out, visit);
            }
            Kernel::Avx512Bf16 => {
                return visit_blocked::<Dpbf16, _>(
                    &packed_for::<Dpbf16>(b, m, d),
                    a,
                    bias,
                    out,
                    visit,
                )
            }
            Kernel::Avx512 => {
                return visit_blocked::<Fma512, _>(
                    &packed_for::<Fma512>(b, m, d),
                    a,
                    bias,
                    out,
                    visit,
                )
            }
            Kernel::Avx2 => {
                return visit_blocked::<Fma256, _>(
                    &packed_for::<Fma256>(b, m, d),
                    a,
                    bias,
                    out,
                    visit,
                )
            }
            Kernel::Avx2Int16 => {
                return visit_blocked::<Madd16, _>(
                    &packed_for::<Madd16>(b, m, d),
                    a,
                    bias,
                    out,
                    visit,
                )
            }
            Kernel::Portable => {}
        }
    }
    let mut whole = Vec::new();
    let out = out.unwrap_or_else(|| {
        whole.resize(n * m, 0.0);
        &mut whole
    });
    matmul_nt_bias_with(kernel, a, b, bias, out, n, m, d);
    let out = &*out;
    row_ranges(n, MR, MC)
        .into_par_iter()
        .map(|(row0, rows)| visit(row0, &out[row0 * m..][..rows * m]))
        .collect()
}

/// [`matmul_nt_bias_visit`] on a packed AVX-512 kernel: tasks of whole rows (all column panels), as
/// [`multiply_packed`] splits a product of many rows, so every sum is the same.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn visit_blocked<K: MicroKernel, R: Send>(
    b: &Packed<K::Layout>,
    a: &[f32],
    bias: Option<&[f32]>,
    out: Option<&mut [f32]>,
    visit: impl Fn(usize, &[f32]) -> R + Sync,
) -> Vec<R> {
    let (m, d) = (b.m, b.d);
    let n = a.len() / d;
    let padded_bias = padded_bias(bias, m);
    let panels = 0..m.div_ceil(K::COLS);
    let compute = |row0: usize, out: &mut [f32]| {
        let rows = out.len() / m;
        let task = Task {
            rows: 0..rows,
            panels: panels.clone(),
        };
        let a_rows = K::Layout::rows(&a[row0 * d..][..rows * d], d);
        // SAFETY: `out` holds the task's rows × m floats, which only this task touches.
        unsafe { block::<K>(a_rows, b, &padded_bias, SharedOut(out.as_mut_ptr()), &task) };
    };
    visit_row_tasks(n, m, MR, MC, out, compute, visit)
}

/// `n` rows of `m` values split as [`row_ranges`] splits them; per task `compute(first_row, its rows)` into
/// its rows of `out` if given, else into a scratch buffer each thread reuses, then `visit(first_row, its
/// rows)` while they are in cache. Returns what `visit` returned, in row order.
#[allow(clippy::too_many_arguments)]
pub(crate) fn visit_row_tasks<R: Send>(
    n: usize,
    m: usize,
    unit: usize,
    max_rows: usize,
    out: Option<&mut [f32]>,
    compute: impl Fn(usize, &mut [f32]) + Sync,
    visit: impl Fn(usize, &[f32]) -> R + Sync,
) -> Vec<R> {
    // Each task: its first row, its number of rows, and its rows of `out` if there is one.
    let tasks: Vec<(usize, usize, Option<&mut [f32]>)> = match out {
        Some(out) => row_tasks(out, m, unit, max_rows)
            .into_iter()
            .map(|(row0, out)| (row0, out.len() / m, Some(out)))
            .collect(),
        None => row_ranges(n, unit, max_rows)
            .into_iter()
            .map(|(row0, rows)| (row0, rows, None))
            .collect(),
    };
    tasks
        .into_par_iter()
        .map_init(Vec::new, |scratch: &mut Vec<f32>, (row0, rows, out)| {
            let out = match out {
                Some(out) => out,
                None => {
                    scratch.resize(rows * m, 0.0);
                    &mut scratch[..rows * m]
                }
            };
            compute(row0, out);
            visit(row0, out)
        })
        .collect()
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
            Kernel::Avx512Bf16 => return blocked::<Dpbf16>(a, b, bias, out, m, d),
            Kernel::Avx512 => return blocked::<Fma512>(a, b, bias, out, m, d),
            Kernel::Avx2 => return blocked::<Fma256>(a, b, bias, out, m, d),
            Kernel::Avx2Int16 => return blocked::<Madd16>(a, b, bias, out, m, d),
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

/// A packed operand format: how `b`'s panels and `a`'s rows hold the depth.
trait Packing {
    /// One packed depth step of one row.
    type Elem: Copy + Default + Send + Sync;
    /// Depth values per packed element.
    const STEP: usize;
    /// Whether each row is packed multiplied by its own [`Packing::scale`] (integer formats), so a sum
    /// must be multiplied back by its row's and column's factors (1 / scale).
    const SCALED: bool = false;
    /// The factor `row`'s values are multiplied by before they are packed (1 for float formats).
    fn scale(_row: &[f32]) -> f32 {
        1.0
    }
    /// The packed element at depth step `p` of `row`, scaled by `scale` (zeros past its end).
    fn elem(row: &[f32], scale: f32, p: usize) -> Self::Elem;
    /// Every packed element of `row` into `out` (`⌈len / STEP⌉` of them): [`Packing::elem`] in turn,
    /// unless a format has a faster way to the same values.
    fn pack_row(row: &[f32], scale: f32, out: &mut [Self::Elem]) {
        for (p, o) in out.iter_mut().enumerate() {
            *o = Self::elem(row, scale, p);
        }
    }
    /// Rows of `a` (`d` values each) in the micro-kernel's form (`⌈d / STEP⌉` elements a row, row-major),
    /// and, for a scaled format, each row's factor (empty otherwise).
    fn rows(a: &[f32], d: usize) -> (Cow<'_, [Self::Elem]>, Vec<f32>);
}

/// A micro-kernel and the packed format it consumes.
trait MicroKernel {
    /// The operands' format.
    type Layout: Packing;
    /// Rows of `a` (and of `out`) per tile.
    const ROWS: usize = MR;
    /// Columns of `b` per tile, which is also the width of `b`'s packed panels ([`Packed::width`]).
    const COLS: usize = NR;
    /// Columns of `out` a tile stores: COLS, or half that for a kernel that stores one value per gate/up
    /// pair ([`Glu256`]).
    const OUT_COLS: usize = Self::COLS;
    /// Whether a task packs its rows of `a` into interleaved panels of ROWS ([`interleave`]) before its
    /// tiles read them, rather than reading them in place: the kernel's broadcasts a step then read one
    /// run of ROWS values at a pointer it steps along, where ROWS rows' addresses cost as many address
    /// computations a step (the AVX2 kernels are bound by the instructions they issue, not by their
    /// multiplies alone).
    const PACKS_A: bool = false;
    /// Panels of `b` a row panel meets before the next row panel does: 1 keeps one `b` panel in cache while
    /// every row panel of the task passes it; more keep a (packed) row panel in L1 while a run of `b` panels
    /// streams past it.
    const PANEL_RUN: usize = 1;
    /// c[ROWS × COLS] = start + a-panel · b-panel over `kc` packed depth steps; for a scaled layout, each
    /// sum multiplied by its row's and column's `factors` first.
    ///
    /// # Safety
    /// The CPU has the kernel's features; `a` holds ROWS rows of at least `kc` elements `lda` apart (a
    /// packed `a`: kc steps of ROWS), `b` kc × COLS elements, and `c` ROWS rows of OUT_COLS floats
    /// `ldc` apart.
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel(
        kc: usize,
        a: *const Elem<Self>,
        lda: usize,
        b: *const Elem<Self>,
        c: *mut f32,
        ldc: usize,
        start: Start,
        factors: Option<Factors>,
    );
}

/// The factors a scaled layout's sums are multiplied back by: a tile's rows' and columns'.
#[derive(Clone, Copy)]
struct Factors<'a> {
    rows: &'a [f32],
    cols: &'a [f32],
}

/// A micro-kernel's packed element.
type Elem<K> = <<K as MicroKernel>::Layout as Packing>::Elem;

/// Plain f32, one depth value per element.
struct F32s;

impl Packing for F32s {
    type Elem = f32;
    const STEP: usize = 1;
    #[inline(always)]
    fn elem(row: &[f32], _scale: f32, p: usize) -> f32 {
        row[p]
    }
    fn pack_row(row: &[f32], _scale: f32, out: &mut [f32]) {
        out.copy_from_slice(row);
    }
    /// `a` as it is: its rows are read in place by the AVX-512 kernel (a task's rows stay in L2 either way,
    /// and copying them into panels cost ~10% of a product on an Intel Xeon), and packed per task for the
    /// AVX2 kernel ([`MicroKernel::PACKS_A`]).
    fn rows(a: &[f32], _d: usize) -> (Cow<'_, [f32]>, Vec<f32>) {
        (Cow::Borrowed(a), Vec::new())
    }
}

/// f32 FMAs on AVX-512F: [`kernel_f32`].
struct Fma512;

impl MicroKernel for Fma512 {
    type Layout = F32s;
    unsafe fn kernel(
        kc: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        start: Start,
        _unscaled: Option<Factors>,
    ) {
        #[cfg(target_arch = "x86_64")]
        kernel_f32(kc, a, lda, b, c, ldc, start);
    }
}

/// f32 FMAs on AVX2: [`kernel_f32_avx2`], the same sums in the same order as [`Fma512`] (so the same bits),
/// in 6 × 16 tiles: `a` packed per task, `b` in 16-column panels, and a row panel (in L1) meeting 16 of
/// them (256 columns) in turn. On an AMD Zen 3 the SmolLM2 forward ran faster this way than with `a` read
/// in place against halves of 32-column panels (each a 36 KB stream on every other cache line, re-read from
/// L2) in every adjacent pair of `BEFORE=… bench/forward.sh` (BENCHMARKS, Zen 3 thirteenth session).
struct Fma256;

impl MicroKernel for Fma256 {
    type Layout = F32s;
    const ROWS: usize = 6;
    const COLS: usize = 16;
    const PACKS_A: bool = true;
    const PANEL_RUN: usize = 16;
    unsafe fn kernel(
        kc: usize,
        a: *const f32,
        _interleaved: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        start: Start,
        _unscaled: Option<Factors>,
    ) {
        #[cfg(target_arch = "x86_64")]
        kernel_f32_avx2(kc, a, b, c, ldc, start);
    }
}

/// [`Fma256`]'s sums of a [`PackedGlu`]'s panels, stored as `silu(gate) · up`: [`kernel_glu_avx2`].
struct Glu256;

impl MicroKernel for Glu256 {
    type Layout = F32s;
    const ROWS: usize = Fma256::ROWS;
    const COLS: usize = Fma256::COLS;
    const OUT_COLS: usize = Fma256::COLS / 2;
    const PACKS_A: bool = true;
    const PANEL_RUN: usize = Fma256::PANEL_RUN;
    unsafe fn kernel(
        kc: usize,
        a: *const f32,
        _interleaved: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        start: Start,
        _unscaled: Option<Factors>,
    ) {
        #[cfg(target_arch = "x86_64")]
        kernel_glu_avx2(kc, a, b, c, ldc, start);
    }
}

/// Pairs of depth-adjacent bfloat16 values in one u32 (low half first), the operand of `vdpbf16ps`.
struct Bf16Pairs;

impl Packing for Bf16Pairs {
    type Elem = u32;
    const STEP: usize = 2;
    #[inline(always)]
    fn elem(row: &[f32], _scale: f32, p: usize) -> u32 {
        let high = row.get(2 * p + 1).map_or(0, |&v| bf16_bits(v));
        bf16_bits(row[2 * p]) | high << 16
    }
    fn rows(a: &[f32], d: usize) -> (Cow<'_, [u32]>, Vec<f32>) {
        let steps = d.div_ceil(2);
        let mut out = vec![0u32; a.len() / d * steps];
        for (dst, src) in out.chunks_mut(steps).zip(a.chunks(d)) {
            // A row's values rounded in order are its pairs (low half first).
            super::amx::round_row(src, &mut bytemuck::cast_slice_mut(dst)[..d]);
        }
        (Cow::Owned(out), Vec::new())
    }
}

/// bf16 pair dot products on AVX512-BF16: [`kernel_bf16`].
struct Dpbf16;

impl MicroKernel for Dpbf16 {
    type Layout = Bf16Pairs;
    unsafe fn kernel(
        kc: usize,
        a: *const u32,
        lda: usize,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        start: Start,
        _unscaled: Option<Factors>,
    ) {
        #[cfg(target_arch = "x86_64")]
        kernel_bf16(kc, a, lda, b, c, ldc, start);
    }
}

/// Pairs of depth-adjacent 16-bit integers in one u32 (low half first), the operand of `vpmaddwd`: each
/// row multiplied by its [`int16_scale`] and rounded to the nearest integer (ties to even).
struct I16Pairs;

impl Packing for I16Pairs {
    type Elem = u32;
    const STEP: usize = 2;
    const SCALED: bool = true;
    fn scale(row: &[f32]) -> f32 {
        int16_scale(row)
    }
    #[inline(always)]
    fn elem(row: &[f32], scale: f32, p: usize) -> u32 {
        let high = row.get(2 * p + 1).copied().unwrap_or(0.0);
        int16_pair(row[2 * p], high, scale)
    }
    fn pack_row(row: &[f32], scale: f32, out: &mut [u32]) {
        #[cfg(target_arch = "x86_64")]
        if super::simd::avx2() {
            // SAFETY: the CPU has AVX2 and FMA (checked).
            return unsafe { int16_pack_row_avx2(row, scale, out) };
        }
        int16_pack_row_lanes(row, scale, out)
    }
    fn rows(a: &[f32], d: usize) -> (Cow<'_, [u32]>, Vec<f32>) {
        let steps = d.div_ceil(2);
        let mut out = vec![0u32; a.len() / d * steps];
        let factors = out
            .chunks_mut(steps)
            .zip(a.chunks(d))
            .map(|(dst, src)| {
                let scale = int16_scale(src);
                Self::pack_row(src, scale, dst);
                1.0 / scale
            })
            .collect();
        (Cow::Owned(out), factors)
    }
}

/// [`I16Pairs::pack_row`]: the row's values two by two, so the compiler vectorises the rounding (the
/// per-element [`Packing::elem`] with its bounds check did not).
#[inline(always)]
fn int16_pack_row_lanes(row: &[f32], scale: f32, out: &mut [u32]) {
    let pairs = row.chunks_exact(2);
    let last = pairs.remainder().first();
    for (o, p) in out.iter_mut().zip(pairs) {
        *o = int16_pair(p[0], p[1], scale);
    }
    if let Some(&v) = last {
        out[row.len() / 2] = int16_pair(v, 0.0, scale);
    }
}

/// Two depth-adjacent values scaled and rounded into one [`I16Pairs`] element (`low` in the low half).
#[inline(always)]
fn int16_pair(low: f32, high: f32, scale: f32) -> u32 {
    int16_round(low, scale) as u16 as u32 | (int16_round(high, scale) as u16 as u32) << 16
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn int16_pack_row_avx2(row: &[f32], scale: f32, out: &mut [u32]) {
    int16_pack_row_lanes(row, scale, out)
}

/// Largest norm of a scaled row: two rows' integer dot product is at most 46000² < 2³¹ (Cauchy–Schwarz),
/// so the i32 sums are exact (`vpmaddwd`'s pair sums cannot overflow either: |values| ≤ 32767).
const INT16_NORM: f32 = 46000.0;
/// Largest magnitude of a scaled value (i16's 32767, less a margin for the scale's own rounding).
const INT16_MAX: f32 = 32000.0;

/// The factor [`Precision::Int16`] multiplies `row` by before rounding it to integers: as large as keeps
/// the rounded row's norm within [`INT16_NORM`] (the rounding adds at most √len / 2 to it) and every value
/// within [`INT16_MAX`]. So the rounding residual's norm is at most √len / 2 / scale, at d = 576 ~1/4000 of
/// the row's norm however its values are spread (bf16 keeps 1/256 of each value). 1 for a zero row; a row
/// with a non-finite value gets a NaN or zero scale, and the bound that uses it is then not finite.
pub(crate) fn int16_scale(row: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::simd::avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked).
        return unsafe { int16_scale_avx2(row) };
    }
    int16_scale_lanes(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn int16_scale_avx2(row: &[f32]) -> f32 {
    int16_scale_lanes(row)
}

/// [`int16_scale`]'s arithmetic, in 16 lanes (the same bits in every build: no FMA contraction).
#[inline(always)]
fn int16_scale_lanes(row: &[f32]) -> f32 {
    let largest = fold_lanes(row, |a, v| a.max(v.abs()));
    let largest = largest.into_iter().fold(0f32, f32::max);
    if largest == 0.0 {
        return 1.0;
    }
    // The norm over the largest value: its squares neither overflow nor underflow.
    let inverse = 1.0 / largest;
    let squares = fold_lanes(row, |a, v| a + (v * inverse) * (v * inverse));
    let squares: f32 = squares.iter().sum();
    let norm = largest * squares.sqrt();
    let room = INT16_NORM - 0.5 * (row.len() as f32).sqrt();
    // (2¹⁰⁰ keeps the scale finite for subnormal rows.)
    (room / norm).min(INT16_MAX / largest).min(2f32.powi(100))
}

/// `f` folded over `row` in 16 lanes (value i into lane i mod 16), from zeros: vectorised, and in a fixed
/// order, so the same result wherever it is computed.
#[inline(always)]
fn fold_lanes(row: &[f32], f: impl Fn(f32, f32) -> f32) -> [f32; 16] {
    let mut acc = [0f32; 16];
    let chunks = row.chunks_exact(16);
    let tail = chunks.remainder();
    for chunk in chunks {
        for l in 0..16 {
            acc[l] = f(acc[l], chunk[l]);
        }
    }
    for (l, &v) in tail.iter().enumerate() {
        acc[l] = f(acc[l], v);
    }
    acc
}

/// `v · scale` rounded to the nearest integer, ties to even, as an i16 (NaN → 0). Adding 1.5·2²³ rounds in
/// the FPU's default mode without SSE4.1's `roundps`, and for |x| < 2²² the sum's bits are 0x4B40_0000 + x,
/// so their low 16 are x's two's complement: no float-to-int conversion (Rust's saturating `as` kept the
/// packing from vectorising well). Scaled values are at most [`INT16_MAX`].
#[inline(always)]
pub(crate) fn int16_round(v: f32, scale: f32) -> i16 {
    int16_shifted(v, scale).to_bits() as u16 as i16
}

/// [`int16_round`]'s integer as an f32.
#[inline(always)]
fn int16_rounded(v: f32, scale: f32) -> f32 {
    int16_shifted(v, scale) - INT16_SHIFT
}

/// 1.5·2²³: adding it rounds to an integer (see [`int16_round`]).
const INT16_SHIFT: f32 = 12_582_912.0;

/// `v · scale + 1.5·2²³`, or 1.5·2²³ (the integer 0) for NaN.
#[inline(always)]
fn int16_shifted(v: f32, scale: f32) -> f32 {
    let shifted = v * scale + INT16_SHIFT;
    if shifted.is_nan() {
        INT16_SHIFT
    } else {
        shifted
    }
}

/// ‖v‖², ‖ṽ‖² and ‖v − ṽ‖² for ṽ the row [`Precision::Int16`]'s product multiplies: `v`'s scaled integers
/// times its factor (1 / [`int16_scale`]). f32 sums in 16 lanes ([`super::simd::rounding_norms_lanes`]).
pub(crate) fn int16_rounding_norms(v: &[f32]) -> [f32; 3] {
    #[cfg(target_arch = "x86_64")]
    if super::simd::avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked).
        return unsafe { int16_rounding_norms_avx2(v) };
    }
    int16_rounding_norms_lanes(v)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn int16_rounding_norms_avx2(v: &[f32]) -> [f32; 3] {
    int16_rounding_norms_lanes(v)
}

#[inline(always)]
fn int16_rounding_norms_lanes(v: &[f32]) -> [f32; 3] {
    let scale = int16_scale_lanes(v);
    let factor = 1.0 / scale;
    super::simd::rounding_norms_lanes(v, |x| int16_rounded(x, scale) * factor)
}

/// Integer pair dot products on AVX2: [`kernel_i16_avx2`].
struct Madd16;

impl MicroKernel for Madd16 {
    type Layout = I16Pairs;
    const ROWS: usize = Fma256::ROWS;
    const COLS: usize = Fma256::COLS;
    const PACKS_A: bool = true;
    const PANEL_RUN: usize = Fma256::PANEL_RUN;
    /// (`a` is an interleaved panel: `lda` is not used.)
    unsafe fn kernel(
        kc: usize,
        a: *const u32,
        _lda: usize,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        start: Start,
        factors: Option<Factors>,
    ) {
        let factors = factors.expect("an integer layout's sums are scaled back");
        #[cfg(target_arch = "x86_64")]
        kernel_i16_avx2(kc, a, b, c, ldc, start, factors);
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
    let size = steps.div_ceil(count.max(1));
    (0..count)
        .map(|i| (i * size, size.min(steps - i * size)))
        .collect()
}

/// `b [m × d]` packed for a micro-kernel: per panel of `width` rows (the kernel's [`MicroKernel::COLS`]),
/// per depth block, `len × width` elements depth-major (zero-padded past m).
struct Packed<K: Packing> {
    data: Vec<K::Elem>,
    /// A scaled format's factor per row of `b` (column of the product), zero-padded to whole panels; empty
    /// for the others.
    factors: Vec<f32>,
    m: usize,
    d: usize,
    steps: usize,
    blocks: Vec<(usize, usize)>,
    /// Rows of `b` (columns of the product) per panel.
    width: usize,
}

/// `b` packed for the micro-kernel `K`.
fn packed_for<K: MicroKernel>(b: &[f32], m: usize, d: usize) -> Packed<K::Layout> {
    Packed::new(b, m, d, K::COLS)
}

impl<K: Packing> Packed<K> {
    fn new(b: &[f32], m: usize, d: usize, width: usize) -> Self {
        assert_eq!(b.len(), m * d);
        assert!(width == NR || width == NR / 2);
        let steps = d.div_ceil(K::STEP);
        let blocks = depth_blocks(steps);
        let panels = m.div_ceil(width);
        let scales: Vec<f32> = match K::SCALED {
            true => b.par_chunks(d.max(1)).map(K::scale).collect(),
            false => Vec::new(),
        };
        let mut data = vec![K::Elem::default(); panels * width * steps];
        data.par_chunks_mut(width * steps.max(1))
            .enumerate()
            .for_each(|(panel, dst)| {
                // Each row packed whole (vectorised), then spread down its panel column.
                let mut packed = vec![K::Elem::default(); steps];
                for (i, r) in (panel * width..m.min(panel * width + width)).enumerate() {
                    let scale = scales.get(r).copied().unwrap_or(1.0);
                    K::pack_row(&b[r * d..][..d], scale, &mut packed);
                    let mut at = 0;
                    for &(start, len) in &blocks {
                        for (p, &v) in packed[start..][..len].iter().enumerate() {
                            dst[at + p * width + i] = v;
                        }
                        at += len * width;
                    }
                }
            });
        let mut factors: Vec<f32> = scales.iter().map(|s| 1.0 / s).collect();
        if K::SCALED {
            factors.resize(panels * width, 0.0);
        }
        Self {
            data,
            factors,
            m,
            d,
            steps,
            blocks,
            width,
        }
    }
}

/// A weight `b [m × d]` packed once for f32 products with [`multiply`] (the layout of the AVX-512 and AVX2
/// kernels), for matrices multiplied many times: a model's linear layers. Packing per call cost a quarter
/// of a forward's products, and all of a decode step's.
pub struct PackedB(Packed<F32s>);

impl PackedB {
    /// The kernel that multiplies packed weights on this CPU ([`Kernel::Avx512`], else [`Kernel::Avx2`]),
    /// if it has one; without, a model's layers stay on candle's matmul.
    pub fn kernel() -> Option<Kernel> {
        [Kernel::Avx512, Kernel::Avx2]
            .into_iter()
            .find(|k| k.available())
    }

    /// Packs the row-major `b [m × d]` for [`PackedB::kernel`].
    pub fn new(b: &[f32], m: usize, d: usize) -> Self {
        Self::for_kernel(Self::kernel().unwrap_or(Kernel::Avx512), b, m, d)
    }

    /// Packs `b` in the panels of `kernel` ([`Kernel::Avx512`]'s or [`Kernel::Avx2`]'s).
    fn for_kernel(kernel: Kernel, b: &[f32], m: usize, d: usize) -> Self {
        match kernel {
            Kernel::Avx2 => Self(packed_for::<Fma256>(b, m, d)),
            _ => Self(packed_for::<Fma512>(b, m, d)),
        }
    }

    /// Rows of the unpacked `b` (columns of the product).
    pub fn rows(&self) -> usize {
        self.0.m
    }

    /// Depth of the unpacked `b`.
    pub fn depth(&self) -> usize {
        self.0.d
    }

    /// The row-major `b [m × d]` back, exactly.
    pub fn unpack(&self) -> Vec<f32> {
        Self::unpack_packed(&self.0)
    }

    fn unpack_packed(packed: &Packed<F32s>) -> Vec<f32> {
        let Packed {
            data,
            m,
            d,
            steps,
            blocks,
            width,
            ..
        } = packed;
        let mut b = vec![0f32; m * d];
        for (r, row) in b.chunks_mut((*d).max(1)).enumerate().take(*m) {
            let panel = &data[r / width * width * steps..];
            let mut at = 0;
            for &(start, len) in blocks {
                for p in 0..len {
                    row[start + p] = panel[at + p * width + r % width];
                }
                at += len * width;
            }
        }
        b
    }
}

/// A gated MLP's `gate` and `up` weights (`[width × d]` each) packed together for [`product_glu`], which
/// stores `silu(x·gateᵀ) · (x·upᵀ)` as it computes the products: the `[n × 2·width]` product is never
/// written, and the separate SwiGLU pass over it (~2% of a SmolLM2 forward, plus writing and reading 12.6
/// MB a layer) is gone. Rows are interleaved 8 by 8 (gate rows 8q..8q+8, then up's), so each 16-column
/// panel holds 8 outputs' gate and up sums side by side, as the AVX2 kernel's 6 × 16 tiles see them.
/// AVX2 without AVX-512 only, for now (the AVX-512 kernel's 12 × 32 tiles would want halves of 16);
/// elsewhere the layer stays a [`PackedB`] followed by [`super::vector::swiglu`].
pub struct PackedGlu {
    packed: Packed<F32s>,
    width: usize,
}

impl PackedGlu {
    /// Packs `gate` and `up` (row-major `[width × d]`) where the packed product runs on [`Kernel::Avx2`],
    /// `width` is a multiple of 8 and `d` one depth block (≤ 1024); `None` otherwise.
    pub fn new(gate: &[f32], up: &[f32], width: usize, d: usize) -> Option<Self> {
        assert!(gate.len() == width * d && up.len() == width * d);
        let fits = width > 0 && width.is_multiple_of(8) && d > 0 && d <= KC;
        if PackedB::kernel() != Some(Kernel::Avx2) || !fits {
            return None;
        }
        let mut rows = Vec::with_capacity(2 * width * d);
        for (g, u) in gate.chunks_exact(8 * d).zip(up.chunks_exact(8 * d)) {
            rows.extend_from_slice(g);
            rows.extend_from_slice(u);
        }
        Some(Self {
            packed: packed_for::<Glu256>(&rows, 2 * width, d),
            width,
        })
    }

    /// Outputs per row (rows of `gate`).
    pub fn width(&self) -> usize {
        self.width
    }

    /// Depth of the weights.
    pub fn depth(&self) -> usize {
        self.packed.d
    }

    /// `gate` and `up` back, exactly, stacked: `[2·width × d]`.
    pub fn unpack(&self) -> Vec<f32> {
        let d = self.packed.d;
        let rows = PackedB::unpack_packed(&self.packed);
        let (mut gate, mut up) = (Vec::with_capacity(self.width * d), Vec::new());
        for pair in rows.chunks_exact(16 * d) {
            gate.extend_from_slice(&pair[..8 * d]);
            up.extend_from_slice(&pair[8 * d..]);
        }
        gate.extend(up);
        gate
    }
}

/// `out[n × width] = silu(a · gateᵀ) · (a · upᵀ)` for `a [n × d]` against a [`PackedGlu`]: the bits of
/// [`product`] against the stacked `[gate; up]` followed by [`super::vector::swiglu`].
pub fn product_glu(a: &[f32], n: usize, b: &PackedGlu) -> Vec<f32> {
    assert!(a.len() == n * b.packed.d);
    let mut out = Vec::with_capacity(n * b.width);
    // SAFETY: `PackedGlu::new` made `b` only where the CPU has AVX2; the capacity holds n × width floats,
    // every one written by the tiles (n rows × width / 8 groups of 8) before `set_len`.
    unsafe {
        multiply_packed::<Glu256>(a, &b.packed, None, SharedOut(out.as_mut_ptr()), n);
        out.set_len(n * b.width);
    }
    out
}

/// `out[n × m] = a[n × d] · b[m × d]ᵀ + bias[m]` with `b` packed once ([`PackedB`]); f32 on
/// [`PackedB::kernel`], the sums in the order of [`matmul_nt_bias_with`]'s `Kernel::Avx512` and
/// `Kernel::Avx2` (bit-identical to them).
///
/// # Panics
/// If the CPU has neither AVX-512 nor AVX2 ([`PackedB::kernel`] is `None`), or the extents disagree.
pub fn multiply(a: &[f32], b: &PackedB, bias: Option<&[f32]>, out: &mut [f32]) {
    let kernel = PackedB::kernel().expect("the packed f32 GEMM needs AVX-512 or AVX2");
    multiply_with(kernel, a, b, bias, out)
}

/// [`multiply`] on a chosen kernel (tests force each).
fn multiply_with(kernel: Kernel, a: &[f32], b: &PackedB, bias: Option<&[f32]>, out: &mut [f32]) {
    let m = b.rows();
    assert!(m > 0 && out.len().is_multiple_of(m));
    // SAFETY: `out` holds n × m floats.
    unsafe {
        multiply_into(
            kernel,
            a,
            b,
            bias,
            SharedOut(out.as_mut_ptr()),
            out.len() / m,
        )
    }
}

/// [`multiply`] into a new `[n × m]` vector, which is never zeroed first (every element is written; the
/// zeroing cost ~3% of a forward).
///
/// # Panics
/// As [`multiply`].
pub fn product(a: &[f32], n: usize, b: &PackedB, bias: Option<&[f32]>) -> Vec<f32> {
    let kernel = PackedB::kernel().expect("the packed f32 GEMM needs AVX-512 or AVX2");
    let mut out = Vec::with_capacity(n * b.rows());
    // SAFETY: the capacity holds n × m floats; `multiply_into` writes every one of them before `set_len`.
    unsafe {
        multiply_into(kernel, a, b, bias, SharedOut(out.as_mut_ptr()), n);
        out.set_len(n * b.rows());
    }
    out
}

/// [`multiply`] into `n × m` floats at `out`, each written (never read before it is).
///
/// # Safety
/// `out` points at `n × b.rows()` writable floats that nothing else touches meanwhile.
unsafe fn multiply_into(
    kernel: Kernel,
    a: &[f32],
    b: &PackedB,
    bias: Option<&[f32]>,
    out: SharedOut,
    n: usize,
) {
    assert!(
        kernel.available(),
        "the {kernel:?} GEMM kernel needs a CPU feature this one lacks"
    );
    let (m, d) = (b.rows(), b.depth());
    assert!(m > 0 && a.len() == n * d);
    assert!(bias.is_none_or(|bias| bias.len() == m));
    if d == 0 {
        for r in 0..n {
            let row = out.0.add(r * m);
            match bias {
                Some(bias) => std::ptr::copy_nonoverlapping(bias.as_ptr(), row, m),
                None => std::ptr::write_bytes(row, 0, m),
            }
        }
        return;
    }
    match kernel {
        Kernel::Avx512 => multiply_packed::<Fma512>(a, &b.0, bias, out, n),
        Kernel::Avx2 => multiply_packed::<Fma256>(a, &b.0, bias, out, n),
        _ => panic!(
            "a packed f32 weight is multiplied by Kernel::Avx512 or Kernel::Avx2, not {kernel:?}"
        ),
    }
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn blocked<K: MicroKernel>(
    a: &[f32],
    b: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    m: usize,
    d: usize,
) {
    let n = out.len() / m;
    // SAFETY: `out` holds n × m floats.
    unsafe {
        multiply_packed::<K>(
            a,
            &packed_for::<K>(b, m, d),
            bias,
            SharedOut(out.as_mut_ptr()),
            n,
        )
    };
}

/// `out` as a pointer the tasks share: each writes its own rectangle of it.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: the tasks of `multiply_packed` write disjoint rectangles of `out`, which outlives them.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

/// `out [n × m] = a · bᵀ + bias` with `b` packed, every element of `out` written before it is read. Tasks
/// are rectangles of `out` (whole row groups × whole column panels); the split never changes a sum's order.
///
/// # Safety
/// `out` points at `n × b.m` writable floats that nothing else touches meanwhile.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
unsafe fn multiply_packed<K: MicroKernel>(
    a: &[f32],
    b: &Packed<K::Layout>,
    bias: Option<&[f32]>,
    shared: SharedOut,
    n: usize,
) {
    let (m, d) = (b.m, b.d);
    assert!(a.len() == n * d);
    let padded_bias = padded_bias(bias, m);
    grid(n, m, K::COLS).into_par_iter().for_each(|task| {
        let a_rows = K::Layout::rows(&a[task.rows.start * d..task.rows.end * d], d);
        // SAFETY: the task's rectangle lies inside `out` (n × m), and no other task writes it.
        unsafe { block::<K>(a_rows, b, &padded_bias, shared, &task) };
    });
}

/// The bias (or zeros), zero-padded to whole panels of `m` columns; the first depth block's tiles add it.
fn padded_bias(bias: Option<&[f32]>, m: usize) -> Vec<f32> {
    let mut padded = vec![0f32; m.div_ceil(NR) * NR];
    if let Some(bias) = bias {
        padded[..m].copy_from_slice(bias);
    }
    padded
}

/// One task of a product: rows `rows` of `out` times the column panels `panels`.
struct Task {
    rows: std::ops::Range<usize>,
    panels: std::ops::Range<usize>,
}

/// `n × m` split into tasks: row blocks of whole MR groups, at most MC rows each unless that leaves a
/// thread idle, and, where there are too few rows to keep every thread busy (a decode step's few rows),
/// column blocks (of whole panels `width` columns wide) too. Several tasks per thread, sizes differing by
/// at most one unit.
fn grid(n: usize, m: usize, width: usize) -> Vec<Task> {
    let groups = n.div_ceil(MR);
    let panels = m.div_ceil(width);
    let row_parts = task_count(groups, MC / MR);
    let col_parts = (4 * rayon::current_num_threads())
        .div_ceil(row_parts)
        .clamp(1, panels.max(1));
    let mut tasks = Vec::with_capacity(row_parts * col_parts);
    for r in 0..row_parts {
        let rows = (r * groups / row_parts * MR)..((r + 1) * groups / row_parts * MR).min(n);
        for c in 0..col_parts {
            let panels = (c * panels / col_parts)..((c + 1) * panels / col_parts);
            if !rows.is_empty() && !panels.is_empty() {
                tasks.push(Task {
                    rows: rows.clone(),
                    panels,
                });
            }
        }
    }
    tasks
}

/// How many tasks to split `groups` units of work into: four per thread, or more to keep each at most
/// `max_groups`, in whole rounds per thread where there are enough groups (9 equal tasks on 2 threads keep
/// one thread idle a ninth of the time); at least one.
fn task_count(groups: usize, max_groups: usize) -> usize {
    let threads = rayon::current_num_threads();
    groups
        .min(4 * threads)
        .max(groups.div_ceil(max_groups.max(1)))
        .next_multiple_of(threads)
        .min(groups)
        .max(1)
}

/// `n` rows split into tasks of whole groups of `unit` rows, at most `max_rows` rows each unless that
/// leaves a thread idle: several per thread (the last task of an uneven split would idle the others), sizes
/// differing by at most one group with the larger ones spread out, so rayon's halving gives each thread the
/// same work. Each task is its first row and its number of rows.
pub(crate) fn row_ranges(n: usize, unit: usize, max_rows: usize) -> Vec<(usize, usize)> {
    let groups = n.div_ceil(unit);
    let tasks = task_count(groups, max_rows / unit);
    (0..tasks)
        .map(|t| {
            let row0 = t * groups / tasks * unit;
            let rows = (((t + 1) * groups / tasks) * unit).min(n) - row0;
            (row0, rows)
        })
        .collect()
}

/// `out` (rows of `m` values) split as [`row_ranges`] splits its rows: each task is its first row and its
/// rows of `out`.
pub(crate) fn row_tasks<T>(
    out: &mut [T],
    m: usize,
    unit: usize,
    max_rows: usize,
) -> Vec<(usize, &mut [T])> {
    let mut rest = out;
    row_ranges(rest.len() / m, unit, max_rows)
        .into_iter()
        .map(|(row0, rows)| {
            let (here, after) = std::mem::take(&mut rest).split_at_mut(rows * m);
            rest = after;
            (row0, here)
        })
        .collect()
}

/// The task's rows of `a` (in the kernel's form, with their factors if scaled: [`Packing::rows`]) times its
/// panels of `b`, into `out`.
///
/// # Safety
/// `out` points at an `n × b.m` matrix that contains the task's rectangle, which nothing else touches
/// meanwhile.
unsafe fn block<K: MicroKernel>(
    (a_rows, mut row_factors): (Cow<[Elem<K>]>, Vec<f32>),
    b: &Packed<K::Layout>,
    padded_bias: &[f32],
    out: SharedOut,
    task: &Task,
) {
    let (mr, nr) = (K::ROWS, K::COLS);
    assert_eq!(b.width, nr, "`b` was packed for another kernel's panels");
    let (m, lda) = (b.m, b.steps);
    // `out`'s row length and a panel's columns of it (half of `b`'s for a GLU kernel).
    let (ldc, per_panel) = (m * K::OUT_COLS / nr, K::OUT_COLS);
    let rows = task.rows.len();
    if K::Layout::SCALED {
        row_factors.resize(rows.div_ceil(mr) * mr, 0.0);
    }
    let factors = |i: usize, j: usize| {
        K::Layout::SCALED.then(|| Factors {
            rows: &row_factors[i * mr..][..mr],
            cols: &b.factors[j * nr..][..nr],
        })
    };
    let interleaved = K::PACKS_A;
    let a_rows = match interleaved {
        true => Cow::Owned(interleave(&a_rows, lda, mr)),
        false => a_rows,
    };
    // Row panels read in place: every one of a packed `a` (zero-padded), else the whole ones, and the last,
    // partial one is copied zero-padded to `mr` rows (its extra rows feed sums that are never stored).
    let in_place = match interleaved {
        true => rows.div_ceil(mr),
        false => rows / mr,
    };
    let mut tail = Vec::new();
    if !interleaved {
        tail.resize(mr * lda, Elem::<K>::default());
        tail[..(rows - in_place * mr) * lda].copy_from_slice(&a_rows[in_place * mr * lda..]);
    }
    // Where depth step `start` begins in a panel.
    let step_at = |start: usize| if interleaved { start * mr } else { start };
    let mut b_at = 0;
    for (bi, &(start, len)) in b.blocks.iter().enumerate() {
        for run in task.panels.clone().step_by(K::PANEL_RUN) {
            let run = run..(run + K::PANEL_RUN).min(task.panels.end);
            for i in 0..rows.div_ceil(mr) {
                let tile_rows = mr.min(rows - i * mr);
                let ap = if i < in_place {
                    &a_rows[i * mr * lda..][..mr * lda]
                } else {
                    &tail[..]
                };
                let first_row = task.rows.start + i * mr;
                for j in run.clone() {
                    let bp = &b.data[j * nr * b.steps + b_at..][..nr * len];
                    let width = per_panel.min(ldc - j * per_panel);
                    let start_with = if bi == 0 {
                        Start::Bias(&padded_bias[j * nr..][..nr])
                    } else {
                        Start::Accumulate
                    };
                    let c = out.0.add(first_row * ldc + j * per_panel);
                    tile::<K>(
                        len,
                        &ap[step_at(start)..],
                        lda,
                        bp,
                        c,
                        ldc,
                        tile_rows,
                        width,
                        start_with,
                        factors(i, j),
                    );
                }
            }
        }
        b_at += len * nr;
    }
}

/// Row-major rows of `steps` elements interleaved in panels of `rows` (element (r, p) of panel i at
/// `(i·steps + p)·rows + r`), the last panel zero-padded: a depth step's values side by side. (Written
/// once, never zeroed first: the zeroing was a fifth of this copy's time in a SmolLM2 forward.)
fn interleave<T: Copy + Default>(a: &[T], steps: usize, rows: usize) -> Vec<T> {
    let len = (a.len() / steps.max(1)).div_ceil(rows) * rows * steps;
    let mut out = Vec::with_capacity(len);
    let panels = out.spare_capacity_mut()[..len].chunks_mut(rows * steps);
    for (panel, src) in panels.zip(a.chunks(rows * steps)) {
        let filled = src.len() / steps;
        for (r, row) in src.chunks(steps).enumerate() {
            for (p, &v) in row.iter().enumerate() {
                panel[p * rows + r].write(v);
            }
        }
        for p in 0..steps {
            for padding in &mut panel[p * rows..][filled..rows] {
                padding.write(T::default());
            }
        }
    }
    // SAFETY: each panel's `filled` rows were copied and its other rows written with zeros: all `len`.
    unsafe { out.set_len(len) };
    out
}

/// What a tile's sums are added to.
#[derive(Clone, Copy)]
enum Start<'a> {
    /// The tile's columns of the bias (the first depth block).
    Bias(&'a [f32]),
    /// What `c` holds (later depth blocks).
    Accumulate,
}

/// One `K::ROWS × K::COLS` tile (`K::ROWS × K::OUT_COLS` of `out`): full tiles go straight to `c`, edge
/// tiles through a scratch tile.
///
/// # Safety
/// `c` points at `rows` rows of `cols` floats `ldc` apart that only this call touches.
#[allow(clippy::too_many_arguments)]
unsafe fn tile<K: MicroKernel>(
    kc: usize,
    a: &[Elem<K>],
    lda: usize,
    b: &[Elem<K>],
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    start: Start,
    factors: Option<Factors>,
) {
    let (mr, nr) = (K::ROWS, K::COLS);
    let a_extent = match K::PACKS_A {
        true => kc * mr,
        false => (mr - 1) * lda + kc,
    };
    assert!(mr <= MR && nr <= NR && K::OUT_COLS <= nr);
    assert!(a.len() >= a_extent && b.len() >= kc * nr);
    assert!(factors.is_none_or(|f| f.rows.len() == mr && f.cols.len() == nr));
    // SAFETY (both calls): `blocked` and `multiply` run only where the kernels' features were detected;
    // the panels' extents were just checked, and the tile lies in `c` (the caller's promise) or the scratch.
    if rows == mr && cols == K::OUT_COLS {
        K::kernel(kc, a.as_ptr(), lda, b.as_ptr(), c, ldc, start, factors);
        return;
    }
    let mut scratch = [0f32; MR * NR];
    if matches!(start, Start::Accumulate) {
        for r in 0..rows {
            std::ptr::copy_nonoverlapping(c.add(r * ldc), scratch[r * NR..].as_mut_ptr(), cols);
        }
    }
    K::kernel(
        kc,
        a.as_ptr(),
        lda,
        b.as_ptr(),
        scratch.as_mut_ptr(),
        NR,
        start,
        factors,
    );
    for r in 0..rows {
        std::ptr::copy_nonoverlapping(scratch[r * NR..].as_ptr(), c.add(r * ldc), cols);
    }
}

/// Depth steps ahead at which the kernels prefetch `b`: its panel is larger than L1, and without this
/// the loads waited on L2 for a third of the kernel's time (prefetching brought the product from ~370 to
/// ~400 GFLOP/s on an Intel Xeon).
const PREFETCH: usize = 16;

/// c[12 × 32] = start + a-panel · b-panel over `kc` depth steps; `a` is 12 rows `lda` apart, `b` 32 floats
/// per step.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel_f32(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    start: Start,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    let mut b = b;
    for p in 0..kc {
        _mm_prefetch::<_MM_HINT_T0>(b.add(PREFETCH * NR).cast());
        _mm_prefetch::<_MM_HINT_T0>(b.add(PREFETCH * NR + 16).cast());
        let b0 = _mm512_loadu_ps(b);
        let b1 = _mm512_loadu_ps(b.add(16));
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = _mm512_set1_ps(*a.add(r * lda + p));
            acc[0] = _mm512_fmadd_ps(x, b0, acc[0]);
            acc[1] = _mm512_fmadd_ps(x, b1, acc[1]);
        }
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
    lda: usize,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    start: Start,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    let mut b = b;
    for p in 0..kc {
        _mm_prefetch::<_MM_HINT_T0>(b.add(PREFETCH * NR).cast());
        _mm_prefetch::<_MM_HINT_T0>(b.add(PREFETCH * NR + 16).cast());
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.cast()));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(16).cast()));
        for (r, acc) in acc.iter_mut().enumerate() {
            let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(r * lda + p) as i32));
            acc[0] = _mm512_dpbf16_ps(acc[0], x, b0);
            acc[1] = _mm512_dpbf16_ps(acc[1], x, b1);
        }
        b = b.add(NR);
    }
    store(&acc, c, ldc, start);
}

/// [`kernel_f32_avx2`] on 16-bit integer pairs: c[6 × 16] = start + factors ∘ (a · b) over `kc` pair steps,
/// `a` a panel of 6 interleaved rows (a step's pairs side by side), `b` 16 pairs per step. Each `vpmaddwd`
/// multiplies two depth steps' pairs and adds them to 8 i32 sums, 16 multiply-adds where an FMA does 8.
/// The sums are exact (the scaled rows' norms keep every partial sum within i32: [`INT16_NORM`]); each is
/// made f32 once, times its row's and column's factors.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_i16_avx2(
    kc: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    start: Start,
    factors: Factors,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_si256(); 2]; 6];
    let (mut a, mut b) = (a, b);
    for _ in 0..kc {
        _mm_prefetch::<_MM_HINT_T0>(b.add(PREFETCH * 16).cast());
        let b0 = _mm256_loadu_si256(b.cast());
        let b1 = _mm256_loadu_si256(b.add(8).cast());
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = _mm256_set1_epi32(*a.add(r) as i32);
            acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(x, b0));
            acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(x, b1));
        }
        a = a.add(6);
        b = b.add(16);
    }
    let cols = (
        _mm256_loadu_ps(factors.cols.as_ptr()),
        _mm256_loadu_ps(factors.cols.as_ptr().add(8)),
    );
    let bias = match start {
        Start::Bias(bias) => Some((
            _mm256_loadu_ps(bias.as_ptr()),
            _mm256_loadu_ps(bias.as_ptr().add(8)),
        )),
        Start::Accumulate => None,
    };
    for (r, acc) in acc.iter().enumerate() {
        let row = c.add(r * ldc);
        let factor = _mm256_set1_ps(factors.rows[r]);
        let (f0, f1) = (_mm256_mul_ps(factor, cols.0), _mm256_mul_ps(factor, cols.1));
        let (s0, s1) = (_mm256_cvtepi32_ps(acc[0]), _mm256_cvtepi32_ps(acc[1]));
        let (start0, start1) = match bias {
            Some(bias) => bias,
            None => (_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8))),
        };
        _mm256_storeu_ps(row, _mm256_fmadd_ps(s0, f0, start0));
        _mm256_storeu_ps(row.add(8), _mm256_fmadd_ps(s1, f1, start1));
    }
}

/// [`kernel_f32`] on AVX2, c[6 × 16] = start + a · b over `kc` depth steps (12 sums in registers of 8
/// floats, two of `b`, one broadcast of `a`: 15 of AVX2's 16 registers): `a` a panel of 6 interleaved
/// rows, `b` 16 floats per step. Every sum is the FMA chain of [`kernel_f32`] over the same depth steps,
/// so the bits are the same.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_f32_avx2(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    start: Start,
) {
    use std::arch::x86_64::*;
    let acc = sums_6x16(kc, a, b);
    let bias = match start {
        Start::Bias(bias) => Some((
            _mm256_loadu_ps(bias.as_ptr()),
            _mm256_loadu_ps(bias.as_ptr().add(8)),
        )),
        Start::Accumulate => None,
    };
    for (r, acc) in acc.iter().enumerate() {
        let row = c.add(r * ldc);
        let (lo, hi) = match bias {
            Some((b0, b1)) => (_mm256_add_ps(acc[0], b0), _mm256_add_ps(acc[1], b1)),
            None => (
                _mm256_add_ps(acc[0], _mm256_loadu_ps(row)),
                _mm256_add_ps(acc[1], _mm256_loadu_ps(row.add(8))),
            ),
        };
        _mm256_storeu_ps(row, lo);
        _mm256_storeu_ps(row.add(8), hi);
    }
}

/// The sums of a 6 × 16 tile over `kc` depth steps: `a` a panel of 6 interleaved rows (a step's 6 values
/// side by side), `b` 16 floats per step (two registers of 8 columns per row).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn sums_6x16(
    kc: usize,
    a: *const f32,
    b: *const f32,
) -> [[std::arch::x86_64::__m256; 2]; 6] {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; 6];
    let (mut a, mut b) = (a, b);
    for _ in 0..kc {
        _mm_prefetch::<_MM_HINT_T0>(b.add(PREFETCH * 16).cast());
        let b0 = _mm256_loadu_ps(b);
        let b1 = _mm256_loadu_ps(b.add(8));
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = _mm256_broadcast_ss(&*a.add(r));
            acc[0] = _mm256_fmadd_ps(x, b0, acc[0]);
            acc[1] = _mm256_fmadd_ps(x, b1, acc[1]);
        }
        a = a.add(6);
        b = b.add(16);
    }
    acc
}

/// [`kernel_f32_avx2`] on a [`PackedGlu`]'s 16-column panels, each 8 gate columns, then the same 8
/// outputs' up columns: the 6 × 16 tile stores `silu(gate + bias) · (up + bias)` as 6 × 8 values (`c` is
/// the tile's first output, `ldc` the output's row length). One depth block only: the store needs the
/// whole sums.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_glu_avx2(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    start: Start,
) {
    use std::arch::x86_64::*;
    let Start::Bias(bias) = start else {
        unreachable!("a GLU product is one depth block (PackedGlu::new checks)")
    };
    let (gate_bias, up_bias) = (
        _mm256_loadu_ps(bias.as_ptr()),
        _mm256_loadu_ps(bias[8..].as_ptr()),
    );
    let acc = sums_6x16(kc, a, b);
    for (r, acc) in acc.iter().enumerate() {
        let (gate, up) = (
            _mm256_add_ps(acc[0], gate_bias),
            _mm256_add_ps(acc[1], up_bias),
        );
        let out = super::vector::avx2::silu_mul8(gate, up);
        _mm256_storeu_ps(c.add(r * ldc), out);
    }
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

    /// What the f32 kernels compute, one scalar at a time: per depth block, a fused multiply-add chain
    /// from zero over the block's steps in order, added to the bias (the first block) or to the sum so far.
    fn fma_chains(
        a: &[f32],
        b: &[f32],
        bias: &[f32],
        (n, m, d): (usize, usize, usize),
    ) -> Vec<f32> {
        let mut out = vec![0f32; n * m];
        for (i, o) in out.iter_mut().enumerate() {
            let (row, col) = (&a[i / m * d..][..d], &b[i % m * d..][..d]);
            *o = bias[i % m];
            for (start, len) in depth_blocks(d) {
                let chain = (start..start + len).fold(0f32, |s, p| row[p].mul_add(col[p], s));
                *o += chain;
            }
        }
        out
    }

    /// `out` is `a · bᵀ + bias` (f64) within f32 summation's error over the depth.
    fn assert_near_naive(
        out: &[f32],
        a: &[f32],
        b: &[f32],
        bias: &[f32],
        (n, m, d): (usize, usize, usize),
    ) {
        let want = naive(a, b, n, m, d);
        for (i, (&got, &want)) in out.iter().zip(&want).enumerate() {
            let want = want + bias[i % m] as f64;
            let tolerance = 1e-5 * (d as f64).sqrt() * (1.0 + want.abs());
            assert!(
                (got as f64 - want).abs() < tolerance,
                "({n}, {m}, {d}) element {i}: {got} vs {want}"
            );
        }
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
            assert_near_naive(&out, &a, &b, &bias, (n, m, d));
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
            // Each f32 kernel of this file forced in turn: within f32 rounding of f64, and bit-identical to
            // the scalar FMA chains they promise (so the AVX2 one to the AVX-512 one).
            let chains = fma_chains(&a, &b, &bias, (n, m, d));
            let mut first: Option<Vec<f32>> = None;
            for kernel in [Kernel::Avx512, Kernel::Avx2] {
                if !kernel.available() {
                    eprintln!("SKIPPED: {kernel:?} (this CPU lacks it)");
                    continue;
                }
                let mut out = vec![f32::NAN; n * m];
                matmul_nt_bias_with(kernel, &a, &b, Some(&bias), &mut out, n, m, d);
                assert_near_naive(&out, &a, &b, &bias, (n, m, d));
                assert!(
                    out.iter()
                        .zip(&chains)
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                    "({n}, {m}, {d}): {kernel:?} is not the FMA chains' bits"
                );
                let bits: Vec<u32> = out.iter().map(|x| x.to_bits()).collect();
                match &first {
                    Some(first) => assert!(
                        first.iter().map(|x| x.to_bits()).eq(bits),
                        "({n}, {m}, {d}): {kernel:?} differs from AVX-512 in bits"
                    ),
                    None => first = Some(out),
                }
            }
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
        } else if Kernel::Avx2.available() {
            Kernel::Avx2
        } else {
            Kernel::Portable
        };
        assert_eq!(best, expected);
        assert!(!Kernel::best(Precision::F32).rounds());
        assert_eq!(Precision::bf16_native(), best.rounds());
    }

    #[test]
    fn the_int16_precision_runs_on_avx2_and_falls_back_to_f32() {
        let best = Kernel::best(Precision::Int16);
        if Kernel::Avx2.available() {
            assert_eq!(best, Kernel::Avx2Int16);
        } else {
            assert_eq!(best, Kernel::best(Precision::F32));
        }
        assert_eq!(
            Precision::int16_faster(),
            best.rounds() && !Kernel::Avx512.available()
        );
    }

    #[test]
    fn int16_scaling_keeps_values_and_norms_in_range_and_rounds_ties_to_even() {
        // Spread rows, an outlier row (one value 10⁴ × the rest), a constant row, a zero row, odd lengths.
        let mut rows = vec![
            random(576, 21, 1.0),
            random(7, 22, 1e-15),
            random(2101, 23, 1e6),
            vec![0.25; 576],
            vec![0.0; 33],
        ];
        let mut outlier = random(577, 24, 1.0);
        outlier[300] = 1e4;
        rows.push(outlier);
        for row in &rows {
            let scale = int16_scale(row);
            let q: Vec<i16> = row.iter().map(|&v| int16_round(v, scale)).collect();
            let norm = q.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
            assert!(norm <= INT16_NORM as f64 + 1.0, "norm {norm}");
            assert!(q.iter().all(|v| v.unsigned_abs() <= INT16_MAX as u16));
            for (&v, &q) in row.iter().zip(&q) {
                assert_eq!(q as f32, (v * scale).round_ties_even(), "{v} × {scale}");
            }
            // The residual the bound uses: at most √len / 2 / scale, and the norms add up.
            let [v2, r2, d2] = int16_rounding_norms(row).map(|x| x as f64);
            let len = row.len() as f64;
            assert!(d2.sqrt() <= 0.5 * len.sqrt() / scale as f64 * 1.001);
            let exact: f64 = row.iter().map(|&v| (v as f64).powi(2)).sum();
            assert!((v2 - exact).abs() <= 1e-5 * exact);
            assert!((r2.sqrt() - norm / scale as f64).abs() <= 1e-5 * r2.sqrt() + 1e-30);
            if row.iter().any(|&v| v != 0.0) {
                // Scaled as far as the norm or the largest value allows.
                let largest = q.iter().map(|v| v.unsigned_abs()).max().unwrap();
                assert!(norm > 0.99 * INT16_NORM as f64 - 0.5 * len.sqrt() || largest > 31_990);
            }
        }
        // Squares that underflow: the largest value sets the scale, which stays finite.
        for tiny in [1e-30, 1e-44] {
            let scale = int16_scale(&[tiny; 7]);
            assert!(scale.is_finite() && int16_round(tiny, scale).unsigned_abs() <= 32000);
        }
        assert_eq!(int16_round(2.5, 1.0), 2);
        assert_eq!(int16_round(3.5, 1.0), 4);
        assert_eq!(int16_round(-2.5, 1.0), -2);
        assert_eq!(int16_round(f32::NAN, 1.0), 0);
    }

    #[test]
    fn int16_packing_rounds_to_nearest_even_in_every_build() {
        // Rounding by the shifted float's bits against Rust's own ties-to-even rounding, over ties, both
        // signs and the whole range a scaled value can take.
        let values = (-32_000..=32_000).flat_map(|i| [i as f32, i as f32 + 0.5, i as f32 - 0.25]);
        for v in values {
            let expected = v.round_ties_even() as i16;
            assert_eq!(int16_round(v, 1.0), expected, "{v}");
            assert_eq!(int16_rounded(v, 1.0), expected as f32, "{v}");
        }
        assert_eq!(int16_rounded(f32::NAN, 3.0), 0.0);
        // A whole row packed (odd length: the last pair's high half is 0) equals the element-wise
        // packing, with the plain build and, where the CPU has it, the AVX2 one.
        let mut row = random(577, 3, 2.0);
        row[5] = f32::NAN;
        row[6] = 0.5;
        let scale = int16_scale(&row[7..]);
        let expected: Vec<u32> = (0..289).map(|p| I16Pairs::elem(&row, scale, p)).collect();
        let mut packed = vec![u32::MAX; 289];
        int16_pack_row_lanes(&row, scale, &mut packed);
        assert_eq!(packed, expected);
        assert_eq!(packed[288] >> 16, 0);
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::simd::avx2() {
            packed.fill(u32::MAX);
            // SAFETY: the CPU has AVX2 and FMA (checked).
            unsafe { int16_pack_row_avx2(&row, scale, &mut packed) };
            assert_eq!(packed, expected);
            let clean = &row[7..];
            // SAFETY: as above.
            let (fast, plain) = unsafe { (int16_scale_avx2(clean), int16_scale_lanes(clean)) };
            assert_eq!(fast.to_bits(), plain.to_bits());
            let (fast, plain) = unsafe {
                (
                    int16_rounding_norms_avx2(clean),
                    int16_rounding_norms_lanes(clean),
                )
            };
            assert_eq!(fast.map(f32::to_bits), plain.map(f32::to_bits));
        }
    }

    #[test]
    #[cfg_attr(missing = "avx2", ignore = "needs a CPU with AVX2 and FMA")]
    fn the_int16_product_sums_the_scaled_integers_exactly_and_keeps_the_rounding_bound() {
        let kernel = Kernel::Avx2Int16;
        assert!(kernel.available());
        // Ragged edges as in the f32 test, an odd depth (half a pair), two depth blocks (2101), rows at
        // the norm limit all of one sign (the largest sums i32 can meet), and an outlier row.
        let shapes = [
            (1, 1, 1),
            (13, 33, 7),
            (121, 70, 193),
            (250, 64, 577),
            (30, 40, 2101),
        ];
        for (case, &(n, m, d)) in shapes.iter().enumerate() {
            let mut a = random(n * d, 1, 1.0);
            let mut b = random(m * d, 2, 1.0);
            if case == 3 {
                a[..d].fill(0.5);
                b[..d].fill(-3.0);
                a[d + 100] = 1e4;
            }
            let bias = random(m, 5, 1.0);
            let mut out = vec![f32::NAN; n * m];
            matmul_nt_bias_with(kernel, &a, &b, Some(&bias), &mut out, n, m, d);
            let quantize = |rows: &[f32]| -> Vec<(Vec<i16>, f64)> {
                rows.chunks(d)
                    .map(|row| {
                        let scale = int16_scale(row);
                        let q = row.iter().map(|&v| int16_round(v, scale)).collect();
                        (q, 1.0 / scale as f64)
                    })
                    .collect()
            };
            let (qa, qb) = (quantize(&a), quantize(&b));
            let norms = |rows: &[f32]| -> Vec<[f64; 3]> {
                let sqrt = |v: f32| (v as f64).sqrt();
                rows.chunks(d)
                    .map(|r| int16_rounding_norms(r).map(sqrt))
                    .collect()
            };
            let (na, nb) = (norms(&a), norms(&b));
            let exact = naive(&a, &b, n, m, d);
            for i in 0..n {
                for j in 0..m {
                    let ((x, fx), (w, fw)) = (&qa[i], &qb[j]);
                    let sum: i64 = x.iter().zip(w).map(|(&x, &w)| x as i64 * w as i64).sum();
                    let magnitude: i64 = x
                        .iter()
                        .zip(w)
                        .map(|(&x, &w)| (x as i64 * w as i64).abs())
                        .sum();
                    assert!(
                        sum.abs() < 1 << 31,
                        "({n}, {m}, {d}) [{i}, {j}]: {sum} overflows"
                    );
                    let want = sum as f64 * fx * fw + bias[j] as f64;
                    let got = out[i * m + j] as f64;
                    // Each depth block's exact sum made f32, times the factors, added: a few roundings.
                    let tolerance =
                        8.0 * 2f64.powi(-24) * (magnitude as f64 * fx * fw + bias[j].abs() as f64);
                    assert!(
                        (got - want).abs() <= tolerance + 1e-30,
                        "({n}, {m}, {d}) [{i}, {j}]: {got} vs {want}"
                    );
                    // The step's bound on the distance to the f32 product: ‖δx‖·‖w̃‖ + ‖x‖·‖δw‖ (with x·w
                    // = x̃·w̃ + δx·w̃ + x·δw).
                    let bound = na[i][2] * nb[j][1] + na[i][0] * nb[j][2] + tolerance;
                    let f32_value = exact[i * m + j] + bias[j] as f64;
                    assert!(
                        (got - f32_value).abs() <= bound * 1.01 + 1e-30,
                        "({n}, {m}, {d}) [{i}, {j}]: {got} vs f32 {f32_value}, bound {bound}"
                    );
                }
            }
        }
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
    fn a_glu_product_is_the_stacked_products_swiglu_bit_for_bit() {
        if PackedGlu::new(&[0.0; 8], &[0.0; 8], 8, 1).is_none() {
            // Only a CPU whose packed product is the AVX2 kernel fuses; elsewhere the dispatch declines.
            assert_ne!(PackedB::kernel(), Some(Kernel::Avx2));
            println!(
                "the fused GLU product is AVX2-only; this CPU packs for {:?}: nothing to compare",
                PackedB::kernel()
            );
            return;
        }
        // Rows in partial groups of 12 (1, 13, 131), widths of one block of 8 and partial panels (8, 24,
        // 40), depths of 1, odd, SmolLM2's 576 and the one-block limit 1024.
        for (n, width, d) in [
            (1, 8, 1),
            (13, 24, 7),
            (131, 40, 576),
            (25, 1536, 576),
            (12, 16, 1024),
        ] {
            let a = random(n * d, 1 + n as u64, 1.0);
            let gate = random(width * d, 2 + d as u64, 1.0);
            let up = random(width * d, 3 + width as u64, 1.0);
            let glu = PackedGlu::new(&gate, &up, width, d).expect("fits");
            let stacked = [gate.clone(), up.clone()].concat();
            assert_eq!(glu.unpack(), stacked, "({n}, {width}, {d}) unpacked");
            assert_eq!((glu.width(), glu.depth()), (width, d));
            let product = product(&a, n, &PackedB::new(&stacked, 2 * width, d), None);
            let mut want = vec![0f32; n * width];
            super::super::vector::swiglu(&product, width, &mut want);
            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let got = pool.install(|| product_glu(&a, n, &glu));
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(
                    same && got.len() == want.len(),
                    "({n}, {width}, {d}), {threads} threads"
                );
            }
            // And against the formula in f64.
            let (g, u) = (naive(&a, &gate, n, width, d), naive(&a, &up, n, width, d));
            for (i, &got) in want.iter().enumerate() {
                let exact = g[i] / (1.0 + (-g[i]).exp()) * u[i];
                let tolerance = 1e-5 * (d as f64).sqrt() * (1.0 + g[i].abs() * u[i].abs());
                assert!((got as f64 - exact).abs() < tolerance, "{got} vs {exact}");
            }
        }
        // Beyond one depth block, or a width not in blocks of 8: no fused product.
        assert!(PackedGlu::new(&vec![0.0; 8 * 1025], &vec![0.0; 8 * 1025], 8, 1025).is_none());
        assert!(PackedGlu::new(&[0.0; 12], &[0.0; 12], 12, 1).is_none());
    }

    #[test]
    fn a_visited_product_gives_the_products_bits_every_row_once_in_order() {
        // Several tasks (n > MC), a partial last row group, m not a multiple of a panel; stored or not.
        for (n, m, d) in [(0, 7, 5), (1, 5, 3), (301, 70, 33), (260, 45, 1100)] {
            let a = random(n * d, 11, 1.0);
            let b = random(m * d, 12, 1.0);
            let bias = random(m, 13, 1.0);
            for kernel in Kernel::ALL.into_iter().filter(|k| k.available()) {
                for bias in [None, Some(&bias[..])] {
                    let mut want = vec![0f32; n * m];
                    matmul_nt_bias_with(kernel, &a, &b, bias, &mut want, n, m, d);
                    for store in [false, true] {
                        let mut stored = vec![f32::NAN; n * m];
                        let out = store.then_some(&mut stored[..]);
                        let visits = matmul_nt_bias_visit(
                            kernel,
                            &a,
                            &b,
                            bias,
                            out,
                            n,
                            m,
                            d,
                            |row0, rows| (row0, rows.to_vec()),
                        );
                        let mut next = 0;
                        let mut seen = Vec::new();
                        for (row0, rows) in &visits {
                            assert_eq!(
                                *row0, next,
                                "{kernel:?} ({n}, {m}, {d}): rows out of order"
                            );
                            next += rows.len() / m;
                            seen.extend_from_slice(rows);
                        }
                        assert_eq!(next, n, "{kernel:?} ({n}, {m}, {d}): rows missed");
                        assert!(n < 2 * MC || visits.len() > 1, "{kernel:?}: one task");
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert!(
                            bits(&seen) == bits(&want),
                            "{kernel:?} ({n}, {m}, {d}) visited"
                        );
                        if store {
                            assert!(
                                bits(&stored) == bits(&want),
                                "{kernel:?} ({n}, {m}, {d}) stored"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    #[cfg_attr(missing = "avx2", ignore = "needs a CPU with AVX2")]
    fn a_weight_packed_once_gives_the_per_call_products_bits() {
        assert_eq!(
            PackedB::kernel(),
            [Kernel::Avx512, Kernel::Avx2]
                .into_iter()
                .find(|k| k.available())
        );
        // A decode step's few rows (tasks split by columns), a forward's many, ragged edges, two depth blocks.
        for &(n, m, d) in &[
            (1, 1, 1),
            (1, 70, 576),
            (5, 300, 33),
            (13, 33, 7),
            (121, 70, 192),
            (30, 40, 2100),
        ] {
            let a = random(n * d, 1, 1.0);
            let b = random(m * d, 2, 1.0);
            let bias = random(m, 5, 1.0);
            let packed = PackedB::new(&b, m, d);
            assert_eq!((packed.rows(), packed.depth()), (m, d));
            assert!(
                packed.unpack() == b,
                "({m}, {d}): unpacking changed the weight"
            );
            let kernels = [Kernel::Avx512, Kernel::Avx2];
            for (threads, kernel) in [1, 3]
                .into_iter()
                .flat_map(|t| kernels.into_iter().map(move |k| (t, k)))
                .filter(|(_, k)| k.available())
            {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let packed = PackedB::for_kernel(kernel, &b, m, d);
                assert!(packed.unpack() == b, "{kernel:?} ({m}, {d}): unpacking");
                let mut once = vec![f32::NAN; n * m];
                let mut per_call = vec![f32::NAN; n * m];
                pool.install(|| {
                    multiply_with(kernel, &a, &packed, Some(&bias), &mut once);
                    matmul_nt_bias_with(kernel, &a, &b, Some(&bias), &mut per_call, n, m, d);
                });
                assert!(
                    once.iter()
                        .zip(&per_call)
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{kernel:?} ({n}, {m}, {d}), {threads} threads"
                );
                assert_near_naive(&once, &a, &b, &bias, (n, m, d));
            }
        }
        // No depth: the bias alone.
        let mut out = vec![f32::NAN; 6];
        multiply(
            &[],
            &PackedB::new(&[], 3, 0),
            Some(&[1.0, 2.0, 3.0]),
            &mut out,
        );
        assert_eq!(out, [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
    }

    #[test]
    fn tasks_cover_the_product_once_in_whole_rounds() {
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for &(n, m) in &[
                (1, 1),
                (1, 960),
                (16, 576),
                (100, 40),
                (1024, 960),
                (1024, 49152),
            ] {
                let tasks = pool.install(|| grid(n, m, NR));
                let mut covered = vec![0u8; n * m.div_ceil(NR)];
                for t in &tasks {
                    assert!(t.rows.start % MR == 0 && t.rows.len() <= n);
                    for r in t.rows.clone() {
                        for p in t.panels.clone() {
                            covered[r * m.div_ceil(NR) + p] += 1;
                        }
                    }
                }
                assert!(
                    covered.iter().all(|&c| c == 1),
                    "({n}, {m}), {threads} threads"
                );
                let enough = n.div_ceil(MR) * m.div_ceil(NR) >= threads;
                assert!(
                    !enough || tasks.len() % threads == 0 || tasks.len() >= 4 * threads,
                    "({n}, {m}): {} tasks on {threads} threads",
                    tasks.len()
                );
            }
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
