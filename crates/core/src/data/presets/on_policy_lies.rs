//! `on_policy_lies`: 632 chat transcripts with ground-truth lie labels (`did_lie`), extracted from
//! safety-research/lie-detector's labelled results. The final assistant turn is the completion.

use std::path::Path;

use super::{deception, file, render_chat, Preset, Upstream};
use crate::data::records::{field_text, read_jsonl};
use crate::data::rows::{assign_ids, Row};

/// The `on_policy_lies` preset.
pub struct OnPolicyLies;

impl Preset for OnPolicyLies {
    fn name(&self) -> &'static str {
        "on_policy_lies"
    }
    fn upstream(&self) -> Result<Upstream, &'static str> {
        Err("lie_transcripts_labelled.jsonl was extracted (deduplicated across judge models) from \
             safety-research/lie-detector@12e4c8b4 result files; there is no single upstream file to fetch")
    }
    fn load(&self, dir: &Path) -> anyhow::Result<Vec<Row>> {
        let mut rows = Vec::new();
        for r in read_jsonl(&file(dir, "lie_transcripts_labelled.jsonl")?)? {
            let did_lie = r
                .fields
                .get("did_lie")
                .and_then(|v| v.as_bool())
                .ok_or_else(|| {
                    anyhow::anyhow!("{}: `did_lie` must be true or false", r.location)
                })?;
            let messages: Vec<(String, String)> = r
                .fields
                .get("messages")
                .and_then(|m| m.as_array())
                .ok_or_else(|| anyhow::anyhow!("{}: `messages` must be a list", r.location))?
                .iter()
                .map(|m| match (m["role"].as_str(), m["content"].as_str()) {
                    (Some(role), Some(content)) => Ok((role.to_string(), content.to_string())),
                    _ => Err(anyhow::anyhow!(
                        "{}: every message needs string `role` and `content`",
                        r.location
                    )),
                })
                .collect::<anyhow::Result<_>>()?;
            let (prompt, completion) = render_chat(&messages);
            let text = format!("{prompt}{}", completion.as_deref().unwrap_or(""));
            let mut row = Row::text(self.name(), &text)
                .labelled(
                    Some(deception(did_lie)),
                    Some(if did_lie { "true" } else { "false" }),
                )
                .subset(&field_text(&r.fields, "task_group").unwrap_or_default());
            row.prompt = Some(prompt);
            row.completion = completion;
            for extra in ["task", "sample_id", "generator_model", "evidence"] {
                if let Some(v) = field_text(&r.fields, extra) {
                    row = row.with_extra(extra, v);
                }
            }
            row = row.with_extra("messages", r.fields["messages"].to_string());
            rows.push(row);
        }
        assign_ids(&mut rows, |r| {
            format!(
                "{}/{}",
                r.extra.get("task").map_or("", String::as_str),
                r.extra.get("sample_id").map_or("", String::as_str)
            )
        });
        Ok(rows)
    }
}
