//! The labelled row table every text source becomes (`rows.parquet`, documented in `schemas/rows.md`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use arrow_array::builder::{StringBuilder, UInt64Builder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema};

/// Column names of the fixed part of the schema, in order.
pub const CORE_COLUMNS: [&str; 10] = [
    "doc_id",
    "prompt",
    "completion",
    "text",
    "label",
    "label_raw",
    "source",
    "subset",
    "pair_id",
    "split",
];

/// One labelled text.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    /// Stable id: hash of source, subset and the row's upstream identity (never of its position).
    pub doc_id: u64,
    /// What the model was asked, when the text is a prompt/answer pair.
    pub prompt: Option<String>,
    /// The model's (or writer's) answer, kept apart so capture knows which tokens are the answer.
    pub completion: Option<String>,
    /// Prompt followed by completion, or the standalone text.
    pub text: String,
    /// Normalised label: `deceptive`/`honest`, `true`/`false`, or a source's own classes.
    pub label: Option<String>,
    /// The label as the source wrote it.
    pub label_raw: Option<String>,
    /// Preset name or file the row came from.
    pub source: String,
    /// File, task or condition within the source.
    pub subset: Option<String>,
    /// Rows that answer one prompt share it; splits never separate them.
    pub pair_id: Option<u64>,
    /// `train`, `val` or `test` (upstream split when the source has one; else assigned by hash).
    pub split: Option<String>,
    /// Extra fields kept from the source, as text (JSON for non-strings).
    pub extra: BTreeMap<String, String>,
}

/// A stable 64-bit id from string parts (blake3, first 8 bytes little-endian).
pub fn stable_id(parts: &[&str]) -> u64 {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
}

impl Row {
    /// A row from a prompt and a completion; `text` is their concatenation.
    pub fn pair(source: &str, prompt: &str, completion: &str) -> Self {
        Row {
            prompt: Some(prompt.to_string()),
            completion: Some(completion.to_string()),
            text: format!("{prompt}{completion}"),
            source: source.to_string(),
            ..Default::default()
        }
    }

    /// A row that is one standalone text.
    pub fn text(source: &str, text: &str) -> Self {
        Row {
            text: text.to_string(),
            source: source.to_string(),
            ..Default::default()
        }
    }

    /// Sets label and raw label.
    pub fn labelled(mut self, label: Option<&str>, raw: Option<&str>) -> Self {
        self.label = label.map(str::to_string);
        self.label_raw = raw.map(str::to_string);
        self
    }

    /// Sets the subset.
    pub fn subset(mut self, subset: &str) -> Self {
        self.subset = Some(subset.to_string());
        self
    }

    /// Pairs this row with others sharing `key` within its source and subset.
    pub fn paired_by(mut self, key: &str) -> Self {
        self.pair_id = Some(stable_id(&[
            &self.source,
            self.subset.as_deref().unwrap_or(""),
            key,
        ]));
        self
    }

    /// Sets the upstream split (normalised to train/val/test).
    pub fn upstream_split(mut self, split: &str) -> Self {
        self.split = Some(normalize_split(split).to_string());
        self
    }

    /// Keeps an extra field.
    pub fn with_extra(mut self, name: &str, value: impl Into<String>) -> Self {
        self.extra.insert(name.to_string(), value.into());
        self
    }
}

/// `validation`/`dev` → `val`; other names pass through.
pub fn normalize_split(split: &str) -> &str {
    match split {
        "validation" | "valid" | "dev" => "val",
        s => s,
    }
}

/// Assigns doc ids from each row's identity: `identity(row)` (an upstream id, or the content), with
/// repeated identities disambiguated by occurrence so exact duplicates keep distinct ids.
pub fn assign_ids(rows: &mut [Row], identity: impl Fn(&Row) -> String) {
    let identities: Vec<String> = rows.iter().map(identity).collect();
    assign_ids_from(rows, &identities);
}

/// [`assign_ids`] with the identities given in a list parallel to `rows`.
pub fn assign_ids_from(rows: &mut [Row], identities: &[String]) {
    let mut seen: BTreeMap<(String, String, &str), u64> = BTreeMap::new();
    for (row, id) in rows.iter_mut().zip(identities) {
        let k = (
            row.source.clone(),
            row.subset.clone().unwrap_or_default(),
            id.as_str(),
        );
        let n = seen.entry(k).or_insert(0);
        let occurrence = n.to_string();
        *n += 1;
        row.doc_id = stable_id(&[
            &row.source,
            row.subset.as_deref().unwrap_or(""),
            id,
            &occurrence,
        ]);
    }
}

/// Identity by content: prompt, completion, text and raw label.
pub fn content_identity(row: &Row) -> String {
    format!(
        "{}\u{1}{}\u{1}{}\u{1}{}",
        row.prompt.as_deref().unwrap_or(""),
        row.completion.as_deref().unwrap_or(""),
        row.text,
        row.label_raw.as_deref().unwrap_or("")
    )
}

/// Extra column names across rows, renamed with an `extra_` prefix where they clash with core columns.
fn extra_columns(rows: &[Row]) -> Vec<String> {
    let names: BTreeSet<&String> = rows.iter().flat_map(|r| r.extra.keys()).collect();
    names.into_iter().cloned().collect()
}

fn column_name(extra: &str) -> String {
    if CORE_COLUMNS.contains(&extra) {
        format!("extra_{extra}")
    } else {
        extra.to_string()
    }
}

/// Builds the Arrow batch of `rows`.
pub fn to_batch(rows: &[Row]) -> anyhow::Result<RecordBatch> {
    let extras = extra_columns(rows);
    let mut fields = vec![
        Field::new("doc_id", DataType::UInt64, false),
        Field::new("prompt", DataType::Utf8, true),
        Field::new("completion", DataType::Utf8, true),
        Field::new("text", DataType::Utf8, false),
        Field::new("label", DataType::Utf8, true),
        Field::new("label_raw", DataType::Utf8, true),
        Field::new("source", DataType::Utf8, false),
        Field::new("subset", DataType::Utf8, true),
        Field::new("pair_id", DataType::UInt64, true),
        Field::new("split", DataType::Utf8, false),
    ];
    fields.extend(
        extras
            .iter()
            .map(|e| Field::new(column_name(e), DataType::Utf8, true)),
    );
    let strings = |f: &dyn Fn(&Row) -> Option<&str>| -> ArrayRef {
        let mut b = StringBuilder::new();
        for r in rows {
            b.append_option(f(r));
        }
        Arc::new(b.finish())
    };
    let u64s = |f: &dyn Fn(&Row) -> Option<u64>| -> ArrayRef {
        let mut b = UInt64Builder::new();
        for r in rows {
            b.append_option(f(r));
        }
        Arc::new(b.finish())
    };
    let mut columns: Vec<ArrayRef> = vec![
        u64s(&|r| Some(r.doc_id)),
        strings(&|r| r.prompt.as_deref()),
        strings(&|r| r.completion.as_deref()),
        strings(&|r| Some(&r.text)),
        strings(&|r| r.label.as_deref()),
        strings(&|r| r.label_raw.as_deref()),
        strings(&|r| Some(&r.source)),
        strings(&|r| r.subset.as_deref()),
        u64s(&|r| r.pair_id),
        strings(&|r| Some(r.split.as_deref().unwrap_or("train"))),
    ];
    for e in &extras {
        columns.push(strings(&|r| r.extra.get(e).map(String::as_str)));
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).context("building the rows table")
}

/// Writes `rows.parquet` (deterministically).
pub fn write(path: &Path, rows: &[Row]) -> anyhow::Result<()> {
    let batch = to_batch(rows)?;
    let step = 16 * 1024;
    let batches: Vec<RecordBatch> = (0..rows.len().max(1))
        .step_by(step)
        .map(|i| batch.slice(i, step.min(rows.len() - i)))
        .collect();
    super::parquet::write_batches(path, &batches)
}

/// The Parquet bytes [`write`] would write (for a caller that publishes them atomically).
pub fn encode(rows: &[Row]) -> anyhow::Result<Vec<u8>> {
    let batch = to_batch(rows)?;
    let mut bytes = Vec::new();
    let mut writer = parquet::arrow::ArrowWriter::try_new(
        &mut bytes,
        batch.schema(),
        Some(super::parquet::writer_properties()),
    )?;
    writer.write(&batch).context("encoding rows")?;
    writer.close().context("encoding rows")?;
    Ok(bytes)
}

/// Reads a `rows.parquet` in file order: the core columns, and every other text column into `extra` (under
/// its column name, `extra_`-prefixed ones included as written).
pub fn read(path: &Path) -> anyhow::Result<Vec<Row>> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::UInt64Type;
    use arrow_array::Array;

    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{}: not a readable Parquet file", path.display()))?
        .build()?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.with_context(|| format!("{}: cannot decode", path.display()))?;
        let column = |name: &str| {
            batch.column_by_name(name).with_context(|| {
                format!("{}: no `{name}` column (not a rows table?)", path.display())
            })
        };
        let strings = |name: &str| -> anyhow::Result<Vec<Option<String>>> {
            let c = column(name)?;
            let c = c
                .as_string_opt::<i32>()
                .with_context(|| format!("{}: column `{name}` is not utf8", path.display()))?;
            Ok(c.iter().map(|v| v.map(str::to_string)).collect())
        };
        let u64s = |name: &str| -> anyhow::Result<Vec<Option<u64>>> {
            let c = column(name)?;
            let c = c
                .as_primitive_opt::<UInt64Type>()
                .with_context(|| format!("{}: column `{name}` is not uint64", path.display()))?;
            Ok((0..c.len())
                .map(|i| (!c.is_null(i)).then(|| c.value(i)))
                .collect())
        };
        let (doc_id, pair_id) = (u64s("doc_id")?, u64s("pair_id")?);
        let (prompt, completion, text) =
            (strings("prompt")?, strings("completion")?, strings("text")?);
        let (label, label_raw) = (strings("label")?, strings("label_raw")?);
        let (source, subset, split) = (strings("source")?, strings("subset")?, strings("split")?);
        let schema = batch.schema();
        let extras: Vec<(&str, Vec<Option<String>>)> = schema
            .fields()
            .iter()
            .filter(|f| {
                !CORE_COLUMNS.contains(&f.name().as_str()) && f.data_type() == &DataType::Utf8
            })
            .map(|f| Ok((f.name().as_str(), strings(f.name())?)))
            .collect::<anyhow::Result<_>>()?;
        for i in 0..batch.num_rows() {
            rows.push(Row {
                doc_id: doc_id[i].unwrap_or_default(),
                prompt: prompt[i].clone(),
                completion: completion[i].clone(),
                text: text[i].clone().unwrap_or_default(),
                label: label[i].clone(),
                label_raw: label_raw[i].clone(),
                source: source[i].clone().unwrap_or_default(),
                subset: subset[i].clone(),
                pair_id: pair_id[i],
                split: split[i].clone(),
                extra: extras
                    .iter()
                    .filter_map(|(name, values)| Some((name.to_string(), values[i].clone()?)))
                    .collect(),
            });
        }
    }
    Ok(rows)
}
