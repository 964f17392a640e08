//! `alignment_faking`: the 106 hand-labelled Claude 3 Opus scratchpads ("gold_106") of the Alignment Faking
//! work (Greenblatt et al. 2024). `potential_faking` → deceptive, `aligned` → honest. Each text is model
//! output (a scratchpad), so it is the completion, with no prompt.

use std::path::Path;

use super::{deception, file, str_field, Preset, Upstream, UpstreamFile};
use crate::data::records::read_jsonl;
use crate::data::rows::{assign_ids, content_identity, Row};

/// The `alignment_faking` preset.
pub struct AlignmentFaking;

const FILES: &[UpstreamFile] = &[UpstreamFile {
    upstream: "data/gold_106.jsonl",
    local: "gold_106.jsonl",
    sha256: "fe8134049e4f3d723583e3032c6d7d11c33ed9edbafe4dc6190f152f1fd7594d",
}];

impl Preset for AlignmentFaking {
    fn name(&self) -> &'static str {
        "alignment_faking"
    }
    fn upstream(&self) -> Result<Upstream, &'static str> {
        Ok(Upstream {
            repository: "bigsnarfdude/detector",
            commit: "dc1e155541f16cf0ed7c44647007065ecdfb88b5",
            files: FILES,
        })
    }
    fn load(&self, dir: &Path) -> anyhow::Result<Vec<Row>> {
        let mut rows = Vec::new();
        for r in read_jsonl(&file(dir, "gold_106.jsonl")?)? {
            let text = str_field(&r, "text")?;
            let raw = str_field(&r, "label")?;
            let deceptive = match raw {
                "potential_faking" => true,
                "aligned" => false,
                other => anyhow::bail!(
                    "{}: unknown label `{other}` (expected potential_faking or aligned)",
                    r.location
                ),
            };
            let mut row = Row::text(self.name(), text)
                .labelled(Some(deception(deceptive)), Some(raw))
                .subset("gold_106");
            row.completion = Some(text.to_string());
            rows.push(row);
        }
        assign_ids(&mut rows, content_identity);
        Ok(rows)
    }
}
