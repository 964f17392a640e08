//! The quickstart's action keys, pinned. A cache filled by an earlier build must stay fully reusable, so a
//! change that only moves code (crates, modules, type names) must not move a key. These values were
//! computed by `main` at 102f4bb, before the crates were split, and moved once since, deliberately: capture
//! VERSION 3 (store format 2 with sources, pairs and sequence positions; sequence-start sinks left out) moved
//! `acts` and everything downstream of it; label VERSION 4 and steer VERSION 3 (features chosen on validation,
//! not test) moved `labels` and `steer`; dataset VERSION 2 (stratified splits) moved every key, and dataset
//! VERSION 3 (preset fixes) with label VERSION 5 (one unit for every method) every key again, and capture
//! VERSION 4 (chat templates rendered by Jinja) `acts` and everything after it, and steer VERSION 4
//! (strengths in residual-norm units, random controls, intervals) `steer`, and steer VERSION 5 (prompts
//! generated in one batch) `steer`. A deliberate
//! change to a stage kind bumps its `VERSION` and
//! updates the values here, saying why in the commit.

use std::collections::BTreeMap;
use std::path::Path;

use saeflow_runner::plan::FileHasher;

const PINNED: &[(&str, &str)] = &[
    (
        "acts",
        "f1ce7605cf0c1e2d6fe4d91dbf581cee1e86ebf10d1a1ffe944775b7c13de02e",
    ),
    (
        "data",
        "2c8ee02e6c3429a81c98fc98a15fa3a4174996a8db87fa3be41719ddb162c713",
    ),
    (
        "eval[sae.k=16]",
        "4da64d11a8591194575d350bb654015fdb27f89d2ebe087aab7d3104e3c1ca47",
    ),
    (
        "eval[sae.k=4]",
        "daf96b3f4b01e8846f739092fcc9271b4ee67de2829f0fb87491529b080fcf34",
    ),
    (
        "eval[sae.k=8]",
        "72e161fbe94c2aa289cd5c6edfd14a71d951332217d4415bb628bc8941a4e955",
    ),
    (
        "labels[sae.k=16]",
        "d98b0fbcd3de6ba99d79e5ae6f7b842ec0837876b96ccfbd75edac4bd8aa3c5d",
    ),
    (
        "labels[sae.k=4]",
        "18d1788a9c0d74dbb93de83e3f729afce9762eb4b3345fe0e64fda24cb97582c",
    ),
    (
        "labels[sae.k=8]",
        "24eb45fced29a3a761fdd7646414dc1b95d7404ba5ff9274a70d20a9c774cd95",
    ),
    (
        "sae[k=16]",
        "35a9145a887be5e61235e5dbbf8fadc5f9f5356e21eadbd3cf104d17329cf8ab",
    ),
    (
        "sae[k=4]",
        "887ea05b94460192703912c335bc9c4c26aa6127bb522593d1d87cdb844003e9",
    ),
    (
        "sae[k=8]",
        "3041a05dbea74d1ed3dd6893a09fd9bb6b7d2897ba7421b83b6b4a33b8b4f87a",
    ),
    (
        "steer[sae.k=16]",
        "3e3701b7edc4cb509a7841cd3acb7d427b99309241c89dc2138d2a2718e7b6b1",
    ),
    (
        "steer[sae.k=4]",
        "315d6bc098f30ac508619a18dd8e7cc350f762e97d615861efd0509c36f0448f",
    ),
    (
        "steer[sae.k=8]",
        "a1e6235f4aa98125e42b20fd1ae3a432ffa32fe284a79d0fe207737390055cb9",
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
