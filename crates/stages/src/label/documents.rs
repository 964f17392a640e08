//! The document unit: every method scored on the same unit — one score per labelled document, from the
//! mean over its stored positions — with a 95% interval (cluster bootstrap, contrast pairs drawn together),
//! pooled, within each source and within each pair, beside the baselines a detector must beat: a score
//! that knows only the source, a lexical probe on bags of tokens, and DiffMean and the logistic probe
//! refitted on labels shuffled within source (a null whose interval should hold 0.5).
//!
//! Methods fit on the fit split's documents, choose what they choose (C, the best feature) on the
//! validation split's, and are reported on the test split's. Written to `evaluation.parquet`
//! (`schemas/label.md`).

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::builder::{Float64Builder, StringBuilder, UInt64Builder};
use arrow_array::{ArrayRef, RecordBatch};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use saeflow_core::data::activations::TokenTable;
use saeflow_core::stats::baselines::{
    bag_of_tokens, shuffle_within, source_only_scores, within_pair_auroc, BAG_WIDTH,
};
use saeflow_core::stats::bootstrap::{auroc_interval, Interval};
use saeflow_core::stats::features::{Codes, TokenInfo};
use saeflow_core::stats::probe::{fit_dense_probe, Sample};

/// Labelled documents (those with a class taking part) and their mean-pooled raw activations.
pub(super) struct Docs {
    /// Document index of each token row (`None`: not labelled, or not taking part).
    of_row: Vec<Option<u32>>,
    /// Per document: class, split, source, cluster (pair id, else its own id), stored tokens.
    class: Vec<u16>,
    split: Vec<u8>,
    source: Vec<u16>,
    cluster: Vec<u64>,
    count: Vec<u32>,
    /// Token ids of each document's stored positions, for the lexical probe.
    tokens: Vec<Vec<u32>>,
    /// `documents × d`: sums while the store is read, means after [`Docs::finish`].
    x: Vec<f32>,
    d: usize,
}

impl Docs {
    /// The labelled documents of a capture (a document's rows are contiguous in `tokens.parquet`).
    pub(super) fn new(table: &TokenTable, tokens: &TokenInfo, d: usize) -> Self {
        let mut docs = Docs {
            of_row: vec![None; table.doc_id.len()],
            class: Vec::new(),
            split: Vec::new(),
            source: Vec::new(),
            cluster: Vec::new(),
            count: Vec::new(),
            tokens: Vec::new(),
            x: Vec::new(),
            d,
        };
        for r in 0..table.doc_id.len() {
            let Some(class) = tokens.class[r] else {
                continue;
            };
            let same =
                r > 0 && table.doc_id[r - 1] == table.doc_id[r] && docs.of_row[r - 1].is_some();
            if !same {
                docs.class.push(class);
                docs.split.push(tokens.split[r]);
                docs.source.push(table.source[r]);
                docs.cluster
                    .push(table.pair_id[r].unwrap_or(table.doc_id[r]));
                docs.count.push(0);
                docs.tokens.push(Vec::new());
            }
            let i = docs.class.len() - 1;
            docs.of_row[r] = Some(i as u32);
            docs.count[i] += 1;
            docs.tokens[i].push(table.token_id[r]);
        }
        docs.x = vec![0f32; docs.class.len() * d];
        docs
    }

    /// An error naming the first source with labelled documents on `fit` but none on `test`: a method
    /// fitted on such a source is never tested there, and pooled numbers would hide it.
    pub(super) fn check_sources(
        &self,
        sources: &[String],
        (fit, fit_name): (u8, &str),
        (test, test_name): (u8, &str),
    ) -> anyhow::Result<()> {
        let mut counts: BTreeMap<u16, (usize, usize)> = BTreeMap::new();
        for i in 0..self.class.len() {
            let e = counts.entry(self.source[i]).or_default();
            e.0 += usize::from(self.split[i] == fit);
            e.1 += usize::from(self.split[i] == test);
        }
        if let Some((s, (n, _))) = counts.iter().find(|(_, (n, t))| *n > 0 && *t == 0) {
            anyhow::bail!(
                "source `{}` has {n} labelled documents in `{fit_name}` but none in `{test_name}`, so it \
                 would never be tested: give it test rows (the dataset stage re-splits sources without \
                 upstream test rows; check the capture's `splits` and `tokens`) or leave it out",
                sources[*s as usize]
            );
        }
        Ok(())
    }

    /// Adds a token row's raw activation to its document's sum.
    pub(super) fn add(&mut self, row: usize, x: &[f32]) {
        if let Some(i) = self.of_row[row] {
            let d = self.d;
            for (s, v) in self.x[i as usize * d..(i as usize + 1) * d]
                .iter_mut()
                .zip(x)
            {
                *s += v;
            }
        }
    }

    /// Turns the sums into means.
    pub(super) fn finish(&mut self) {
        let d = self.d;
        for (i, &n) in self.count.iter().enumerate() {
            self.x[i * d..(i + 1) * d]
                .iter_mut()
                .for_each(|v| *v /= n.max(1) as f32);
        }
    }

    fn of_split(&self, split: u8) -> Vec<usize> {
        (0..self.class.len())
            .filter(|&i| self.split[i] == split)
            .collect()
    }

    /// A probe sample of documents with features `features(i)` of width `d`, and the given classes.
    fn sample(
        &self,
        docs: &[usize],
        class: &[u16],
        features: impl Fn(usize) -> Vec<f32>,
    ) -> Sample {
        Sample {
            rows: docs.to_vec(),
            class: docs.iter().map(|&i| class[i]).collect(),
            x: docs.iter().flat_map(|&i| features(i)).collect(),
        }
    }

    /// The document mean of one SAE feature's code, per document.
    fn feature_means(&self, codes: &Codes, feature: u32) -> Vec<f32> {
        let mut sums = vec![0f32; self.class.len()];
        for &(row, value) in &codes.columns[feature as usize] {
            if let Some(i) = self.of_row[row as usize] {
                sums[i as usize] += value;
            }
        }
        sums.iter()
            .zip(&self.count)
            .map(|(s, &n)| s / n.max(1) as f32)
            .collect()
    }
}

/// One line of `evaluation.parquet`: a method's test-split AUROC for a class, in one scope.
#[derive(Debug, Clone)]
pub(super) struct Evaluated {
    pub(super) class: String,
    pub(super) method: String,
    /// `pooled`, or `source:<name>` for the documents of one source.
    pub(super) scope: String,
    pub(super) n_pos: u64,
    pub(super) n_neg: u64,
    pub(super) interval: Option<Interval>,
    pub(super) within_pair: Option<f64>,
}

/// What the document evaluation needs besides the documents.
pub(super) struct Setting<'a> {
    pub(super) names: &'a [&'a str],
    pub(super) sources: &'a [String],
    pub(super) splits: (u8, u8, u8),
    pub(super) resamples: usize,
    pub(super) seed: u64,
}

/// Scores every method on the test documents of each tested class (with its best feature chosen on
/// validation, if any) and measures each pooled and within each source.
pub(super) fn evaluate(
    docs: &Docs,
    codes: &Codes,
    classes: &[(u16, Option<u32>)],
    s: &Setting,
) -> Vec<Evaluated> {
    let (fit, val, test) = (
        docs.of_split(s.splits.0),
        docs.of_split(s.splits.1),
        docs.of_split(s.splits.2),
    );
    let d = docs.d;
    let raw = |i: usize| docs.x[i * d..(i + 1) * d].to_vec();
    let bags: Vec<Vec<f32>> = docs.tokens.iter().map(|t| bag_of_tokens(t)).collect();
    // The null: every document's label shuffled within its (source, split) — fit, validation and test
    // alike, so the shuffled methods are scored against shuffled labels too.
    let mut shuffled = docs.class.clone();
    let groups: Vec<(u16, u8)> = (0..docs.class.len())
        .map(|i| (docs.source[i], docs.split[i]))
        .collect();
    shuffle_within(
        &groups,
        &mut shuffled,
        &mut ChaCha8Rng::seed_from_u64(s.seed ^ 0x5u64),
    );

    let mut out = Vec::new();
    for &(c, best) in classes {
        // Each method's test scores and the labels they are judged against.
        let truth = &docs.class;
        let mut methods: Vec<(&str, Vec<f32>, &Vec<u16>)> = Vec::new();
        if let Some(f) = best {
            let means = docs.feature_means(codes, f);
            methods.push((
                "best_feature",
                test.iter().map(|&i| means[i]).collect(),
                truth,
            ));
        }
        for (name, labels) in [("diffmean", truth), ("shuffled_diffmean", &shuffled)] {
            let direction = diffmean(docs, &fit, labels, c);
            let scores = test
                .iter()
                .map(|&i| dot(&direction, &docs.x[i * d..(i + 1) * d]))
                .collect();
            methods.push((name, scores, labels));
        }
        for (name, labels, width, features) in [
            (
                "logistic",
                &docs.class,
                d,
                &raw as &dyn Fn(usize) -> Vec<f32>,
            ),
            ("shuffled_logistic", &shuffled, d, &raw),
            ("lexical", &docs.class, BAG_WIDTH, &|i: usize| {
                bags[i].clone()
            }),
        ] {
            let probe = fit_dense_probe(
                &docs.sample(&fit, labels, features),
                &docs.sample(&val, labels, features),
                c,
                width,
            );
            let scores = test
                .iter()
                .map(|&i| (dot(&probe.direction, &features(i)) as f64 + probe.bias) as f32)
                .collect();
            methods.push((name, scores, labels));
        }
        let fit_positive: Vec<bool> = fit.iter().map(|&i| docs.class[i] == c).collect();
        let fit_sources: Vec<u16> = fit.iter().map(|&i| docs.source[i]).collect();
        let test_sources: Vec<u16> = test.iter().map(|&i| docs.source[i]).collect();
        methods.push((
            "source_only",
            source_only_scores(&fit_sources, &fit_positive, &test_sources),
            truth,
        ));

        let cluster: Vec<u64> = test.iter().map(|&i| docs.cluster[i]).collect();
        let mut scopes: Vec<(String, Vec<usize>)> =
            vec![("pooled".into(), (0..test.len()).collect())];
        let mut by_source: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
        for (k, &src) in test_sources.iter().enumerate() {
            by_source.entry(src).or_default().push(k);
        }
        for (src, members) in by_source {
            scopes.push((format!("source:{}", s.sources[src as usize]), members));
        }
        for (method, scores, labels) in &methods {
            for (scope, members) in &scopes {
                let sc: Vec<f32> = members.iter().map(|&k| scores[k]).collect();
                let pos: Vec<bool> = members.iter().map(|&k| labels[test[k]] == c).collect();
                let cl: Vec<u64> = members.iter().map(|&k| cluster[k]).collect();
                let n_pos = pos.iter().filter(|&&p| p).count() as u64;
                out.push(Evaluated {
                    class: s.names[c as usize].to_string(),
                    method: method.to_string(),
                    scope: scope.clone(),
                    n_pos,
                    n_neg: pos.len() as u64 - n_pos,
                    interval: auroc_interval(&sc, &pos, &cl, s.resamples, s.seed),
                    within_pair: within_pair_auroc(&sc, &pos, &cl),
                });
            }
        }
    }
    out
}

/// Train on one source, test on each: per class, DiffMean and the logistic probe fitted on one source's fit
/// documents (C chosen on its validation documents) and scored on every source's test documents. Sources
/// lacking either class in their fit or validation documents train nothing.
pub(super) fn transfer_matrix(docs: &Docs, classes: &[u16], s: &Setting) -> Vec<Evaluated> {
    let d = docs.d;
    let (fit, val, test) = (
        docs.of_split(s.splits.0),
        docs.of_split(s.splits.1),
        docs.of_split(s.splits.2),
    );
    let raw = |i: usize| docs.x[i * d..(i + 1) * d].to_vec();
    let n_sources = s.sources.len() as u16;
    let mut out = Vec::new();
    for &c in classes {
        for a in 0..n_sources {
            let of_a = |set: &[usize]| -> Vec<usize> {
                set.iter()
                    .copied()
                    .filter(|&i| docs.source[i] == a)
                    .collect()
            };
            let (fit_a, val_a) = (of_a(&fit), of_a(&val));
            let both = |set: &[usize]| {
                set.iter().any(|&i| docs.class[i] == c) && set.iter().any(|&i| docs.class[i] != c)
            };
            if !both(&fit_a) || !both(&val_a) {
                continue;
            }
            let direction = diffmean(docs, &fit_a, &docs.class, c);
            let probe = fit_dense_probe(
                &docs.sample(&fit_a, &docs.class, raw),
                &docs.sample(&val_a, &docs.class, raw),
                c,
                d,
            );
            for b in 0..n_sources {
                let members: Vec<usize> = test
                    .iter()
                    .copied()
                    .filter(|&i| docs.source[i] == b)
                    .collect();
                if members.is_empty() {
                    continue;
                }
                let pos: Vec<bool> = members.iter().map(|&i| docs.class[i] == c).collect();
                let cluster: Vec<u64> = members.iter().map(|&i| docs.cluster[i]).collect();
                let n_pos = pos.iter().filter(|&&p| p).count() as u64;
                for (method, scores) in [
                    (
                        "diffmean",
                        members
                            .iter()
                            .map(|&i| dot(&direction, &docs.x[i * d..(i + 1) * d]))
                            .collect::<Vec<f32>>(),
                    ),
                    (
                        "logistic",
                        members
                            .iter()
                            .map(|&i| (dot(&probe.direction, &raw(i)) as f64 + probe.bias) as f32)
                            .collect(),
                    ),
                ] {
                    out.push(Evaluated {
                        class: s.names[c as usize].to_string(),
                        method: method.to_string(),
                        scope: format!(
                            "train:{}/source:{}",
                            s.sources[a as usize], s.sources[b as usize]
                        ),
                        n_pos,
                        n_neg: members.len() as u64 - n_pos,
                        interval: auroc_interval(&scores, &pos, &cluster, s.resamples, s.seed),
                        within_pair: within_pair_auroc(&scores, &pos, &cluster),
                    });
                }
            }
        }
    }
    out
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Mean of the class's fit documents minus the mean of the other fit documents.
fn diffmean(docs: &Docs, fit: &[usize], labels: &[u16], c: u16) -> Vec<f32> {
    let d = docs.d;
    let (mut pos, mut neg) = (vec![0f64; d], vec![0f64; d]);
    let (mut n_pos, mut n_neg) = (0f64, 0f64);
    for &i in fit {
        let (sum, n) = if labels[i] == c {
            (&mut pos, &mut n_pos)
        } else {
            (&mut neg, &mut n_neg)
        };
        *n += 1.0;
        for (s, v) in sum.iter_mut().zip(&docs.x[i * d..(i + 1) * d]) {
            *s += f64::from(*v);
        }
    }
    pos.iter()
        .zip(&neg)
        .map(|(p, q)| (p / n_pos.max(1.0) - q / n_neg.max(1.0)) as f32)
        .collect()
}

/// `evaluation.parquet`.
pub(super) fn evaluation_batch(rows: &[Evaluated]) -> anyhow::Result<RecordBatch> {
    let mut class = StringBuilder::new();
    let mut method = StringBuilder::new();
    let mut scope = StringBuilder::new();
    let (mut n_pos, mut n_neg, mut resamples) = (
        UInt64Builder::new(),
        UInt64Builder::new(),
        UInt64Builder::new(),
    );
    let (mut auroc, mut low, mut high, mut within) = (
        Float64Builder::new(),
        Float64Builder::new(),
        Float64Builder::new(),
        Float64Builder::new(),
    );
    for r in rows {
        class.append_value(&r.class);
        method.append_value(&r.method);
        scope.append_value(&r.scope);
        n_pos.append_value(r.n_pos);
        n_neg.append_value(r.n_neg);
        auroc.append_option(r.interval.map(|i| i.estimate));
        low.append_option(r.interval.map(|i| i.low));
        high.append_option(r.interval.map(|i| i.high));
        resamples.append_option(r.interval.map(|i| i.resamples as u64));
        within.append_option(r.within_pair);
    }
    let columns: Vec<(&str, ArrayRef)> = vec![
        ("class", Arc::new(class.finish())),
        ("method", Arc::new(method.finish())),
        ("scope", Arc::new(scope.finish())),
        ("n_pos", Arc::new(n_pos.finish())),
        ("n_neg", Arc::new(n_neg.finish())),
        ("auroc", Arc::new(auroc.finish())),
        ("auroc_low", Arc::new(low.finish())),
        ("auroc_high", Arc::new(high.finish())),
        ("resamples", Arc::new(resamples.finish())),
        ("within_pair_auroc", Arc::new(within.finish())),
    ];
    Ok(RecordBatch::try_from_iter(columns)?)
}
