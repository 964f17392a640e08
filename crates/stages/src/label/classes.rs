//! Which labels a `label` stage compares: the tested classes, the labels they are compared with, and the
//! splits, checked against the capture before any encoding so a bad choice fails in seconds.

use anyhow::{bail, Context};
use saeflow_core::data::activations::TokenTable;
use saeflow_core::stats::features::TokenInfo;

use super::LabelParams;

/// The label indices to test: `classes` as named, or every label of the capture.
pub(super) fn choose_classes(p: &LabelParams, table: &TokenTable) -> anyhow::Result<Vec<u16>> {
    if table.labels.is_empty() {
        bail!(
            "capture `{}` has no labelled tokens: label the rows in its dataset stage (a preset with labels, \
             or `label = \"FIELD\"` on a source) and capture again",
            p.input
        );
    }
    if p.classes.is_empty() {
        if table.labels.len() < 2 {
            bail!(
                "capture `{}` has one label (`{}`): a class needs others to be compared with",
                p.input,
                table.labels[0]
            );
        }
        return Ok((0..table.labels.len() as u16).collect());
    }
    p.classes
        .iter()
        .map(|c| {
            table
                .labels
                .iter()
                .position(|l| l == c)
                .map(|i| i as u16)
                .with_context(|| {
                    format!(
                        "class `{c}` is not a label of capture `{}` (its labels: {})",
                        p.input,
                        table.labels.join(", ")
                    )
                })
        })
        .collect()
}

/// Each tested class needs tokens in every split, and each split more than one class.
pub(super) fn check_splits(
    p: &LabelParams,
    tokens: &TokenInfo,
    names: &[&str],
    classes: &[u16],
    splits: [(&String, u8); 3],
) -> anyhow::Result<()> {
    for (split, index) in splits {
        let (counts, _) = tokens.counts(index, names.len());
        for &c in classes {
            if counts[c as usize] == 0 {
                bail!(
                    "split `{split}` of capture `{}` has no `{}` tokens: each class needs tokens on both \
                     sides of the comparison in the fit, val and test splits",
                    p.input,
                    names[c as usize]
                );
            }
        }
        if counts.iter().sum::<u64>() == *counts.iter().max().unwrap_or(&0) {
            bail!(
                "split `{split}` of capture `{}` holds a single class",
                p.input
            );
        }
    }
    Ok(())
}

/// With `versus`: the labels that take part (the classes and `versus`); `None` for all of them.
pub(super) fn versus_labels(
    p: &LabelParams,
    table: &TokenTable,
    classes: &[u16],
) -> anyhow::Result<Option<Vec<u16>>> {
    if p.versus.is_empty() {
        return Ok(None);
    }
    if p.classes.is_empty() {
        bail!("`versus` needs `classes`: the labels compared with the `versus` ones");
    }
    let mut labels = classes.to_vec();
    for v in &p.versus {
        let i = table.labels.iter().position(|l| l == v).with_context(|| {
            format!(
                "`versus` label `{v}` is not a label of capture `{}` (its labels: {})",
                p.input,
                table.labels.join(", ")
            )
        })? as u16;
        if classes.contains(&i) {
            bail!("`{v}` is in both `classes` and `versus`");
        }
        labels.push(i);
    }
    Ok(Some(labels))
}

/// The index of split `name` in the capture; an error listing its splits when it has none of that name.
pub(super) fn split_of(p: &LabelParams, table: &TokenTable, name: &str) -> anyhow::Result<u8> {
    table.split_index(name).with_context(|| {
        format!(
            "capture `{}` has no split `{name}` (its splits: {})",
            p.input,
            table.splits.join(", ")
        )
    })
}

/// Source indices a split draws on (`None`: every source).
pub(super) type Sources = Option<Vec<u16>>;

/// Which sources each split draws on, as source indices: `train_sources` for the fit and val splits and
/// `test_sources` for the test split (each: every source when empty). `None` means every source. A name
/// that is not a source of the capture is an error listing its sources.
pub(super) fn source_selection(
    p: &LabelParams,
    table: &TokenTable,
) -> anyhow::Result<(Sources, Sources)> {
    let pick = |key: &str, names: &[String]| -> anyhow::Result<Sources> {
        if names.is_empty() {
            return Ok(None);
        }
        names
            .iter()
            .map(|n| {
                table
                    .sources
                    .iter()
                    .position(|s| s == n)
                    .map(|i| i as u16)
                    .with_context(|| {
                        format!(
                            "`{key}`: `{n}` is not a source of capture `{}` (its sources: {})",
                            p.input,
                            table.sources.join(", ")
                        )
                    })
            })
            .collect::<anyhow::Result<Vec<u16>>>()
            .map(Some)
    };
    Ok((
        pick("train_sources", &p.train_sources)?,
        pick("test_sources", &p.test_sources)?,
    ))
}
