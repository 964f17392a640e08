//! The unit of analysis: every method scored on the same unit — by default one score per labelled
//! document, the mean over its pooled positions (`Pool`) — with a 95% interval (cluster bootstrap, contrast
//! pairs drawn together), pooled, within each source and within each pair, beside the baselines a detector
//! must beat: a score that knows only the source, a lexical probe on bags of tokens, and DiffMean and the
//! logistic probe refitted on labels shuffled within source (a null whose interval should hold 0.5).
//!
//! Methods fit on the fit split's units, choose what they choose (C, the best feature) on the validation
//! split's, and are reported on the test split's. Written to `evaluation.parquet` (`schemas/label.md`).

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::builder::{Float64Builder, StringBuilder, UInt64Builder};
use arrow_array::{ArrayRef, RecordBatch};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use saeflow_core::data::activations::TokenTable;
use saeflow_core::stats::baselines::{
    bag_of_tokens, shuffle_within, source_only_scores, within_pair_auroc, BAG_WIDTH,
};
use saeflow_core::stats::bootstrap::{auroc_interval, Interval};
use saeflow_core::stats::features::{Codes, TokenInfo};
use saeflow_core::stats::probe::{fit_dense_probe, Probe, Sample};
use saeflow_core::stats::threshold::recall_at_fpr;

use super::Pool;

/// The sizes of the k-sparse probes on SAE latents (SAEBench's sparse probing).
pub(super) const SPARSE_K: [usize; 3] = [1, 5, 20];

/// The units of analysis of the labelled rows taking part, and their pooled raw activations.
pub(super) struct Units {
    pool: Pool,
    /// Unit of each token row (`None`: not pooled — unlabelled, not taking part, or not the last row).
    of_row: Vec<Option<u32>>,
    /// Per unit: class, split, source, cluster (pair id, else its document), rows pooled into it.
    class: Vec<u16>,
    split: Vec<u8>,
    source: Vec<u16>,
    cluster: Vec<u64>,
    count: Vec<u32>,
    /// The token ids the lexical baseline sees: the document's pooled tokens (for `token`, those up to
    /// and including the unit's own).
    tokens: Vec<Vec<u32>>,
    /// `units × d`: sums (maxima for `max`) while the store is read, pooled after [`Units::finish`].
    x: Vec<f32>,
    d: usize,
}

impl Units {
    /// The units of a capture's labelled rows (`tokens.class`), pooled by `pool`. A document's rows are
    /// contiguous in `tokens.parquet`.
    pub(super) fn new(table: &TokenTable, tokens: &TokenInfo, d: usize, pool: Pool) -> Self {
        let mut units = Units {
            pool,
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
        let mut last: Option<(u64, usize)> = None; // the previous pooled row's document and row
        let mut seen: Vec<u32> = Vec::new(); // `token` pools: the document's pooled tokens so far
        for r in 0..table.doc_id.len() {
            let Some(class) = tokens.class[r] else {
                continue;
            };
            let same_doc = last.is_some_and(|(doc, _)| doc == table.doc_id[r]);
            if pool == Pool::Token {
                if !same_doc {
                    seen.clear();
                }
                seen.push(table.token_id[r]);
            }
            if !same_doc || pool == Pool::Token {
                units.class.push(class);
                units.split.push(tokens.split[r]);
                units.source.push(table.source[r]);
                units
                    .cluster
                    .push(table.pair_id[r].unwrap_or(table.doc_id[r]));
                units.count.push(0);
                units.tokens.push(Vec::new());
            }
            let i = units.class.len() - 1;
            if pool == Pool::Last {
                if let (true, Some((_, previous))) = (same_doc, last) {
                    units.of_row[previous] = None;
                }
                units.count[i] = 1;
            } else {
                units.count[i] += 1;
            }
            units.of_row[r] = Some(i as u32);
            if pool == Pool::Token {
                units.tokens[i].clone_from(&seen);
            } else {
                units.tokens[i].push(table.token_id[r]);
            }
            last = Some((table.doc_id[r], r));
        }
        let fill = if pool == Pool::Max {
            f32::NEG_INFINITY
        } else {
            0.0
        };
        units.x = vec![fill; units.class.len() * d];
        units
    }

    /// How many units there are.
    pub(super) fn len(&self) -> usize {
        self.class.len()
    }

    /// An error naming the first source with labelled units on `fit` but none on `test`: a method fitted
    /// on such a source is never tested there, and pooled numbers would hide it.
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
                "source `{}` has {n} labelled units in `{fit_name}` but none in `{test_name}`, so it \
                 would never be tested: give it test rows (the dataset stage re-splits sources without \
                 upstream test rows; check the capture's `splits` and `tokens`) or leave it out",
                sources[*s as usize]
            );
        }
        Ok(())
    }

    /// Pools a token row's raw activation into its unit.
    pub(super) fn add(&mut self, row: usize, x: &[f32]) {
        if let Some(i) = self.of_row[row] {
            let d = self.d;
            let unit = &mut self.x[i as usize * d..(i as usize + 1) * d];
            if self.pool == Pool::Max {
                unit.iter_mut().zip(x).for_each(|(s, &v)| *s = s.max(v));
            } else {
                unit.iter_mut().zip(x).for_each(|(s, &v)| *s += v);
            }
        }
    }

    /// Turns the sums into means (`mean`); the other pools are final already.
    pub(super) fn finish(&mut self) {
        if self.pool != Pool::Mean {
            return;
        }
        let d = self.d;
        for (i, &n) in self.count.iter().enumerate() {
            self.x[i * d..(i + 1) * d]
                .iter_mut()
                .for_each(|v| *v /= n.max(1) as f32);
        }
    }

    /// The pooled raw activation of unit `i`.
    pub(super) fn raw(&self, i: usize) -> &[f32] {
        &self.x[i * self.d..(i + 1) * self.d]
    }

    fn of_split(&self, split: u8) -> Vec<usize> {
        (0..self.class.len())
            .filter(|&i| self.split[i] == split)
            .collect()
    }

    /// A probe sample of units with features `features(i)`, and the given classes.
    fn sample(
        &self,
        units: &[usize],
        class: &[u16],
        features: impl Fn(usize) -> Vec<f32>,
    ) -> Sample {
        Sample {
            rows: units.to_vec(),
            class: units.iter().map(|&i| class[i]).collect(),
            x: units.iter().flat_map(|&i| features(i)).collect(),
        }
    }

    /// One SAE feature's code pooled per unit (codes are ≥ 0 and stored only where non-zero, so a unit
    /// where it never fires pools to 0).
    pub(super) fn feature(&self, codes: &Codes, feature: u32) -> Vec<f32> {
        let mut pooled = vec![0f32; self.class.len()];
        for &(row, value) in &codes.columns[feature as usize] {
            if let Some(i) = self.of_row[row as usize] {
                let p = &mut pooled[i as usize];
                match self.pool {
                    Pool::Max => *p = p.max(value),
                    _ => *p += value,
                }
            }
        }
        if self.pool == Pool::Mean {
            pooled
                .iter_mut()
                .zip(&self.count)
                .for_each(|(p, &n)| *p /= n.max(1) as f32);
        }
        pooled
    }
}

/// One line of `evaluation.parquet`: a method's test-split AUROC for a class, in one scope.
#[derive(Debug, Clone)]
pub(super) struct Evaluated {
    pub(super) class: String,
    pub(super) method: String,
    /// `pooled`, `source:<name>`, or `train:<a>/source:<b>` (the source matrix).
    pub(super) scope: String,
    pub(super) n_pos: u64,
    pub(super) n_neg: u64,
    pub(super) interval: Option<Interval>,
    pub(super) within_pair: Option<f64>,
    /// Recall of the class at the threshold that flags 1% of `control` units (see [`Setting`]).
    pub(super) recall_at_1pct_fpr: Option<f64>,
}

/// What a class's methods fitted, for `directions.safetensors`, `label.json` and steering.
pub(super) struct Fitted {
    pub(super) class: u16,
    /// DiffMean: mean pooled activation of the class's fit units minus that of the others.
    pub(super) diffmean: Vec<f32>,
    /// The logistic probe on pooled raw activations (C chosen on validation units).
    pub(super) logistic: Probe,
    /// The k-sparse probes: (k, latents, chosen C).
    pub(super) sparse: Vec<(usize, Vec<u32>, f64)>,
}

/// What the evaluation needs besides the units.
pub(super) struct Setting<'a> {
    pub(super) names: &'a [&'a str],
    pub(super) sources: &'a [String],
    pub(super) splits: (u8, u8, u8),
    pub(super) resamples: usize,
    pub(super) seed: u64,
    /// The source whose test units set the 1%-false-positive threshold of `recall_at_1pct_fpr` (a neutral
    /// control set, its units counted as negatives whatever their label).
    pub(super) control: Option<u16>,
}

/// Scores every method on the test units of each tested class (with its best feature chosen on
/// validation, if any; the k-sparse probes when there are SAE codes) and measures each pooled and within
/// each source.
pub(super) fn evaluate(
    units: &Units,
    codes: Option<&Codes>,
    classes: &[(u16, Option<u32>)],
    s: &Setting,
) -> (Vec<Evaluated>, Vec<Fitted>) {
    let (fit, val, test) = (
        units.of_split(s.splits.0),
        units.of_split(s.splits.1),
        units.of_split(s.splits.2),
    );
    let d = units.d;
    let raw = |i: usize| units.raw(i).to_vec();
    let bags: Vec<Vec<f32>> = units.tokens.iter().map(|t| bag_of_tokens(t)).collect();
    // The null: every unit's label shuffled within its (source, split) — fit, validation and test alike,
    // so the shuffled methods are scored against shuffled labels too. A document's token units move
    // together (they share a cluster only within a document or pair, so shuffle clusters' labels).
    let shuffled = shuffled_labels(units, s.seed);

    let mut out = Vec::new();
    let mut fitted = Vec::new();
    for &(c, best) in classes {
        // Each method's test scores and the labels they are judged against.
        let truth = &units.class;
        let mut methods: Vec<(String, Vec<f32>, &Vec<u16>)> = Vec::new();
        if let (Some(f), Some(codes)) = (best, codes) {
            let pooled = units.feature(codes, f);
            methods.push((
                "best_feature".into(),
                test.iter().map(|&i| pooled[i]).collect(),
                truth,
            ));
        }
        let mut sparse = Vec::new();
        if let Some(codes) = codes {
            for (k, latents, probe, scores) in sparse_probes(units, codes, c, (&fit, &val, &test)) {
                methods.push((format!("sparse_probe_k{k}"), scores, truth));
                sparse.push((k, latents, probe.c));
            }
        }
        let mut diffmean_direction = Vec::new();
        for (name, labels) in [("diffmean", truth), ("shuffled_diffmean", &shuffled)] {
            let direction = diffmean(units, &fit, labels, c);
            let scores = test
                .iter()
                .map(|&i| dot(&direction, units.raw(i)))
                .collect();
            methods.push((name.into(), scores, labels));
            if name == "diffmean" {
                diffmean_direction = direction;
            }
        }
        let mut logistic = None;
        for (name, labels, width, features) in [
            ("logistic", truth, d, &raw as &dyn Fn(usize) -> Vec<f32>),
            ("shuffled_logistic", &shuffled, d, &raw),
            ("lexical", truth, BAG_WIDTH, &|i: usize| bags[i].clone()),
        ] {
            let probe = fit_dense_probe(
                &units.sample(&fit, labels, features),
                &units.sample(&val, labels, features),
                c,
                width,
            );
            let scores = test
                .iter()
                .map(|&i| (dot(&probe.direction, &features(i)) as f64 + probe.bias) as f32)
                .collect();
            methods.push((name.into(), scores, labels));
            if name == "logistic" {
                logistic = Some(probe);
            }
        }
        let fit_positive: Vec<bool> = fit.iter().map(|&i| units.class[i] == c).collect();
        let fit_sources: Vec<u16> = fit.iter().map(|&i| units.source[i]).collect();
        let test_sources: Vec<u16> = test.iter().map(|&i| units.source[i]).collect();
        methods.push((
            "source_only".into(),
            source_only_scores(&fit_sources, &fit_positive, &test_sources),
            truth,
        ));

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
                out.push(measure(
                    units,
                    s,
                    (c, method, scope),
                    members.iter().map(|&k| (test[k], scores[k])),
                    labels,
                ));
            }
        }
        fitted.push(Fitted {
            class: c,
            diffmean: diffmean_direction,
            logistic: logistic.expect("the logistic probe is always fitted"),
            sparse,
        });
    }
    (out, fitted)
}

/// One row of `evaluation.parquet` from (unit, score) pairs of a scope.
fn measure(
    units: &Units,
    s: &Setting,
    (c, method, scope): (u16, &str, &str),
    scored: impl Iterator<Item = (usize, f32)>,
    labels: &[u16],
) -> Evaluated {
    let (members, scores): (Vec<usize>, Vec<f32>) = scored.unzip();
    // The control source's units are negatives of every class: a neutral set the threshold is set on.
    let is_control = |i: usize| Some(units.source[i]) == s.control;
    let pos: Vec<bool> = members
        .iter()
        .map(|&i| labels[i] == c && !is_control(i))
        .collect();
    let cluster: Vec<u64> = members.iter().map(|&i| units.cluster[i]).collect();
    let n_pos = pos.iter().filter(|&&p| p).count() as u64;
    let control_scores: Vec<f32> = members
        .iter()
        .zip(&scores)
        .filter(|(&i, _)| is_control(i))
        .map(|(_, &v)| v)
        .collect();
    let positive_scores: Vec<f32> = scores
        .iter()
        .zip(&pos)
        .filter(|(_, &p)| p)
        .map(|(&v, _)| v)
        .collect();
    Evaluated {
        class: s.names[c as usize].to_string(),
        method: method.to_string(),
        scope: scope.to_string(),
        n_pos,
        n_neg: pos.len() as u64 - n_pos,
        interval: auroc_interval(&scores, &pos, &cluster, s.resamples, s.seed),
        within_pair: within_pair_auroc(&scores, &pos, &cluster),
        recall_at_1pct_fpr: recall_at_fpr(&positive_scores, &control_scores, 0.01),
    }
}

/// Labels shuffled within (source, split), cluster by cluster: the units of one document or pair keep
/// sharing a label pattern, so a null is as dependent as the data it stands in for.
fn shuffled_labels(units: &Units, seed: u64) -> Vec<u16> {
    // Per cluster, the label of its first unit moves; the cluster's other units are relabelled by the
    // same permutation of classes within the group.
    let mut first: BTreeMap<u64, usize> = BTreeMap::new();
    for i in 0..units.len() {
        first.entry(units.cluster[i]).or_insert(i);
    }
    let heads: Vec<usize> = first.values().copied().collect();
    let groups: Vec<(u16, u8)> = heads
        .iter()
        .map(|&i| (units.source[i], units.split[i]))
        .collect();
    let mut moved: Vec<u64> = heads.iter().map(|&i| units.cluster[i]).collect();
    shuffle_within(
        &groups,
        &mut moved,
        &mut ChaCha8Rng::seed_from_u64(seed ^ 0x5),
    );
    // Cluster `heads[j]` takes the labels of cluster `moved[j]`'s units, matched by order; a cluster with
    // fewer units than its donor takes the donor's first ones, one with more repeats the donor's last.
    let mut members: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for i in 0..units.len() {
        members.entry(units.cluster[i]).or_default().push(i);
    }
    let mut out = units.class.clone();
    for (j, &h) in heads.iter().enumerate() {
        let own = &members[&units.cluster[h]];
        let donor = &members[&moved[j]];
        for (n, &i) in own.iter().enumerate() {
            out[i] = units.class[donor[n.min(donor.len() - 1)]];
        }
    }
    out
}

/// k-sparse probes for one class (SAEBench): the k latents whose pooled codes differ most between the
/// class's fit units and the others' (|difference of means|; ties: the lower latent), a logistic probe
/// on them with C chosen on validation units, scored on test units.
fn sparse_probes(
    units: &Units,
    codes: &Codes,
    c: u16,
    (fit, val, test): (&[usize], &[usize], &[usize]),
) -> Vec<(usize, Vec<u32>, Probe, Vec<f32>)> {
    let n_pos = fit.iter().filter(|&&i| units.class[i] == c).count().max(1) as f64;
    let n_neg = (fit.len() as f64 - n_pos).max(1.0);
    let mut ranked: Vec<(f64, u32)> = (0..codes.columns.len() as u32)
        .into_par_iter()
        .map(|f| {
            let pooled = units.feature(codes, f);
            let (mut pos, mut neg) = (0f64, 0f64);
            for &i in fit {
                if units.class[i] == c {
                    pos += pooled[i] as f64;
                } else {
                    neg += pooled[i] as f64;
                }
            }
            ((pos / n_pos - neg / n_neg).abs(), f)
        })
        .collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut out = Vec::new();
    for k in SPARSE_K {
        if k > ranked.len() {
            break;
        }
        let latents: Vec<u32> = ranked[..k].iter().map(|r| r.1).collect();
        let pooled: Vec<Vec<f32>> = latents.iter().map(|&f| units.feature(codes, f)).collect();
        let features = |i: usize| pooled.iter().map(|p| p[i]).collect::<Vec<f32>>();
        let probe = fit_dense_probe(
            &units.sample(fit, &units.class, features),
            &units.sample(val, &units.class, features),
            c,
            k,
        );
        let scores = test
            .iter()
            .map(|&i| (dot(&probe.direction, &features(i)) as f64 + probe.bias) as f32)
            .collect();
        out.push((k, latents, probe, scores));
    }
    out
}

/// Train on one source, test on each: per class, DiffMean and the logistic probe fitted on one source's fit
/// units (C chosen on its validation units) and scored on every source's test units. Sources lacking
/// either class in their fit or validation units train nothing.
pub(super) fn transfer_matrix(units: &Units, classes: &[u16], s: &Setting) -> Vec<Evaluated> {
    let (fit, val, test) = (
        units.of_split(s.splits.0),
        units.of_split(s.splits.1),
        units.of_split(s.splits.2),
    );
    let raw = |i: usize| units.raw(i).to_vec();
    let n_sources = s.sources.len() as u16;
    let mut out = Vec::new();
    for &c in classes {
        for a in 0..n_sources {
            let of_a = |set: &[usize]| -> Vec<usize> {
                set.iter()
                    .copied()
                    .filter(|&i| units.source[i] == a)
                    .collect()
            };
            let (fit_a, val_a) = (of_a(&fit), of_a(&val));
            let both = |set: &[usize]| {
                set.iter().any(|&i| units.class[i] == c) && set.iter().any(|&i| units.class[i] != c)
            };
            if !both(&fit_a) || !both(&val_a) {
                continue;
            }
            let direction = diffmean(units, &fit_a, &units.class, c);
            let probe = fit_dense_probe(
                &units.sample(&fit_a, &units.class, raw),
                &units.sample(&val_a, &units.class, raw),
                c,
                units.d,
            );
            for b in 0..n_sources {
                let members: Vec<usize> = test
                    .iter()
                    .copied()
                    .filter(|&i| units.source[i] == b)
                    .collect();
                if members.is_empty() {
                    continue;
                }
                let scope = format!(
                    "train:{}/source:{}",
                    s.sources[a as usize], s.sources[b as usize]
                );
                let diffmean_scores = members.iter().map(|&i| (i, dot(&direction, units.raw(i))));
                out.push(measure(
                    units,
                    s,
                    (c, "diffmean", &scope),
                    diffmean_scores,
                    &units.class,
                ));
                let logistic_scores = members.iter().map(|&i| {
                    (
                        i,
                        (dot(&probe.direction, units.raw(i)) as f64 + probe.bias) as f32,
                    )
                });
                out.push(measure(
                    units,
                    s,
                    (c, "logistic", &scope),
                    logistic_scores,
                    &units.class,
                ));
            }
        }
    }
    out
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Mean of the class's fit units minus the mean of the other fit units.
fn diffmean(units: &Units, fit: &[usize], labels: &[u16], c: u16) -> Vec<f32> {
    let d = units.d;
    let (mut pos, mut neg) = (vec![0f64; d], vec![0f64; d]);
    let (mut n_pos, mut n_neg) = (0f64, 0f64);
    for &i in fit {
        let (sum, n) = if labels[i] == c {
            (&mut pos, &mut n_pos)
        } else {
            (&mut neg, &mut n_neg)
        };
        *n += 1.0;
        for (s, v) in sum.iter_mut().zip(units.raw(i)) {
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
    let [mut auroc, mut low, mut high, mut within, mut recall]: [Float64Builder; 5] =
        Default::default();
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
        recall.append_option(r.recall_at_1pct_fpr);
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
        ("recall_at_1pct_fpr", Arc::new(recall.finish())),
    ];
    Ok(RecordBatch::try_from_iter(columns)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two documents of 4 stored rows each: doc 1 (class 0) rows 0–3, doc 2 (class 1) rows 4–7; only rows
    /// whose `keep` is true are pooled (as the label stage's position rule leaves them).
    fn table_and_tokens(keep: [bool; 8]) -> (TokenTable, TokenInfo) {
        let table = TokenTable {
            doc_id: vec![1, 1, 1, 1, 2, 2, 2, 2],
            pos: vec![0, 1, 2, 3, 0, 1, 2, 3],
            token_id: vec![10, 11, 12, 13, 20, 21, 22, 23],
            label: vec![Some(0); 8],
            labels: vec!["a".into(), "b".into()],
            split: vec![0; 8],
            splits: vec!["train".into()],
            seq_pos: vec![0, 1, 2, 3, 0, 1, 2, 3],
            is_completion: vec![false, false, true, true, false, true, true, true],
            source: vec![0; 8],
            sources: vec!["s".into()],
            pair_id: vec![None; 8],
        };
        let class = (0..8)
            .map(|r| keep[r].then_some(if r < 4 { 0 } else { 1 }))
            .collect();
        let tokens = TokenInfo {
            class,
            doc: table.doc_id.clone(),
            split: table.split.clone(),
        };
        (table, tokens)
    }

    fn pooled(pool: Pool, keep: [bool; 8]) -> (Vec<Vec<f32>>, Vec<Vec<u32>>, Vec<f32>) {
        let (table, tokens) = table_and_tokens(keep);
        let mut units = Units::new(&table, &tokens, 1, pool);
        // Row r's activation is r + 1; feature 0 fires on rows 2 (5.0) and 7 (1.0).
        for r in 0..8 {
            units.add(r, &[r as f32 + 1.0]);
        }
        units.finish();
        let mut codes = Codes::new(1);
        codes
            .push(&[0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 1.0])
            .unwrap();
        let x = (0..units.len()).map(|i| units.raw(i).to_vec()).collect();
        (x, units.tokens.clone(), units.feature(&codes, 0))
    }

    #[test]
    fn units_pool_exactly_the_stored_positions_they_are_given() {
        // The completion rows: doc 1 rows 2, 3; doc 2 rows 5, 6, 7.
        let completion = [false, false, true, true, false, true, true, true];
        let (x, tokens, f) = pooled(Pool::Mean, completion);
        assert_eq!(x, vec![vec![3.5], vec![7.0]]);
        assert_eq!(tokens, vec![vec![12, 13], vec![21, 22, 23]]);
        assert_eq!(f, vec![2.5, 1.0 / 3.0]);
        let (x, _, f) = pooled(Pool::Max, completion);
        assert_eq!((x, f), (vec![vec![4.0], vec![8.0]], vec![5.0, 1.0]));
        let (x, tokens, f) = pooled(Pool::Last, completion);
        assert_eq!((x, f), (vec![vec![4.0], vec![8.0]], vec![0.0, 1.0]));
        assert_eq!(tokens, vec![vec![12, 13], vec![21, 22, 23]]);
        let (x, tokens, f) = pooled(Pool::Token, completion);
        assert_eq!(
            x,
            vec![vec![3.0], vec![4.0], vec![6.0], vec![7.0], vec![8.0]]
        );
        assert_eq!(tokens[1], vec![12, 13]);
        assert_eq!(tokens[4], vec![21, 22, 23]);
        assert_eq!(f, vec![5.0, 0.0, 0.0, 0.0, 1.0]);
        // Every row: the means move with them.
        let (x, _, _) = pooled(Pool::Mean, [true; 8]);
        assert_eq!(x, vec![vec![2.5], vec![6.5]]);
    }
}
