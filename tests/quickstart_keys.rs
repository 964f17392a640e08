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
//! kernels::gemm) `acts` and everything after it, and train's `encoder_precision = "auto"` default (bf16
//! ranking where it outruns f32, the same latents) `sae` and everything after it. A deliberate
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
        "70069ff2488dc3a79f65cd34a656a900db71a05f44095c2a9dbc92aa4ad0d535",
    ),
    (
        "eval[sae.k=4]",
        "410525584fde3a37c5ce871bf86b71ce853ac0d6976d89137809435083177b9b",
    ),
    (
        "eval[sae.k=8]",
        "20a5bcf46f1de0aaeb84e36956fa5fff9aa6607c158bdadf343a75f758d61003",
    ),
    (
        "labels[sae.k=16]",
        "f3fe311f280612bef1ccd1b532cf07bf74a77f291440b2c842b9b46fd3d6e4db",
    ),
    (
        "labels[sae.k=4]",
        "763aa9111b90d6004391683ee9cfc5ac974d970e84d353fcd33d51d94b2ac126",
    ),
    (
        "labels[sae.k=8]",
        "a10d30f45c220919988568d557b00bc3df90059ae3afa5aa61931a4c6ed67d20",
    ),
    (
        "sae[k=16]",
        "40fba60a48651de19622c27a34755a335b10565e78e401701cc70d0d4b342b09",
    ),
    (
        "sae[k=4]",
        "8a69e2b5f3edfc04665b8ce03772c5700aeee4a7892afadc6e59b3bb85a3cc8d",
    ),
    (
        "sae[k=8]",
        "0cfaa7a52c10d5f8a89237a446a678d1b6e46c817971f4dbedeaee73b9fe8b01",
    ),
    (
        "steer[sae.k=16]",
        "b530b96bc2db498e545e974b847a4d82c4d0087168579c7ad59ab0c365f9cfd2",
    ),
    (
        "steer[sae.k=4]",
        "90bf74bd196e1c45cb9499db0836782e81273836b882f11d82f09be27a821a53",
    ),
    (
        "steer[sae.k=8]",
        "6b382ab1318a2dfdce21da139fc51bfc0477885f2b76cddc36effa36df3aad90",
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
