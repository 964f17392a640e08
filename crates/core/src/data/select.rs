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

/// Assigns a split to every row without an upstream one, by a seeded hash of its group, so that paired
/// rows always land in the same split.
pub fn assign_splits(rows: &mut [Row], fractions: &BTreeMap<String, f64>, seed: u64) {
    let order = split_order(fractions);
    let total: f64 = order.iter().map(|(_, f)| f).sum();
    for row in rows.iter_mut().filter(|r| r.split.is_none()) {
        let u = rank(seed, "split", row) as f64 / u64::MAX as f64 * total;
        let mut acc = 0.0;
        let mut chosen = order.last().map(|(n, _)| *n).unwrap_or("train");
        for (name, f) in &order {
            acc += f;
            if u < acc {
                chosen = name;
                break;
            }
        }
        row.split = Some(chosen.to_string());
    }
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
        assert!((train - 0.8).abs() < 0.03, "{train}");
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
