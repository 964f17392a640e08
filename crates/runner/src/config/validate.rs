//! The validating loader: walks the parsed TOML with its source positions, checks every table against
//! what it must hold (stage kinds' parameter types, references, sweep values, resources, no cycles) and
//! builds the [`Pipeline`]. Errors point at the offending text.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

use saeflow_core::fs::resolve_path;

use super::cycles::find_cycle;
use super::overrides::{
    check_param_exists, override_header, parse_cli_value, set_param, type_value, Override,
};
use super::{Axis, ConfigError, ModelSpec, Pipeline, PipelineHeader, Resources, Source, StageDecl};
use crate::stage::{KeySeg, ParamError, References, Registry, StageKind};

/// Parses and validates `source`, applying `overrides`; relative paths resolve against `workdir`.
pub(super) fn validate(
    source: &Source,
    overrides: &[Override],
    registry: &Registry,
    workdir: &Path,
) -> Result<Pipeline, ConfigError> {
    Loader {
        source,
        registry,
        workdir,
    }
    .load(overrides)
}

/// Converts a located TOML value to a plain one (positions dropped).
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

/// The file being validated and what it is validated against.
struct Loader<'a> {
    /// The pipeline file, for located errors.
    source: &'a Source,
    /// The stage kinds a stage may have.
    registry: &'a Registry,
    /// Where relative file references resolve.
    workdir: &'a Path,
}

/// A stage table still carrying source positions.
struct RawStage<'i> {
    /// Its kind, from the registry.
    kind: std::sync::Arc<dyn StageKind>,
    /// Where `[stages.NAME]` names it, for errors about the stage as a whole.
    header_span: Range<usize>,
    /// The table as written, `kind` and `resources` included.
    table: Spanned<DeValue<'i>>,
}

impl Loader<'_> {
    /// An error located at `span` in the file.
    fn err(&self, span: Range<usize>, msg: impl Into<String>) -> ConfigError {
        self.source.error(Some(span), msg)
    }

    /// Validates the whole file, section by section, in the order its errors are reported.
    fn load(&self, overrides: &[Override]) -> Result<Pipeline, ConfigError> {
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
        if let Err(m) = super::check_file_name(&header.name) {
            let span = span_at(&root_value, &crate::stage::key_path(&["pipeline", "name"]));
            return Err(self.err(
                span,
                format!("pipeline name `{}` {m}", super::printable(&header.name)),
            ));
        }

        if let Some(url) = &header.cache_remote {
            let scheme = url.split_once("://").map(|(s, _)| s);
            if !matches!(
                scheme,
                Some("s3" | "s3a" | "gs" | "az" | "azure" | "abfs" | "abfss" | "file")
            ) {
                let span = span_at(
                    &root_value,
                    &crate::stage::key_path(&["pipeline", "cache_remote"]),
                );
                return Err(self.err(
                    span,
                    format!(
                        "cache_remote `{}` is not a remote cache URL: s3://bucket/prefix, gs://bucket/prefix, \
                         az://container/prefix or file:///dir",
                        super::printable(url)
                    ),
                ));
            }
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
        self.apply_overrides(overrides, &raw_stages, &mut header, &mut tables, &mut axes)?;

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
            workdir: self.workdir.to_path_buf(),
        })
    }

    /// Applies the `-S` overrides in command-line order: `pipeline.*` ones to the header, one value into the
    /// stage's table, several as a sweep axis (replacing a `[sweep]` axis of the same parameter).
    fn apply_overrides(
        &self,
        overrides: &[Override],
        raw_stages: &BTreeMap<String, RawStage<'_>>,
        header: &mut PipelineHeader,
        tables: &mut BTreeMap<String, toml::Table>,
        axes: &mut Vec<Axis>,
    ) -> Result<(), ConfigError> {
        for o in overrides {
            let fail = |m: String| {
                ConfigError::without_location(
                    &self.source.path,
                    format!("-S {}: {m}", super::printable(&o.arg)),
                )
            };
            if o.stage == "pipeline" {
                override_header(header, o).map_err(fail)?;
                // The name becomes the refs directory (and Slurm file names): checked here as in the file,
                // or `-S pipeline.name=../../x` would write outside `refs/`.
                super::check_file_name(&header.name).map_err(|m| {
                    fail(format!(
                        "pipeline name `{}` {m}",
                        super::printable(&header.name)
                    ))
                })?;
                continue;
            }
            let raw = raw_stages
                .get(&o.stage)
                .ok_or_else(|| fail(format!("no stage named `{}`", o.stage)))?;
            check_param_exists(raw.kind.as_ref(), &o.param).map_err(fail)?;
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
                    type_value(
                        raw.kind.as_ref(),
                        &tables[&o.stage],
                        &o.param,
                        value,
                        raw_text,
                    )
                    .map_err(fail)
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
        Ok(())
    }

    /// `[stages.NAME.resources]`, checked against Slurm's formats; absent, no requests.
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

    /// Attaches the file position of a deserialization error; errors without a span point at `fallback`.
    fn located(&self, e: toml::de::Error, fallback: &Spanned<DeValue<'_>>) -> ConfigError {
        let span = e.span().unwrap_or_else(|| fallback.span());
        self.err(span, e.message().trim_end().to_string())
    }

    /// `[models.*]`: each a valid model spec with a supported dtype and a `path` or a `hub`.
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
                .filter(|d| !["f32", "bf16", "f16", "quantized"].contains(d))
            {
                let span = span_at(v, &crate::stage::key_path(&["dtype"]));
                return Err(self.err(
                    span,
                    format!("model dtype `{d}` is not supported (f32, bf16, f16 or quantized)"),
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

    /// `[stages.*]`: at least one, each a table with a valid name and a known `kind`.
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
                    format!(
                        "invalid stage name `{}`: use letters, digits, `_` and `-`",
                        super::printable(&name_str)
                    ),
                ));
            }
            if name_str.len() > super::MAX_NAME_BYTES {
                return Err(self.err(
                    name.span(),
                    format!(
                        "stage name `{name_str}` is {} bytes long, at most {} are allowed",
                        name_str.len(),
                        super::MAX_NAME_BYTES
                    ),
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

    /// `[sweep]`: per `"stage.param"` key, a parameter the stage declares and a non-empty array of values
    /// that each type as that parameter; the axes in file order.
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
            check_param_exists(raw.kind.as_ref(), param)
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
                let typed = type_value(raw.kind.as_ref(), &tables[stage], param, value, &text)
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

    /// What a stage (or one swept variant of it) references must exist: other stages (not itself), files
    /// and globs relative to the working directory, models declared under `[models]`.
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

    /// The stages' input references must form a DAG; a cycle is reported at the header of the stage it
    /// starts from.
    fn check_cycles(
        &self,
        stages: &BTreeMap<String, StageDecl>,
        raw: &BTreeMap<String, RawStage<'_>>,
    ) -> Result<(), ConfigError> {
        match find_cycle(stages) {
            Some((start, path)) => Err(self.err(
                raw[start].header_span.clone(),
                format!("cycle between stages: {}", path.join(" -> ")),
            )),
            None => Ok(()),
        }
    }
}

impl<'i> RawStage<'i> {
    /// The parameter table: the stage table without `kind` and `resources`, positions kept.
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

/// Whether `name` is a valid stage name: non-empty, of letters, digits, `_` and `-`.
fn valid_stage_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}
