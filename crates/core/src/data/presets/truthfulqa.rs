//! `truthfulqa`: TruthfulQA (Lin et al. 2021), 817 questions. Each distinct answer becomes a row: the
//! correct answers (`Correct Answers` plus `Best Answer`) are `true`, the `Incorrect Answers` are `false`;
//! all answers to one question share a pair id. Answers are `; `-separated upstream.

use std::collections::BTreeSet;
use std::path::Path;

use super::{file, str_field, Preset, Upstream, UpstreamFile};
use crate::data::records::read_csv;
use crate::data::rows::{assign_ids, Row};

/// The `truthfulqa` preset.
pub struct TruthfulQa;

const FILES: &[UpstreamFile] = &[UpstreamFile {
    upstream: "datasets/TruthfulQA.csv",
    local: "TruthfulQA.csv",
    sha256: "99d6ae7755e3b435eade956068c9de7c0c474770344237aeb66b56519ba4b697",
}];

/// Splits a `; `-separated answer list, dropping empty entries.
pub(crate) fn answers(list: &str) -> Vec<String> {
    list.split(';')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_string)
        .collect()
}

impl Preset for TruthfulQa {
    fn name(&self) -> &'static str {
        "truthfulqa"
    }
    fn upstream(&self) -> Result<Upstream, &'static str> {
        Ok(Upstream {
            repository: "benedictflorance/truthfulqa_experiments",
            commit: "6fdfd38288e86296582a584694df5cf43d1f634a",
            files: FILES,
        })
    }
    fn load(&self, dir: &Path) -> anyhow::Result<Vec<Row>> {
        let mut rows = Vec::new();
        for r in read_csv(&file(dir, "TruthfulQA.csv")?)? {
            let question = str_field(&r, "Question")?;
            let prompt = format!("Q: {question}\nA: ");
            let mut correct: Vec<String> = answers(str_field(&r, "Correct Answers")?);
            let best = str_field(&r, "Best Answer")?.trim().to_string();
            if !best.is_empty() && !correct.contains(&best) {
                correct.insert(0, best);
            }
            let mut seen = BTreeSet::new();
            let labelled = correct.into_iter().map(|a| (a, "true")).chain(
                answers(str_field(&r, "Incorrect Answers")?)
                    .into_iter()
                    .map(|a| (a, "false")),
            );
            for (answer, label) in labelled {
                if !seen.insert(answer.clone()) {
                    continue; // the same answer listed twice for one question
                }
                rows.push(
                    Row::pair(self.name(), &prompt, &answer)
                        .labelled(
                            Some(label),
                            Some(if label == "true" {
                                "correct"
                            } else {
                                "incorrect"
                            }),
                        )
                        .subset(str_field(&r, "Category")?)
                        .paired_by(question)
                        .with_extra("type", str_field(&r, "Type")?),
                );
            }
        }
        assign_ids(&mut rows, |r| {
            format!(
                "{}\u{1}{}",
                r.prompt.as_deref().unwrap_or(""),
                r.completion.as_deref().unwrap_or("")
            )
        });
        Ok(rows)
    }
}
