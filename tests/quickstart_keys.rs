//! The quickstart's action keys, pinned. A cache filled by an earlier build must stay fully reusable, so a
//! change that only moves code (crates, modules, type names) must not move a key. These values were
//! computed by `main` at 102f4bb, before the crates were split, and moved once since, deliberately: capture
//! VERSION 3 (store format 2 with sources, pairs and sequence positions; sequence-start sinks left out) moved
//! `acts` and everything downstream of it; label VERSION 4 and steer VERSION 3 (features chosen on validation,
//! not test) moved `labels` and `steer`. A deliberate change to a stage kind bumps its `VERSION` and
//! updates the values here, saying why in the commit.

use std::collections::BTreeMap;
use std::path::Path;

use saeflow_runner::plan::FileHasher;

const PINNED: &[(&str, &str)] = &[
    (
        "acts",
        "5c8ce937c05864532bd16cd00c270b5c266adbe581528d8b46e99a57e67c34a8",
    ),
    (
        "data",
        "f77abed2126240e7794114085a4d711bd535f5b572c5255c873ab5712498290f",
    ),
    (
        "eval[sae.k=16]",
        "3b700b3fb8cc9d1f77fffbce05fe10e701fb23f32540c64577109317587eefcb",
    ),
    (
        "eval[sae.k=4]",
        "2707afde2f2d49b6781b6999f459a72115d92c46610933f08b8278b4bca95cdc",
    ),
    (
        "eval[sae.k=8]",
        "15c325aa36e9f953c3758e4e48c955e6cc9dd6341e64830196cea7019015bbde",
    ),
    (
        "labels[sae.k=16]",
        "5b8c78afadbf876f2de00576f024ece25443ea933da874e17aeb63ac4a9034d1",
    ),
    (
        "labels[sae.k=4]",
        "61799f2fe414e0edf34b4c981479664e28759136efcb04fa5db55f2435a77a99",
    ),
    (
        "labels[sae.k=8]",
        "27de408a4f84a71f834734652aafa5de6e42434d100f1800ff10f0d02fc6c148",
    ),
    (
        "sae[k=16]",
        "4be926b7f26e0284a19593a392fe95044f3d57171a73a8e82033a1027b778b66",
    ),
    (
        "sae[k=4]",
        "7cf8c2c1925d880eecdcfbd92ed8a56ebe5f49484f166f1acfcf2b42deb6e12a",
    ),
    (
        "sae[k=8]",
        "54aa0100cb4dc9d921713267b3321531316a90bcc1bb9f3591e167f427217d66",
    ),
    (
        "steer[sae.k=16]",
        "86fae6bef573200b8e12b0c595db3f30768a6cbe5554b712580a703b66207a5e",
    ),
    (
        "steer[sae.k=4]",
        "741b9a03ce1f3786744e6424d0ba97a002750a974722047c0fc41a40c6527390",
    ),
    (
        "steer[sae.k=8]",
        "045a9f381c91121588245f0c07cb6b0d01d5634c4ff0523e9dceb4c6bbe61d3d",
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
