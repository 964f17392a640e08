//! The Arrow tables a `label` stage writes as `features.parquet` and `contexts.parquet`;
//! their columns are documented in `schemas/label.md`.

use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, Float64Builder, ListBuilder, StringBuilder, UInt32Builder, UInt64Builder,
};
use arrow_array::{ArrayRef, RecordBatch};
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use saeflow_core::data::activations::TokenTable;
use saeflow_core::stats::features::{Codes, FeatureClass};

use super::LabelParams;

/// One row per tested (feature, class): token counts, fit-split statistics, q, the label, and the
/// held-out re-measurement.
pub(super) fn features_batch(
    names: &[&str],
    fit: &[FeatureClass],
    val: &[FeatureClass],
    test: &[FeatureClass],
    q: &[f64],
    labelled: &[bool],
) -> anyhow::Result<RecordBatch> {
    let mut feature = UInt32Builder::new();
    let mut class = StringBuilder::new();
    let mut flag = BooleanBuilder::new();
    let mut counts: [UInt64Builder; 4] = Default::default();
    let mut floats: Vec<Float64Builder> = (0..FLOAT_COLUMNS.len())
        .map(|_| Float64Builder::new())
        .collect();
    for (i, ((s, v), t)) in fit.iter().zip(val).zip(test).enumerate() {
        feature.append_value(s.feature);
        class.append_value(names[s.class as usize]);
        flag.append_value(labelled[i]);
        for (b, v) in
            counts
                .iter_mut()
                .zip([s.token.n_pos, s.token.n_neg, t.token.n_pos, t.token.n_neg])
        {
            b.append_value(v);
        }
        let values = [
            s.fire_pos,
            s.fire_neg,
            s.mean_pos,
            s.mean_neg,
            s.active_mean_pos,
            s.active_mean_neg,
            s.token.auroc,
            s.doc_max.auroc,
            s.doc_mean.auroc,
            s.doc_last.auroc,
            s.token.p,
            s.doc_max.p,
            s.doc_mean.p,
            s.doc_last.p,
            q[i],
            t.token.auroc,
            t.doc_max.auroc,
            t.doc_mean.auroc,
            t.doc_last.auroc,
            t.token.p,
            v.token.auroc,
            v.doc_max.auroc,
            v.doc_mean.auroc,
            v.doc_last.auroc,
        ];
        for (b, v) in floats.iter_mut().zip(values) {
            b.append_value(v);
        }
    }
    let mut columns: Vec<(&str, ArrayRef)> = vec![
        ("feature", Arc::new(feature.finish())),
        ("class", Arc::new(class.finish())),
        ("labelled", Arc::new(flag.finish())),
    ];
    for (name, mut b) in ["n_pos", "n_neg", "test_n_pos", "test_n_neg"]
        .into_iter()
        .zip(counts)
    {
        columns.push((name, Arc::new(b.finish())));
    }
    for (name, mut b) in FLOAT_COLUMNS.iter().zip(floats) {
        columns.push((name, Arc::new(b.finish())));
    }
    Ok(RecordBatch::try_from_iter(columns)?)
}

/// The f64 columns of `features.parquet`, in order (`schemas/label.md`).
const FLOAT_COLUMNS: [&str; 24] = [
    "fire_rate",
    "fire_rate_rest",
    "mean",
    "mean_rest",
    "mean_active",
    "mean_active_rest",
    "auroc",
    "auroc_doc_max",
    "auroc_doc_mean",
    "auroc_doc_last",
    "p",
    "p_doc_max",
    "p_doc_mean",
    "p_doc_last",
    "q",
    "test_auroc",
    "test_auroc_doc_max",
    "test_auroc_doc_mean",
    "test_auroc_doc_last",
    "test_p",
    "val_auroc",
    "val_auroc_doc_max",
    "val_auroc_doc_mean",
    "val_auroc_doc_last",
];

/// Top and random active contexts of every labelled (feature, class): the token, its document, its
/// activation, and up to `window` tokens of the same document on each side (all splits).
pub(super) fn contexts_batch(
    p: &LabelParams,
    seed: u64,
    names: &[&str],
    codes: &Codes,
    table: &TokenTable,
    chosen: &[(u32, u16)],
) -> anyhow::Result<RecordBatch> {
    let mut feature = UInt32Builder::new();
    let mut class = StringBuilder::new();
    let mut kind = StringBuilder::new();
    let mut rank = UInt32Builder::new();
    let mut row_b = UInt64Builder::new();
    let mut doc = UInt64Builder::new();
    let mut activation = Float64Builder::new();
    let mut window = ListBuilder::new(UInt32Builder::new());
    let mut marked = UInt32Builder::new();
    for &(f, c) in chosen {
        let column = &codes.columns[f as usize];
        let mut order: Vec<usize> = (0..column.len()).collect();
        order.sort_by(|&a, &b| column[b].1.total_cmp(&column[a].1).then(a.cmp(&b)));
        let top = order.iter().take(p.top_contexts).copied();
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ ((f as u64) << 16 | c as u64));
        let random = sample(&mut rng, column.len(), p.random_contexts.min(column.len())).into_vec();
        // Tokens the feature is silent on, for judging explanations by detection (delphi-style). The
        // column is in row order; a few rejected draws at most, as features fire on a small share of rows.
        let rows = table.doc_id.len();
        let mut negatives: Vec<(u32, f32)> = Vec::new();
        for _ in 0..100 * p.random_contexts.max(1) {
            if negatives.len() >= p.random_contexts.min(rows - column.len()) {
                break;
            }
            let r = rng.random_range(0..rows) as u32;
            if column.binary_search_by_key(&r, |e| e.0).is_err()
                && !negatives.iter().any(|e| e.0 == r)
            {
                negatives.push((r, 0.0));
            }
        }
        let at = |picks: Vec<usize>| picks.into_iter().map(|e| column[e]).collect::<Vec<_>>();
        for (label, picks) in [
            ("top", at(top.collect())),
            ("random", at(random)),
            ("negative", negatives),
        ] {
            for (r, (row, v)) in picks.into_iter().enumerate() {
                let row = row as usize;
                let same_doc = |i: usize| table.doc_id[i] == table.doc_id[row];
                let mut start = row;
                while start > 0 && row - start < p.window && same_doc(start - 1) {
                    start -= 1;
                }
                let mut end = row + 1;
                while end < table.doc_id.len() && end - row <= p.window && same_doc(end) {
                    end += 1;
                }
                feature.append_value(f);
                class.append_value(names[c as usize]);
                kind.append_value(label);
                rank.append_value(r as u32);
                row_b.append_value(row as u64);
                doc.append_value(table.doc_id[row]);
                activation.append_value(v as f64);
                window.values().append_slice(&table.token_id[start..end]);
                window.append(true);
                marked.append_value((row - start) as u32);
            }
        }
    }
    Ok(RecordBatch::try_from_iter([
        ("feature", Arc::new(feature.finish()) as ArrayRef),
        ("class", Arc::new(class.finish())),
        ("kind", Arc::new(kind.finish())),
        ("rank", Arc::new(rank.finish())),
        ("row", Arc::new(row_b.finish())),
        ("doc_id", Arc::new(doc.finish())),
        ("activation", Arc::new(activation.finish())),
        ("token_ids", Arc::new(window.finish())),
        ("marked", Arc::new(marked.finish())),
    ])?)
}
