//! The quickstart's action keys, pinned. A cache filled by an earlier build must stay fully reusable, so a
//! change that only moves code (crates, modules, type names) must not move a key. These values were
//! computed by `main` at 102f4bb, before the crates were split, and moved once since, deliberately: capture
//! VERSION 3 (store format 2 with sources, pairs and sequence positions; sequence-start sinks left out) moved
//! `acts` and everything downstream of it; label VERSION 4 and steer VERSION 3 (features chosen on validation,
//! not test) moved `labels` and `steer`; dataset VERSION 2 (stratified splits) moved every key, and dataset
//! VERSION 3 (preset fixes) with label VERSION 5 (one unit for every method) every key again. A deliberate
//! change to a stage kind bumps its `VERSION` and
//! updates the values here, saying why in the commit.

use std::collections::BTreeMap;
use std::path::Path;

use saeflow_runner::plan::FileHasher;

const PINNED: &[(&str, &str)] = &[
    (
        "acts",
        "b04ec470e506c9dbde454154195220af2127bed0f6466cb47e24af05644650d6",
    ),
    (
        "data",
        "2c8ee02e6c3429a81c98fc98a15fa3a4174996a8db87fa3be41719ddb162c713",
    ),
    (
        "eval[sae.k=16]",
        "3607fbceacd24f0d41c7246e29463f34bce7642bbf1e2ab2b777fcf680fc3148",
    ),
    (
        "eval[sae.k=4]",
        "948499c968594ff9b194db2b98a12bd6a9e3b7c487806f53cf5801ff3df5b434",
    ),
    (
        "eval[sae.k=8]",
        "51d0e02b2d3d2c496286f0ac7923412bbe7338fac264b08816b52977a755c604",
    ),
    (
        "labels[sae.k=16]",
        "7e245830812ef00dce4a1d1ef27e554dd0733fb67279de102c2cf7eda9cbcc97",
    ),
    (
        "labels[sae.k=4]",
        "b17a7159a7ecd3d5743590be49fc4830c5fe6132f388006d4a3d27a8743e1399",
    ),
    (
        "labels[sae.k=8]",
        "48995635f5a27a1ef3b1ffbd0dc7489864a259d255ce14474175d173fdb06145",
    ),
    (
        "sae[k=16]",
        "30189b85e9aa5804f602bdd8daa696dc0f50933386f828fae8b74519dfb5d4df",
    ),
    (
        "sae[k=4]",
        "8043e20b1be214944e384fe1216e9645a8475270b9b4edbcfb7bf011e41eca39",
    ),
    (
        "sae[k=8]",
        "24ad22bf632d13459793c424eaac16e495988c5ca8c25ea80bbb3b189c3390d8",
    ),
    (
        "steer[sae.k=16]",
        "e6110a82685b3dec09a9299f6fc2667fd1d1d7d0c22cb747054adf94241392bc",
    ),
    (
        "steer[sae.k=4]",
        "2363a74d1fd511f1eefd2510167e7088bb33da8e02245245a99260008dfa8dd4",
    ),
    (
        "steer[sae.k=8]",
        "2fccb8b08bb5c5df92e72e8b548d24aca0f93cdc22cb867d6857b99bcef5437b",
    ),
];

#[test]
fn quickstart_keys_are_the_pinned_ones() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let memo = tempfile::tempdir().unwrap();
    let mut hasher = FileHasher::open(memo.path().join("memo.json"));
    // Paths in the pipeline are relative to the repository root, as when a user runs it from there.
    std::env::set_current_dir(root).unwrap();
    let plan = saeflow_runner::plan::load(
        Path::new("pipelines/quickstart.toml"),
        &[],
        &saeflow_stages::builtin(),
        &mut hasher,
    )
    .unwrap();
    let keys: BTreeMap<String, String> = plan
        .order
        .iter()
        .map(|&n| {
            (
                plan.instance(n).name.clone(),
                plan.instance(n).key.0.clone(),
            )
        })
        .collect();
    let pinned: BTreeMap<String, String> = PINNED
        .iter()
        .map(|(n, k)| (n.to_string(), k.to_string()))
        .collect();
    assert_eq!(keys, pinned, "the quickstart's action keys moved");
}
