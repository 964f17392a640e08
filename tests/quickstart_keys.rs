//! The quickstart's action keys, pinned. A cache filled by an earlier build must stay fully reusable, so a
//! change that only moves code (crates, modules, type names) must not move a key. These values were
//! computed by `main` at 102f4bb, before the crates were split; a deliberate change to a stage kind bumps
//! its `VERSION` and updates the values here, saying why in the commit.

use std::collections::BTreeMap;
use std::path::Path;

use saeflow_runner::plan::FileHasher;

const PINNED: &[(&str, &str)] = &[
    (
        "acts",
        "f975fdd49fa5a78060cbaf718290771f4482b8de9fdce49445f53e1906867a5c",
    ),
    (
        "data",
        "f77abed2126240e7794114085a4d711bd535f5b572c5255c873ab5712498290f",
    ),
    (
        "eval[sae.k=16]",
        "e3e04cd8f93cedbeb97ee01015d06f1baed9dc10efdde0bc4bba94eee01b02bf",
    ),
    (
        "eval[sae.k=4]",
        "f2d8e4edc52781a180e5a8c32b3aca3caf21b3abbde062ff148cf5594cf6617a",
    ),
    (
        "eval[sae.k=8]",
        "28132417c0ff07f229d737821e72f0446e833e8f911dacfa71efaa5b38d25871",
    ),
    (
        "labels[sae.k=16]",
        "04c9b650a98d08643242e04ba471044d1544ed548828386beaec29d2ed1bfc41",
    ),
    (
        "labels[sae.k=4]",
        "67c753a8c85b264a1d025bc9b20f28398be7bcc362853e41139fa5fadafe2d4e",
    ),
    (
        "labels[sae.k=8]",
        "9ae41b12157038471bbc544df5b37f410882524c0b9ad21f330bc6d476626d02",
    ),
    (
        "sae[k=16]",
        "1576bb2f7441faec80d07bd2e51e4bcbd3b6b4c71b2f507fd6b97697ec72236f",
    ),
    (
        "sae[k=4]",
        "a805448d0277d647f78477d78ae1aac3bb56bbf3fb2cc5c8945b2bb36fd7d415",
    ),
    (
        "sae[k=8]",
        "85f8979e13affc24cd5ec79685edae4326a43730ed47e5e9ad3eb48b1907e5a9",
    ),
    (
        "steer[sae.k=16]",
        "7265d2e08ba9063f9d1d63c59d714fab9bdf88b464b16ac61a5bbecdd8df674f",
    ),
    (
        "steer[sae.k=4]",
        "9e274eb140e45fec9e3c645baa97d568b90cc26666579b3b2f5ddf3bfd67deac",
    ),
    (
        "steer[sae.k=8]",
        "87a836d7a9e66b64c57e638bf13da9cdb4a6a33371a4399ad6e7a762cce27719",
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
