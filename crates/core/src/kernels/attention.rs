//! Causal attention on CPU: scores, masked softmax and the weighted sum of values in one pass per query
//! row, touching only the keys the row sees.
//!
//! Written by hand because the general path (two batched matmuls around a softmax of the full score
//! matrix) computes every masked score too and writes and re-reads the whole matrix: on SmolLM2 at batch
//! 8 × 128 it took ~3.5 ms of each layer's ~48. Keys are transposed once per (sequence, kv head) so 16
//! keys' scores accumulate in one register; values are summed row by row.

use rayon::prelude::*;

use std::mem::MaybeUninit;

use super::vector::softmax_row;
use super::{to_overwrite, Isa};

/// Query rows per parallel task.
const ROWS_PER_TASK: usize = 64;
/// Columns (keys, or a head's width) one pass over a query row accumulates: 8 registers of 16.
const BLOCK: usize = 128;
/// Query rows computed together (AVX-512 where the head width is a multiple of 64, AVX2 where it is one of
/// 16).
const GROUP: usize = 4;

/// Extents of one attention call; queries of the `groups` query heads that share a kv head are stacked
/// (GQA): query row `r` of a kv head is at position `start + r % t`.
#[derive(Debug, Clone, Copy)]
pub struct Extents {
    /// Sequences × kv heads.
    pub pairs: usize,
    /// Query rows per pair (`groups · t`).
    pub rows: usize,
    /// Queries per sequence.
    pub t: usize,
    /// Keys per pair (cached ones included).
    pub keys: usize,
    /// Position of the first query.
    pub start: usize,
    /// Width of one head.
    pub head_dim: usize,
}

/// Which keys a query row sees besides causality, and how its scores are bounded.
#[derive(Debug, Clone, Copy, Default)]
pub struct Visibility<'a> {
    /// The first key each pair's rows see (keys before it are left padding of a batch); empty = 0.
    pub first_key: &'a [usize],
    /// A sliding window: the row at position p sees keys after p − window only (Gemma 2's local layers).
    pub window: Option<usize>,
    /// Scaled scores become `softcap · tanh(score / softcap)` before the softmax (Gemma 2).
    pub softcap: Option<f32>,
}

impl Visibility<'_> {
    /// The first key row `r` of `pair` sees, given it sees keys up to `seen` (exclusive). A row of left
    /// padding, which sees no real key, sees its own key so that its (unused) output stays finite.
    fn first(&self, pair: usize, seen: usize) -> usize {
        let padding = self.first_key.get(pair).copied().unwrap_or(0);
        let window = self.window.map_or(0, |w| seen.saturating_sub(w));
        padding.max(window).min(seen.saturating_sub(1))
    }

    /// Turns a row's raw scores over keys `..seen` into probabilities: keys before `first` get 0.
    fn probabilities(&self, scores: &mut [f32], first: usize, scale: f32) {
        let (hidden, seen) = scores.split_at_mut(first);
        hidden.fill(0.0);
        match self.softcap {
            Some(cap) => {
                seen.iter_mut()
                    .for_each(|s| *s = cap * (*s * scale / cap).tanh());
                softmax_row(seen, 1.0);
            }
            None => softmax_row(seen, scale),
        }
    }
}

/// `out = softmax(scale · q·kᵀ, causal) · v` for `q, out [pairs, rows, head_dim]` and `k, v [pairs, keys,
/// head_dim]`, all row-major. Row `r` sees keys `0..=start + r % t`, narrowed further by `vis`.
pub fn causal_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    e: Extents,
    scale: f32,
    vis: Visibility,
    out: &mut [f32],
) {
    // SAFETY: the kernel writes only floats.
    let out = unsafe { to_overwrite(out) };
    causal_attention_on(Isa::best(), q, k, v, e, scale, vis, Layout::Pairs, out)
}

/// [`causal_attention`] with `out` by token: `[sequences, t, kv_heads · groups, head_dim]`, i.e. the
/// `[batch, t, heads · head_dim]` the output projection reads (pairs = sequences × `kv_heads`, groups =
/// rows / t). Each task's rows are computed in a small scratch block and copied to their places, instead
/// of a separate pass over the whole output to merge the heads (~1.5% of a SmolLM2 forward). Every element
/// of `out` is written (it need not be initialised).
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_by_token(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    e: Extents,
    kv_heads: usize,
    scale: f32,
    vis: Visibility,
    out: &mut [MaybeUninit<f32>],
) {
    assert!(kv_heads > 0 && e.pairs.is_multiple_of(kv_heads) && e.rows.is_multiple_of(e.t.max(1)));
    let layout = Layout::Tokens { kv_heads };
    causal_attention_on(Isa::best(), q, k, v, e, scale, vis, layout, out)
}

/// [`causal_attention`] on a chosen build.
#[allow(clippy::too_many_arguments)]
fn causal_attention_on(
    isa: Isa,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    e: Extents,
    scale: f32,
    vis: Visibility,
    layout: Layout,
    out: &mut [MaybeUninit<f32>],
) {
    let Extents {
        pairs,
        rows,
        keys,
        head_dim: hd,
        ..
    } = e;
    assert!(q.len() == pairs * rows * hd && out.len() == q.len());
    assert!(k.len() == pairs * keys * hd && v.len() == k.len() && scale > 0.0);
    if out.is_empty() {
        return;
    }
    // kᵀ per pair, keys padded to whole registers: [pairs, head_dim, padded].
    let padded = keys.div_ceil(16) * 16;
    let mut kt = vec![0f32; pairs * hd * padded];
    kt.par_chunks_mut((hd * padded).max(1))
        .zip(k.par_chunks((keys * hd).max(1)))
        .for_each(|(kt, k)| {
            for (j, key) in k.chunks_exact(hd).enumerate() {
                for (d, &x) in key.iter().enumerate() {
                    kt[d * padded + j] = x;
                }
            }
        });
    // Four rows at a time share every key and value load (a lone row waits on the cache, not the FMAs).
    let grouped = match isa {
        Isa::Avx512 => hd.is_multiple_of(64),
        Isa::Avx2 => hd.is_multiple_of(16),
        Isa::Portable => false,
    };
    let task = |pair: usize, block: usize, out: &mut [f32]| {
        let kt = &kt[pair * hd * padded..][..hd * padded];
        let v = &v[pair * keys * hd..][..keys * hd];
        let first = block * ROWS_PER_TASK;
        let q = &q[(pair * rows + first) * hd..][..out.len()];
        let seen = |i: usize| (e.start + (first + i) % e.t + 1).min(keys);
        let mut scores = vec![0f32; GROUP * padded];
        let mut i = 0;
        let count = out.len() / hd;
        while i < count {
            if grouped && i + GROUP <= count {
                let seen = [seen(i), seen(i + 1), seen(i + 2), seen(i + 3)];
                let (q, out) = (&q[i * hd..][..GROUP * hd], &mut out[i * hd..][..GROUP * hd]);
                let how = (scale, vis, pair);
                // SAFETY: `grouped` means AVX-512F and hd a multiple of 64, or AVX2 and one of 16;
                // extents as in `row`.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    match isa {
                        Isa::Avx512 => avx512::group(q, kt, padded, v, seen, how, &mut scores, out),
                        _ => avx2::group(q, kt, padded, v, seen, how, &mut scores, out),
                    }
                };
                i += GROUP;
            } else {
                let (q, out) = (&q[i * hd..][..hd], &mut out[i * hd..][..hd]);
                let scores = &mut scores[..padded];
                row(
                    isa,
                    q,
                    kt,
                    padded,
                    v,
                    seen(i),
                    (scale, vis, pair),
                    scores,
                    out,
                );
                i += 1;
            }
        }
    };
    // Each task's rows into a scratch block, then each row to its place in `out`.
    let blocks = rows.div_ceil(ROWS_PER_TASK);
    let dest = SharedOut(out.as_mut_ptr().cast());
    (0..pairs * blocks)
        .into_par_iter()
        .for_each_init(Vec::new, |scratch: &mut Vec<f32>, index| {
            let (pair, block) = (index / blocks, index % blocks);
            let first = block * ROWS_PER_TASK;
            scratch.resize(ROWS_PER_TASK.min(rows - first) * hd, 0.0);
            task(pair, block, scratch);
            for (i, row) in scratch.chunks_exact(hd).enumerate() {
                let at = layout.row_at(pair, first + i, e) * hd;
                // SAFETY: `at + hd` ≤ out.len() (`row_at` is below pairs · rows); each output row is
                // written by the one task that holds its (pair, r).
                unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), dest.at(at), hd) };
            }
        });
}

/// Where [`causal_attention`] puts a pair's query rows.
#[derive(Debug, Clone, Copy)]
enum Layout {
    /// `[pairs, rows, head_dim]`, as `q`.
    Pairs,
    /// `[sequences, t, kv_heads · groups, head_dim]`: by token, heads side by side.
    Tokens {
        /// kv heads per sequence (pairs = sequences × kv heads).
        kv_heads: usize,
    },
}

impl Layout {
    /// The output row of query row `r` of `pair`: in `Tokens`, row r of pair (b, h) is query head
    /// h·groups + r / t of token b·t + r % t.
    fn row_at(self, pair: usize, r: usize, e: Extents) -> usize {
        match self {
            Layout::Pairs => pair * e.rows + r,
            Layout::Tokens { kv_heads } => {
                let (t, groups) = (e.t, e.rows / e.t);
                let (b, h) = (pair / kv_heads, pair % kv_heads);
                (b * t + r % t) * kv_heads * groups + h * groups + r / t
            }
        }
    }
}

/// The output as a pointer the tasks share: each writes its own rows.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: the tasks of `causal_attention_on` write disjoint rows of the output, which outlives them.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The output's float `i` (a method, so closures capture the whole `SharedOut`, not its pointer).
    ///
    /// # Safety
    /// `i` is within the output.
    unsafe fn at(self, i: usize) -> *mut f32 {
        self.0.add(i)
    }
}

/// One query row over its first `seen` keys; `how` = (scale, visibility, pair).
#[allow(clippy::too_many_arguments)]
fn row(
    isa: Isa,
    q: &[f32],
    kt: &[f32],
    padded: usize,
    v: &[f32],
    seen: usize,
    how: (f32, Visibility, usize),
    scores: &mut [f32],
    out: &mut [f32],
) {
    let hd = q.len();
    let (scale, vis, pair) = how;
    let first = vis.first(pair, seen);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    #[cfg(target_arch = "x86_64")]
    {
        type WeightedRows = unsafe fn(&[f32], *const f32, usize, usize, *mut f32);
        let weighted: Option<WeightedRows> = match isa {
            Isa::Avx512 if hd.is_multiple_of(16) => Some(avx512::weighted_rows),
            // An AVX-512 CPU has AVX2 too: a width of 8·odd takes the 8-lane build.
            Isa::Avx512 | Isa::Avx2 if hd.is_multiple_of(8) => Some(avx2::weighted_rows),
            _ => None,
        };
        if let Some(weighted_rows) = weighted {
            // SAFETY: the CPU has the chosen build's features (`isa` is one it runs); `kt` holds hd rows of
            // `padded` ≥ seen (rounded up to 16) floats, `v` seen rows of hd (a multiple of the build's
            // lanes), `scores` padded floats, `out` hd.
            unsafe { weighted_rows(q, kt.as_ptr(), padded, seen, scores.as_mut_ptr()) };
            vis.probabilities(&mut scores[..seen], first, scale);
            unsafe { weighted_rows(&scores[..seen], v.as_ptr(), hd, hd, out.as_mut_ptr()) };
            return;
        }
    }
    for (j, s) in scores[..seen].iter_mut().enumerate() {
        *s = q
            .iter()
            .enumerate()
            .map(|(d, &x)| x * kt[d * padded + j])
            .sum();
    }
    vis.probabilities(&mut scores[..seen], first, scale);
    out.fill(0.0);
    for (&p, value) in scores[..seen].iter().zip(v.chunks_exact(hd)) {
        for (o, &x) in out.iter_mut().zip(value) {
            *o += p * x;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::BLOCK;
    use std::arch::x86_64::*;

    /// `out[c] = Σ_i w_i · rows[i][c]` for the columns `c < width` (up to the next multiple of 16; the
    /// rest is not written), rows `stride` apart: a query's scores (`w` = q, rows = kᵀ, columns = keys) and
    /// its weighted sum of values (`w` = probabilities, rows = v, columns = the head's width).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn weighted_rows(
        w: &[f32],
        rows: *const f32,
        stride: usize,
        width: usize,
        out: *mut f32,
    ) {
        for from in (0..width).step_by(BLOCK) {
            let (at, to) = (rows.add(from), out.add(from));
            // A fixed register count per call keeps the accumulators in registers.
            match (width - from).min(BLOCK).div_ceil(16) {
                1 => column_block::<1>(w, at, stride, to),
                2 => column_block::<2>(w, at, stride, to),
                3 => column_block::<3>(w, at, stride, to),
                4 => column_block::<4>(w, at, stride, to),
                5 => column_block::<5>(w, at, stride, to),
                6 => column_block::<6>(w, at, stride, to),
                7 => column_block::<7>(w, at, stride, to),
                _ => column_block::<8>(w, at, stride, to),
            }
        }
    }

    /// [`weighted_rows`] for 16·N columns.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn column_block<const N: usize>(
        w: &[f32],
        rows: *const f32,
        stride: usize,
        out: *mut f32,
    ) {
        let acc = dual_chains::<N>(w, rows, stride);
        for (c, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.add(16 * c), *acc);
        }
    }

    /// `Σ_i w_i · rows[i][..16·N]` (rows `stride` apart) in N registers. Even and odd `i` go to separate
    /// accumulators, so even N = 1 keeps two FMA chains in flight (one chain waits on the FMA latency).
    #[inline(always)]
    unsafe fn dual_chains<const N: usize>(
        w: &[f32],
        rows: *const f32,
        stride: usize,
    ) -> [__m512; N] {
        let (mut even, mut odd) = ([_mm512_setzero_ps(); N], [_mm512_setzero_ps(); N]);
        let mut at = rows;
        let pairs = w.chunks_exact(2);
        let last = pairs.remainder().first().copied();
        for pair in pairs {
            let (x0, x1) = (_mm512_set1_ps(pair[0]), _mm512_set1_ps(pair[1]));
            for c in 0..N {
                even[c] = _mm512_fmadd_ps(x0, _mm512_loadu_ps(at.add(16 * c)), even[c]);
                odd[c] = _mm512_fmadd_ps(x1, _mm512_loadu_ps(at.add(stride + 16 * c)), odd[c]);
            }
            at = at.add(2 * stride);
        }
        if let Some(x) = last {
            let x = _mm512_set1_ps(x);
            for (c, even) in even.iter_mut().enumerate() {
                *even = _mm512_fmadd_ps(x, _mm512_loadu_ps(at.add(16 * c)), *even);
            }
        }
        for c in 0..N {
            even[c] = _mm512_add_ps(even[c], odd[c]);
        }
        even
    }

    /// Four consecutive query rows (`q`, `out`: 4 × hd, hd a multiple of 64) over their own `seen` keys;
    /// `scores` holds 4 × `padded` floats. The scores of all four are computed up to the largest `seen`
    /// (each row's softmax ignores the rest); each row's weighted sum stops at its own `seen`. `how` =
    /// (scale, visibility, pair).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn group(
        q: &[f32],
        kt: &[f32],
        padded: usize,
        v: &[f32],
        seen: [usize; 4],
        how: (f32, super::Visibility, usize),
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let (scale, vis, pair) = how;
        let hd = q.len() / 4;
        let most = seen.iter().copied().max().unwrap_or(0);
        let least = seen.iter().copied().min().unwrap_or(0);
        let q: [*const f32; 4] = std::array::from_fn(|i| q.as_ptr().add(i * hd));
        let s: [*mut f32; 4] = std::array::from_fn(|i| scores.as_mut_ptr().add(i * padded));
        for from in (0..most).step_by(64) {
            let at = kt.as_ptr().add(from);
            let to = s.map(|s| s.add(from));
            match (most - from).min(64).div_ceil(16) {
                1 => score4::<1>(q, hd, at, padded, to),
                2 => score4::<2>(q, hd, at, padded, to),
                3 => score4::<3>(q, hd, at, padded, to),
                _ => score4::<4>(q, hd, at, padded, to),
            }
        }
        for (i, &seen) in seen.iter().enumerate() {
            let first = vis.first(pair, seen);
            vis.probabilities(&mut scores[i * padded..][..seen], first, scale);
        }
        for part in (0..hd).step_by(64) {
            // Keys every row sees together; then each row's own few.
            let mut acc = [[_mm512_setzero_ps(); 4]; 4];
            let mut at = v.as_ptr().add(part);
            for j in 0..least {
                let vj: [__m512; 4] = std::array::from_fn(|c| _mm512_loadu_ps(at.add(16 * c)));
                for (row, acc) in acc.iter_mut().enumerate() {
                    let p = _mm512_set1_ps(*s[row].add(j));
                    for c in 0..4 {
                        acc[c] = _mm512_fmadd_ps(p, vj[c], acc[c]);
                    }
                }
                at = at.add(hd);
            }
            for (row, acc) in acc.iter_mut().enumerate() {
                for j in least..seen[row] {
                    let p = _mm512_set1_ps(*s[row].add(j));
                    let vj = v.as_ptr().add(j * hd + part);
                    for (c, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm512_fmadd_ps(p, _mm512_loadu_ps(vj.add(16 * c)), *acc);
                    }
                }
                let o = out.as_mut_ptr().add(row * hd + part);
                for (c, acc) in acc.iter().enumerate() {
                    _mm512_storeu_ps(o.add(16 * c), *acc);
                }
            }
        }
    }

    /// Scores of 16·N keys for four query rows: each kᵀ register loaded once serves all four.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn score4<const N: usize>(
        q: [*const f32; 4],
        hd: usize,
        kt: *const f32,
        padded: usize,
        out: [*mut f32; 4],
    ) {
        let mut acc = [[_mm512_setzero_ps(); N]; 4];
        let mut at = kt;
        for d in 0..hd {
            let k: [__m512; N] = std::array::from_fn(|c| _mm512_loadu_ps(at.add(16 * c)));
            for (row, acc) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*q[row].add(d));
                for c in 0..N {
                    acc[c] = _mm512_fmadd_ps(x, k[c], acc[c]);
                }
            }
            at = at.add(padded);
        }
        for (row, acc) in acc.iter().enumerate() {
            for (c, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(out[row].add(16 * c), *acc);
            }
        }
    }
}

/// [`avx512::weighted_rows`] and [`avx512::group`] on 8 lanes, for CPUs with AVX2 and FMA only (AMD Zen
/// 1–3). The four-row groups take 16 columns a pass (8 sums, two loaded registers and a broadcast: 11 of
/// AVX2's 16 registers), where AVX-512's take 64.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// [`super::avx512::group`] on 8 lanes: `q`, `out` 4 × hd with hd a multiple of 16, `scores` 4 ×
    /// `padded` floats (`padded` a multiple of 16, at least every row's `seen`). Each loaded key or value
    /// register serves four rows: 0.75 loads per FMA where [`weighted_rows`] takes 1.25 (on SmolLM2 a lone
    /// row's attention ran at about half the linear layers' FLOP rate).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn group(
        q: &[f32],
        kt: &[f32],
        padded: usize,
        v: &[f32],
        seen: [usize; 4],
        how: (f32, super::Visibility, usize),
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let (scale, vis, pair) = how;
        let hd = q.len() / 4;
        let most = seen.iter().copied().max().unwrap_or(0);
        let least = seen.iter().copied().min().unwrap_or(0);
        let q: [*const f32; 4] = std::array::from_fn(|i| q.as_ptr().add(i * hd));
        let s: [*mut f32; 4] = std::array::from_fn(|i| scores.as_mut_ptr().add(i * padded));
        for from in (0..most).step_by(16) {
            let at = kt.as_ptr().add(from);
            let to = s.map(|s| s.add(from));
            match (most - from).div_ceil(8) {
                1 => score4::<1>(q, hd, at, padded, to),
                _ => score4::<2>(q, hd, at, padded, to),
            }
        }
        for (i, &seen) in seen.iter().enumerate() {
            let first = vis.first(pair, seen);
            vis.probabilities(&mut scores[i * padded..][..seen], first, scale);
        }
        for part in (0..hd).step_by(16) {
            // Keys every row sees together; then each row's own few.
            let mut acc = [[_mm256_setzero_ps(); 2]; 4];
            let mut at = v.as_ptr().add(part);
            for j in 0..least {
                let vj = [_mm256_loadu_ps(at), _mm256_loadu_ps(at.add(8))];
                for (row, acc) in acc.iter_mut().enumerate() {
                    let p = _mm256_set1_ps(*s[row].add(j));
                    acc[0] = _mm256_fmadd_ps(p, vj[0], acc[0]);
                    acc[1] = _mm256_fmadd_ps(p, vj[1], acc[1]);
                }
                at = at.add(hd);
            }
            for (row, acc) in acc.iter_mut().enumerate() {
                for j in least..seen[row] {
                    let p = _mm256_set1_ps(*s[row].add(j));
                    let vj = v.as_ptr().add(j * hd + part);
                    acc[0] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj), acc[0]);
                    acc[1] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj.add(8)), acc[1]);
                }
                let o = out.as_mut_ptr().add(row * hd + part);
                _mm256_storeu_ps(o, acc[0]);
                _mm256_storeu_ps(o.add(8), acc[1]);
            }
        }
    }

    /// Scores of 8·N keys for four query rows: each kᵀ register loaded once serves all four.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn score4<const N: usize>(
        q: [*const f32; 4],
        hd: usize,
        kt: *const f32,
        padded: usize,
        out: [*mut f32; 4],
    ) {
        let mut acc = [[_mm256_setzero_ps(); N]; 4];
        let mut at = kt;
        for d in 0..hd {
            let k: [__m256; N] = std::array::from_fn(|c| _mm256_loadu_ps(at.add(8 * c)));
            for (row, acc) in acc.iter_mut().enumerate() {
                let x = _mm256_set1_ps(*q[row].add(d));
                for c in 0..N {
                    acc[c] = _mm256_fmadd_ps(x, k[c], acc[c]);
                }
            }
            at = at.add(padded);
        }
        for (row, acc) in acc.iter().enumerate() {
            for (c, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(out[row].add(8 * c), *acc);
            }
        }
    }

    /// Columns one pass accumulates: 4 registers of 8, twice (even and odd rows): 8 of the 16 registers.
    const BLOCK: usize = 32;

    /// `out[c] = Σ_i w_i · rows[i][c]` for the columns `c < width` (up to the next multiple of 8; the
    /// rest is not written), rows `stride` apart.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn weighted_rows(
        w: &[f32],
        rows: *const f32,
        stride: usize,
        width: usize,
        out: *mut f32,
    ) {
        for from in (0..width).step_by(BLOCK) {
            let (at, to) = (rows.add(from), out.add(from));
            match (width - from).min(BLOCK).div_ceil(8) {
                1 => column_block::<1>(w, at, stride, to),
                2 => column_block::<2>(w, at, stride, to),
                3 => column_block::<3>(w, at, stride, to),
                _ => column_block::<4>(w, at, stride, to),
            }
        }
    }

    /// [`weighted_rows`] for 8·N columns, even and odd rows in separate accumulators.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn column_block<const N: usize>(
        w: &[f32],
        rows: *const f32,
        stride: usize,
        out: *mut f32,
    ) {
        let (mut even, mut odd) = ([_mm256_setzero_ps(); N], [_mm256_setzero_ps(); N]);
        let mut at = rows;
        let pairs = w.chunks_exact(2);
        let last = pairs.remainder().first().copied();
        for pair in pairs {
            let (x0, x1) = (_mm256_set1_ps(pair[0]), _mm256_set1_ps(pair[1]));
            for c in 0..N {
                even[c] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(at.add(8 * c)), even[c]);
                odd[c] = _mm256_fmadd_ps(x1, _mm256_loadu_ps(at.add(stride + 8 * c)), odd[c]);
            }
            at = at.add(2 * stride);
        }
        if let Some(x) = last {
            let x = _mm256_set1_ps(x);
            for (c, even) in even.iter_mut().enumerate() {
                *even = _mm256_fmadd_ps(x, _mm256_loadu_ps(at.add(8 * c)), *even);
            }
        }
        for c in 0..N {
            _mm256_storeu_ps(out.add(8 * c), _mm256_add_ps(even[c], odd[c]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`causal_attention_on`] into initialised floats (NaN in most tests: a row left unwritten shows).
    #[allow(clippy::too_many_arguments)]
    fn attend(
        isa: Isa,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        e: Extents,
        scale: f32,
        vis: Visibility,
        layout: Layout,
        out: &mut [f32],
    ) {
        // SAFETY: the kernel writes only floats.
        causal_attention_on(isa, q, k, v, e, scale, vis, layout, unsafe {
            to_overwrite(out)
        })
    }

    /// The definition in f64: masked scores, softmax, weighted sum.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        e: Extents,
        scale: f32,
        vis: Visibility,
    ) -> Vec<f64> {
        let hd = e.head_dim;
        let mut out = vec![0f64; q.len()];
        for pair in 0..e.pairs {
            for r in 0..e.rows {
                let position = e.start + r % e.t;
                let seen = (position + 1).min(e.keys);
                // Written out from the definition: padding before first_key, a window of w keys ending at
                // the row's own position.
                let mut first = vis.first_key.get(pair).copied().unwrap_or(0);
                if let Some(w) = vis.window {
                    first = first.max((position + 1).saturating_sub(w));
                }
                let first = first.min(seen - 1);
                let qr = &q[(pair * e.rows + r) * hd..][..hd];
                let s: Vec<f64> = (first..seen)
                    .map(|j| {
                        let kj = &k[(pair * e.keys + j) * hd..][..hd];
                        let s = qr
                            .iter()
                            .zip(kj)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                            * scale as f64;
                        match vis.softcap {
                            Some(c) => c as f64 * (s / c as f64).tanh(),
                            None => s,
                        }
                    })
                    .collect();
                let max = s.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = s.iter().map(|x| (x - max).exp()).sum();
                for (j, x) in s.iter().enumerate() {
                    let j = j + first;
                    let p = (x - max).exp() / z;
                    let vj = &v[(pair * e.keys + j) * hd..][..hd];
                    for d in 0..hd {
                        out[(pair * e.rows + r) * hd + d] += p * vj[d] as f64;
                    }
                }
            }
        }
        out
    }

    fn random(n: usize, seed: u64) -> Vec<f32> {
        crate::kernels::test_data::random(n, seed, 1.0)
    }

    #[test]
    fn matches_the_definition_for_prefill_gqa_decode_and_odd_widths() {
        // (pairs, groups, t, cached keys, head_dim): GQA prefill with more keys than one block; decode
        // (t = 1) after 200 cached keys; a chunked prefill after a cache; a width without a vector path;
        // one of 8 lanes but not 16;
        // four-row groups that straddle query heads (positions wrap inside a group).
        for &(pairs, groups, t, cached, hd) in &[
            (3, 3, 130, 0, 64),
            (2, 1, 1, 200, 32),
            (2, 2, 5, 17, 48),
            (1, 2, 9, 0, 20),
            (2, 2, 7, 33, 40),
            (2, 4, 3, 70, 128),
        ] {
            let e = Extents {
                pairs,
                rows: groups * t,
                t,
                keys: cached + t,
                start: cached,
                head_dim: hd,
            };
            let q = random(pairs * e.rows * hd, 1);
            let k = random(pairs * e.keys * hd, 2);
            let v = random(pairs * e.keys * hd, 3);
            let scale = 1.0 / (hd as f32).sqrt();
            let first_key: Vec<usize> = (0..pairs).map(|p| (p * 7) % (cached + 3)).collect();
            let narrowed = [
                Visibility::default(),
                Visibility {
                    first_key: &first_key,
                    window: Some(11),
                    softcap: Some(0.7),
                },
                Visibility {
                    window: Some(1),
                    ..Visibility::default()
                },
            ];
            for (vis, isa) in narrowed
                .into_iter()
                .flat_map(|vis| Isa::available().into_iter().map(move |isa| (vis, isa)))
            {
                let mut out = vec![f32::NAN; q.len()];
                attend(isa, &q, &k, &v, e, scale, vis, Layout::Pairs, &mut out);
                let want = reference(&q, &k, &v, e, scale, vis);
                for (i, (&g, &w)) in out.iter().zip(&want).enumerate() {
                    assert!(
                        (g as f64 - w).abs() < 1e-5,
                        "{isa:?} {e:?} {vis:?} element {i}: {g} vs {w}"
                    );
                }
                // By token, with the pairs as one sequence of `pairs` kv heads or `pairs` sequences of
                // one: every row the same bits, at (token, head).
                for kv_heads in [1, pairs] {
                    let layout = Layout::Tokens { kv_heads };
                    let mut by_token = vec![f32::NAN; q.len()];
                    attend(isa, &q, &k, &v, e, scale, vis, layout, &mut by_token);
                    for pair in 0..pairs {
                        for r in 0..e.rows {
                            let (b, h) = (pair / kv_heads, pair % kv_heads);
                            let (token, head) = (b * t + r % t, h * groups + r / t);
                            let got = &by_token[(token * kv_heads * groups + head) * hd..][..hd];
                            let want = &out[(pair * e.rows + r) * hd..][..hd];
                            let same = got
                                .iter()
                                .zip(want)
                                .all(|(x, y)| x.to_bits() == y.to_bits());
                            assert!(
                                same,
                                "{isa:?} {e:?} by token, {kv_heads} kv heads: pair {pair} row {r}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn future_keys_and_values_do_not_matter() {
        // Changing the keys and values of positions after a query leaves its output bit-identical.
        let e = Extents {
            pairs: 2,
            rows: 2 * 40,
            t: 40,
            keys: 40,
            start: 0,
            head_dim: 64,
        };
        let q = random(e.pairs * e.rows * 64, 4);
        let (k, v) = (random(e.pairs * 40 * 64, 5), random(e.pairs * 40 * 64, 6));
        let (mut k2, mut v2) = (k.clone(), v.clone());
        for pair in 0..e.pairs {
            for j in 20..40 {
                for d in 0..64 {
                    k2[(pair * 40 + j) * 64 + d] += 3.0;
                    v2[(pair * 40 + j) * 64 + d] -= 5.0;
                }
            }
        }
        for isa in Isa::available() {
            let (mut a, mut b) = (vec![0f32; q.len()], vec![0f32; q.len()]);
            let vis = Visibility::default();
            attend(isa, &q, &k, &v, e, 0.125, vis, Layout::Pairs, &mut a);
            attend(isa, &q, &k2, &v2, e, 0.125, vis, Layout::Pairs, &mut b);
            for pair in 0..e.pairs {
                for r in 0..e.rows {
                    let row = (pair * e.rows + r) * 64;
                    let same = a[row..row + 64] == b[row..row + 64];
                    assert_eq!(same, r % 40 < 20, "{isa:?}: pair {pair} row {r}");
                }
            }
        }
    }
}
