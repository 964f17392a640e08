//! Action keys: stable under reformatting, and a parameter change moves exactly the stage and its descendants.
//! Uses test-only stage kinds with float and integer parameters.

use std::collections::BTreeMap;
use std::path::Path;

use saeflow_runner::config::Override;
use saeflow_runner::plan::{FileHasher, Plan};
use saeflow_runner::stage::{key_path, Reference, References, Registry, Stage, StageContext};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct TrainParams {
    #[serde(default)]
    input: Option<String>,
    lr: f64,
    k: u32,
    #[serde(default)]
    tag: String,
}

struct Train;
impl Stage for Train {
    type Params = TrainParams;
    const KIND: &'static str = "train";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "test kind";
    fn references(p: &TrainParams) -> References {
        References {
            inputs: p
                .input
                .iter()
                .map(|i| Reference {
                    role: "input".into(),
                    target: i.clone(),
                    at: key_path(&["input"]),
                })
                .collect(),
            ..Default::default()
        }
    }
    fn run(_: &TrainParams, _: &mut StageContext) -> anyhow::Result<()> {
        Ok(())
    }
}

fn registry() -> Registry {
    let mut r = saeflow_stages::builtin();
    r.register::<Train>();
    r
}

fn keys(dir: &Path, name: &str, text: &str, overrides: &[&str]) -> BTreeMap<String, String> {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    let overrides: Vec<Override> = overrides.iter().map(|o| o.parse().unwrap()).collect();
    let mut hasher = FileHasher::open(dir.join("memo.json"));
    let plan = saeflow_runner::plan::load(&path, &overrides, &registry(), &mut hasher).unwrap();
    plan_keys(&plan)
}

fn plan_keys(plan: &Plan) -> BTreeMap<String, String> {
    plan.order
        .iter()
        .map(|&n| {
            (
                plan.instance(n).name.clone(),
                plan.instance(n).key.0.clone(),
            )
        })
        .collect()
}

const BASE: &str = r#"
[pipeline]
name = "keys"
seed = 7

[stages.a]
kind = "train"
lr = 1e-5
k = 32

[stages.b]
kind = "train"
input = "a"
lr = 0.001
k = 8

[stages.c]
kind = "train"
input = "b"
lr = 0.5
k = 1

[stages.d]
kind = "train"
input = "a"
lr = 2.0
k = 4
"#;

/// The same pipeline: comments, blank lines, key and table order, float spellings, inline vs dotted tables.
const REFORMATTED: &str = r#"
# a comment
[stages.d]   # trailing comment
k   =   4
lr  =   2.0
input="a"
kind="train"

[stages.c]
input = 'b'
kind  = "train"
lr    = 5e-1
k     = 1

[pipeline]
seed = 7
name = 'keys'

[stages]
a = { kind = "train", k = 32, lr = 0.00001 }
b.kind = "train"
b.input = "a"
b.lr = 1.0e-3
b.k = 8
"#;

#[test]
fn reformatting_changes_no_key() {
    let dir = tempfile::tempdir().unwrap();
    let base = keys(dir.path(), "base.toml", BASE, &[]);
    assert_eq!(base.len(), 4);
    assert_eq!(base, keys(dir.path(), "reformatted.toml", REFORMATTED, &[]));
}

#[test]
fn a_parameter_change_moves_exactly_that_stage_and_its_descendants() {
    let dir = tempfile::tempdir().unwrap();
    let base = keys(dir.path(), "base.toml", BASE, &[]);
    let changed = keys(
        dir.path(),
        "changed.toml",
        &BASE.replace("lr = 0.001", "lr = 0.002"),
        &[],
    );
    let moved: Vec<&str> = base
        .keys()
        .filter(|s| base[*s] != changed[*s])
        .map(String::as_str)
        .collect();
    assert_eq!(moved, ["b", "c"]);
    // The same change through -S gives the same keys as editing the file.
    assert_eq!(
        changed,
        keys(dir.path(), "base2.toml", BASE, &["b.lr=0.002"])
    );
    // Integers and floats stay distinct, but an integer written for a float parameter is that float.
    assert_eq!(
        keys(
            dir.path(),
            "int.toml",
            &BASE.replace("lr = 2.0", "lr = 2"),
            &[]
        ),
        base
    );
    // The seed enters every key.
    let reseeded = keys(dir.path(), "seed.toml", BASE, &["pipeline.seed=8"]);
    assert!(base.keys().all(|s| base[s] != reseeded[s]));
}

#[test]
fn overrides_are_typed_by_the_parameter_schema() {
    let dir = tempfile::tempdir().unwrap();
    // `tag` is a string: `-S a.tag=3` must mean "3", and equal the file spelling `tag = "3"`.
    let from_cli = keys(dir.path(), "p.toml", BASE, &["a.tag=3"]);
    let from_file = keys(
        dir.path(),
        "q.toml",
        &BASE.replace("k = 32", "k = 32\ntag = \"3\""),
        &[],
    );
    assert_eq!(from_cli, from_file);
    // `lr` is a float: `-S b.lr=1` equals `lr = 1.0`.
    assert_eq!(
        keys(dir.path(), "r.toml", BASE, &["b.lr=1"]),
        keys(
            dir.path(),
            "s.toml",
            &BASE.replace("lr = 0.001", "lr = 1.0"),
            &[]
        )
    );
}

#[test]
fn sweeps_share_upstream_instances() {
    let dir = tempfile::tempdir().unwrap();
    let swept = keys(dir.path(), "p.toml", BASE, &["b.k=1,2,3"]);
    let names: Vec<&str> = swept.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["a", "b[k=1]", "b[k=2]", "b[k=3]", "c[b.k=1]", "c[b.k=2]", "c[b.k=3]", "d"]
    );
    let base = keys(dir.path(), "q.toml", BASE, &[]);
    assert_eq!(swept["a"], base["a"]);
    assert_eq!(swept["d"], base["d"]);
    // The member equal to the file's value is the same computation as the unswept stage.
    assert_eq!(
        keys(dir.path(), "r.toml", BASE, &["b.k=8"])["c"],
        keys(dir.path(), "s.toml", BASE, &["b.k=8,9"])["c[b.k=8]"]
    );
    // A [sweep] table and -S give the same instances; two axes form a grid.
    let grid = keys(
        dir.path(),
        "t.toml",
        &format!("{BASE}\n[sweep]\n\"b.k\" = [1, 2, 3]\n"),
        &["c.lr=0.1,0.2"],
    );
    assert_eq!(grid.len(), 1 + 3 + 6 + 1);
    assert_eq!(grid["b[k=2]"], swept["b[k=2]"]);
}
