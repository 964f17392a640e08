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
        "4aff074bf27c88d599179598713101cc4ce0fff594b7e08f0aa021c00c9a1d19",
    ),
    (
        "labels[sae.k=4]",
        "781df516fad2337de8ad4909d84aea260aee7ee45e78b7a6372914e8aa95ab7a",
    ),
    (
        "labels[sae.k=8]",
        "2a1d9e2d51380957a18aa2107f89caafbef33c26b0d46bef0734416fb160d68a",
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
        "045baca2311945005d92368c552ca6f3cf12cff3fb95566454cc34d23791c80d",
    ),
    (
        "steer[sae.k=4]",
        "9967c23c7b0480f938800d750ab203edc47e9b084f172ecc8d201eb837ae927e",
    ),
    (
        "steer[sae.k=8]",
        "773899717fc30504a843ba06073d02380ce295508a2c64b8a45f06033bc0aa70",
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
