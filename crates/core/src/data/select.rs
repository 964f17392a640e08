//! Row selection: deduplication, per-label balancing, row caps and split assignment — all seeded and
//! deterministic, and all keeping paired rows (same `pair_id`) together where it matters.

use std::collections::{BTreeMap, BTreeSet};

use super::rows::{stable_id, Row};

/// The unit that must not be separated: the pair, else the row itself.
fn group(row: &Row) -> u64 {
    row.pair_id.unwrap_or(row.doc_id)
}

/// A seeded pseudo-random rank of a row's group (uniform in u64).
fn rank(seed: u64, purpose: &str, row: &Row) -> u64 {
    stable_id(&[&seed.to_string(), purpose, &group(row).to_string()])
}

/// Drops rows whose text already appeared (first occurrence wins); returns how many were dropped.
pub fn dedupe(rows: &mut Vec<Row>) -> usize {
    let before = rows.len();
    let mut seen = BTreeSet::new();
    rows.retain(|r| seen.insert(*blake3::hash(r.text.as_bytes()).as_bytes()));
    before - rows.len()
}

/// Keeps the rows with the smallest seeded ranks: `balance` keeps equally many per label (rows without a
/// label are dropped then), `max_rows` caps the total. Upstream order is preserved.
pub fn select(rows: Vec<Row>, max_rows: Option<usize>, balance: bool, seed: u64) -> Vec<Row> {
    if !balance && max_rows.is_none_or(|m| m >= rows.len()) {
        return rows;
    }
    let mut keep: BTreeSet<usize> = BTreeSet::new();
    let mut by_label: BTreeMap<Option<&str>, Vec<usize>> = BTreeMap::new();
    for (i, r) in rows.iter().enumerate() {
        let key = if balance { r.label.as_deref() } else { None };
        if balance && key.is_none() {
            continue;
        }
        by_label.entry(key).or_default().push(i);
    }
    let per_label = if balance {
        by_label.values().map(Vec::len).min().unwrap_or(0)
    } else {
        usize::MAX
    };
    let cap = max_rows.map_or(usize::MAX, |m| m / by_label.len().max(1));
    for indices in by_label.values_mut() {
        indices.sort_by_key(|&i| (rank(seed, "select", &rows[i]), rows[i].doc_id));
        keep.extend(indices.iter().take(per_label.min(cap)));
    }
    rows.into_iter()
        .enumerate()
        .filter(|(i, _)| keep.contains(i))
        .map(|(_, r)| r)
        .collect()
}

/// Canonical order of split names: train, val, test, then the rest alphabetically.
pub fn split_order(fractions: &BTreeMap<String, f64>) -> Vec<(&str, f64)> {
    let mut names: Vec<(&str, f64)> = fractions.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    let pos = |n: &str| {
        ["train", "val", "test"]
            .iter()
            .position(|s| *s == n)
            .unwrap_or(3)
    };
    names.sort_by(|a, b| (pos(a.0), a.0).cmp(&(pos(b.0), b.0)));
    names
}

/// Assigns splits, grouped and stratified: paired rows (same `pair_id`) always share a split, and within
/// each stratum — a source, and for unpaired rows their label too — the groups are ordered by a seeded hash
/// and cut at the fractions, so every source (and label) gets its share of every split rather than a
/// hash-dependent one. Upstream splits are kept for a source only when they include `test`: a source whose
/// upstream data has no test rows (lie_detector's train/validation) is re-split whole, since a detector
/// that is never tested on a source says nothing about it. Returns the sources re-split that way.
pub fn assign_splits(
    rows: &mut [Row],
    fractions: &BTreeMap<String, f64>,
    seed: u64,
) -> Vec<String> {
    // Sources whose upstream splits lack `test` lose them.
    let mut upstream: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for r in rows.iter() {
        if let Some(s) = &r.split {
            upstream.entry(&r.source).or_default().insert(s);
        }
    }
    let resplit: Vec<String> = upstream
        .iter()
        .filter(|(_, splits)| !splits.contains("test"))
        .map(|(source, _)| source.to_string())
        .collect();
    for r in rows.iter_mut() {
        if resplit.contains(&r.source) {
            r.split = None;
        }
    }

    // Groups without a split, by stratum: (source, the group's label when it has one label, else none).
    let mut labels_of: BTreeMap<u64, BTreeSet<Option<&str>>> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.split.is_none()) {
        labels_of
            .entry(group(r))
            .or_default()
            .insert(r.label.as_deref());
    }
    // (source, label) → the stratum's groups as (seeded rank, group).
    type Stratum = (String, Option<String>);
    let mut strata: BTreeMap<Stratum, Vec<(u64, u64)>> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for r in rows.iter().filter(|r| r.split.is_none()) {
        let g = group(r);
        if !seen.insert(g) {
            continue;
        }
        let labels = &labels_of[&g];
        let label = (labels.len() == 1)
            .then(|| labels.iter().next().copied().flatten().map(str::to_string))
            .flatten();
        strata
            .entry((r.source.clone(), label))
            .or_default()
            .push((rank(seed, "split", r), g));
    }
    let order = split_order(fractions);
    let total: f64 = order.iter().map(|(_, f)| f).sum();
    let mut split_of: BTreeMap<u64, &str> = BTreeMap::new();
    for groups in strata.values_mut() {
        groups.sort_unstable();
        let n = groups.len();
        // Cut points at the cumulative fractions; a split's share is exact up to rounding.
        let mut start = 0;
        let mut acc = 0.0;
        for (k, (name, f)) in order.iter().enumerate() {
            acc += f;
            let end = if k + 1 == order.len() {
                n
            } else {
                ((acc / total * n as f64).round() as usize).clamp(start, n)
            };
            for &(_, g) in &groups[start..end] {
                split_of.insert(g, name);
            }
            start = end;
        }
    }
    for r in rows.iter_mut().filter(|r| r.split.is_none()) {
        r.split = Some(split_of[&group(r)].to_string());
    }
    resplit
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize) -> Vec<Row> {
        let mut out: Vec<Row> = (0..n)
            .map(|i| {
                Row::text("s", &format!("t{i}"))
                    .labelled(Some(if i % 3 == 0 { "a" } else { "b" }), None)
                    .paired_by(&(i / 2).to_string())
            })
            .collect();
        super::super::rows::assign_ids(&mut out, |r| r.text.clone());
        out
    }

    #[test]
    fn balance_keeps_equal_counts_and_order() {
        let picked = select(rows(300), None, true, 1);
        let a = picked
            .iter()
            .filter(|r| r.label.as_deref() == Some("a"))
            .count();
        assert_eq!(a, 100);
        assert_eq!(picked.len(), 200);
        let positions: Vec<usize> = picked
            .iter()
            .map(|r| r.text[1..].parse().unwrap())
            .collect();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "upstream order kept"
        );
        assert_eq!(select(rows(300), Some(50), true, 1).len(), 50);
        assert_ne!(
            select(rows(300), Some(50), false, 1),
            select(rows(300), Some(50), false, 2),
            "seeded"
        );
    }

    #[test]
    fn pairs_never_straddle_splits_and_fractions_hold() {
        let mut r = rows(10_000);
        let fractions = BTreeMap::from([
            ("train".into(), 0.8),
            ("val".into(), 0.1),
            ("test".into(), 0.1),
        ]);
        assign_splits(&mut r, &fractions, 0);
        let mut split_of_pair: BTreeMap<u64, String> = BTreeMap::new();
        for row in &r {
            let s = row.split.clone().unwrap();
            assert_eq!(
                split_of_pair
                    .entry(row.pair_id.unwrap())
                    .or_insert(s.clone()),
                &s
            );
        }
        let train = r
            .iter()
            .filter(|x| x.split.as_deref() == Some("train"))
            .count() as f64
            / r.len() as f64;
        assert!((train - 0.8).abs() < 0.01, "{train}");
    }

    #[test]
    fn every_source_and_label_gets_its_share_and_sources_without_test_are_resplit() {
        let fractions = BTreeMap::from([
            ("train".into(), 0.7),
            ("val".into(), 0.15),
            ("test".into(), 0.15),
        ]);
        // A small source of 20 unpaired rows (5 of label a), a source with upstream train/val only, and one
        // with upstream test rows.
        let mut r: Vec<Row> = (0..20)
            .map(|i| {
                Row::text("small", &format!("s{i}"))
                    .labelled(Some(if i < 5 { "a" } else { "b" }), None)
            })
            .chain((0..40).map(|i| {
                Row::text("no_test", &format!("n{i}")).upstream_split(if i < 30 {
                    "train"
                } else {
                    "validation"
                })
            }))
            .chain((0..10).map(|i| {
                Row::text("kept", &format!("k{i}")).upstream_split(if i < 8 {
                    "train"
                } else {
                    "test"
                })
            }))
            .collect();
        super::super::rows::assign_ids(&mut r, |x| x.text.clone());
        let resplit = assign_splits(&mut r, &fractions, 3);
        assert_eq!(resplit, vec!["no_test".to_string()]);
        let count = |source: &str, label: Option<&str>, split: &str| {
            r.iter()
                .filter(|x| {
                    x.source == source
                        && (label.is_none() || x.label.as_deref() == label)
                        && x.split.as_deref() == Some(split)
                })
                .count()
        };
        // Label a, 5 groups: cut points round(3.5) = 4 and round(4.25) = 4, so 4 train, 0 val, 1 test.
        assert_eq!(
            (
                count("small", Some("a"), "train"),
                count("small", Some("a"), "val"),
                count("small", Some("a"), "test")
            ),
            (4, 0, 1)
        );
        assert_eq!(
            (
                count("small", Some("b"), "train"),
                count("small", Some("b"), "val"),
                count("small", Some("b"), "test")
            ),
            (11, 2, 2)
        );
        assert_eq!(
            (
                count("no_test", None, "train"),
                count("no_test", None, "val"),
                count("no_test", None, "test")
            ),
            (28, 6, 6)
        );
        assert_eq!(
            (count("kept", None, "train"), count("kept", None, "test")),
            (8, 2)
        );
    }

    #[test]
    fn dedupe_keeps_first() {
        let mut r = vec![
            Row::text("a", "x"),
            Row::text("b", "x"),
            Row::text("b", "y"),
        ];
        assert_eq!(dedupe(&mut r), 1);
        assert_eq!(r[0].source, "a");
    }
}
