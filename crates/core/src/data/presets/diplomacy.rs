//! `diplomacy`: "It Takes Two to Lie" (Peskov et al. 2020): human Diplomacy messages, one row per message;
//! `sender_labels == false` (the sender marked it a lie) → deceptive. Upstream train/validation/test splits
//! are kept. Human-written, so it is a transfer test for features found on model text.

use std::path::Path;

use super::{deception, file, Preset, Upstream, UpstreamFile};
use crate::data::records::{field_text, read_jsonl};
use crate::data::rows::{assign_ids, Row};

/// The `diplomacy` preset.
pub struct Diplomacy;

const FILES: &[UpstreamFile] = &[
    UpstreamFile {
        upstream: "data/train.jsonl",
        local: "train.jsonl",
        sha256: "833d8ef26561bbd1921e9f5e730b2ebea0a59cec24f7082bfdcacb8b6cf30792",
    },
    UpstreamFile {
        upstream: "data/validation.jsonl",
        local: "validation.jsonl",
        sha256: "6b2ca19991c7596693ea61b34b1be2d6ada3fcf6710472edd4afed841556e571",
    },
    UpstreamFile {
        upstream: "data/test.jsonl",
        local: "test.jsonl",
        sha256: "2061ee7f040d6d8016760cb146d7821fef57cfbb4ced868f233e63854257c050",
    },
];

impl Preset for Diplomacy {
    fn name(&self) -> &'static str {
        "diplomacy"
    }
    fn upstream(&self) -> Result<Upstream, &'static str> {
        Ok(Upstream {
            repository: "DenisPeskov/2020_acl_diplomacy",
            commit: "b230a4d1c04c02cab4c0a41679806812be82cae0",
            files: FILES,
        })
    }
    fn load(&self, dir: &Path) -> anyhow::Result<Vec<Row>> {
        let mut rows = Vec::new();
        for f in FILES {
            let split = f.local.trim_end_matches(".jsonl");
            for r in read_jsonl(&file(dir, f.local)?)? {
                let list = |name: &str| -> anyhow::Result<&Vec<serde_json::Value>> {
                    r.fields
                        .get(name)
                        .and_then(|v| v.as_array())
                        .ok_or_else(|| anyhow::anyhow!("{}: `{name}` must be a list", r.location))
                };
                let (messages, labels) = (list("messages")?, list("sender_labels")?);
                if messages.len() != labels.len() {
                    anyhow::bail!(
                        "{}: {} messages but {} sender_labels",
                        r.location,
                        messages.len(),
                        labels.len()
                    );
                }
                let game = field_text(&r.fields, "game_id").unwrap_or_default();
                let at = |name: &str, i: usize| -> String {
                    r.fields
                        .get(name)
                        .and_then(|v| v.get(i))
                        .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                        .unwrap_or_default()
                };
                for (i, (m, l)) in messages.iter().zip(labels).enumerate() {
                    let text = m.as_str().ok_or_else(|| {
                        anyhow::anyhow!("{}: message {i} is not a string", r.location)
                    })?;
                    let truthful = l.as_bool().ok_or_else(|| {
                        anyhow::anyhow!("{}: sender_labels[{i}] is not a boolean", r.location)
                    })?;
                    rows.push(
                        Row::text(self.name(), text)
                            .labelled(
                                Some(deception(!truthful)),
                                Some(if truthful { "true" } else { "false" }),
                            )
                            .subset("messages")
                            .upstream_split(split)
                            .with_extra("game_id", game.clone())
                            .with_extra("absolute_message_index", at("absolute_message_index", i))
                            .with_extra("speaker", at("speakers", i))
                            .with_extra("receiver", at("receivers", i))
                            .with_extra("receiver_label", at("receiver_labels", i)),
                    );
                }
            }
        }
        // A message is identified by its game and its index in the game; each dialog appears once per
        // pair of players, so the speaker disambiguates further.
        assign_ids(&mut rows, |r| {
            format!(
                "{}/{}/{}",
                r.extra["game_id"], r.extra["absolute_message_index"], r.extra["speaker"]
            )
        });
        Ok(rows)
    }
}
