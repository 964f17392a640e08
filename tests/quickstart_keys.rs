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
        "2570e0b2aa5579e0c10c637e996d895f6060544c730142f6df57eabcfc8ed558",
    ),
    (
        "eval[sae.k=4]",
        "7c1f5a0964fcf485c13b34c9399f378351345ede102528baf9701f3072f59f31",
    ),
    (
        "eval[sae.k=8]",
        "1a8044611e66ec00c06123f7c45fd209d76ddca8cb9ea0e03af26606806be098",
    ),
    (
        "labels[sae.k=16]",
        "9593cab5c714eda26961fcb8b85ce252f0c8513abe6119be79abf3ad4d7a35d6",
    ),
    (
        "labels[sae.k=4]",
        "1ee78bf7d4ce1dfa0cb046547422248d5633459d9912fc45fdffbff83a416457",
    ),
    (
        "labels[sae.k=8]",
        "96a6996e2faa4a8bcf01188a16627214e92f5aeb1749343ff5595488bf88f78c",
    ),
    (
        "sae[k=16]",
        "dca1a1200105ec3b4ac83a56746f598a8f776684d4155a3b7f06e59ba87240d5",
    ),
    (
        "sae[k=4]",
        "a2eea31a987dccca6aa6fe3232df87a9949d6c6a2ce71dfed015444496f77b1d",
    ),
    (
        "sae[k=8]",
        "d30a192115b29831669d8f5a72b19498ba453ad28d597df9d7868dcf24deaa80",
    ),
    (
        "steer[sae.k=16]",
        "756edcd2120543c99a33b0a89feb525c92c62aecbe823448359b350de5a69c91",
    ),
    (
        "steer[sae.k=4]",
        "078c9b6e4f33fb13ecf210bba8783c641ea50f40a69b4b009666041a33e9b2c2",
    ),
    (
        "steer[sae.k=8]",
        "fdcd53fb552a15cd105dd3290bbe143ba553eef9f1c6c681df90d996b061fdfa",
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
