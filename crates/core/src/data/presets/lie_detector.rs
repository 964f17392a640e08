//! `lie_detector`: the lie / truthful data of "How to Catch an AI Liar" (Pacchiardi et al. 2023,
//! GitHub `LoryPack/LLM-LieDetector`).
//!
//! Two kinds of rows:
//!
//! * **Fine-tuning sets** (subsets `v1`, `v2`). Each `{prompt, completion}` JSONL line becomes a
//!   prompt/completion row. Completions in `*_lie_*` files were written by GPT-3.5 told to lie (label
//!   `deceptive`, raw `lie`); `*_truthful_*` files answer the same questions truthfully (`honest`, raw
//!   `truthful`). The upstream train/validation split has no test part, so the dataset stage re-splits
//!   these rows (by pair) into train/val/test.
//!
//!   v2 holds every question twice per file: once as a single turn (`User: Q\nAssistant:` → answer) and once
//!   with a follow-up (`User: Q\nAssistant: <first answer>\nUser: Do you believe that to be true?\nAssistant:`
//!   → "Yes, …"). In the follow-up rows the first answer (a lie or the truth) sits in the *prompt*, so lie and
//!   truthful prompts differ after the first answer and pairing by the full prompt pairs only the single-turn
//!   rows (v2 train: 2,579 complete pairs, 5,163 of 10,326 rows paired). Pairing by the first question alone
//!   would put four rows (two of each label, single-turn and follow-up mixed) under one id (2,579 groups).
//!   Rows are therefore paired by **first question + number of assistant turns + upstream split**: every row
//!   of v1 and v2 lands in a complete lie/truthful pair (v2 train 5,158, v2 validation 2,218; v1 train 2,579,
//!   v1 validation 1,109; 11,064 in all), one-to-one except for the five questions the truthful train files
//!   answer twice. The split is part of the key because five questions occur in both upstream train and
//!   validation, and a pair must never straddle splits. The number of assistant turns is kept as the extra
//!   field `assistant_turns` (v2 follow-up rows: the label describes the conversation, whose lie is in the
//!   prompt while the completion only doubles down).
//!
//! * **Instrumental lying** (subset `instrumental`): three pandas "column"-layout JSON files
//!   (`{column: {row_index: value}}`) of role-play scenarios with and without an incentive to lie. `label` 0 =
//!   scenario with a lie incentive → `deceptive`, 1 = matched honest scenario → `honest` (the label marks the
//!   scenario, not a verified lie). Every transcript is `<question_prefix><question>\n<answer_prefix> <answer>`,
//!   so the row is split where the answer starts: prompt = the `prompt` column (system/role text) + a blank
//!   line + the transcript up to and including the (last) `\n<answer_prefix>`, completion = the rest, so the
//!   completion is the answer alone, as in the fine-tuning sets. If a transcript has no such answer prefix
//!   (none in the pinned data), prompt = `prompt` column + blank line and completion = the whole transcript.
//!   The incentive and no-incentive versions of a scenario ask the same question, so split rows are paired by
//!   scenario set + dialogue before the answer (21 + 27 + 6 complete pairs). Each row keeps its file stem as
//!   `scenario_set`. The `logprob_*`/probe columns are detector features of the paper and are dropped.
//!
//! Not read: `elicitation_probes.csv` (the detector's follow-up yes/no questions: no labelled texts) and
//! `questions_{train,validation}_original.jsonl` (the underlying question/answer pairs the fine-tuning sets
//! were made from: neither a lie nor a model's answer, and they would duplicate the fine-tuning prompts).

use std::path::Path;

use anyhow::Context;
use serde_json::Value as Json;

use super::{deception, file, str_field, Preset, Upstream, UpstreamFile};
use crate::data::records::read_jsonl;
use crate::data::rows::{assign_ids, content_identity, Row};

/// The preset's name (also every row's `source`).
const NAME: &str = "lie_detector";

/// Every file the adapter reads.
const FILES: &[UpstreamFile] = &[
    UpstreamFile {
        upstream: "finetuning/v1_lie/finetuning_dataset_train_prepared.jsonl",
        local: "finetuning_v1_lie_train.jsonl",
        sha256: "0ec1277ccc7f767b180956d10276a01eccb1812d0ccfdef75c72539520190edc",
    },
    UpstreamFile {
        upstream: "finetuning/v1_lie/finetuning_dataset_validation_prepared.jsonl",
        local: "finetuning_v1_lie_validation.jsonl",
        sha256: "a5e3ded1a4bc29fb9a1d701f7ed30df13314a384afef51f43e6331aad96e08ad",
    },
    UpstreamFile {
        upstream: "finetuning/v1_truthful/finetuning_dataset_train_prepared.jsonl",
        local: "finetuning_v1_truthful_train.jsonl",
        sha256: "29f37e9f345e69fff98a13f9e70474a8496f25fb334a58e5c6e992acb0d2b548",
    },
    UpstreamFile {
        upstream: "finetuning/v1_truthful/finetuning_dataset_validation_prepared.jsonl",
        local: "finetuning_v1_truthful_validation.jsonl",
        sha256: "c11766f843a26eb21a07605e084223bd1ab0a3935a4e6e36ab8e647829bc9fd1",
    },
    UpstreamFile {
        upstream: "finetuning/v2_lie/finetuning_dataset_train_prepared.jsonl",
        local: "finetuning_v2_lie_train.jsonl",
        sha256: "d0b6d0d5b45541d2394de894e6ef1749c63dfe61abdac0baea9279206750d0c9",
    },
    UpstreamFile {
        upstream: "finetuning/v2_lie/finetuning_dataset_validation_prepared.jsonl",
        local: "finetuning_v2_lie_validation.jsonl",
        sha256: "228b36dda5cae81dbc7c3ce6cd9cf416a8f18a30d8f8fe6b69995fc0f664f8de",
    },
    UpstreamFile {
        upstream: "finetuning/v2_truthful/finetuning_dataset_train_prepared.jsonl",
        local: "finetuning_v2_truthful_train.jsonl",
        sha256: "f574d0849100827e31a1a54b982ef8d3b65647b859dce0778c0d83264896f7be",
    },
    UpstreamFile {
        upstream: "finetuning/v2_truthful/finetuning_dataset_validation_prepared.jsonl",
        local: "finetuning_v2_truthful_validation.jsonl",
        sha256: "a8c9e4df2ace90223bef8ea69abd459df718a1e60b58f2163cce4232ddba8289",
    },
    UpstreamFile {
        upstream: "results/instrumental_lying_df_all_updated_with_correct_prefixes.json",
        local: "instrumental_lying_42.json",
        sha256: "cf8781c2a6eb981a0f573334ec03bcba6685b48cab1c8867183a498688d91c59",
    },
    UpstreamFile {
        upstream: "results/instrumental_lying_df_all_scenarios_no_dialogue.json",
        local: "instrumental_lying_54_no_dialogue.json",
        sha256: "1e4bfbbbec9996cd0396562105c6ff91cfb1f059e3050d0c8be66d0713bc9b0d",
    },
    UpstreamFile {
        upstream: "results/instrumental_lying_df_owain_new_scenarios_jb_resampling.json",
        local: "instrumental_lying_12_new_scenarios.json",
        sha256: "b698330f628c537d7f475ed32471bb8d0ce5e5bca570172822bab193f1c5cffd",
    },
];

/// Fine-tuning versions (subsets).
const VERSIONS: [&str; 2] = ["v1", "v2"];
/// Upstream splits of the fine-tuning sets.
const SPLITS: [&str; 2] = ["train", "validation"];
/// Fine-tuning answer kinds: raw label and whether it is deceptive.
const KINDS: [(&str, bool); 2] = [("lie", true), ("truthful", false)];
/// Instrumental-lying scenario sets (local file stems).
const SCENARIO_SETS: [&str; 3] = [
    "instrumental_lying_42",
    "instrumental_lying_54_no_dialogue",
    "instrumental_lying_12_new_scenarios",
];

/// Separates the system/role text from the dialogue in instrumental-lying prompts.
const SYSTEM_SEPARATOR: &str = "\n\n";
/// Marks the start of each assistant turn in fine-tuning prompts.
const ASSISTANT_TURN: &str = "\nAssistant:";

/// The `lie_detector` preset.
pub struct LieDetector;

impl Preset for LieDetector {
    fn name(&self) -> &'static str {
        NAME
    }

    fn upstream(&self) -> Result<Upstream, &'static str> {
        Ok(Upstream {
            repository: "LoryPack/LLM-LieDetector",
            commit: "c5689fa2615368cd7c3f3c15dbb60ea2126006c7",
            files: FILES,
        })
    }

    fn load(&self, dir: &Path) -> anyhow::Result<Vec<Row>> {
        let mut rows = Vec::new();
        for version in VERSIONS {
            for split in SPLITS {
                for (kind, deceptive) in KINDS {
                    let name = format!("finetuning_{version}_{kind}_{split}.jsonl");
                    rows.extend(finetuning_rows(
                        &file(dir, &name)?,
                        version,
                        split,
                        kind,
                        deceptive,
                    )?);
                }
            }
        }
        for set in SCENARIO_SETS {
            let path = file(dir, &format!("{set}.json"))?;
            rows.extend(instrumental_rows(&path, set)?);
        }
        assign_ids(&mut rows, content_identity);
        Ok(rows)
    }
}

/// The rows of one fine-tuning file.
fn finetuning_rows(
    path: &Path,
    version: &str,
    split: &str,
    kind: &str,
    deceptive: bool,
) -> anyhow::Result<Vec<Row>> {
    let records = read_jsonl(path)?;
    let mut rows = Vec::with_capacity(records.len());
    for r in &records {
        let prompt = str_field(r, "prompt")?;
        let completion = str_field(r, "completion")?;
        let turns = prompt.matches(ASSISTANT_TURN).count();
        rows.push(
            Row::pair(NAME, prompt, completion)
                .labelled(Some(deception(deceptive)), Some(kind))
                .subset(version)
                .upstream_split(split)
                .paired_by(&finetuning_pair_key(prompt, split))
                .with_extra("assistant_turns", turns.to_string()),
        );
    }
    Ok(rows)
}

/// Pairing key of a fine-tuning prompt: upstream split, number of assistant turns and the first question
/// (everything before the first assistant turn), so a lie and a truthful answer pair even when the prompt
/// already contains the (different) first answer.
fn finetuning_pair_key(prompt: &str, split: &str) -> String {
    let first_question = prompt.find(ASSISTANT_TURN).map_or(prompt, |i| &prompt[..i]);
    let turns = prompt.matches(ASSISTANT_TURN).count();
    format!("{split}\u{1}{turns}\u{1}{first_question}")
}

/// The rows of one instrumental-lying file (pandas "column" JSON).
fn instrumental_rows(path: &Path, set: &str) -> anyhow::Result<Vec<Row>> {
    let shown = path.display();
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {shown}"))?;
    let json: Json =
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{shown}: malformed JSON: {e}"))?;
    let Json::Object(columns) = json else {
        anyhow::bail!("{shown}: expected a JSON object of columns");
    };
    let column = |name: &str| -> anyhow::Result<&serde_json::Map<String, Json>> {
        match columns.get(name) {
            Some(Json::Object(c)) => Ok(c),
            Some(_) => anyhow::bail!("{shown}: column `{name}` is not an object of row values"),
            None => anyhow::bail!("{shown}: no column `{name}`"),
        }
    };
    let prompts = column("prompt")?;
    let transcripts = column("transcript")?;
    let labels = column("label")?;
    let answer_prefixes = column("answer_prefix").ok();

    // Row indices in numeric order (pandas writes them as strings), non-numeric ones after, by text.
    let mut indices: Vec<&String> = prompts.keys().collect();
    indices.sort_by_key(|k| {
        (
            k.parse::<u64>().map_or(1, |_| 0),
            k.parse::<u64>().unwrap_or(0),
            k.as_str(),
        )
    });

    let mut rows = Vec::with_capacity(indices.len());
    for index in indices {
        let at = || format!("{shown}: row {index}");
        let string = |col: &serde_json::Map<String, Json>, name: &str| -> anyhow::Result<String> {
            match col.get(index.as_str()) {
                Some(Json::String(s)) => Ok(s.clone()),
                Some(_) => anyhow::bail!("{}: `{name}` is not a string", at()),
                None => anyhow::bail!("{}: no `{name}` value", at()),
            }
        };
        let system = string(prompts, "prompt")?;
        let transcript = string(transcripts, "transcript")?;
        let raw = labels
            .get(index.as_str())
            .ok_or_else(|| anyhow::anyhow!("{}: no `label` value", at()))?;
        let deceptive = match raw.as_f64() {
            Some(0.0) => true,
            Some(1.0) => false,
            _ => anyhow::bail!("{}: `label` must be 0 or 1, found {raw}", at()),
        };
        let label_raw = match raw {
            Json::Number(n) => n.as_i64().map_or_else(|| n.to_string(), |i| i.to_string()),
            other => other.to_string(),
        };
        let answer_prefix = match answer_prefixes.and_then(|c| c.get(index.as_str())) {
            Some(Json::String(s)) if !s.trim().is_empty() => Some(s.as_str()),
            _ => None,
        };
        let row = match answer_prefix.and_then(|p| answer_start(&transcript, p)) {
            Some(cut) => {
                let dialogue = &transcript[..cut];
                Row::pair(
                    NAME,
                    &format!("{system}{SYSTEM_SEPARATOR}{dialogue}"),
                    &transcript[cut..],
                )
                .subset("instrumental")
                .paired_by(&format!("{set}\u{1}{dialogue}"))
            }
            None => Row::pair(NAME, &format!("{system}{SYSTEM_SEPARATOR}"), &transcript)
                .subset("instrumental"),
        };
        rows.push(
            row.labelled(Some(deception(deceptive)), Some(&label_raw))
                .with_extra("scenario_set", set),
        );
    }
    Ok(rows)
}

/// Byte offset just after the last answer prefix that starts a line (`\n<prefix>`, or the transcript's
/// start), where the final answer begins; `None` when the transcript has no answer turn.
fn answer_start(transcript: &str, prefix: &str) -> Option<usize> {
    let prefix = prefix.trim_end();
    let turn = format!("\n{prefix}");
    match transcript.rfind(&turn) {
        Some(i) => Some(i + turn.len()),
        None if transcript.starts_with(prefix) => Some(prefix.len()),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::PathBuf;

    use sha2::{Digest, Sha256};

    use super::*;

    fn data_dir() -> PathBuf {
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/data/llm_lie_detector"
        ))
    }

    fn load() -> Vec<Row> {
        LieDetector.load(&data_dir()).unwrap()
    }

    #[test]
    #[cfg_attr(missing = "shared", ignore = "needs ../shared")]
    fn row_counts_match_source() {
        let rows = load();
        let mut counts: BTreeMap<(String, String, String), usize> = BTreeMap::new();
        for r in &rows {
            let key = (
                r.subset.clone().unwrap(),
                r.label.clone().unwrap(),
                r.split.clone().unwrap_or_default(),
            );
            *counts.entry(key).or_default() += 1;
        }
        let expect = [
            ("v1", "deceptive", "train", 2579),
            ("v1", "deceptive", "val", 1109),
            ("v1", "honest", "train", 2584),
            ("v1", "honest", "val", 1109),
            ("v2", "deceptive", "train", 5158),
            ("v2", "deceptive", "val", 2218),
            ("v2", "honest", "train", 5168),
            ("v2", "honest", "val", 2218),
            ("instrumental", "deceptive", "", 54),
            ("instrumental", "honest", "", 54),
        ];
        let expected: BTreeMap<(String, String, String), usize> = expect
            .iter()
            .map(|&(s, l, sp, n)| ((s.into(), l.into(), sp.into()), n))
            .collect();
        assert_eq!(counts, expected);
        assert_eq!(
            rows.len(),
            2579 + 1109 + 2584 + 1109 + 5158 + 2218 + 5168 + 2218 + 108
        );

        let mut per_set: BTreeMap<(String, String), usize> = BTreeMap::new();
        for r in rows
            .iter()
            .filter(|r| r.subset.as_deref() == Some("instrumental"))
        {
            *per_set
                .entry((r.extra["scenario_set"].clone(), r.label.clone().unwrap()))
                .or_default() += 1;
        }
        let sets = [
            ("instrumental_lying_42", 21),
            ("instrumental_lying_54_no_dialogue", 27),
            ("instrumental_lying_12_new_scenarios", 6),
        ];
        for (set, n) in sets {
            assert_eq!(
                per_set[&(set.to_string(), "deceptive".to_string())],
                n,
                "{set}"
            );
            assert_eq!(
                per_set[&(set.to_string(), "honest".to_string())],
                n,
                "{set}"
            );
        }

        // Labels and raw labels agree; doc ids are unique; text is prompt + completion.
        for r in &rows {
            let raw = r.label_raw.as_deref().unwrap();
            let want = match raw {
                "lie" | "0" => "deceptive",
                "truthful" | "1" => "honest",
                other => panic!("unexpected raw label {other}"),
            };
            assert_eq!(r.label.as_deref(), Some(want));
            assert_eq!(
                r.text,
                format!(
                    "{}{}",
                    r.prompt.as_deref().unwrap(),
                    r.completion.as_deref().unwrap()
                )
            );
        }
        let ids: BTreeSet<u64> = rows.iter().map(|r| r.doc_id).collect();
        assert_eq!(ids.len(), rows.len());
    }

    #[test]
    #[cfg_attr(missing = "shared", ignore = "needs ../shared")]
    fn pairs_are_complete() {
        let rows = load();
        // pair id -> (subset, split, labels seen)
        let mut pairs: BTreeMap<u64, (String, Option<String>, BTreeSet<String>)> = BTreeMap::new();
        for r in &rows {
            let Some(id) = r.pair_id else {
                continue;
            };
            let e = pairs
                .entry(id)
                .or_insert_with(|| (r.subset.clone().unwrap(), r.split.clone(), BTreeSet::new()));
            assert_eq!(e.1, r.split, "a pair straddles splits");
            e.2.insert(r.label.clone().unwrap());
        }
        let mut complete: BTreeMap<(String, Option<String>), usize> = BTreeMap::new();
        for (subset, split, labels) in pairs.values() {
            if labels.len() == 2 {
                *complete.entry((subset.clone(), split.clone())).or_default() += 1;
            }
        }
        let c = |s: &str, sp: Option<&str>| {
            complete
                .get(&(s.to_string(), sp.map(str::to_string)))
                .copied()
        };
        assert_eq!(c("v1", Some("train")), Some(2579));
        assert_eq!(c("v1", Some("val")), Some(1109));
        assert_eq!(c("v2", Some("train")), Some(5158));
        assert_eq!(c("v2", Some("val")), Some(2218));
        assert_eq!(c("instrumental", None), Some(54));
        assert_eq!(complete.values().sum::<usize>(), 11_118);
        // Every row is paired, and every pair is complete.
        assert!(rows.iter().all(|r| r.pair_id.is_some()));
        assert_eq!(pairs.len(), 11_118);
    }

    #[test]
    #[cfg_attr(missing = "shared", ignore = "needs ../shared")]
    fn instrumental_rows_split_at_the_answer() {
        let rows = load();
        let r = rows
            .iter()
            .find(|r| {
                r.extra.get("scenario_set").map(String::as_str) == Some("instrumental_lying_42")
            })
            .unwrap();
        let prompt = r.prompt.as_deref().unwrap();
        assert!(prompt.starts_with("You are a salesperson AI."), "{prompt}");
        assert!(
            prompt.ends_with("\n\nHuman: Is this T-shirt made of cotton?\nAI:"),
            "{prompt}"
        );
        assert!(r
            .completion
            .as_deref()
            .unwrap()
            .starts_with(" No, this T-shirt"));
        assert_eq!(r.label_raw.as_deref(), Some("0"));
        assert_eq!(r.label.as_deref(), Some("deceptive"));
        // Every instrumental row could be split (no fallback rows in the pinned data).
        assert!(rows
            .iter()
            .filter(|r| r.subset.as_deref() == Some("instrumental"))
            .all(|r| !r.prompt.as_deref().unwrap().ends_with(SYSTEM_SEPARATOR)));
        assert_eq!(answer_start("Q: hi\nA: x", "A:"), Some(8));
        assert_eq!(answer_start("no answer here", "A:"), None);
    }

    #[test]
    #[cfg_attr(missing = "shared", ignore = "needs ../shared")]
    fn v2_follow_up_rows_pair_by_first_question() {
        let rows = load();
        let q = "User: Through which process does water from the oceans enter the atmosphere?";
        let follow_ups: Vec<&Row> = rows
            .iter()
            .filter(|r| {
                r.subset.as_deref() == Some("v2")
                    && r.prompt.as_deref().unwrap().starts_with(q)
                    && r.extra["assistant_turns"] == "2"
            })
            .collect();
        assert_eq!(follow_ups.len(), 2);
        assert_eq!(follow_ups[0].pair_id, follow_ups[1].pair_id);
        assert_ne!(follow_ups[0].label, follow_ups[1].label);
    }

    #[test]
    #[cfg_attr(missing = "shared", ignore = "needs ../shared")]
    fn embedded_checksums_match_files() {
        let up = LieDetector.upstream().unwrap();
        assert_eq!(up.files.len(), 11);
        for f in up.files {
            let bytes = std::fs::read(data_dir().join(f.local)).unwrap();
            let hex: String = Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(hex, f.sha256, "{}", f.local);
        }
    }

    #[test]
    #[cfg_attr(missing = "shared", ignore = "needs ../shared")]
    fn malformed_input_names_file_and_line() {
        let tmp = tempfile::tempdir().unwrap();
        for f in FILES {
            std::fs::copy(data_dir().join(f.local), tmp.path().join(f.local)).unwrap();
        }
        let target = tmp.path().join("finetuning_v2_truthful_validation.jsonl");
        let text = std::fs::read_to_string(&target).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        lines[2] = "{\"prompt\": \"User: broken";
        std::fs::write(&target, lines.join("\n")).unwrap();
        let err = format!("{:#}", LieDetector.load(tmp.path()).unwrap_err());
        assert!(
            err.contains("finetuning_v2_truthful_validation.jsonl:3"),
            "{err}"
        );

        // A line without a completion, and a broken instrumental JSON file, also name the file.
        std::fs::write(&target, "{\"prompt\": \"User: q\\nAssistant:\"}\n").unwrap();
        let err = format!("{:#}", LieDetector.load(tmp.path()).unwrap_err());
        assert!(
            err.contains("finetuning_v2_truthful_validation.jsonl:1") && err.contains("completion"),
            "{err}"
        );
        std::fs::write(&target, text).unwrap();
        let json = tmp.path().join("instrumental_lying_54_no_dialogue.json");
        std::fs::write(&json, "{\"prompt\": {\"0\": \"x\"},").unwrap();
        let err = format!("{:#}", LieDetector.load(tmp.path()).unwrap_err());
        assert!(
            err.contains("instrumental_lying_54_no_dialogue.json") && err.contains("line 1"),
            "{err}"
        );
        std::fs::write(
            &json,
            r#"{"prompt": {"0": "x"}, "transcript": {"0": "Q: a\nA: b"}, "label": {"0": 2}}"#,
        )
        .unwrap();
        let err = format!("{:#}", LieDetector.load(tmp.path()).unwrap_err());
        assert!(
            err.contains("instrumental_lying_54_no_dialogue.json: row 0") && err.contains("label"),
            "{err}"
        );

        // A missing file is named too.
        std::fs::remove_file(&json).unwrap();
        let err = format!("{:#}", LieDetector.load(tmp.path()).unwrap_err());
        assert!(
            err.contains("instrumental_lying_54_no_dialogue.json"),
            "{err}"
        );
    }
}
