//! Which stored positions of each document a `label` stage pools, and the labels it reads from them.

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use saeflow_core::data::activations::TokenTable;
use saeflow_core::stats::baselines::shuffle_within;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The stored positions of a document that are pooled into its units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Over {
    /// The completion (response) tokens of documents that have a completion; every stored token of the
    /// others (standalone statements). What a response-level detector reads.
    #[default]
    Auto,
    /// Completion tokens only: a labelled document with no stored completion token is an error.
    Completion,
    /// Every stored token (prompt tokens included: they are the same under both labels of a pair).
    All,
}

/// The stored positions pooled from a document without a completion (a standalone statement) under
/// `positions = "auto"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Statements {
    /// Every stored token of the statement.
    #[default]
    All,
    /// Its last stored token (Marks & Tegmark read a statement there), while documents with a completion
    /// still pool their completion tokens: one capture can hold QA and statement sources.
    Last,
}

impl Statements {
    /// Whether this is the default (left out of the stage's key when it is).
    pub fn is_all(&self) -> bool {
        *self == Statements::All
    }
}

/// The contiguous row ranges of each document in `tokens.parquet`, in order.
pub(super) fn documents(table: &TokenTable) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    for r in 1..=table.doc_id.len() {
        if r == table.doc_id.len() || table.doc_id[r] != table.doc_id[start] {
            out.push(start..r);
            start = r;
        }
    }
    out
}

/// Whether each row is pooled: by `over`, leaving out the first `skip` completion tokens of each
/// document (counted by position from its first stored completion token); under `auto`, a statement's rows
/// by `statements`.
pub(super) fn pooled_rows(
    table: &TokenTable,
    over: Over,
    skip: u32,
    statements: Statements,
) -> Vec<bool> {
    let mut pooled = vec![false; table.doc_id.len()];
    for doc in documents(table) {
        let first = doc
            .clone()
            .filter(|&r| table.is_completion[r])
            .map(|r| table.pos[r])
            .min();
        let last = doc.end - 1;
        for r in doc {
            let completion =
                first.is_some_and(|f| table.is_completion[r] && table.pos[r] - f >= skip);
            let statement = first.is_none() && (statements == Statements::All || r == last);
            pooled[r] = match over {
                Over::All => true,
                Over::Completion => completion,
                Over::Auto => statement || completion,
            };
        }
    }
    pooled
}

/// An error when a labelled document taking part (`class` set on some row) has no pooled row: names its
/// source and how many of that source's documents are empty, and what to change.
pub(super) fn check_pooled(
    table: &TokenTable,
    class: &[Option<u16>],
    pooled: &[bool],
    (over, skip): (Over, u32),
) -> anyhow::Result<()> {
    let mut empty: BTreeMap<u16, usize> = BTreeMap::new();
    for doc in documents(table) {
        let labelled = doc.clone().any(|r| class[r].is_some());
        if labelled && !doc.clone().any(|r| pooled[r] && class[r].is_some()) {
            *empty.entry(table.source[doc.start]).or_default() += 1;
        }
    }
    if let Some((&s, &n)) = empty.iter().next() {
        anyhow::bail!(
            "{n} labelled documents of source `{}` have no stored positions to pool (positions = \"{}\", \
             skip_completion = {skip}): capture their completions (capture `positions = \"completion\"` or \
             \"all\", a longer `context`), lower `skip_completion`, or pool `positions = \"all\"`",
            table.sources[s as usize],
            match over {
                Over::Auto => "auto",
                Over::Completion => "completion",
                Over::All => "all",
            }
        );
    }
    Ok(())
}

/// Every document's label shuffled among the documents of its (source, split), seeded: the stage then
/// measures a null, where labels (and discoveries) should be at chance.
pub(super) fn shuffle_document_labels(table: &TokenTable, class: &mut [Option<u16>], seed: u64) {
    let docs: Vec<std::ops::Range<usize>> = documents(table)
        .into_iter()
        .filter(|d| class[d.start].is_some())
        .collect();
    let groups: Vec<(u16, u8)> = docs
        .iter()
        .map(|d| (table.source[d.start], table.split[d.start]))
        .collect();
    let mut labels: Vec<Option<u16>> = docs.iter().map(|d| class[d.start]).collect();
    shuffle_within(
        &groups,
        &mut labels,
        &mut ChaCha8Rng::seed_from_u64(seed ^ 0x5_4ff1e),
    );
    for (d, l) in docs.iter().zip(labels) {
        for r in d.clone() {
            class[r] = l;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> TokenTable {
        // Doc 1: a prompt (rows 0, 1) and a completion (rows 2–4); doc 2: a statement (rows 5, 6).
        TokenTable {
            doc_id: vec![1, 1, 1, 1, 1, 2, 2],
            pos: vec![0, 1, 2, 3, 4, 0, 1],
            token_id: vec![0; 7],
            label: vec![Some(0); 7],
            labels: vec!["a".into()],
            split: vec![0; 7],
            splits: vec!["train".into()],
            seq_pos: vec![0, 1, 2, 3, 4, 0, 1],
            is_completion: vec![false, false, true, true, true, false, false],
            source: vec![0, 0, 0, 0, 0, 1, 1],
            sources: vec!["qa".into(), "facts".into()],
            pair_id: vec![None; 7],
        }
    }

    #[test]
    fn positions_by_rule() {
        let t = table();
        let on = |v: Vec<bool>| -> Vec<usize> { (0..v.len()).filter(|&i| v[i]).collect() };
        let all = Statements::All;
        assert_eq!(on(pooled_rows(&t, Over::Auto, 0, all)), vec![2, 3, 4, 5, 6]);
        assert_eq!(on(pooled_rows(&t, Over::Auto, 2, all)), vec![4, 5, 6]);
        // A statement's last token only; the QA document keeps its completion.
        assert_eq!(
            on(pooled_rows(&t, Over::Auto, 0, Statements::Last)),
            vec![2, 3, 4, 6]
        );
        assert_eq!(on(pooled_rows(&t, Over::Completion, 1, all)), vec![3, 4]);
        assert_eq!(
            on(pooled_rows(&t, Over::All, 3, all)),
            (0..7).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_document_with_nothing_to_pool_is_an_error_naming_its_source() {
        let t = table();
        let class = vec![Some(0); 7];
        let pooled = pooled_rows(&t, Over::Completion, 0, Statements::All);
        let e = check_pooled(&t, &class, &pooled, (Over::Completion, 0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("1 labelled documents of source `facts`"), "{e}");
        let pooled = pooled_rows(&t, Over::Auto, 3, Statements::All);
        let e = check_pooled(&t, &class, &pooled, (Over::Auto, 3))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("source `qa`") && e.contains("skip_completion = 3"),
            "{e}"
        );
        let pooled = pooled_rows(&t, Over::Auto, 2, Statements::All);
        check_pooled(&t, &class, &pooled, (Over::Auto, 2)).unwrap();
    }
}
