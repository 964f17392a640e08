//! `out = a · bᵀ + bias` with bfloat16 inputs and f32 sums on Intel AMX tiles (Sapphire Rapids and later):
//! the bf16 products of [`super::gemm`] where the CPU has them. One `tdpbf16ps` multiplies a 16 × 32 tile
//! of `a` by a 32 × 16 tile of `b` into 16 × 16 f32 sums — 8,192 multiply-adds, 16× an AVX-512 FMA.
//!
//! Written with `asm!` because Rust's AMX intrinsics are unstable; run-time detected (CPUID leaf 7) and
//! enabled with Linux's permission request for the tile data (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, asked
//! once per process). Layout: `b` is packed into 32-column panels of depth pairs (the "VNNI" order a B
//! tile wants: row `p` holds, per column, the bf16 values at depths `2p` and `2p + 1`), `a` into bf16 rows;
//! the depth is zero-padded to a multiple of 32, rows to a multiple of 32. The micro-kernel keeps a 32 × 32
//! block of sums in four tiles while it walks the whole depth. Every sum is taken in the same order
//! whatever the thread count, so results are bit-identical across runs and thread counts.

use std::mem::MaybeUninit;

use rayon::prelude::*;

/// Rows and columns of the micro-kernel's output block (2 × 2 tiles of 16 × 16).
const BLOCK: usize = 32;
/// Depth values per tile step (a tile row holds 32 bf16).
const DEPTH_STEP: usize = 32;
/// Rows of `a` per thread task, at most (a multiple of BLOCK): its packed rows stay in L2, and one panel's
/// sums for them (8 KiB) stay in L1 beside the panel's depth chunk (256 rows' 32 KiB did not: the SAE
/// trainer's 4096 × 4608 product took ~27 ms instead of ~22).
const ROWS_PER_TASK: usize = 64;
/// Depth per pass over a task's blocks (a multiple of DEPTH_STEP): a block's slice of `a` and a panel's
/// slice of `b` (16 KiB each in bf16) stay in L1 while the panel meets every block of the task.
const DEPTH_CHUNK: usize = 256;

/// Whether this CPU has AMX-BF16 and this process may use the tile registers (asked of Linux once).
/// `SAEFLOW_AMX=0` says no (to run or measure the AVX512-BF16 paths on an AMX machine).
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| std::env::var("SAEFLOW_AMX").as_deref() != Ok("0") && detect())
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    use std::arch::x86_64::{__cpuid_count, __get_cpuid_max};
    // SAFETY: CPUID exists on every x86-64 CPU; leaf 7 is read only where the CPU reports it.
    #[allow(unused_unsafe)]
    let (max_leaf, leaf7) = unsafe {
        let max = __get_cpuid_max(0).0;
        (
            max,
            if max >= 7 {
                __cpuid_count(7, 0)
            } else {
                __cpuid_count(0, 0)
            },
        )
    };
    let amx_bf16 = max_leaf >= 7 && leaf7.edx >> 22 & 1 == 1;
    let amx_tile = max_leaf >= 7 && leaf7.edx >> 24 & 1 == 1;
    if !(amx_bf16 && amx_tile) {
        return false;
    }
    // Linux keeps the 8 KiB tile state off until a process asks (kernel 5.16+); a refusal means no AMX.
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes this process's permitted state components.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// The bfloat16 bits of `x`, rounded to nearest even (as [`super::gemm`]'s bf16 path).
#[inline(always)]
fn bf16(x: f32) -> u16 {
    super::gemm::bf16_bits(x) as u16
}

/// `dst[i] = bf16(src[i])`, rounded to nearest even, for `min(len)` values: 16 at a time with AVX512-BF16
/// (which every AMX CPU has; packing one value at a time took longer than the tiles' products). Its
/// conversion flushes denormals to zero; the tiles treat bf16 denormal inputs as zero anyway.
pub(crate) fn round_row(src: &[f32], dst: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if super::avx512() && std::arch::is_x86_feature_detected!("avx512bf16") {
        // SAFETY: the features were just detected.
        unsafe { round_row_avx512(src, dst) };
        return;
    }
    for (o, &v) in dst.iter_mut().zip(src) {
        *o = bf16(v);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn round_row_avx512(src: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    let n = src.len().min(dst.len());
    let mut i = 0;
    while i + 16 <= n {
        let v = _mm512_loadu_ps(src.as_ptr().add(i));
        let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
        _mm256_storeu_si256(dst.as_mut_ptr().add(i).cast(), h);
        i += 16;
    }
    for j in i..n {
        dst[j] = bf16(src[j]);
    }
}

/// `b [m × d]` packed into B tiles: per 32-column panel, `pairs` rows of 32 u32 (each the bf16 values at
/// depths 2p and 2p + 1 of one column, low half first); zeros past `m` and `d`.
pub struct PackedB {
    data: Vec<u32>,
    m: usize,
    d: usize,
    /// Depth pairs per panel: ⌈d / 32⌉ · 16.
    pairs: usize,
}

impl PackedB {
    /// Packs `b` (row-major `[m × d]`, f32 rounded to bf16).
    pub fn new(b: &[f32], m: usize, d: usize) -> Self {
        assert_eq!(b.len(), m * d);
        let pairs = d.div_ceil(DEPTH_STEP) * DEPTH_STEP / 2;
        let panels = m.div_ceil(BLOCK);
        let mut data = vec![0u32; panels * pairs * BLOCK];
        data.par_chunks_mut(pairs * BLOCK)
            .enumerate()
            .for_each(|(panel, dst)| {
                // One column's depth rounded to bf16 in order is its depth pairs (low half first).
                let mut pairs_of_col = vec![0u32; pairs];
                for col in 0..BLOCK.min(m - panel * BLOCK) {
                    let row = &b[(panel * BLOCK + col) * d..][..d];
                    round_row(row, bytemuck::cast_slice_mut(&mut pairs_of_col));
                    for (p, &pair) in pairs_of_col.iter().enumerate() {
                        dst[p * BLOCK + col] = pair;
                    }
                }
            });
        Self { data, m, d, pairs }
    }

    /// Rows of the unpacked `b` (columns of the product).
    pub fn rows(&self) -> usize {
        self.m
    }

    /// Depth of the unpacked `b`.
    pub fn depth(&self) -> usize {
        self.d
    }
}

/// `out[n × m] = a[n × d] · b[m × d]ᵀ + bias[m]` on AMX, inputs rounded to bf16, f32 sums.
///
/// # Panics
/// If [`available`] is false, or the extents disagree.
pub fn matmul_nt_bias(
    a: &[f32],
    b: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    n: usize,
    m: usize,
    d: usize,
) {
    assert!(b.len() == m * d);
    if n == 0 || m == 0 {
        return;
    }
    multiply(a, &PackedB::new(b, m, d), bias, out);
}

/// `out = a · bᵀ + bias` with `b` packed once ([`PackedB`]), for weights used many times.
///
/// # Panics
/// If [`available`] is false, or the extents disagree.
pub fn multiply(a: &[f32], b: &PackedB, bias: Option<&[f32]>, out: &mut [f32]) {
    // SAFETY: `multiply_into` writes only floats.
    let out = unsafe { super::to_overwrite(out) };
    multiply_into(a, b, bias, out);
}

/// [`multiply`] into a new `[n × m]` vector, which is never zeroed first (every element is written; zeroing
/// it cost more than the rounding of the input).
///
/// # Panics
/// As [`multiply`].
pub fn product(a: &[f32], n: usize, b: &PackedB, bias: Option<&[f32]>) -> Vec<f32> {
    // SAFETY: `multiply_into` writes every one of the n × m values.
    unsafe { super::written(n * b.m, |out| multiply_into(a, b, bias, out)) }
}

/// [`multiply`] into `out`, every element of which it writes.
fn multiply_into(a: &[f32], b: &PackedB, bias: Option<&[f32]>, out: &mut [MaybeUninit<f32>]) {
    assert!(
        available(),
        "AMX is not available on this CPU or to this process"
    );
    let (m, d) = (b.m, b.d);
    assert!(m > 0 && out.len().is_multiple_of(m) && a.len() == out.len() / m * d);
    assert!(bias.is_none_or(|bias| bias.len() == m));
    let n = out.len() / m;
    if n == 0 {
        return;
    }
    let parts = super::gemm::row_tasks(out, m, BLOCK, ROWS_PER_TASK);
    parts.into_par_iter().for_each(|(row0, out)| {
        let rows = out.len() / m;
        task(&a[row0 * d..][..rows * d], b, bias, out);
    });
}

/// `a · bᵀ + bias` (as [`multiply`] computes it), handed task by task to `visit(first_row, rows)` right after
/// each task's rows are computed, while they are in cache; stored in `out` if given, else only in a scratch
/// buffer that each thread reuses (a pass over the product, such as the SAE step's top-k scan, then costs
/// neither the 4 bytes per value written to memory nor their reading back). Returns what `visit` returned,
/// in row order.
///
/// # Panics
/// If [`available`] is false, or the extents disagree.
pub fn multiply_visit<R: Send>(
    a: &[f32],
    n: usize,
    b: &PackedB,
    bias: Option<&[f32]>,
    out: Option<&mut [f32]>,
    visit: impl Fn(usize, &[f32]) -> R + Sync,
) -> Vec<R> {
    assert!(
        available(),
        "AMX is not available on this CPU or to this process"
    );
    let (m, d) = (b.m, b.d);
    assert!(m > 0 && a.len() == n * d && out.as_ref().is_none_or(|out| out.len() == n * m));
    assert!(bias.is_none_or(|bias| bias.len() == m));
    let compute = |row0: usize, out: &mut [f32]| {
        let rows = out.len() / m;
        // SAFETY: `task` writes only floats.
        let uninit = unsafe { super::to_overwrite(out) };
        task(&a[row0 * d..][..rows * d], b, bias, uninit);
    };
    super::gemm::visit_row_tasks(n, m, BLOCK, ROWS_PER_TASK, out, compute, visit)
}

/// The rows of `a` times `b`, into the same rows of `out`. Per 32-column panel of `b`, the depth is summed
/// in chunks of DEPTH_CHUNK: a chunk of the panel stays in L1 while it meets every 32-row block of the task,
/// and the panel's sums so far (the task's rows × 32, in L2) are added to. Every sum is taken in the same
/// order whatever the split into tasks.
fn task(a: &[f32], b: &PackedB, bias: Option<&[f32]>, out: &mut [MaybeUninit<f32>]) {
    let (m, d) = (b.m, b.d);
    let rows = out.len() / m;
    let depth = b.pairs * 2; // padded
    let padded_rows = rows.div_ceil(BLOCK) * BLOCK;
    let mut packed_a = vec![0u16; padded_rows * depth];
    for (dst, src) in packed_a.chunks_mut(depth).zip(a.chunks(d)) {
        round_row(src, dst);
    }
    // One panel's sums: padded_rows × 32, 32-row blocks one after another.
    let mut sums = vec![0f32; padded_rows * BLOCK];
    let tiles = Tiles::configure();
    for panel in 0..m.div_ceil(BLOCK) {
        let panel_b = &b.data[panel * b.pairs * BLOCK..][..b.pairs * BLOCK];
        for start in (0..depth).step_by(DEPTH_CHUNK) {
            let len = DEPTH_CHUNK.min(depth - start);
            let bp = &panel_b[start / 2 * BLOCK..][..len / 2 * BLOCK];
            for block in 0..padded_rows / BLOCK {
                let ap = &packed_a[block * BLOCK * depth + start..];
                let c = &mut sums[block * BLOCK * BLOCK..][..BLOCK * BLOCK];
                tiles.block(ap, depth, bp, len, c, BLOCK, start > 0);
            }
        }
        let col0 = panel * BLOCK;
        let cols = BLOCK.min(m - col0);
        for (r, src) in sums.chunks(BLOCK).take(rows).enumerate() {
            let dst = &mut out[r * m + col0..][..cols];
            match bias {
                Some(bias) => {
                    for ((o, s), b) in dst.iter_mut().zip(src).zip(&bias[col0..]) {
                        o.write(s + b);
                    }
                }
                None => {
                    for (o, &s) in dst.iter_mut().zip(src) {
                        o.write(s);
                    }
                }
            }
        }
    }
}

/// This thread's tile registers, configured for the micro-kernel (16 rows × 64 bytes each) and released
/// when dropped. Nothing else on the thread uses tiles between (the task runs no other rayon work).
struct Tiles(());

/// The tile configuration `ldtilecfg` loads: palette 1, eight tiles of 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl Tiles {
    fn configure() -> Self {
        let mut cfg = TileConfig([0; 64]);
        cfg.0[0] = 1; // palette
        for t in 0..8 {
            cfg.0[16 + 2 * t] = 64; // bytes per row (u16, little-endian)
            cfg.0[48 + t] = 16; // rows
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `multiply` checked `available()` (the CPU has AMX and Linux granted the tile state);
        // the configuration is a valid palette-1 layout.
        unsafe {
            std::arch::asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
        }
        Self(())
    }

    /// `c [32 × 32] (+)= a [32 × len] · b`: `a` is 32 packed bf16 rows `a_stride` values apart, of which
    /// the first `len` (a multiple of 32) are used; `b` is `len / 2` rows of 32 depth pairs; `c` is 32 rows
    /// of 32 f32 `ldc` floats apart, added to when `accumulate` (else overwritten).
    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        a: &[u16],
        a_stride: usize,
        b: &[u32],
        len: usize,
        c: &mut [f32],
        ldc: usize,
        accumulate: bool,
    ) {
        assert!(len > 0 && len.is_multiple_of(DEPTH_STEP) && len <= a_stride);
        assert!(a.len() >= (BLOCK - 1) * a_stride + len && b.len() >= len / 2 * BLOCK);
        assert!(ldc >= BLOCK && c.len() >= (BLOCK - 1) * ldc + BLOCK);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: tiles configured by `configure` on this thread. Every load stays inside `a` and `b`
        // and every load and store of `c` inside `c` (asserted above: 32 rows at the given strides).
        unsafe {
            let (a_bytes, c_bytes) = (a_stride * 2, ldc * 4);
            let c = c.as_mut_ptr();
            let (c01, c10, c11) = (c.add(16), c.add(16 * ldc), c.add(16 * ldc + 16));
            if accumulate {
                std::arch::asm!(
                    "tileloadd tmm0, [{c00} + {ldc}*1]",
                    "tileloadd tmm1, [{c01} + {ldc}*1]",
                    "tileloadd tmm2, [{c10} + {ldc}*1]",
                    "tileloadd tmm3, [{c11} + {ldc}*1]",
                    c00 = in(reg) c, c01 = in(reg) c01, c10 = in(reg) c10, c11 = in(reg) c11,
                    ldc = in(reg) c_bytes,
                    options(nostack, readonly),
                );
            } else {
                std::arch::asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem),
                );
            }
            std::arch::asm!(
                "2:",
                "tileloadd tmm4, [{a0} + {a_stride}*1]",
                "tileloadd tmm5, [{a1} + {a_stride}*1]",
                "tileloadd tmm6, [{b0} + {b_stride}*1]",
                "tileloadd tmm7, [{b1} + {b_stride}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "add {a0}, 64",
                "add {a1}, 64",
                "add {b0}, 2048",
                "add {b1}, 2048",
                "dec {steps}",
                "jnz 2b",
                "tilestored [{c00} + {ldc}*1], tmm0",
                "tilestored [{c01} + {ldc}*1], tmm1",
                "tilestored [{c10} + {ldc}*1], tmm2",
                "tilestored [{c11} + {ldc}*1], tmm3",
                a0 = inout(reg) a.as_ptr() => _,
                a1 = inout(reg) a.as_ptr().add(16 * a_stride) => _,
                b0 = inout(reg) b.as_ptr() => _,
                b1 = inout(reg) b.as_ptr().add(16) => _,
                steps = inout(reg) len / DEPTH_STEP => _,
                a_stride = in(reg) a_bytes,
                b_stride = in(reg) BLOCK * 4,
                c00 = in(reg) c, c01 = in(reg) c01, c10 = in(reg) c10, c11 = in(reg) c11,
                ldc = in(reg) c_bytes,
                options(nostack),
            );
        }
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: releases this thread's tile state (configured by `configure`).
        unsafe {
            std::arch::asm!("tilerelease", options(nostack, nomem));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_data::random;

    /// The build script saw AMX (else these tests are ignored); a target directory may outlive its CPU.
    fn assert_amx() {
        assert!(
            available(),
            "built on a CPU with AMX, but AMX is not usable now (SAEFLOW_AMX=0? another CPU? `touch crates/core/build.rs`; or Linux refused the tile state)"
        );
    }

    #[test]
    #[cfg_attr(missing = "amx", ignore = "needs a CPU with AMX")]
    fn amx_results_do_not_depend_on_the_thread_count_or_packing() {
        assert_amx();
        let (n, m, d) = (500, 90, 200);
        let a = random(n * d, 3, 1.0);
        let b = random(m * d, 4, 1.0);
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut out = vec![0f32; n * m];
            pool.install(|| matmul_nt_bias(&a, &b, None, &mut out, n, m, d));
            out
        };
        let one = run(1);
        assert!(one
            .iter()
            .zip(run(3))
            .all(|(x, y)| x.to_bits() == y.to_bits()));
        let packed = PackedB::new(&b, m, d);
        let mut again = vec![0f32; n * m];
        multiply(&a, &packed, None, &mut again);
        assert!(one
            .iter()
            .zip(&again)
            .all(|(x, y)| x.to_bits() == y.to_bits()));
        // Visited task by task, stored or not: the same bits, every row once, in order.
        for store in [false, true] {
            let mut stored = vec![f32::NAN; n * m];
            let out = store.then_some(&mut stored[..]);
            let visited = multiply_visit(&a, n, &packed, None, out, |row0, rows| {
                (row0, rows.to_vec())
            });
            let mut next = 0;
            for (row0, rows) in &visited {
                assert_eq!(*row0, next);
                let want = &one[row0 * m..][..rows.len()];
                assert!(rows
                    .iter()
                    .zip(want)
                    .all(|(x, y)| x.to_bits() == y.to_bits()));
                next += rows.len() / m;
            }
            assert_eq!(next, n);
            assert!(visited.len() > 1, "one task: the split is not tested");
            if store {
                assert!(stored
                    .iter()
                    .zip(&one)
                    .all(|(x, y)| x.to_bits() == y.to_bits()));
            }
        }
        // Into a fresh, never-zeroed vector: the same bits.
        let fresh = product(&a, n, &packed, None);
        assert!(one
            .iter()
            .zip(&fresh)
            .all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}
