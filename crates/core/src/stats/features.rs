//! Per-feature statistics of SAE codes against token classes (what the `label` stage measures): for every
//! feature and class, on one split, firing rates and means in and out of the class, and the rank test and
//! AUROC of the feature as a detector of the class, per token and per document (max-, mean- and
//! last-token-pooled).

use rayon::prelude::*;
use rustc_hash::FxHashMap;

use super::TwoSample;

/// Sparse SAE codes of a run of tokens, stored column by column (feature by feature): the label
/// statistics walk one feature at a time, and a TopK SAE fires k of d_sae latents per token.
#[derive(Debug, Clone)]
pub struct Codes {
    /// Tokens encoded so far.
    pub rows: usize,
    /// Per feature: (token row, activation) of every non-zero activation, in row order.
    pub columns: Vec<Vec<(u32, f32)>>,
}

impl Codes {
    /// No tokens yet, `d_sae` features.
    pub fn new(d_sae: usize) -> Self {
        Codes {
            rows: 0,
            columns: vec![Vec::new(); d_sae],
        }
    }

    /// Appends the codes `[n, d_sae]` (row-major) of the next `n` tokens. Activations must be finite and
    /// non-negative (ReLU'd); anything else is an error naming the token row.
    pub fn push(&mut self, codes: &[f32]) -> anyhow::Result<()> {
        let d_sae = self.columns.len();
        for row in codes.chunks(d_sae) {
            for (f, &v) in row.iter().enumerate() {
                if v != 0.0 {
                    if !(v > 0.0 && v.is_finite()) {
                        anyhow::bail!(
                            "token row {}: feature {f} has activation {v} (expected finite and ≥ 0)",
                            self.rows
                        );
                    }
                    self.columns[f].push((self.rows as u32, v));
                }
            }
            self.rows += 1;
        }
        Ok(())
    }
}

/// What each token row is: its class (index into the class list; `None` when unlabelled or of no listed
/// class), its document (any id, equal for the tokens of one document) and its split (index into the
/// split list).
#[derive(Debug, Clone, Default)]
pub struct TokenInfo {
    /// Class per row.
    pub class: Vec<Option<u16>>,
    /// Document per row.
    pub doc: Vec<u64>,
    /// Split per row.
    pub split: Vec<u8>,
}

impl TokenInfo {
    /// Labelled tokens of `split` per class, and labelled documents of `split` per class.
    pub fn counts(&self, split: u8, classes: usize) -> (Vec<u64>, Vec<u64>) {
        let mut tokens = vec![0u64; classes];
        let mut docs: FxHashMap<u64, u16> = FxHashMap::default();
        for r in 0..self.class.len() {
            if let (Some(c), true) = (self.class[r], self.split[r] == split) {
                tokens[c as usize] += 1;
                docs.insert(self.doc[r], c);
            }
        }
        let mut doc_counts = vec![0u64; classes];
        for c in docs.values() {
            doc_counts[*c as usize] += 1;
        }
        (tokens, doc_counts)
    }
}

/// One feature against one class (one-vs-rest) on one split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FeatureClass {
    /// Feature index.
    pub feature: u32,
    /// Class index.
    pub class: u16,
    /// Fraction of the class's tokens on which the feature fires.
    pub fire_pos: f64,
    /// Same for the other labelled tokens.
    pub fire_neg: f64,
    /// Mean activation over the class's tokens (zeros included).
    pub mean_pos: f64,
    /// Same for the other labelled tokens.
    pub mean_neg: f64,
    /// Mean activation where it fires, in the class (0 if it never does).
    pub active_mean_pos: f64,
    /// Same for the other labelled tokens.
    pub active_mean_neg: f64,
    /// Per token: the activation as a score for "this token is of the class".
    pub token: TwoSample,
    /// Per document: the maximum activation over its tokens.
    pub doc_max: TwoSample,
    /// Per document: the mean activation over its tokens.
    pub doc_mean: TwoSample,
    /// Per document: the activation on its last token.
    pub doc_last: TwoSample,
}

/// Statistics of every feature against every class on `split`, feature-major (feature 0's classes, then
/// feature 1's, ...). Documents take the class of their tokens.
pub fn feature_classes(
    codes: &Codes,
    tokens: &TokenInfo,
    split: u8,
    classes: usize,
) -> Vec<FeatureClass> {
    let (class_tokens, class_docs) = tokens.counts(split, classes);
    let labelled: u64 = class_tokens.iter().sum();
    let labelled_docs: u64 = class_docs.iter().sum();
    // Tokens per labelled document of the split (for mean pooling) and its last row.
    let mut doc_tokens: FxHashMap<u64, (u64, u32)> = FxHashMap::default();
    for r in 0..tokens.class.len() {
        if tokens.class[r].is_some() && tokens.split[r] == split {
            let e = doc_tokens.entry(tokens.doc[r]).or_default();
            e.0 += 1;
            e.1 = e.1.max(r as u32);
        }
    }
    codes
        .columns
        .par_iter()
        .enumerate()
        .flat_map_iter(|(f, column)| {
            let (class_tokens, class_docs) = (&class_tokens, &class_docs);
            // This feature's non-zero activations on labelled tokens of the split, and per document the
            // (class, max, sum, last).
            let mut entries: Vec<(f32, u16)> = Vec::new();
            let mut docs: FxHashMap<u64, (u16, f32, f64, f32)> = FxHashMap::default();
            for &(row, v) in column {
                let r = row as usize;
                let Some(c) = tokens.class[r] else { continue };
                if tokens.split[r] != split {
                    continue;
                }
                entries.push((v, c));
                let (_, last_row) = doc_tokens[&tokens.doc[r]];
                let d = docs.entry(tokens.doc[r]).or_insert((c, 0.0, 0.0, 0.0));
                d.1 = d.1.max(v);
                d.2 += v as f64;
                if row == last_row {
                    d.3 = v;
                }
            }
            let docs: Vec<(u16, f32, f32, f32)> = docs
                .iter()
                .map(|(doc, &(c, max, sum, last))| {
                    (c, max, (sum / doc_tokens[doc].0 as f64) as f32, last)
                })
                .collect();
            (0..classes).map(move |c| {
                let c16 = c as u16;
                let (n_pos, n_neg) = (class_tokens[c], labelled - class_tokens[c]);
                let (d_pos, d_neg) = (class_docs[c], labelled_docs - class_docs[c]);
                let mut token: Vec<(f32, bool)> =
                    entries.iter().map(|&(v, k)| (v, k == c16)).collect();
                let (mut fire, mut sum) = ([0u64; 2], [0f64; 2]);
                for &(v, pos) in &token {
                    fire[pos as usize] += 1;
                    sum[pos as usize] += v as f64;
                }
                let ratio = |a: f64, b: u64| if b > 0 { a / b as f64 } else { 0.0 };
                let mut max: Vec<(f32, bool)> =
                    docs.iter().map(|&(k, m, _, _)| (m, k == c16)).collect();
                let mut mean: Vec<(f32, bool)> = docs
                    .iter()
                    .filter(|d| d.2 > 0.0)
                    .map(|&(k, _, m, _)| (m, k == c16))
                    .collect();
                let mut last: Vec<(f32, bool)> = docs
                    .iter()
                    .filter(|d| d.3 > 0.0)
                    .map(|&(k, _, _, l)| (l, k == c16))
                    .collect();
                FeatureClass {
                    feature: f as u32,
                    class: c16,
                    fire_pos: ratio(fire[1] as f64, n_pos),
                    fire_neg: ratio(fire[0] as f64, n_neg),
                    mean_pos: ratio(sum[1], n_pos),
                    mean_neg: ratio(sum[0], n_neg),
                    active_mean_pos: ratio(sum[1], fire[1]),
                    active_mean_neg: ratio(sum[0], fire[0]),
                    token: TwoSample::sparse(&mut token, n_pos, n_neg),
                    doc_max: TwoSample::sparse(&mut max, d_pos, d_neg),
                    doc_mean: TwoSample::sparse(&mut mean, d_pos, d_neg),
                    doc_last: TwoSample::sparse(&mut last, d_pos, d_neg),
                }
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_by_hand() {
        // Two features over 6 tokens of 3 documents; classes 0 and 1; rows 4..6 are another split.
        // doc 10 (class 0): rows 0, 1; doc 11 (class 1): rows 2, 3; doc 12 (class 1, split 1): rows 4, 5.
        let mut codes = Codes::new(2);
        codes
            .push(&[0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 4.0, 1.0, 9.0, 9.0, 9.0, 9.0])
            .unwrap();
        let tokens = TokenInfo {
            class: vec![Some(0), Some(0), Some(1), Some(1), Some(1), Some(1)],
            doc: vec![10, 10, 11, 11, 12, 12],
            split: vec![0, 0, 0, 0, 1, 1],
        };
        let stats = feature_classes(&codes, &tokens, 0, 2);
        assert_eq!(stats.len(), 4);
        // Feature 0 against class 1: class tokens {0, 4}, others {0, 2}: AUROC (½ + 1 + 0 + 1)/4 = 0.625.
        let s = stats[1];
        assert_eq!((s.feature, s.class), (0, 1));
        assert_eq!(s.token.auroc, 0.625);
        assert_eq!((s.fire_pos, s.fire_neg), (0.5, 0.5));
        assert_eq!((s.mean_pos, s.mean_neg, s.active_mean_pos), (2.0, 1.0, 4.0));
        // Documents: 11 (class 1) max 4, mean 2; 10 (class 0) max 2, mean 1: both pooled AUROCs are 1.
        assert_eq!((s.doc_max.auroc, s.doc_mean.auroc), (1.0, 1.0));
        assert_eq!((s.doc_max.n_pos, s.doc_max.n_neg), (1, 1));
        // Last tokens: doc 11 row 3 (4) above doc 10 row 1 (2): 1. Feature 1 on last tokens against
        // class 0: doc 10 row 1 (0) below doc 11 row 3 (1): 0.
        assert_eq!(s.doc_last.auroc, 1.0);
        assert_eq!(stats[2].doc_last.auroc, 0.0);
        // Feature 1 against class 0: class tokens {1, 0}, others {0, 1}: AUROC 0.5; the split-1 rows
        // (activation 9) are not counted.
        let s = stats[2];
        assert_eq!((s.feature, s.class), (1, 0));
        assert_eq!(s.token.auroc, 0.5);
        assert_eq!((s.token.n_pos, s.token.n_neg), (2, 2));
    }

    #[test]
    fn negative_or_non_finite_codes_are_refused() {
        let mut codes = Codes::new(2);
        codes.push(&[0.0, 1.0]).unwrap();
        let e = codes.push(&[f32::NAN, 0.0]).unwrap_err().to_string();
        assert!(e.contains("token row 1: feature 0"), "{e}");
    }
}
