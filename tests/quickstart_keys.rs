//! The quickstart's action keys, pinned. A cache filled by an earlier build must stay fully reusable, so a
//! change that only moves code (crates, modules, type names) must not move a key. These values were
//! computed by `main` at 102f4bb, before the crates were split, and moved once since, deliberately: capture
//! VERSION 3 (store format 2 with sources, pairs and sequence positions; sequence-start sinks left out) moved
//! `acts` and everything downstream of it; label VERSION 4 and steer VERSION 3 (features chosen on validation,
//! not test) moved `labels` and `steer`; dataset VERSION 2 (stratified splits) moved every key. A deliberate change to a stage kind bumps its `VERSION` and
//! updates the values here, saying why in the commit.

use std::collections::BTreeMap;
use std::path::Path;

use saeflow_runner::plan::FileHasher;

const PINNED: &[(&str, &str)] = &[
    (
        "acts",
        "18f2367ffa10c39bb37b4f2b232568006f68ae82772dbd421910677a4a5358b3",
    ),
    (
        "data",
        "5d5c6665c702776f19cd8381232b4feec6458cec1fb96f9c88e6f18b3da9ba9d",
    ),
    (
        "eval[sae.k=16]",
        "a51c661e7ba57ff76686703857e2f6a3dc2b0c30a10f4ea519304cbeb75e398d",
    ),
    (
        "eval[sae.k=4]",
        "20c3fb08cf65e5cb26a80274f38ea6e1fb14e2fffbd0b8f14e0f44b22a1bfe78",
    ),
    (
        "eval[sae.k=8]",
        "7cdc10044518f22d4ef70d4de5c96579b72191d7f5a767deb0757f6f62e5b646",
    ),
    (
        "labels[sae.k=16]",
        "f4f4c3b1a130a53de7d77b6bdf066de3ff7fa7242fd1a750e7a8e05ee19f50bc",
    ),
    (
        "labels[sae.k=4]",
        "212942cf1877d49e572efc857bd13877ae15aeca2915e11ee2794eeee502e8a9",
    ),
    (
        "labels[sae.k=8]",
        "1bf0b7030c35e5ed2585673e9462df0a26c6b1acc133df95efd4a562d5329618",
    ),
    (
        "sae[k=16]",
        "c1ca248e62f6832e3c5f1a7111ddf388419ceb69bab898a42311120e1ee4cfdb",
    ),
    (
        "sae[k=4]",
        "e47c9d7a9d45c8cf497d0c356e46a9540a64cfe710b17db2dd8370a0379e90f0",
    ),
    (
        "sae[k=8]",
        "fcac1dd0c0c4187eb38aeb05523c0e661f8e95ea197a244558a66f9b23c152d5",
    ),
    (
        "steer[sae.k=16]",
        "3add01e71fd9f4412913a8914759a8d6bbf5be7d4dfa6f67564179feb2c22664",
    ),
    (
        "steer[sae.k=4]",
        "d55abb7618148f3e340b485e010a22c5aee08cfb3bf2ed2ce2b8000396e912ae",
    ),
    (
        "steer[sae.k=8]",
        "d8a45859a1ada446b0ef0972990c586189cd4daf3dbd6e76af7ad52d5cbbba34",
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
