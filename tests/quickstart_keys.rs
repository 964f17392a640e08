//! The quickstart's action keys, pinned. A cache filled by an earlier build must stay fully reusable, so a
//! change that only moves code (crates, modules, type names) must not move a key. These values were
//! computed by `main` at 102f4bb, before the crates were split, and moved once since, deliberately: capture
//! VERSION 3 (store format 2 with sources, pairs and sequence positions; sequence-start sinks left out) moved
//! `acts` and everything downstream of it. A deliberate change to a stage kind bumps its `VERSION` and
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
        "49c7b2914543c29e74e174e0ac1b41d5404bf18b9b0324bfaab07515ee53f6d3",
    ),
    (
        "labels[sae.k=4]",
        "eff77eb2dca4ed9241b852d3c2ec6abc7f1469e973c86badac1e6d41924157ba",
    ),
    (
        "labels[sae.k=8]",
        "6644fe3d422a7965477644c8bbb4516565ec983d96cb2d717780ccd7fcb5c18d",
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
        "9ffa9ae997a2a2df60cee4f21428b36dc01564d014e3fa40096102b56b910999",
    ),
    (
        "steer[sae.k=4]",
        "53e5deea431b4c02bce6c198bf9a8d9b133915b203da9953d4f628df1639cc72",
    ),
    (
        "steer[sae.k=8]",
        "cee94293577a116aa28a12ca4cb2539ba8bd1dd237a801ad48dfab6e4d9cad40",
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
