//! Which latents each token keeps, chosen from its pre-activations: the k largest of a row ([`top_k`]),
//! the k·n largest of a whole batch (BatchTopK), or every value above a threshold (JumpReLU, ReLU; BatchTopK
//! at inference), written as compressed rows ([`Selection`]).
//!
//! Only pre-activations come in here. The bf16-ranked TopK that recomputes its candidates exactly
//! ([`Weights::top_k`](super::step::Weights::top_k)) and the weights' part of the bound that decides which
//! candidates it recomputes ([`WeightBounds`](super::step::WeightBounds)) stay with the weights in
//! [`super::step`]: both read encoder rows, and leaving them there keeps this module below the step (the
//! step uses it, never the reverse).

use rayon::prelude::*;

use crate::kernels::Isa;

/// Per token: the selected latents and their (ReLU'd) activations, as compressed rows.
#[derive(Debug, Clone)]
pub struct Selection {
    /// Token t's entries are `offsets[t]..offsets[t + 1]`.
    pub offsets: Vec<usize>,
    /// Latent indices.
    pub index: Vec<u32>,
    /// Activations.
    pub value: Vec<f32>,
}

/// Lanes of the vectorised top-k scans (one AVX-512 register of f32).
const LANES: usize = 16;

/// Indices of the `k` largest values of `row` for which `allowed` holds, largest first; ties go to the
/// lower index, so the choice is deterministic. NaN is never chosen.
pub fn top_k(row: &[f32], k: usize, allowed: impl Fn(usize) -> bool) -> Vec<u32> {
    let mut best: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
    top_k_into(row, k, allowed, &mut best);
    best.into_iter().map(|(_, j)| j).collect()
}

/// [`top_k`] into a reusable buffer of (value, index), largest first.
fn top_k_into(row: &[f32], k: usize, allowed: impl Fn(usize) -> bool, best: &mut Vec<(f32, u32)>) {
    best.clear();
    if k == 0 {
        return;
    }
    // Once k candidates are held, almost every value fails the comparison against the smallest: blocks
    // of 16 are tested at once (a vectorised compare) and skipped whole.
    let mut floor = f32::NEG_INFINITY;
    for (c, block) in row.chunks(16).enumerate() {
        if best.len() == k && !block.iter().fold(false, |any, &v| any | (v > floor)) {
            continue;
        }
        for (i, &v) in block.iter().enumerate() {
            let j = c * 16 + i;
            // NaN is never chosen (it would sort first and push a number out).
            if v.is_nan() || best.len() == k && v <= floor || !allowed(j) {
                continue;
            }
            // Insertion into a short sorted list beats a heap for k ≤ a few hundred.
            let at = best.partition_point(|&(b, _)| b >= v);
            best.insert(at, (v, j as u32));
            best.truncate(k);
            if best.len() == k {
                floor = best[k - 1].0;
            }
        }
    }
}

/// [`top_k_into`] with every latent allowed, faster: each of 16 lanes keeps its r = ⌈k/16⌉ largest values
/// over the row's 16-wide blocks (a vectorised pass). Those 16·r values are distinct elements, so their k-th
/// largest is at most the row's k-th largest: only values at or above it can be chosen, and they are few.
/// Same choice and order as `top_k_into` (ties to the lower index).
///
/// With `slack` > 0 it keeps, beyond the k largest, every value within `slack` of the k-th largest (all of
/// them, not necessarily in order): the candidates of [`Weights::top_k`](super::step::Weights::top_k)'s exact re-ranking.
pub(super) fn top_k_unrestricted(row: &[f32], k: usize, slack: f32, best: &mut Vec<(f32, u32)>) {
    match Isa::best() {
        // SAFETY: the CPU has AVX-512F (`Isa::best` checked).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { top_k_unrestricted_avx512(row, k, slack, best) },
        // SAFETY: the CPU has AVX2 and FMA (`Isa::best` checked).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { top_k_unrestricted_avx2(row, k, slack, best) },
        _ => top_k_lanes(Isa::Portable, row, k, slack, best),
    }
}

// Each wrapper passes a constant build to the inlined scan, so its `match isa` folds away and the scan is
// compiled once per build with that build's instructions.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn top_k_unrestricted_avx512(row: &[f32], k: usize, slack: f32, best: &mut Vec<(f32, u32)>) {
    top_k_lanes(Isa::Avx512, row, k, slack, best)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn top_k_unrestricted_avx2(row: &[f32], k: usize, slack: f32, best: &mut Vec<(f32, u32)>) {
    top_k_lanes(Isa::Avx2, row, k, slack, best)
}

/// [`lane_tops`] at depth `R` on the build `isa`.
#[inline(always)]
fn lane_tops_on<const R: usize>(isa: Isa, row: &[f32], kept: &mut [f32; 8 * LANES]) {
    match isa {
        // SAFETY: only `top_k_unrestricted_avx512`, on a CPU with AVX-512F, passes `Isa::Avx512`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { lane_tops_avx512::<R>(row, kept) },
        // SAFETY: only `top_k_unrestricted_avx2`, on a CPU with AVX2, passes `Isa::Avx2`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { lane_tops_avx2::<R>(row, kept) },
        _ => lane_tops::<R>(row, kept),
    }
}

/// The scan, its two passes on the build `isa` (the same values on every build).
#[inline(always)]
fn top_k_lanes(isa: Isa, row: &[f32], k: usize, slack: f32, best: &mut Vec<(f32, u32)>) {
    // Twice the minimum depth: a tighter bound, so far fewer candidates to sort.
    let r = 2 * k.div_ceil(LANES);
    // No closures here: one capturing `isa` by reference kept it from folding to the caller's constant.
    let cut = if k > 0 && r <= 8 && row.len() >= r * LANES {
        let mut kept = [0f32; 8 * LANES];
        match r {
            2 => lane_tops_on::<2>(isa, row, &mut kept),
            4 => lane_tops_on::<4>(isa, row, &mut kept),
            6 => lane_tops_on::<6>(isa, row, &mut kept),
            _ => lane_tops_on::<8>(isa, row, &mut kept),
        }
        let kept = &mut kept[..r * LANES];
        kept.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        kept[k - 1] - slack
    } else {
        f32::NAN
    };
    if cut.is_nan() {
        // Large k or short rows: the plain scan, then the values within the slack.
        top_k_into(row, k, |_| true, best);
        if slack > 0.0 && best.len() == k {
            let floor = best[k - 1].0 - slack;
            best.clear();
            best.extend(
                row.iter()
                    .enumerate()
                    .filter(|&(_, &v)| v >= floor)
                    .map(|(j, &v)| (v, j as u32)),
            );
            best.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        }
        return;
    }
    best.clear();
    match isa {
        // SAFETY: as in `lane_tops_on`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { at_least_avx512(row, cut, best) },
        // SAFETY: as in `lane_tops_on`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { at_least_avx2(row, cut, best) },
        _ => at_least(row, cut, best),
    }
    // No NaN passed `v >= cut`, so the comparison is a total order.
    let order = |a: &(f32, u32), b: &(f32, u32)| {
        b.0.partial_cmp(&a.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.1.cmp(&b.1))
    };
    if best.len() > k {
        best.select_nth_unstable_by(k - 1, order);
        if slack > 0.0 {
            let floor = best[k - 1].0 - slack;
            best.retain(|e| e.0 >= floor);
            // The caller re-ranks the candidates by their exact values.
            return;
        }
        best.truncate(k);
    }
    best.sort_unstable_by(order);
}

/// Each of 16 lanes' `R` largest values over the row's whole 16-wide blocks (distinct elements of the row),
/// into `kept`. The row's values pass down the lanes' sorted levels; NaN sinks through and out (the
/// comparisons are false), so it never takes a level or duplicates one.
#[inline(always)]
fn lane_tops<const R: usize>(row: &[f32], kept: &mut [f32; 8 * LANES]) {
    let mut tops = [[f32::NEG_INFINITY; LANES]; R];
    for block in row.chunks_exact(LANES) {
        let mut v: [f32; LANES] = block.try_into().expect("exact chunk");
        for top in &mut tops {
            let lo = std::array::from_fn(|l| if top[l] < v[l] { top[l] } else { v[l] });
            *top = std::array::from_fn(|l| if top[l] < v[l] { v[l] } else { top[l] });
            v = lo;
        }
    }
    kept[..R * LANES].copy_from_slice(tops.as_flattened());
}

/// [`lane_tops`] in AVX-512 registers (the same values: `vminps`/`vmaxps` choose
/// as its comparisons do, NaN included). The compiler's own vectorisation of the 4-level case shuffled
/// half-registers and ran at a fraction of this speed.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn lane_tops_avx512<const R: usize>(row: &[f32], kept: &mut [f32; 8 * LANES]) {
    use std::arch::x86_64::*;
    let mut tops = [_mm512_set1_ps(f32::NEG_INFINITY); R];
    for block in row.chunks_exact(LANES) {
        let mut v = _mm512_loadu_ps(block.as_ptr());
        for top in &mut tops {
            // min(a, b) = a < b ? a : b and max(a, b) = a > b ? a : b, the second operand on NaN.
            let lo = _mm512_min_ps(*top, v);
            *top = _mm512_max_ps(v, *top);
            v = lo;
        }
    }
    for (i, top) in tops.iter().enumerate() {
        _mm512_storeu_ps(kept.as_mut_ptr().add(i * LANES), *top);
    }
}

/// [`lane_tops`] in AVX2 registers, two per level (lanes 0–7 and 8–15); the same values, as in
/// [`lane_tops_avx512`]. The compiler's vectorisation of the portable loop left the whole scan at ~2 ns a
/// value on an AMD Zen 3.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn lane_tops_avx2<const R: usize>(row: &[f32], kept: &mut [f32; 8 * LANES]) {
    use std::arch::x86_64::*;
    let mut tops = [[_mm256_set1_ps(f32::NEG_INFINITY); 2]; R];
    for block in row.chunks_exact(LANES) {
        let mut v = [
            _mm256_loadu_ps(block.as_ptr()),
            _mm256_loadu_ps(block.as_ptr().add(8)),
        ];
        for top in &mut tops {
            for (top, v) in top.iter_mut().zip(&mut v) {
                let lo = _mm256_min_ps(*top, *v);
                *top = _mm256_max_ps(*v, *top);
                *v = lo;
            }
        }
    }
    for (i, top) in tops.iter().enumerate() {
        _mm256_storeu_ps(kept.as_mut_ptr().add(i * LANES), top[0]);
        _mm256_storeu_ps(kept.as_mut_ptr().add(i * LANES + 8), top[1]);
    }
}

/// Every (value, column) of `row` at or above `cut`, in column order.
#[inline(always)]
fn at_least(row: &[f32], cut: f32, best: &mut Vec<(f32, u32)>) {
    for (c, block) in row.chunks(LANES).enumerate() {
        // Almost every block fails whole (one vectorised compare).
        if block.iter().fold(false, |any, &v| any | (v >= cut)) {
            push_at_least(block, c * LANES, cut, best);
        }
    }
}

/// [`at_least`] with AVX-512: a block's passing values and columns compressed out in one step each
/// (the scalar loop over a passing block's 16 values mispredicted a branch per pass).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn at_least_avx512(row: &[f32], cut: f32, best: &mut Vec<(f32, u32)>) {
    use std::arch::x86_64::*;
    let blocks = row.chunks_exact(LANES);
    let tail = blocks.remainder();
    let cuts = _mm512_set1_ps(cut);
    let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let (mut values, mut columns) = ([0f32; LANES], [0u32; LANES]);
    for (c, block) in blocks.enumerate() {
        let v = _mm512_loadu_ps(block.as_ptr());
        let pass = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(v, cuts);
        if pass != 0 {
            let column = _mm512_add_epi32(lanes, _mm512_set1_epi32((c * LANES) as i32));
            _mm512_mask_compressstoreu_ps(values.as_mut_ptr().cast(), pass, v);
            _mm512_mask_compressstoreu_epi32(columns.as_mut_ptr().cast(), pass, column);
            let passed = pass.count_ones() as usize;
            best.extend(
                values[..passed]
                    .iter()
                    .copied()
                    .zip(columns[..passed].iter().copied()),
            );
        }
    }
    push_at_least(tail, row.len() - tail.len(), cut, best);
}

/// [`at_least`] with AVX2: a block's 16 comparisons as one bit mask, and only its set bits visited.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn at_least_avx2(row: &[f32], cut: f32, best: &mut Vec<(f32, u32)>) {
    use std::arch::x86_64::*;
    let blocks = row.chunks_exact(LANES);
    let tail = blocks.remainder();
    let cuts = _mm256_set1_ps(cut);
    for (c, block) in blocks.enumerate() {
        let at = |h: usize| {
            let v = _mm256_loadu_ps(block.as_ptr().add(8 * h));
            _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(v, cuts)) as u32
        };
        let mut pass = at(0) | at(1) << 8;
        while pass != 0 {
            let i = pass.trailing_zeros() as usize;
            best.push((block[i], (c * LANES + i) as u32));
            pass &= pass - 1;
        }
    }
    push_at_least(tail, row.len() - tail.len(), cut, best);
}

/// Each value of `values` at or above `cut` with its column (`first` + its place), in order: a block that
/// passed [`at_least`]'s test, or the vector builds' values past their last whole block.
#[inline(always)]
fn push_at_least(values: &[f32], first: usize, cut: f32, best: &mut Vec<(f32, u32)>) {
    for (i, &v) in values.iter().enumerate() {
        if v >= cut {
            best.push((v, (first + i) as u32));
        }
    }
}

/// Writes a token's k kept latents (ReLU'd) from a ranked candidate list.
pub(super) fn keep(best: &[(f32, u32)], k: usize, idx: &mut [u32], val: &mut [f32]) {
    for (s, &(v, j)) in best.iter().take(k).enumerate() {
        idx[s] = j;
        val[s] = v.max(0.0);
    }
}

/// Top-k selection of every row of `pre` (`m` wide) among `allowed` latents, ReLU'd, written per token.
pub(super) fn select_rows(
    pre: &[f32],
    m: usize,
    k: usize,
    allowed: Option<&(dyn Fn(usize) -> bool + Sync)>,
) -> Selection {
    let n = pre.len() / m;
    let unrestricted = allowed.is_none();
    let allowed = allowed.unwrap_or(&|_| true);
    let mut index = vec![0u32; n * k];
    let mut value = vec![0f32; n * k];
    index
        .par_chunks_mut(k.max(1) * 64)
        .zip(value.par_chunks_mut(k.max(1) * 64))
        .enumerate()
        .for_each(|(c, (idx, val))| {
            let mut best = Vec::with_capacity(k + 1);
            for (r, (idx, val)) in idx.chunks_mut(k).zip(val.chunks_mut(k)).enumerate() {
                let t = c * 64 + r;
                let row = &pre[t * m..][..m];
                if unrestricted {
                    top_k_unrestricted(row, k, 0.0, &mut best);
                } else {
                    top_k_into(row, k, allowed, &mut best);
                }
                for (s, &(v, j)) in best.iter().enumerate() {
                    idx[s] = j;
                    val[s] = v.max(0.0);
                }
            }
        });
    Selection {
        offsets: (0..=n).map(|t| t * k).collect(),
        index,
        value,
    }
}

/// The `total` largest ReLU'd pre-activations of the whole batch; ties at the cut are taken in (token,
/// latent) order, so the choice is deterministic.
pub(super) fn select_batch(pre: &[f32], m: usize, total: usize) -> Selection {
    let n = pre.len() / m;
    let total = total.min(pre.len());
    let mut values: Vec<f32> = pre.par_iter().map(|v| v.max(0.0)).collect();
    let cut = if total == 0 {
        f32::INFINITY
    } else {
        let at = values.len() - total;
        *values.select_nth_unstable_by(at, |a, b| a.total_cmp(b)).1
    };
    drop(values);
    let counts: Vec<(usize, usize)> = pre
        .par_chunks(m)
        .map(|row| {
            let above = row.iter().filter(|&&v| v.max(0.0) > cut).count();
            let ties = row.iter().filter(|&&v| v.max(0.0) == cut).count();
            (above, ties)
        })
        .collect();
    let mut ties_left = total - counts.iter().map(|c| c.0).sum::<usize>();
    let mut offsets = Vec::with_capacity(n + 1);
    let mut ties_taken = Vec::with_capacity(n);
    offsets.push(0);
    for &(above, ties) in &counts {
        let take = ties.min(ties_left);
        ties_left -= take;
        ties_taken.push(take);
        offsets.push(offsets.last().unwrap() + above + take);
    }
    let rows: Vec<(Vec<u32>, Vec<f32>)> = pre
        .par_chunks(m)
        .zip(ties_taken.par_iter())
        .map(|(row, &take)| {
            let (mut index, mut value, mut tied) = (Vec::new(), Vec::new(), 0);
            for (j, &v) in row.iter().enumerate() {
                let v = v.max(0.0);
                if v > cut || (v == cut && tied < take) {
                    tied += usize::from(v == cut);
                    index.push(j as u32);
                    value.push(v);
                }
            }
            (index, value)
        })
        .collect();
    Selection {
        offsets,
        index: rows.iter().flat_map(|r| r.0.iter().copied()).collect(),
        value: rows.into_iter().flat_map(|r| r.1).collect(),
    }
}

/// Every positive pre-activation above its latent's threshold.
pub(super) fn select_above(
    pre: &[f32],
    m: usize,
    threshold: &(dyn Fn(usize) -> f32 + Sync),
) -> Selection {
    let rows: Vec<(Vec<u32>, Vec<f32>)> = pre
        .par_chunks(m)
        .map(|row| {
            let mut out = (Vec::new(), Vec::new());
            for (j, &v) in row.iter().enumerate() {
                if v > threshold(j) && v > 0.0 {
                    out.0.push(j as u32);
                    out.1.push(v);
                }
            }
            out
        })
        .collect();
    let mut offsets = vec![0];
    for r in &rows {
        offsets.push(offsets.last().unwrap() + r.0.len());
    }
    Selection {
        offsets,
        index: rows.iter().flat_map(|r| r.0.iter().copied()).collect(),
        value: rows.into_iter().flat_map(|r| r.1).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_data::random;

    #[test]
    fn top_k_breaks_ties_by_index_and_respects_the_mask() {
        let row = [1.0, 3.0, 3.0, -1.0, 2.0];
        assert_eq!(top_k(&row, 3, |_| true), vec![1, 2, 4]);
        assert_eq!(top_k(&row, 2, |j| j != 1), vec![2, 4]);
        assert_eq!(top_k(&row, 9, |j| j == 3), vec![3]);
    }

    #[test]
    fn the_avx_builds_of_the_lane_bounded_top_k_choose_what_the_portable_one_does() {
        // Every lane depth (k 1–16: 2 levels, to 64: 8), with and without a slack, on rows with ties,
        // NaN and infinities and a length that is no multiple of 16.
        let mut a = random(1003, 1, 1.0);
        a.iter_mut()
            .step_by(7)
            .for_each(|v| *v = (*v * 4.0).round() / 4.0);
        a[5] = f32::NAN;
        a[300] = f32::NAN;
        a[17] = f32::INFINITY;
        a[18] = f32::NEG_INFINITY;
        for k in [1, 16, 20, 32, 40, 64] {
            for slack in [0.0, 0.05] {
                // Candidates come in no particular order.
                let sorted = |mut t: Vec<(f32, u32)>| {
                    t.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
                    t
                };
                let mut portable = Vec::new();
                top_k_lanes(Isa::Portable, &a, k, slack, &mut portable);
                let mut builds = Vec::new();
                for isa in Isa::available() {
                    let mut t = Vec::new();
                    match isa {
                        // SAFETY: `Isa::available` lists only builds this CPU runs.
                        #[cfg(target_arch = "x86_64")]
                        Isa::Avx512 => unsafe { top_k_unrestricted_avx512(&a, k, slack, &mut t) },
                        // SAFETY: as above.
                        #[cfg(target_arch = "x86_64")]
                        Isa::Avx2 => unsafe { top_k_unrestricted_avx2(&a, k, slack, &mut t) },
                        _ => continue,
                    }
                    builds.push((isa, t));
                }
                for (build, t) in builds {
                    assert_eq!(
                        sorted(t),
                        sorted(portable.clone()),
                        "{build:?}, k {k}, slack {slack}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_candidates_within_the_slack_are_every_value_near_the_kth_largest() {
        for (seed, (m, k)) in [(4608, 32), (1003, 20), (100, 16), (40, 3), (700, 100)]
            .into_iter()
            .enumerate()
        {
            let mut row = random(m, seed as u64 + 30, 1.0);
            row[m / 2] = f32::NAN;
            let mut sorted: Vec<f32> = row.iter().copied().filter(|v| !v.is_nan()).collect();
            sorted.sort_by(|a, b| b.total_cmp(a));
            for slack in [0.01, 0.1, 1.0] {
                let floor = sorted[k - 1] - slack;
                let mut want: Vec<u32> = (0..m as u32)
                    .filter(|&j| row[j as usize] >= floor)
                    .collect();
                let mut got = Vec::new();
                top_k_unrestricted(&row, k, slack, &mut got);
                let mut got: Vec<u32> = got.iter().map(|&(_, j)| j).collect();
                got.sort();
                want.sort();
                assert_eq!(got, want, "m {m}, k {k}, slack {slack}");
            }
        }
    }

    #[test]
    fn the_lane_bounded_top_k_chooses_exactly_what_the_plain_one_does() {
        let mut fast = Vec::new();
        let mut plain = Vec::new();
        for (seed, &(m, k)) in [
            (16, 1),
            (40, 3),
            (100, 16),
            (333, 17),
            (4608, 32),
            (4608, 128),
            (64, 40),
        ]
        .iter()
        .enumerate()
        {
            // Values on a coarse grid, so ties (and ±0) are frequent.
            let row: Vec<f32> = random(m, seed as u64 + 10, 1.0)
                .iter()
                .map(|v| (v * 8.0).round() / 8.0 * if seed % 2 == 0 { 1.0 } else { -1.0 })
                .collect();
            top_k_unrestricted(&row, k, 0.0, &mut fast);
            top_k_into(&row, k, |_| true, &mut plain);
            let ids = |v: &Vec<(f32, u32)>| v.iter().map(|&(_, j)| j).collect::<Vec<_>>();
            assert_eq!(ids(&fast), ids(&plain), "m {m}, k {k}");
        }
    }

    #[test]
    fn batch_top_k_keeps_the_largest_activations_of_the_whole_batch() {
        // Two tokens, three latents, k = 1: the two largest of the batch are both in token 0.
        let pre = [5.0, 4.0, -1.0, 1.0, 0.5, 0.2];
        let sel = select_batch(&pre, 3, 2);
        assert_eq!(sel.offsets, [0, 2, 2]);
        assert_eq!((sel.index, sel.value), (vec![0, 1], vec![5.0, 4.0]));
        // Ties at the cut go to the earlier (token, latent).
        let sel = select_batch(&[1.0, 2.0, 1.0, 1.0], 2, 2);
        assert_eq!((sel.offsets, sel.index), (vec![0, 2, 2], vec![0, 1]));
    }
}
