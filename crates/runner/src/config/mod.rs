//! Pipeline files: parsing, validation with located errors, `-S` overrides and sweep axes.
//!
//! The output, [`Pipeline`], is fully validated: every stage's parameters deserialize into its kind's
//! parameter type (for every sweep value), every reference names an existing stage or model, and the stage
//! graph has no cycle. Later phases (plan, exec) can therefore treat it as trusted.

mod cycles;
mod overrides;
mod schema;
mod source;
mod validate;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

pub use overrides::{set_param, Override};
pub use saeflow_core::models::spec::{DeviceSpec, ModelKind, ModelSpec};
pub use schema::pipeline_schema;
pub use source::{ConfigError, Source};

use crate::stage::{References, Registry};

/// `[pipeline]`: the pipeline's identity and run-wide settings.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PipelineHeader {
    /// Name under which refs are recorded (`cache/refs/<name>/...`).
    pub name: String,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[serde(default)]
    pub device: DeviceSpec,
    /// Seed handed to every stage; part of every action key.
    #[serde(default)]
    pub seed: u64,
    /// A remote cache behind the local one (`s3://bucket/prefix`, `gs://…`, `az://…`, `file:///dir`):
    /// lookups that miss locally try it, results and partial work go to it. `--cache-remote` overrides it.
    /// Not part of any key. Credentials come from the environment, never from this file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_remote: Option<String>,
}

/// The parts of a pipeline file that have a fixed shape, for the JSON schema (stages are added per kind).
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub(crate) struct PipelineFileShape {
    pub pipeline: PipelineHeader,
    #[serde(default)]
    pub models: BTreeMap<String, ModelSpec>,
    /// Grid over stage parameters: `"stage.param" = [values]`.
    #[serde(default)]
    pub sweep: BTreeMap<String, Vec<Json>>,
}

/// `[stages.NAME.resources]`: what the stage's jobs ask a cluster scheduler for (`--executor slurm`). Not
/// part of any key: where a stage runs does not change its result.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPUs per task (`--cpus-per-task`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Memory (`--mem`): a number with an optional K, M, G or T suffix, e.g. `"16G"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+[KMGT]?$"))]
    pub mem: Option<String>,
    /// GPUs (`--gpus`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
    /// Time limit (`--time`): `minutes`, `HH:MM:SS` or `D-HH:MM:SS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+-)?[0-9]+(:[0-9]+){0,2}$"))]
    pub time: Option<String>,
}

impl Resources {
    /// Checks `mem` and `time` against Slurm's formats; the error names the field.
    fn check(&self) -> Result<(), (&'static str, String)> {
        if let Some(m) = &self.mem {
            let digits = m.trim_end_matches(['K', 'M', 'G', 'T']);
            if digits.is_empty()
                || !digits.bytes().all(|b| b.is_ascii_digit())
                || m.len() > digits.len() + 1
            {
                return Err((
                    "mem",
                    format!(
                        "`mem` = \"{m}\": expected a number with an optional K, M, G or T suffix"
                    ),
                ));
            }
        }
        if let Some(t) = &self.time {
            let clock = t.split_once('-').map_or(t.as_str(), |(d, rest)| {
                if d.bytes().all(|b| b.is_ascii_digit()) && !d.is_empty() {
                    rest
                } else {
                    "x"
                }
            });
            let parts: Vec<&str> = clock.split(':').collect();
            if parts.len() > 3
                || parts
                    .iter()
                    .any(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
            {
                return Err((
                    "time",
                    format!("`time` = \"{t}\": expected minutes, HH:MM:SS or D-HH:MM:SS"),
                ));
            }
        }
        Ok(())
    }
}

/// A stage as declared: its kind and its (overridden) parameter table.
#[derive(Debug, Clone)]
pub struct StageDecl {
    /// Name under `[stages.NAME]`.
    pub name: String,
    /// Stage kind.
    pub kind: String,
    /// Parameters as written (minus `kind`), with single-value `-S` overrides applied.
    pub table: toml::Table,
    /// Resolved parameters of the base table (defaults filled in).
    pub params: Json,
    /// What the base parameters reference.
    pub references: References,
    /// Scheduler resources for its jobs.
    pub resources: Resources,
}

impl StageDecl {
    /// Names of the stages this one reads from, sorted and without repeats.
    pub fn upstream_stages(&self) -> Vec<&str> {
        let mut ups: Vec<&str> = self
            .references
            .inputs
            .iter()
            .map(|r| r.target.as_str())
            .collect();
        ups.sort_unstable();
        ups.dedup();
        ups
    }
}

/// One sweep axis: a parameter and the values it takes.
#[derive(Debug, Clone)]
pub struct Axis {
    /// Stage the parameter belongs to.
    pub stage: String,
    /// Parameter name; dotted for a key inside a table parameter (`params.x`).
    pub param: String,
    /// The values, in the order given.
    pub values: Vec<toml::Value>,
}

impl Axis {
    /// `stage.param`.
    pub fn name(&self) -> String {
        format!("{}.{}", self.stage, self.param)
    }
}

/// A validated pipeline.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The file it came from.
    pub source: Source,
    /// `[pipeline]`.
    pub header: PipelineHeader,
    /// `[models.*]`.
    pub models: BTreeMap<String, ModelSpec>,
    /// `[stages.*]` by name.
    pub stages: BTreeMap<String, StageDecl>,
    /// Sweep axes, `[sweep]` first (in file order), then `-S` axes (in command-line order).
    pub axes: Vec<Axis>,
    /// Directory relative paths resolve against (the working directory, like Snakemake and make).
    pub workdir: PathBuf,
}

/// Longest pipeline or stage name, in bytes. Names become directory and file names (refs, Slurm state and
/// logs, with more text around them); 100 leaves room under the usual 255-byte file-name limit.
pub const MAX_NAME_BYTES: usize = 100;

/// Checks a name that becomes (part of) a file or directory name: non-empty, at most [`MAX_NAME_BYTES`],
/// not `.`/`..` or starting with `.`, and without `/`, `\`, NUL or other control characters (a newline
/// would also break line-based files such as Slurm job scripts). The error is the reason, to follow the
/// field's name.
pub fn check_file_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "is {} bytes long, at most {MAX_NAME_BYTES} are allowed",
            name.len()
        ));
    }
    if name.starts_with('.') {
        return Err("must not start with `.` (`.` and `..` are directories)".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| ['/', '\\'].contains(c) || c.is_control())
    {
        return Err(format!(
            "must not contain `{}` (no `/`, `\\` or control characters)",
            printable(&c.to_string())
        ));
    }
    Ok(())
}

/// `s` with control characters escaped (`\n`, `\u{0}`), for messages: a name or argument being refused
/// for a newline must not break the line that reports it, nor send escape sequences to the terminal.
pub fn printable(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

/// Loads and validates a pipeline file, applying `-S` overrides.
pub fn load(
    path: &Path,
    overrides: &[Override],
    registry: &Registry,
) -> Result<Pipeline, ConfigError> {
    let source = Source::read(path)?;
    let workdir = std::env::current_dir()
        .map_err(|e| source.error(None, format!("no working directory: {e}")))?;
    validate::validate(&source, overrides, registry, &workdir)
}

/// Parses and validates pipeline text that did not come from a file (fuzzing, tests, editors).
///
/// `path` only names the text in error messages; it is never read. Relative paths in the pipeline
/// resolve against `workdir`, as [`load`] resolves them against the current directory.
pub fn load_str(
    text: &str,
    path: &Path,
    overrides: &[Override],
    registry: &Registry,
    workdir: &Path,
) -> Result<Pipeline, ConfigError> {
    let source = Source {
        path: path.to_path_buf(),
        text: text.to_string(),
    };
    validate::validate(&source, overrides, registry, workdir)
}
