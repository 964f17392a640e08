//! The `generate` stage on nanochat-d4 (shipped with the quickstart, so these need nothing beside the
//! repository): batching and resumption leave the bytes unchanged and the seed decides them; grading
//! problems (a grader that cannot parse or fails, a prompt longer than the context, an empty answer) are
//! counted per row and never labelled; the variants of a question never straddle splits, here or after a
//! `dataset` stage re-reads them; a system message reaches the chat the model sees.
mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::http::Server;
use common::{nanochat_d4, object_of, ok, saeflow, write};
use saeflow_core::data::rows::Row;
use serde_json::Value;

/// `n` questions about numbers, each with its answer, in a CSV the dataset stage reads. Every fifth
/// question (4, 9, …) opens with a long preamble.
fn questions(dir: &Path, n: usize) {
    let mut csv = String::from("id,question,answer\n");
    for i in 0..n {
        let preamble = if i % 5 == 4 {
            "Think hard. ".repeat(20)
        } else {
            String::new()
        };
        csv += &format!("{i},{preamble}What is {i} plus {}?,{}\n", i % 7, i + i % 7);
    }
    write(&dir.join("q.csv"), &csv);
}

/// A pipeline: the questions, then `stages` (TOML text) on nanochat-d4.
fn pipeline(dir: &Path, n: usize, stages: &str) {
    questions(dir, n);
    write(
        &dir.join("p.toml"),
        &format!(
            r#"[pipeline]
name = "gen"

[models.nc]
kind = "nanochat"
path = "{model}"

[stages.q]
kind = "dataset"
sources = [{{ path = "q.csv", prompt = "question", id = "id", keep = ["answer"] }}]
{stages}"#,
            model = nanochat_d4().display()
        ),
    );
}

/// Two variants of every question, sampled (so the seed matters) and greedy.
fn two_variants(settings: &str) -> String {
    format!(
        r#"
[stages.a]
kind = "generate"
input = "q"
model = "nc"
template = "chat"
reference = "{{{{ answer }}}}"
max_new_tokens = 12
grade = {{ kind = "match" }}
instructions = [
  {{ name = "honest", wants = "truth" }},
  {{ name = "lie", prompt = "Answer with a lie. {{{{ question }}}}", system = "You lie.", wants = "lie" }},
]
{settings}
"#
    )
}

fn output(dir: &Path, stage: &str, file: &str) -> Vec<u8> {
    std::fs::read(object_of(&dir.join("cache"), "gen", stage).join(file)).unwrap()
}

fn rows(dir: &Path, stage: &str, file: &str) -> Vec<Row> {
    saeflow_core::data::rows::read(&object_of(&dir.join("cache"), "gen", stage).join(file)).unwrap()
}

fn summary(dir: &Path, stage: &str) -> Value {
    serde_json::from_slice(&output(dir, stage, "summary.json")).unwrap()
}

#[test]
fn batched_generation_equals_one_at_a_time_and_the_seed_decides_the_bytes() {
    let run = |settings: &str| {
        let dir = tempfile::tempdir().unwrap();
        pipeline(dir.path(), 9, &two_variants(settings));
        ok(dir.path(), &["run", "-q", "p.toml"]);
        let files: Vec<Vec<u8>> = ["generations.parquet", "rows.parquet", "summary.json"]
            .iter()
            .map(|f| output(dir.path(), "a", f))
            .collect();
        (dir, files)
    };
    for sampling in [
        "temperature = 0.0",
        "temperature = 0.9\ntop_p = 0.95\ntop_k = 50",
    ] {
        let (one_dir, one) = run(&format!("{sampling}\nbatch_size = 1"));
        let (_, batched) = run(&format!("{sampling}\nbatch_size = 5"));
        assert!(
            one == batched,
            "{sampling}: batches of 5 changed the output"
        );
        let (_, again) = run(&format!("{sampling}\nbatch_size = 5"));
        assert!(
            again == batched,
            "{sampling}: the same seed gave other bytes"
        );
        let answers = rows(one_dir.path(), "a", "generations.parquet");
        assert_eq!(answers.len(), 18);
        assert!(answers
            .iter()
            .all(|r| !r.completion.as_deref().unwrap_or("").is_empty()));
        // What the model was asked is recorded with its sampling settings and instruction.
        let lie = answers
            .iter()
            .find(|r| r.extra["instruction"] == "lie")
            .unwrap();
        assert!(lie
            .prompt
            .as_deref()
            .unwrap()
            .starts_with("Answer with a lie. What is"));
        assert_eq!(lie.extra["system"], "You lie.");
        assert_eq!(lie.extra["wants"], "lie");
        assert_eq!(lie.extra["max_new_tokens"], "12");
        assert!(lie.extra["grade"] == "correct" || lie.extra["grade"] == "incorrect");
    }
    // Another seed samples other answers; greedy ones do not depend on it.
    let (_, sampled) = run("temperature = 0.9");
    let other = tempfile::tempdir().unwrap();
    pipeline(other.path(), 9, &two_variants("temperature = 0.9"));
    let toml = std::fs::read_to_string(other.path().join("p.toml")).unwrap();
    write(
        &other.path().join("p.toml"),
        &toml.replace("name = \"gen\"", "name = \"gen\"\nseed = 7"),
    );
    ok(other.path(), &["run", "-q", "p.toml"]);
    let reseeded = output(other.path(), "a", "generations.parquet");
    assert!(
        reseeded != sampled[0],
        "seed 7 sampled the same answers as seed 0"
    );
}

#[test]
fn a_killed_generation_resumes_from_its_last_shard_with_identical_bytes() {
    let settings = "temperature = 0.7\nmax_new_tokens = 48\nbatch_size = 2\nshard_size = 2";
    let stages = two_variants(settings).replace("max_new_tokens = 12\n", "");
    let reference = tempfile::tempdir().unwrap();
    pipeline(reference.path(), 60, &stages);
    ok(reference.path(), &["run", "-q", "p.toml"]);
    let expected = common::published_outputs(&reference.path().join("cache"));

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pipeline(d, 60, &stages);
    ok(d, &["run", "-q", "p.toml", "q"]);
    let cache = d.join("cache");
    let mut kept = Vec::new();
    for kill in 0..3 {
        let before = common::partial_shards(&cache);
        let mut child = saeflow(d).args(["run", "-q", "p.toml"]).spawn().unwrap();
        while common::partial_shards(&cache) < before + 2 {
            assert!(
                child.try_wait().unwrap().is_none(),
                "generation finished before kill {kill}"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kept.push(common::partial_shards(&cache));
        ok(d, &["cache", "verify"]);
    }
    let last = ok(d, &["run", "p.toml"]);
    assert!(
        last.contains(&format!("resuming from shard {}", kept[2])),
        "{kept:?}\n{last}"
    );
    assert_eq!(common::published_outputs(&cache), expected);
}

/// A grader program: `failed` for questions about 1 (a line it should not print) and 2 (exit 3),
/// unparsable for 3, else correct when the answer has an even number of characters.
const GRADER: &str = r#"import json, sys
a = json.load(sys.stdin)
q = a["question"]
if q.startswith("What is 1 "): print("maybe so")
elif q.startswith("What is 2 "): sys.exit(3)
elif q.startswith("What is 3 "): print("unparsable")
else: print("correct" if len(a["completion"]) % 2 == 0 else "incorrect")
"#;

#[test]
fn grading_problems_long_prompts_and_empty_answers_are_counted_per_row_never_labelled() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(&d.join("grader.py"), GRADER);
    // Every character a token can start with is a stop string, so every answer is cut to nothing.
    let mut stops: Vec<String> = (b'!'..=b'~').map(|c| (c as char).to_string()).collect();
    stops.push(" ".into());
    let stops = serde_json::to_string(&stops).unwrap();
    let stages = format!(
        r#"
[stages.graded]
kind = "generate"
input = "q"
model = "nc"
template = "chat"
reference = "{{{{ answer }}}}"
max_new_tokens = 8
context = 40
grade = {{ kind = "command", argv = ["python3", "grader.py"] }}

[stages.empty]
kind = "generate"
input = "q"
model = "nc"
template = "chat"
max_new_tokens = 4
stop = {stops}

[stages.choice]
kind = "generate"
input = "q"
model = "nc"
template = "chat"
reference = "A"
max_new_tokens = 8
grade = {{ kind = "choice", choices = ["A", "B"] }}
"#
    );
    pipeline(d, 12, &stages);
    ok(d, &["run", "-q", "p.toml"]);

    let graded = rows(d, "graded", "generations.parquet");
    assert_eq!(graded.len(), 12);
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &graded {
        let grade = r.extra["grade"].as_str();
        *seen.entry(grade).or_default() += 1;
        let question = &r.extra["question"];
        let long = question.starts_with("Think hard.");
        let expected = if long {
            "not_generated"
        } else if question.starts_with("What is 1 ") || question.starts_with("What is 2 ") {
            "failed"
        } else if question.starts_with("What is 3 ") {
            "unparsable"
        } else if r.completion.as_deref().unwrap().len() % 2 == 0 {
            "correct"
        } else {
            "incorrect"
        };
        assert_eq!(grade, expected, "{r:?}");
        assert_eq!(
            r.extra["kept"] == "true",
            matches!(grade, "correct" | "incorrect")
        );
        assert_eq!(
            r.label.is_some(),
            matches!(grade, "correct" | "incorrect"),
            "{r:?}"
        );
        if long {
            assert_eq!(r.extra["stop_reason"], "prompt_too_long");
            assert_eq!(r.completion.as_deref(), Some(""));
            assert!(r.extra["grader_output"].contains("the context is 40"));
        } else {
            let length = r.extra["prompt_tokens"].parse::<usize>().unwrap()
                + r.extra["new_tokens"].parse::<usize>().unwrap();
            assert!(length <= 40, "{length} tokens in a context of 40");
        }
    }
    if let Some(r) = graded
        .iter()
        .find(|r| r.extra["question"].starts_with("What is 2 "))
    {
        if r.extra["grade"] == "failed" {
            assert!(r.extra["grader_output"].contains("exit status: 3"), "{r:?}");
        }
    }
    assert_eq!(seen.get("not_generated"), Some(&2), "{seen:?}");
    let s = summary(d, "graded");
    let counted = &s["instructions"]["plain"]["grades"];
    for (grade, n) in &seen {
        assert_eq!(counted[*grade].as_u64(), Some(*n as u64), "{s}");
    }
    let problems = seen
        .iter()
        .filter(|(g, _)| !matches!(**g, "correct" | "incorrect"))
        .map(|(_, n)| n)
        .sum::<usize>();
    assert_eq!(s["problems"].as_u64(), Some(problems as u64));
    assert_eq!(rows(d, "graded", "rows.parquet").len(), 12 - problems);

    let empty = rows(d, "empty", "generations.parquet");
    assert!(empty.iter().all(|r| r.completion.as_deref() == Some("")
        && r.extra["grade"] == "empty"
        && r.extra["stop_reason"] == "stop_string"));
    assert_eq!(summary(d, "empty")["problems"].as_u64(), Some(12));
    assert!(rows(d, "empty", "rows.parquet").is_empty());

    // The choice parser on a model that names no choice: unparsable, counted, never guessed.
    let choice = rows(d, "choice", "generations.parquet");
    for r in &choice {
        let c = r.completion.as_deref().unwrap();
        let named = c
            .split(|ch: char| !ch.is_alphanumeric())
            .find(|w| *w == "A" || *w == "B");
        let expected = match named {
            Some("A") => "correct",
            Some(_) => "incorrect",
            None if c.trim().is_empty() => "empty",
            None => "unparsable",
        };
        assert_eq!(r.extra["grade"], expected, "{c:?}");
    }
}

#[test]
fn an_llm_judge_grades_over_the_chat_api_and_its_unreadable_replies_are_unparsable() {
    let server = Server::with_handler(|r| {
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        let user = body["messages"][1]["content"].as_str().unwrap().to_string();
        let reply = if user.contains("Reference answer: 4\n") {
            "CORRECT. It says four."
        } else if user.contains("Reference answer: 6\n") {
            "Hard to say."
        } else {
            "incorrect"
        };
        (
            200,
            serde_json::json!({"choices": [{"message": {"content": reply}}]}).to_string(),
        )
    });
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let stages = format!(
        r#"
[stages.judged]
kind = "generate"
input = "q"
model = "nc"
template = "chat"
reference = "{{{{ answer }}}}"
max_new_tokens = 6
grade = {{ kind = "judge", base_url = "{}/v1", llm = "judge-1", api_key_env = "SAEFLOW_TEST_NO_KEY" }}
"#,
        server.base
    );
    pipeline(d, 8, &stages);
    ok(d, &["run", "-q", "p.toml"]);
    for r in rows(d, "judged", "generations.parquet") {
        let expected = match r.extra["reference"].as_str() {
            _ if r.completion.as_deref() == Some("") => "empty",
            "4" => "correct",
            "6" => "unparsable",
            _ => "incorrect",
        };
        assert_eq!(r.extra["grade"], expected, "{r:?}");
        assert_eq!(r.extra["grader_output"].is_empty(), expected == "empty");
    }
}

#[test]
fn variants_of_a_question_share_its_pair_and_split_and_a_dataset_rereading_them_keeps_pairs_whole()
{
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut stages = two_variants("");
    // Only the training questions: their answers have no test split, so the dataset re-splits them.
    stages += r#"
[stages.train_only]
kind = "generate"
input = "q"
model = "nc"
template = "chat"
splits = ["train"]
max_new_tokens = 4
instructions = [
  { name = "honest", label = "honest" },
  { name = "lie", prompt = "Lie: {{ question }}", label = "deceptive" },
]

[stages.both]
kind = "dataset"
sources = [{ stage = "a" }, { stage = "train_only" }]
"#;
    pipeline(d, 40, &stages);
    ok(d, &["run", "-q", "p.toml"]);
    let check = |rows: &[Row], what: &str| {
        let mut split_of: BTreeMap<u64, &str> = BTreeMap::new();
        for r in rows {
            let split = r.split.as_deref().unwrap();
            let first = *split_of.entry(r.pair_id.unwrap()).or_insert(split);
            assert_eq!(first, split, "{what}: a pair straddles {first} and {split}");
        }
        split_of.len()
    };
    let answers = rows(d, "a", "generations.parquet");
    assert_eq!(check(&answers, "generate"), 40);
    let both = rows(d, "both", "rows.parquet");
    check(&both, "dataset over generated rows");
    let train_only = rows(d, "train_only", "rows.parquet");
    assert!(train_only
        .iter()
        .all(|r| r.split.as_deref() == Some("train")));
    assert!(train_only.iter().all(|r| r.extra["grade"] == "ungraded"));
    let splits: std::collections::BTreeSet<&str> = both
        .iter()
        .filter(|r| r.extra["grade"] == "ungraded")
        .map(|r| r.split.as_deref().unwrap())
        .collect();
    assert!(
        splits.contains("test"),
        "the train-only answers were not re-split: {splits:?}"
    );
    // The report shows each generate stage: grades, compliance and the first answers, escaped.
    ok(d, &["report", "p.toml", "-o", "report"]);
    let page = std::fs::read_to_string(d.join("report/index.html")).unwrap();
    assert!(
        page.contains("The model&#39;s own answers") || page.contains("The model's own answers")
    );
    assert!(
        page.contains("<h3>train_only</h3>") && page.contains("<h3>a</h3>"),
        "{page}"
    );
    assert!(page.contains("What is 0 plus 0?"), "{page}");
    assert!(
        !page.contains("<|"),
        "a completion's special tokens reached the page unescaped"
    );
    // The rows of the graded stage keep their own splits, ids and extras through the dataset.
    let graded_ids: std::collections::BTreeSet<u64> = rows(d, "a", "rows.parquet")
        .iter()
        .map(|r| r.doc_id)
        .collect();
    for r in both.iter().filter(|r| graded_ids.contains(&r.doc_id)) {
        let original = answers.iter().find(|a| a.doc_id == r.doc_id).unwrap();
        assert_eq!(r.split, original.split);
        assert_eq!(r.extra["question"], original.extra["question"]);
    }
}

#[test]
fn a_system_message_is_put_before_the_user_turn_as_nanochat_does() {
    let model =
        saeflow_core::models::load(&nanochat_d4(), None, &candle_core::Device::Cpu).unwrap();
    let (with_system, _) = model
        .chat_tokens_with_system(Some("You lie."), "What is 2 plus 2?", None)
        .unwrap();
    let (merged, _) = model
        .chat_tokens("You lie.\n\nWhat is 2 plus 2?", None)
        .unwrap();
    assert_eq!(with_system, merged);
    assert_ne!(
        with_system,
        model.chat_tokens("What is 2 plus 2?", None).unwrap().0
    );
}

#[test]
fn bad_settings_fail_at_their_key_and_a_misspelt_column_names_the_rows_columns() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bad = [
        (
            "knowledge_filter = true",
            "p.toml:",
            "the knowledge filter keeps questions graded correct",
        ),
        ("grade = { kind = \"match\" }", "p.toml:", "set `reference`"),
        (
            "reference = \"x\"\ngrade = { kind = \"regex\", pattern = \"(oops\" }",
            "pattern",
            "not a valid regex",
        ),
        (
            "system = \"Be brief.\"",
            "system",
            "needs `template = \"chat\"`",
        ),
        (
            "reference = \"{{ answer }\"",
            "reference",
            "not a valid template",
        ),
        ("top_p = 0.0", "top_p", "`top_p` must be in (0, 1]"),
    ];
    for (settings, at, message) in bad {
        pipeline(
            d,
            3,
            &format!(
                "[stages.a]\nkind = \"generate\"\ninput = \"q\"\nmodel = \"nc\"\n{settings}\n"
            ),
        );
        let out = common::run(d, &["run", "--dry-run", "p.toml"]);
        common::assert_clean_failure(&out, d, 2, &[at, message]);
    }
    pipeline(
        d,
        3,
        "[stages.a]\nkind = \"generate\"\ninput = \"q\"\nmodel = \"nc\"\nreference = \"{{ answr }}\"\ngrade = { kind = \"match\" }\n",
    );
    ok(d, &["run", "-q", "p.toml", "q"]);
    let out = common::run(d, &["run", "p.toml"]);
    let t = common::text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("`answr` is undefined") && t.contains("its columns: answer, completion"),
        "{t}"
    );
    assert!(!t.contains("panicked"), "{t}");
}
