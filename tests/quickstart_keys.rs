//! The quickstart's action keys, pinned. A cache filled by an earlier build must stay fully reusable, so a
//! change that only moves code (crates, modules, type names) must not move a key. These values were
//! computed by `main` at 102f4bb, before the crates were split, and moved once since, deliberately: capture
//! VERSION 3 (store format 2 with sources, pairs and sequence positions; sequence-start sinks left out) moved
//! `acts` and everything downstream of it; label VERSION 4 and steer VERSION 3 (features chosen on validation,
//! not test) moved `labels` and `steer`; dataset VERSION 2 (stratified splits) moved every key, and dataset
//! VERSION 3 (preset fixes) with label VERSION 5 (one unit for every method) every key again, and capture
//! VERSION 4 (chat templates rendered by Jinja) `acts` and everything after it, and steer VERSION 4
//! (strengths in residual-norm units, random controls, intervals) `steer`, and steer VERSION 5 (prompts
//! generated in one batch) with capture VERSION 5 and eval VERSION 3 (the model's linear layers on
//! kernels::gemm) `acts` and everything after it. A deliberate
//! change to a stage kind bumps its `VERSION` and
//! updates the values here, saying why in the commit.

use std::collections::BTreeMap;
use std::path::Path;

use saeflow_runner::plan::FileHasher;

const PINNED: &[(&str, &str)] = &[
    (
        "acts",
        "abd02f25397afa0d2991bb3f0ac3596f13e80c54767da4573606e9528434a8da",
    ),
    (
        "data",
        "2c8ee02e6c3429a81c98fc98a15fa3a4174996a8db87fa3be41719ddb162c713",
    ),
    (
        "eval[sae.k=16]",
        "84fc766fa76943561439fe939409790ac71c18bb92a70bd993a1733ef385415c",
    ),
    (
        "eval[sae.k=4]",
        "9827003daed4e2af5b4a43ec6568c0740b6be5c9b07b0adad6df3ddfa3af50d7",
    ),
    (
        "eval[sae.k=8]",
        "92ee44e35c064bcc329f2013aaf09bef37860500cf627e728ac7ecd0c2ca9f0c",
    ),
    (
        "labels[sae.k=16]",
        "a5b50d6505750e222428ee8b41db68b2fb9e07838245aaea08b47245da4fd867",
    ),
    (
        "labels[sae.k=4]",
        "da44ae7593e4840559991021a2b88e65220a1ffaadb6bf2a0b98eacad9738414",
    ),
    (
        "labels[sae.k=8]",
        "d3eecd8dce29b2aabb27646508273e55598586879fcfb59e98a4a535cbfd94e5",
    ),
    (
        "sae[k=16]",
        "13147831a155c1ff15c0439b93798179c758d33a9ef3e6ac2fdb9defeb91fba2",
    ),
    (
        "sae[k=4]",
        "53d067df67b9487cb262ad7451703f5fec89b906b77a938c1a85990fd25f4cc4",
    ),
    (
        "sae[k=8]",
        "43cdd2edd4fad878b65086bf47f34aa6b9dcd36e3656138c3e5bc1dd93f69c1a",
    ),
    (
        "steer[sae.k=16]",
        "4391b7563bb5c0df979b017e30ed235ac3121a0cb6fbaf665b2bd8f2cb4d0e95",
    ),
    (
        "steer[sae.k=4]",
        "48e713a0def0560d8245748090b50e2e7b446e9e8383e1005ae6365d1a02c955",
    ),
    (
        "steer[sae.k=8]",
        "cde88ea6bfa738cd6f7521989d0a0414f5ef6c2f40e9eaad8233507ba67b4022",
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
