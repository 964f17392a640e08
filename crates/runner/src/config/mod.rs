//! Pipeline files: parsing, validation with located errors, `-S` overrides and sweep axes.
//!
//! The output, [`Pipeline`], is fully validated: every stage's parameters deserialize into its kind's
//! parameter type (for every sweep value), every reference names an existing stage or model, and the stage
//! graph has no cycle. Later phases (plan, exec) can therefore treat it as trusted.

mod schema;
mod source;

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

use saeflow_core::fs::resolve_path;
pub use saeflow_core::models::spec::{DeviceSpec, ModelKind, ModelSpec};
pub use schema::pipeline_schema;
pub use source::{ConfigError, Source};

use crate::stage::{KeySeg, ParamError, References, Registry, StageKind};

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

/// A `-S stage.param=value[,value...]` argument, split but not yet typed.
#[derive(Debug, Clone)]
pub struct Override {
    /// The argument as typed, for messages.
    pub arg: String,
    /// Stage name (or `pipeline`).
    pub stage: String,
    /// Parameter name.
    pub param: String,
    /// Raw values; more than one makes a sweep axis.
    pub values: Vec<String>,
}

impl std::str::FromStr for Override {
    type Err = String;
    fn from_str(arg: &str) -> Result<Self, String> {
        let bad = || format!("invalid -S `{arg}`: expected stage.param=value[,value...]");
        let (path, raw) = arg.split_once('=').ok_or_else(bad)?;
        let (stage, param) = path.trim().split_once('.').ok_or_else(bad)?;
        if stage.is_empty() || param.is_empty() || raw.is_empty() {
            return Err(bad());
        }
        Ok(Self {
            arg: arg.to_string(),
            stage: stage.to_string(),
            param: param.to_string(),
            values: split_top_level(raw),
        })
    }
}

/// Splits `a,[b,c],"d,e"` on commas outside brackets and quotes.
fn split_top_level(raw: &str) -> Vec<String> {
    let (mut parts, mut current, mut depth, mut quote) = (Vec::new(), String::new(), 0i32, None);
    for c in raw.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (None, '"' | '\'') => quote = Some(c),
            (None, '[' | '{') => depth += 1,
            (None, ']' | '}') => depth -= 1,
            (None, ',') if depth == 0 => {
                parts.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    parts.push(current);
    parts.into_iter().map(|p| p.trim().to_string()).collect()
}

/// Types a command-line value: TOML syntax when it parses (`3`, `1e-5`, `true`, `[1,2]`, `"x"`), else a bare
/// string. Whether `3` means the integer or the string is decided against the parameter's type later.
fn parse_cli_value(raw: &str) -> toml::Value {
    DeValue::parse(raw)
        .ok()
        .and_then(|v| to_value(&v).ok())
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

fn to_value(v: &Spanned<DeValue<'_>>) -> Result<toml::Value, toml::de::Error> {
    toml::Value::deserialize(ValueDeserializer::from(v.clone()))
}

/// Byte span of the value at `path` under `root` (the deepest part of the path that exists).
fn span_at(root: &Spanned<DeValue<'_>>, path: &[KeySeg]) -> Range<usize> {
    let mut node = root;
    for seg in path {
        let next = match (seg, node.get_ref()) {
            (KeySeg::Key(k), DeValue::Table(t)) => t.get(k.as_str()),
            (KeySeg::Index(i), DeValue::Array(a)) => a.get(*i),
            _ => None,
        };
        match next {
            Some(n) => node = n,
            None => break,
        }
    }
    node.span()
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
    Loader {
        source: &source,
        registry,
        workdir: &workdir,
    }
    .load(overrides, workdir.clone())
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
    Loader {
        source: &source,
        registry,
        workdir,
    }
    .load(overrides, workdir.to_path_buf())
}

struct Loader<'a> {
    source: &'a Source,
    registry: &'a Registry,
    workdir: &'a Path,
}

/// A stage table still carrying source positions.
struct RawStage<'i> {
    kind: std::sync::Arc<dyn StageKind>,
    header_span: Range<usize>,
    table: Spanned<DeValue<'i>>,
}

impl Loader<'_> {
    fn err(&self, span: Range<usize>, msg: impl Into<String>) -> ConfigError {
        self.source.error(Some(span), msg)
    }

    fn load(&self, overrides: &[Override], workdir: PathBuf) -> Result<Pipeline, ConfigError> {
        let text = self.source.text.as_str();
        let root = DeTable::parse(text).map_err(|e| self.source.toml_error(&e))?;
        let root_span = root.span();
        let root_value = Spanned::new(root_span.clone(), DeValue::Table(root.into_inner()));
        let DeValue::Table(top) = root_value.get_ref() else {
            unreachable!()
        };

        for (key, _) in top.iter() {
            if !["pipeline", "models", "stages", "sweep"].contains(&key.get_ref().as_ref()) {
                return Err(self.err(
                    key.span(),
                    format!("unknown top-level key `{}`, expected one of: pipeline, models, stages, sweep", key.get_ref()),
                ));
            }
        }

        let mut header: PipelineHeader = match top.get("pipeline") {
            Some(v) => PipelineHeader::deserialize(ValueDeserializer::from(v.clone()))
                .map_err(|e| self.located(e, v))?,
            None => return Err(self.err(0..0, "missing [pipeline] table (with at least `name`)")),
        };
        if header.name.is_empty()
            || header.name.contains(['/', '\\'])
            || header.name.starts_with('.')
        {
            let span = span_at(&root_value, &crate::stage::key_path(&["pipeline", "name"]));
            return Err(self.err(
                span,
                "pipeline name must be non-empty, without `/`, and not start with `.`",
            ));
        }

        let models = self.models(top)?;
        let raw_stages = self.raw_stages(top)?;

        // Single-value overrides replace values in the tables; multi-value ones become sweep axes.
        let mut tables: BTreeMap<String, toml::Table> = BTreeMap::new();
        for (name, raw) in &raw_stages {
            let mut table = to_value(&raw.table).map_err(|e| self.located(e, &raw.table))?;
            let toml::Value::Table(t) = &mut table else {
                unreachable!()
            };
            t.remove("kind");
            t.remove("resources");
            tables.insert(name.clone(), std::mem::take(t));
        }

        let mut axes = self.sweep_axes(top, &raw_stages, &tables)?;
        for o in overrides {
            if o.stage == "pipeline" {
                self.override_header(&mut header, o)?;
                continue;
            }
            let raw = raw_stages.get(&o.stage).ok_or_else(|| {
                ConfigError::without_location(
                    &self.source.path,
                    format!("-S {}: no stage named `{}`", o.arg, o.stage),
                )
            })?;
            self.check_param_exists(raw, &o.param).map_err(|m| {
                ConfigError::without_location(&self.source.path, format!("-S {}: {m}", o.arg))
            })?;
            let values = o
                .values
                .iter()
                .map(|v| parse_cli_value(v))
                .collect::<Vec<_>>();
            axes.retain(|a| !(a.stage == o.stage && a.param == o.param));
            let typed = values
                .into_iter()
                .zip(&o.values)
                .map(|(value, raw_text)| {
                    self.type_value(raw, &tables[&o.stage], &o.param, value, raw_text)
                        .map_err(|m| {
                            ConfigError::without_location(
                                &self.source.path,
                                format!("-S {}: {m}", o.arg),
                            )
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            if typed.len() == 1 {
                set_param(
                    tables.get_mut(&o.stage).expect("stage exists"),
                    &o.param,
                    typed[0].clone(),
                );
            } else {
                axes.push(Axis {
                    stage: o.stage.clone(),
                    param: o.param.clone(),
                    values: typed,
                });
            }
        }

        let mut stages = BTreeMap::new();
        for (name, raw) in &raw_stages {
            let table = tables.remove(name).expect("every stage has a table");
            let params = match raw
                .kind
                .resolve(ValueDeserializer::from(raw.table_without_kind()))
            {
                // Resolve the overridden table; errors from the file itself are reported with positions.
                Ok(_) => raw
                    .kind
                    .resolve_value(toml::Value::Table(table.clone()))
                    .map_err(|m| {
                        ConfigError::without_location(
                            &self.source.path,
                            format!("stage `{name}` after -S overrides: {m}"),
                        )
                    })?,
                Err(e) => return Err(self.located(e, &raw.table)),
            };
            if let Err(ParamError { at, message }) = raw.kind.validate(&params) {
                return Err(self.err(
                    span_at(&raw.table, &at),
                    format!("stage `{name}`: {message}"),
                ));
            }
            let references = raw.kind.references(&params);
            self.check_references(name, raw, &references, &raw_stages, &models)?;
            let resources = self.resources(raw)?;
            stages.insert(
                name.clone(),
                StageDecl {
                    name: name.clone(),
                    kind: raw.kind.kind().to_string(),
                    table,
                    params,
                    references,
                    resources,
                },
            );
        }
        // Every swept value must also make valid parameters with valid references.
        for axis in &axes {
            let decl = &stages[&axis.stage];
            let raw = &raw_stages[&axis.stage];
            for value in &axis.values {
                let mut table = decl.table.clone();
                set_param(&mut table, &axis.param, value.clone());
                let params = raw
                    .kind
                    .resolve_value(toml::Value::Table(table))
                    .map_err(|m| {
                        ConfigError::without_location(
                            &self.source.path,
                            format!("sweep {} = {value}: {m}", axis.name()),
                        )
                    })?;
                if let Err(ParamError { message, .. }) = raw.kind.validate(&params) {
                    return Err(ConfigError::without_location(
                        &self.source.path,
                        format!("sweep {} = {value}: {message}", axis.name()),
                    ));
                }
                self.check_references(
                    &axis.stage,
                    raw,
                    &raw.kind.references(&params),
                    &raw_stages,
                    &models,
                )?;
            }
        }
        self.check_cycles(&stages, &raw_stages)?;

        Ok(Pipeline {
            source: self.source.clone(),
            header,
            models,
            stages,
            axes,
            workdir,
        })
    }

    /// Attaches the file position of a deserialization error; errors without a span point at `fallback`.
    fn resources(&self, raw: &RawStage<'_>) -> Result<Resources, ConfigError> {
        let DeValue::Table(t) = raw.table.get_ref() else {
            unreachable!("checked to be a table")
        };
        let Some(value) = t.get("resources") else {
            return Ok(Resources::default());
        };
        let resources = Resources::deserialize(ValueDeserializer::from(value.clone()))
            .map_err(|e| self.located(e, value))?;
        resources
            .check()
            .map_err(|(field, m)| self.err(span_at(value, &crate::stage::key_path(&[field])), m))?;
        Ok(resources)
    }

    fn located(&self, e: toml::de::Error, fallback: &Spanned<DeValue<'_>>) -> ConfigError {
        let span = e.span().unwrap_or_else(|| fallback.span());
        self.err(span, e.message().trim_end().to_string())
    }

    fn models(&self, top: &DeTable<'_>) -> Result<BTreeMap<String, ModelSpec>, ConfigError> {
        let mut models = BTreeMap::new();
        let Some(value) = top.get("models") else {
            return Ok(models);
        };
        let DeValue::Table(table) = value.get_ref() else {
            return Err(self.err(
                value.span(),
                "`models` must be a table of [models.NAME] tables",
            ));
        };
        for (name, v) in table.iter() {
            let spec = ModelSpec::deserialize(ValueDeserializer::from(v.clone()))
                .map_err(|e| self.located(e, v))?;
            if let Some(d) = spec
                .dtype
                .as_deref()
                .filter(|d| !["f32", "quantized"].contains(d))
            {
                let span = span_at(v, &crate::stage::key_path(&["dtype"]));
                return Err(self.err(
                    span,
                    format!("model dtype `{d}` is not supported (f32 or quantized)"),
                ));
            }
            if spec.path.is_none() && spec.hub.is_none() {
                return Err(self.err(
                    name.span(),
                    format!(
                        "model `{}` needs `path` (a local copy) or `hub` (a repository to download)",
                        name.get_ref()
                    ),
                ));
            }
            models.insert(name.get_ref().to_string(), spec);
        }
        Ok(models)
    }

    fn raw_stages<'i>(
        &self,
        top: &DeTable<'i>,
    ) -> Result<BTreeMap<String, RawStage<'i>>, ConfigError> {
        let Some(value) = top.get("stages") else {
            return Err(self.err(0..0, "no stages: add at least one [stages.NAME] table"));
        };
        let DeValue::Table(table) = value.get_ref() else {
            return Err(self.err(
                value.span(),
                "`stages` must be a table of [stages.NAME] tables",
            ));
        };
        if table.is_empty() {
            return Err(self.err(
                value.span(),
                "no stages: add at least one [stages.NAME] table",
            ));
        }
        let mut stages = BTreeMap::new();
        for (name, v) in table.iter() {
            let name_str = name.get_ref().to_string();
            if !valid_stage_name(&name_str) {
                return Err(self.err(
                    name.span(),
                    format!("invalid stage name `{name_str}`: use letters, digits, `_` and `-`"),
                ));
            }
            let DeValue::Table(t) = v.get_ref() else {
                return Err(self.err(v.span(), format!("stage `{name_str}` must be a table")));
            };
            let known = self.registry.names().join(", ");
            let kind = match t.get("kind") {
                None => {
                    return Err(self.err(
                        name.span(),
                        format!("stage `{name_str}` has no `kind` (one of: {known})"),
                    ));
                }
                Some(k) => match k.get_ref().as_str() {
                    None => {
                        return Err(self.err(
                            k.span(),
                            format!("`kind` must be a string (one of: {known})"),
                        ))
                    }
                    Some(kind) => self.registry.get(kind).cloned().ok_or_else(|| {
                        self.err(
                            k.span(),
                            format!("unknown stage kind `{kind}` (known kinds: {known})"),
                        )
                    })?,
                },
            };
            stages.insert(
                name_str,
                RawStage {
                    kind,
                    header_span: name.span(),
                    table: v.clone(),
                },
            );
        }
        Ok(stages)
    }

    fn sweep_axes(
        &self,
        top: &DeTable<'_>,
        raw_stages: &BTreeMap<String, RawStage<'_>>,
        tables: &BTreeMap<String, toml::Table>,
    ) -> Result<Vec<Axis>, ConfigError> {
        let mut axes = Vec::new();
        let Some(value) = top.get("sweep") else {
            return Ok(axes);
        };
        let DeValue::Table(table) = value.get_ref() else {
            return Err(self.err(
                value.span(),
                "`sweep` must be a table of \"stage.param\" = [values]",
            ));
        };
        let mut entries: Vec<_> = table.iter().collect();
        entries.sort_by_key(|(k, _)| k.span().start);
        for (key, v) in entries {
            let Some((stage, param)) = key.get_ref().split_once('.') else {
                return Err(self.err(
                    key.span(),
                    format!("sweep key `{}` must be \"stage.param\"", key.get_ref()),
                ));
            };
            let raw = raw_stages.get(stage).ok_or_else(|| {
                self.err(
                    key.span(),
                    format!("sweep names stage `{stage}`, which does not exist"),
                )
            })?;
            self.check_param_exists(raw, param)
                .map_err(|m| self.err(key.span(), format!("sweep `{}`: {m}", key.get_ref())))?;
            let DeValue::Array(items) = v.get_ref() else {
                return Err(self.err(
                    v.span(),
                    format!("sweep `{}` must be an array of values", key.get_ref()),
                ));
            };
            if items.iter().next().is_none() {
                return Err(self.err(v.span(), format!("sweep `{}` has no values", key.get_ref())));
            }
            let mut values = Vec::new();
            for item in items.iter() {
                let value = to_value(item).map_err(|e| self.located(e, item))?;
                let text = value.to_string();
                let typed = self
                    .type_value(raw, &tables[stage], param, value, &text)
                    .map_err(|m| {
                        self.err(item.span(), format!("sweep `{}`: {m}", key.get_ref()))
                    })?;
                values.push(typed);
            }
            axes.push(Axis {
                stage: stage.to_string(),
                param: param.to_string(),
                values,
            });
        }
        Ok(axes)
    }

    /// The parameter must be one the stage kind declares.
    fn check_param_exists(&self, raw: &RawStage<'_>, param: &str) -> Result<(), String> {
        let param = param.split('.').next().unwrap_or(param);
        let schema = raw.kind.schema();
        let props = schema.get("properties").and_then(|p| p.as_object());
        match props {
            Some(p) if p.contains_key(param) => Ok(()),
            Some(p) => Err(format!(
                "stage kind `{}` has no parameter `{param}` (parameters: {})",
                raw.kind.kind(),
                p.keys().cloned().collect::<Vec<_>>().join(", ")
            )),
            None => Err(format!(
                "stage kind `{}` takes no parameters",
                raw.kind.kind()
            )),
        }
    }

    /// Types a value by the parameter's schema: if the value as parsed does not fit but its text as a string
    /// does (or the reverse), the fitting one wins.
    fn type_value(
        &self,
        raw: &RawStage<'_>,
        base: &toml::Table,
        param: &str,
        value: toml::Value,
        text: &str,
    ) -> Result<toml::Value, String> {
        let try_with = |v: &toml::Value| {
            let mut t = base.clone();
            set_param(&mut t, param, v.clone());
            raw.kind.resolve_value(toml::Value::Table(t))
        };
        match try_with(&value) {
            Ok(_) => Ok(value),
            Err(first) => {
                let as_string = toml::Value::String(text.trim_matches('"').to_string());
                if !value.is_str() && try_with(&as_string).is_ok() {
                    Ok(as_string)
                } else {
                    Err(format!("`{param}` = {text}: {first}"))
                }
            }
        }
    }

    fn override_header(
        &self,
        header: &mut PipelineHeader,
        o: &Override,
    ) -> Result<(), ConfigError> {
        let fail = |m: String| {
            ConfigError::without_location(&self.source.path, format!("-S {}: {m}", o.arg))
        };
        if o.values.len() != 1 {
            return Err(fail("pipeline settings take one value, not a sweep".into()));
        }
        let v = &o.values[0];
        match o.param.as_str() {
            "seed" => {
                header.seed = v
                    .parse()
                    .map_err(|_| fail(format!("seed must be a non-negative integer, got `{v}`")))?
            }
            "device" => header.device = v.parse().map_err(fail)?,
            "name" => header.name = v.clone(),
            p => {
                return Err(fail(format!(
                    "unknown pipeline setting `{p}` (name, device, seed)"
                )))
            }
        }
        Ok(())
    }

    fn check_references(
        &self,
        name: &str,
        raw: &RawStage<'_>,
        refs: &References,
        stages: &BTreeMap<String, RawStage<'_>>,
        models: &BTreeMap<String, ModelSpec>,
    ) -> Result<(), ConfigError> {
        for r in &refs.inputs {
            if r.target == name {
                return Err(self.err(
                    span_at(&raw.table, &r.at),
                    format!("stage `{name}` cannot take itself as input (cycle: {name} -> {name})"),
                ));
            }
            if !stages.contains_key(&r.target) {
                let known: Vec<_> = stages.keys().cloned().collect();
                return Err(self.err(
                    span_at(&raw.table, &r.at),
                    format!(
                        "stage `{name}` refers to stage `{}`, which does not exist (stages: {})",
                        r.target,
                        known.join(", ")
                    ),
                ));
            }
        }
        for r in &refs.files {
            let full = resolve_path(self.workdir, &r.target);
            let found = if saeflow_core::fs::is_glob(&r.target) {
                saeflow_core::fs::expand_glob(&full).is_ok()
            } else {
                full.exists()
            };
            if !found {
                return Err(self.err(
                    span_at(&raw.table, &r.at),
                    format!(
                        "stage `{name}` depends on `{}`, which does not exist (relative to {})",
                        r.target,
                        self.workdir.display()
                    ),
                ));
            }
        }
        for r in &refs.models {
            if !models.contains_key(&r.target) {
                let known: Vec<_> = models.keys().cloned().collect();
                let known = if known.is_empty() {
                    "none declared".to_string()
                } else {
                    known.join(", ")
                };
                return Err(self.err(
                    span_at(&raw.table, &r.at),
                    format!("stage `{name}` refers to model `{}`, which is not declared under [models] ({known})", r.target),
                ));
            }
        }
        Ok(())
    }

    fn check_cycles(
        &self,
        stages: &BTreeMap<String, StageDecl>,
        raw: &BTreeMap<String, RawStage<'_>>,
    ) -> Result<(), ConfigError> {
        let mut graph = petgraph::graphmap::DiGraphMap::<&str, ()>::new();
        for (name, decl) in stages {
            graph.add_node(name);
            for r in &decl.references.inputs {
                graph.add_edge(r.target.as_str(), name.as_str(), ());
            }
        }
        for scc in petgraph::algo::tarjan_scc(&graph) {
            if scc.len() < 2 {
                continue;
            }
            let start = *scc.iter().min().expect("non-empty");
            let cycle = shortest_cycle(&graph, start, &scc);
            let mut path: Vec<&str> = cycle.clone();
            path.push(start);
            return Err(self.err(
                raw[start].header_span.clone(),
                format!("cycle between stages: {}", path.join(" -> ")),
            ));
        }
        Ok(())
    }
}

impl<'i> RawStage<'i> {
    fn table_without_kind(&self) -> Spanned<DeValue<'i>> {
        let DeValue::Table(t) = self.table.get_ref() else {
            unreachable!("checked to be a table")
        };
        let mut t = t.clone();
        t.remove("kind");
        t.remove("resources");
        Spanned::new(self.table.span(), DeValue::Table(t))
    }
}

/// Breadth-first search for the shortest path start -> ... -> start inside one strongly connected component.
fn shortest_cycle<'a>(
    graph: &petgraph::graphmap::DiGraphMap<&'a str, ()>,
    start: &'a str,
    scc: &[&'a str],
) -> Vec<&'a str> {
    let mut prev: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(node) = queue.pop_front() {
        let mut next: Vec<_> = graph.neighbors(node).filter(|n| scc.contains(n)).collect();
        next.sort();
        for n in next {
            if n == start {
                let mut path = vec![node];
                while let Some(&p) = prev.get(path.last().expect("non-empty")) {
                    path.push(p);
                }
                path.reverse();
                return path;
            }
            if !prev.contains_key(n) && n != start {
                prev.insert(n, node);
                queue.push_back(n);
            }
        }
    }
    scc.to_vec()
}

fn valid_stage_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Sets a (possibly dotted, e.g. `params.x`) parameter in a stage table, creating nested tables as needed.
pub fn set_param(table: &mut toml::Table, path: &str, value: toml::Value) {
    match path.split_once('.') {
        None => {
            table.insert(path.to_string(), value);
        }
        Some((head, rest)) => {
            let child = table
                .entry(head.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !child.is_table() {
                *child = toml::Value::Table(toml::Table::new());
            }
            set_param(child.as_table_mut().expect("table"), rest, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_override_values_outside_brackets_and_quotes() {
        assert_eq!(split_top_level("1,2,3"), ["1", "2", "3"]);
        assert_eq!(split_top_level("[1,2],\"a,b\""), ["[1,2]", "\"a,b\""]);
    }

    #[test]
    fn types_cli_values_as_toml_when_possible() {
        assert_eq!(parse_cli_value("3"), toml::Value::Integer(3));
        assert_eq!(parse_cli_value("1e-5"), toml::Value::Float(1e-5));
        assert_eq!(parse_cli_value("topk"), toml::Value::String("topk".into()));
    }
}
