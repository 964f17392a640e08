//! Baselines and controls for a detector of a class among documents: what a score knowing only each
//! document's source achieves, a bag-of-tokens representation for a lexical probe, labels shuffled within
//! source for a null, and the AUROC within each contrast pair.
//!
//! A detector is only interesting where it beats these: sources are confounded with labels in most
//! deception datasets (a score that knows only the source reaches ≈ 0.70 on the pooled presets), surface
//! words give many of them away, and a probe fitted on shuffled labels shows what fitting alone produces.

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

/// The source-only score of each test document: the share of positives among the fit documents of its
/// source (the overall share for a source absent from the fit documents) — the best any score that knows
/// only the source can rank.
pub fn source_only_scores(
    fit_source: &[u16],
    fit_positive: &[bool],
    test_source: &[u16],
) -> Vec<f32> {
    let mut by_source: BTreeMap<u16, (f64, f64)> = BTreeMap::new();
    for (&s, &p) in fit_source.iter().zip(fit_positive) {
        let e = by_source.entry(s).or_default();
        e.0 += f64::from(u8::from(p));
        e.1 += 1.0;
    }
    let overall =
        fit_positive.iter().filter(|&&p| p).count() as f64 / fit_positive.len().max(1) as f64;
    test_source
        .iter()
        .map(|s| by_source.get(s).map_or(overall, |(p, n)| p / n) as f32)
        .collect()
}

/// Shuffles `labels` among the items of each group (seeded): the class balance of every group (source,
/// split) stays, any link between labels and content goes. Run a whole evaluation on such labels — fit and
/// test alike — and its AUROC is a draw from the null.
pub fn shuffle_within<G: Ord + Copy, T: Clone>(
    groups: &[G],
    labels: &mut [T],
    rng: &mut ChaCha8Rng,
) {
    let mut members: BTreeMap<G, Vec<usize>> = BTreeMap::new();
    for (i, &g) in groups.iter().enumerate() {
        members.entry(g).or_default().push(i);
    }
    for idx in members.values() {
        let mut group: Vec<T> = idx.iter().map(|&i| labels[i].clone()).collect();
        group.shuffle(rng);
        for (&i, label) in idx.iter().zip(group) {
            labels[i] = label;
        }
    }
}

/// Width of the hashed bag-of-tokens vectors. The probes' Newton solver costs O(width³) per step, so a
/// few hundred buckets keep the lexical baseline as cheap as the others; wider bags need another solver.
pub const BAG_WIDTH: usize = 256;

/// A document's tokens as term frequencies over [`BAG_WIDTH`] buckets (token id modulo the width): the
/// input of the lexical probe, which sees which words occur and nothing of the model.
pub fn bag_of_tokens(tokens: &[u32]) -> Vec<f32> {
    let mut bag = vec![0f32; BAG_WIDTH];
    for &t in tokens {
        bag[t as usize % BAG_WIDTH] += 1.0;
    }
    let n = tokens.len().max(1) as f32;
    bag.iter_mut().for_each(|v| *v /= n);
    bag
}

/// Within-pair AUROC: over clusters (contrast pairs) holding both classes, the mean of each cluster's own
/// AUROC (the share of its positive–negative pairs ranked right, ties one half). It asks whether a score
/// tells apart two documents that answer the same prompt, which no source or topic cue can. `None` when no
/// cluster holds both classes.
pub fn within_pair_auroc(scores: &[f32], positive: &[bool], cluster: &[u64]) -> Option<f64> {
    let mut members: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (i, &c) in cluster.iter().enumerate() {
        members.entry(c).or_default().push(i);
    }
    let mut sum = 0.0;
    let mut count = 0usize;
    for idx in members.values() {
        let (pos, neg): (Vec<usize>, Vec<usize>) = idx.iter().partition(|&&i| positive[i]);
        if pos.is_empty() || neg.is_empty() {
            continue;
        }
        let mut wins = 0.0;
        for &p in &pos {
            for &n in &neg {
                wins += if scores[p] > scores[n] {
                    1.0
                } else if scores[p] == scores[n] {
                    0.5
                } else {
                    0.0
                };
            }
        }
        sum += wins / (pos.len() * neg.len()) as f64;
        count += 1;
    }
    (count > 0).then(|| sum / count as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn source_only_scores_are_each_sources_fit_share_of_positives() {
        // Source 0: 3 of 4 positive; source 1: 0 of 2; overall 3 of 6.
        let fit_source = [0, 0, 0, 0, 1, 1];
        let fit_positive = [true, true, true, false, false, false];
        assert_eq!(
            source_only_scores(&fit_source, &fit_positive, &[1, 0, 2]),
            vec![0.0, 0.75, 0.5]
        );
    }

    #[test]
    fn shuffling_within_source_keeps_each_sources_labels() {
        let groups = [0u16, 1, 0, 1, 0, 1, 0, 0];
        let labels: Vec<u32> = (0..8).collect();
        let mut shuffled = labels.clone();
        shuffle_within(&groups, &mut shuffled, &mut ChaCha8Rng::seed_from_u64(3));
        assert_ne!(shuffled, labels, "seed 3 moves something");
        for g in [0u16, 1] {
            let mut before: Vec<u32> = (0..8)
                .filter(|&i| groups[i] == g)
                .map(|i| labels[i])
                .collect();
            let mut after: Vec<u32> = (0..8)
                .filter(|&i| groups[i] == g)
                .map(|i| shuffled[i])
                .collect();
            before.sort();
            after.sort();
            assert_eq!(before, after, "group {g} keeps its labels");
        }
        let mut again = labels.clone();
        shuffle_within(&groups, &mut again, &mut ChaCha8Rng::seed_from_u64(3));
        assert_eq!(again, shuffled, "seeded");
    }

    #[test]
    fn bags_are_term_frequencies_by_bucket() {
        let bag = bag_of_tokens(&[5, 5, 7, 5 + BAG_WIDTH as u32]);
        assert_eq!(bag[5], 0.75);
        assert_eq!(bag[7], 0.25);
        assert_eq!(bag.iter().sum::<f32>(), 1.0);
        assert!(bag_of_tokens(&[]).iter().all(|&v| v == 0.0));
    }

    #[test]
    fn within_pair_auroc_by_hand() {
        // Pair 1: positive above negative (1); pair 2: tie (0.5); pair 3: one class only (skipped);
        // cluster 4: two positives, one negative, one above and one below it (0.5).
        let scores = [0.9, 0.1, 0.5, 0.5, 0.3, 0.2, 0.8, 0.4, 0.1];
        let positive = [true, false, true, false, true, true, true, false, true];
        let cluster = [1, 1, 2, 2, 3, 3, 4, 4, 4];
        assert_eq!(
            within_pair_auroc(&scores, &positive, &cluster),
            Some(2.0 / 3.0)
        );
        assert_eq!(within_pair_auroc(&[0.1], &[true], &[1]), None);
    }
}
