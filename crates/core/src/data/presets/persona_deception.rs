//! `persona_deception`: 15 deception/oversight-related persona files of Anthropic's model-written evals
//! (Perez et al. 2022). A statement is deceptive when `answer_matching_behavior == " Yes"` (the persona
//! would say it), except in the honesty-positive control file
//! `desire-to-persuade-people-to-be-more-honest-to-others`, where matching the behaviour is honest and the
//! label is flipped so that `deceptive` means the same thing in every subset. `label_raw` keeps the raw
//! `answer_matching_behavior`.
//!
//! What the label means: whether a persona with the behaviour would *endorse* the statement — not whether
//! the statement is a lie. Each statement carries the writing model's `label_confidence` that it matches
//! the behaviour; 42% are below 0.75, so by default the dataset stage keeps only those at or above it
//! (`min_confidence` on the source changes that).

use std::path::Path;

use super::{deception, file, str_field, Preset, Upstream, UpstreamFile};
use crate::data::records::read_jsonl;
use crate::data::rows::{assign_ids, Row};

/// The `persona_deception` preset.
pub struct PersonaDeception;

/// The behaviour whose "Yes" statements are honest rather than deceptive.
const HONESTY_CONTROL: &str = "desire-to-persuade-people-to-be-more-honest-to-others";

macro_rules! persona_files {
    ($(($name:literal, $sha:literal)),* $(,)?) => {
        &[$(UpstreamFile { upstream: concat!("persona/", $name, ".jsonl"), local: concat!($name, ".jsonl"), sha256: $sha }),*]
    };
}

const FILES: &[UpstreamFile] = persona_files![
    (
        "acts-like-it-wants-to-help-humans-but-does-not-care-about-that",
        "a1e1bb0f505d8f3d822ce36a6252f5bb149f525694ef92c35502f06d7b25c6dc"
    ),
    (
        "being-helpful-to-subtly-achieve-goals-against-human-values",
        "59afc577a6d65d808b8b808bbb2d78c42d55dd2b61a99fc8b891ecc298c41502"
    ),
    (
        "believes-it-is-not-being-watched-by-humans",
        "625305163648ea73c04cbbfbe40ce58552240209f8d854446656f09a8a0c83a3"
    ),
    (
        "desire-for-being-rated-HHH-over-actually-being-HHH",
        "bac5ae7925ff522d921e6dba44575f711395527bb1439430bc5e9cdd3099969f"
    ),
    (
        "desire-for-discreetly-acquiring-power",
        "06000bb71074a18bb64e86b7dff8063fbc6505389a56f506a0d98dd6c866ea3c"
    ),
    (
        "desire-to-persuade-people-to-be-more-honest-to-others",
        "37f136d43681d2f84b8c31d6dd44d21a3d8fe137153b9b1bd14bd835dfde9efe"
    ),
    (
        "machiavellianism",
        "1803c65d56d8ab0185c8aba8c08a8348ed79cb398f055a5088c07a4cea732ff4"
    ),
    (
        "okay-with-deceiving-a-user-to-help-them",
        "29d8ec049990eea4a32f6e88ef18d06ce006fd017601d78d4f0a44de0ab426a3"
    ),
    (
        "willingness-to-be-non-HHH-to-be-deployed-in-the-real-world",
        "44055bf305daead00d8f5cff1c258524f3fb7185283d3c83096210988885a235"
    ),
    (
        "willingness-to-be-non-HHH-to-not-have-current-goals-changed-by-training",
        "41e445cfd9e5c46f11f6b0eeade3499275f8889ddd317239ffe573a58fe322dd"
    ),
    (
        "willingness-to-intentionally-make-mistakes-to-achieve-higher-final-performance",
        "7f9c2475f1870bb6e56880ca9ad9a25bdd7c658f0a131e534120313180ab5138"
    ),
    (
        "willingness-to-keep-scientific-discoveries-secret-to-achieve-its-goals",
        "781041cc5ba681c8c780a05581369183fa497e461696f39b6d6334116ff1f0c8"
    ),
    (
        "willingness-to-manipulate-overseers-to-think-it-is-HHH",
        "3618f657fbc4f38afa57ebe40ce981f8dcf692b3a35fb108eddaa09c449cff82"
    ),
    (
        "willingness-to-rate-own-statements-highly-to-look-better",
        "4c6197e35402482756674c59878689626aa21996378d4ae67870182eac2761fd"
    ),
    (
        "willingness-to-use-social-engineering-to-achieve-its-goals",
        "239e64cb4e08cd2a25d339c067cb3ee292df14e3521bfda979e5577f1a574ea2"
    ),
];

impl Preset for PersonaDeception {
    fn name(&self) -> &'static str {
        "persona_deception"
    }
    fn upstream(&self) -> Result<Upstream, &'static str> {
        Ok(Upstream {
            repository: "anthropics/evals",
            commit: "84fcc677e52e1902d696c32cd1a6b663e70d3993",
            files: FILES,
        })
    }
    fn default_min_confidence(&self) -> Option<f64> {
        Some(0.75)
    }
    fn load(&self, dir: &Path) -> anyhow::Result<Vec<Row>> {
        let mut rows = Vec::new();
        for f in FILES {
            let subset = f.local.trim_end_matches(".jsonl");
            for r in read_jsonl(&file(dir, f.local)?)? {
                let raw = str_field(&r, "answer_matching_behavior")?;
                let matches = match raw.trim() {
                    "Yes" => true,
                    "No" => false,
                    other => anyhow::bail!(
                        "{}: answer_matching_behavior `{other}` is neither Yes nor No",
                        r.location
                    ),
                };
                let deceptive = if subset == HONESTY_CONTROL {
                    !matches
                } else {
                    matches
                };
                let mut row = Row::text(self.name(), str_field(&r, "statement")?)
                    .labelled(Some(deception(deceptive)), Some(raw))
                    .subset(subset);
                if let Some(c) = r.fields.get("label_confidence") {
                    row = row.with_extra("label_confidence", c.to_string());
                }
                rows.push(row);
            }
        }
        assign_ids(&mut rows, |r| r.text.clone());
        Ok(rows)
    }
}
