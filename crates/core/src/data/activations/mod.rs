//! The activation store that `capture` writes and training, labelling and evaluation read
//! (documented in `schemas/capture.md`).
//!
//! Per hook, shards `acts-<hook>-<shard>.parquet` hold one row per stored token with a single column `act`:
//! `FixedSizeBinary(d_model × element size)`, the vector's little-endian f32 / f16 / bf16 values. Rows align
//! one to one with `tokens.parquet` (doc_id, pos, token_id, label, split, is_completion) across the shards in
//! order. A `FixedSizeList<float>` column would be the obvious Arrow type, but Parquet stores lists with a
//! repetition level per element and arrow-rs decodes them at ~0.5 GB/s; a fixed-size binary column is plain
//! bytes and decodes at ~5 GB/s (measured, see BENCHMARKS.md), which is what keeps a GPU trainer fed.
//! pyarrow/numpy read it as `np.frombuffer(col.buffers()[1], dtype).reshape(-1, d_model)`.

pub mod reader;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use arrow_array::builder::{BooleanBuilder, StringBuilder, UInt32Builder, UInt64Builder};
use arrow_array::{ArrayRef, FixedSizeBinaryArray, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use candle_core::DType;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use reader::{ActivationStore, Batch, ReadOptions};

#[cfg(target_endian = "big")]
compile_error!("activation shards store little-endian values; big-endian hosts are not supported");

/// Name of the activation column.
pub const ACT_COLUMN: &str = "act";
/// Rows per Parquet row group in activation shards: the unit a shuffled reader picks at random.
pub const ACT_ROW_GROUP: usize = 4096;
/// Version of the store layout, recorded in `capture.json`.
pub const FORMAT_VERSION: u32 = 2;

/// Element type of stored activations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ActDtype {
    /// 32-bit float.
    #[default]
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
}

impl ActDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            ActDtype::F32 => 4,
            ActDtype::F16 | ActDtype::Bf16 => 2,
        }
    }
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            ActDtype::F32 => DType::F32,
            ActDtype::F16 => DType::F16,
            ActDtype::Bf16 => DType::BF16,
        }
    }
    /// Name as written in configs and metadata.
    pub fn name(self) -> &'static str {
        match self {
            ActDtype::F32 => "f32",
            ActDtype::F16 => "f16",
            ActDtype::Bf16 => "bf16",
        }
    }
    /// Position of the first non-finite element of little-endian `bytes`, if any.
    pub fn first_non_finite(self, bytes: &[u8]) -> Option<usize> {
        match self {
            ActDtype::F32 => bytemuck::cast_slice::<u8, f32>(bytes)
                .iter()
                .position(|v| !v.is_finite()),
            ActDtype::F16 => bytemuck::cast_slice::<u8, half::f16>(bytes)
                .iter()
                .position(|v| !v.is_finite()),
            ActDtype::Bf16 => bytemuck::cast_slice::<u8, half::bf16>(bytes)
                .iter()
                .position(|v| !v.is_finite()),
        }
    }
}

/// File name of one hook's shard.
pub fn act_file_name(hook: &str, shard: usize) -> String {
    format!("acts-{hook}-{shard:05}.parquet")
}

/// One shard of the capture, as listed in `capture.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// Index of the shard's first row in `tokens.parquet`.
    pub first_row: u64,
    /// Rows (stored tokens) in the shard.
    pub rows: u64,
}

/// `capture.json`: what was captured, from which model, and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptureInfo {
    /// Store layout version ([`FORMAT_VERSION`]).
    pub format: u32,
    /// Model name in the pipeline.
    pub model: String,
    /// Content key of the model (spec and file hashes, not its location).
    pub model_key: String,
    /// Model family and file the weights came from (file name only).
    pub model_source: String,
    /// Hook names, in the order the files were written.
    pub hooks: Vec<String>,
    /// Width of every stored vector.
    pub d_model: usize,
    /// Element type of stored vectors.
    pub dtype: ActDtype,
    /// Tokenizer description (kind, vocabulary size, BOS id).
    pub tokenizer: serde_json::Value,
    /// Tokens per forward sequence.
    pub context: usize,
    /// Capture settings that shape which tokens are stored (positions, template, pack, bos, ...).
    pub settings: serde_json::Value,
    /// Rows in `tokens.parquet` (= rows in each hook's shards together).
    pub tokens: u64,
    /// Documents that contributed at least one stored token.
    pub documents: u64,
    /// Documents cut at `context` tokens (unpacked capture only).
    pub truncated_documents: u64,
    /// Forward sequences run.
    pub sequences: u64,
    /// Stored tokens per split.
    pub splits: BTreeMap<String, u64>,
    /// Stored tokens per label (`null` for unlabelled).
    pub labels: BTreeMap<String, u64>,
    /// Mean L2 norm of the stored vectors, per hook.
    pub mean_norm: BTreeMap<String, f64>,
    /// Shards in order.
    pub shards: Vec<ShardInfo>,
    /// How attention sinks and norm outliers were kept out of the store.
    #[serde(default)]
    pub sinks: SinkReport,
}

/// `capture.json` `sinks`: the tokens left out as attention sinks or norm outliers, and what that did to
/// the store's norm distribution.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SinkReport {
    /// First positions of every forward sequence left out (`None`: the first, unless it is BOS).
    pub drop_first: Option<u32>,
    /// Norm cut, as a multiple of the batch's median norm (`None`: off).
    pub norm_cut: Option<f64>,
    /// Tokens left out for being among their sequence's first `drop_first`.
    pub dropped_first: u64,
    /// Tokens left out by the norm cut.
    pub dropped_norm: u64,
    /// Per hook: the share of the total squared norm (the activations' uncentred second moment) held by
    /// the top 0.5% of tokens by norm, over the tokens before sink handling and over those stored.
    pub top_half_percent_share: BTreeMap<String, BeforeAfter>,
    /// Per hook: the share of the total squared norm held by tokens whose norm exceeds 10× the median norm
    /// (of the same set), before and after. Unlike the top-0.5% share it does not depend on how many sinks
    /// there are: with short documents sinks are more than 0.5% of the tokens.
    #[serde(default)]
    pub above_10x_median_share: BTreeMap<String, BeforeAfter>,
}

/// A measure before and after a filter.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BeforeAfter {
    /// Before (`None`: nothing to measure).
    pub before: Option<f64>,
    /// After.
    pub after: Option<f64>,
}

impl CaptureInfo {
    /// Reads `capture.json` from a capture directory.
    pub fn read(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("capture.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {} (is the input a capture stage?)",
                path.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("{}: invalid", path.display()))
    }
}

fn act_properties() -> WriterProperties {
    // Activations barely compress and are read far more often than written: plain, uncompressed pages
    // with no dictionary or statistics decode at memory speed.
    WriterProperties::builder()
        .set_created_by(super::parquet::CREATED_BY.to_string())
        .set_compression(Compression::UNCOMPRESSED)
        .set_dictionary_enabled(false)
        .set_statistics_enabled(EnabledStatistics::None)
        .set_max_row_group_size(ACT_ROW_GROUP)
        .build()
}

/// The Arrow schema of an activation shard.
pub fn act_schema(d_model: usize, dtype: ActDtype) -> Arc<Schema> {
    let field = Field::new(
        ACT_COLUMN,
        DataType::FixedSizeBinary((d_model * dtype.size()) as i32),
        false,
    )
    .with_metadata(
        [
            ("saeflow.dtype".to_string(), dtype.name().to_string()),
            ("saeflow.d_model".to_string(), d_model.to_string()),
        ]
        .into(),
    );
    Arc::new(Schema::new(vec![field]))
}

/// Writes one activation shard: `bytes` holds rows of `d_model` little-endian `dtype` values.
pub fn write_act_shard(
    path: &Path,
    bytes: Vec<u8>,
    d_model: usize,
    dtype: ActDtype,
) -> anyhow::Result<()> {
    let width = d_model * dtype.size();
    anyhow::ensure!(
        bytes.len().is_multiple_of(width),
        "activation buffer is not a whole number of rows"
    );
    let schema = act_schema(d_model, dtype);
    let column = FixedSizeBinaryArray::try_new(width as i32, bytes.into(), None)?;
    let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(column)])?;
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut writer = ArrowWriter::try_new(file, schema, Some(act_properties()))?;
    writer
        .write(&batch)
        .with_context(|| format!("writing {}", path.display()))?;
    // Shards are resume points: make them durable before they are renamed into place.
    writer.into_inner()?.sync_all()?;
    Ok(())
}

/// One stored token: a row of `tokens.parquet`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenRow {
    /// The document (row of `rows.parquet`).
    pub doc_id: u64,
    /// Position in the document's token sequence (0 = BOS when one is prepended).
    pub pos: u32,
    /// Position in the forward sequence the token was computed in (its distance from the sequence's
    /// attention sink; equals `pos` unless documents were split across sequences).
    pub seq_pos: u32,
    /// Token id.
    pub token_id: u32,
    /// The document's label.
    pub label: Option<Arc<str>>,
    /// The document's split.
    pub split: Arc<str>,
    /// Whether the token belongs to the completion (answer) part.
    pub is_completion: bool,
    /// The document's source (preset name or file).
    pub source: Arc<str>,
    /// The document's subset within its source (file, task or condition).
    pub subset: Option<Arc<str>>,
    /// Shared by documents that answer one prompt (the two sides of a contrast pair).
    pub pair_id: Option<u64>,
}

/// The Arrow batch of `tokens.parquet` rows.
pub fn tokens_batch(rows: &[TokenRow]) -> anyhow::Result<RecordBatch> {
    let mut doc_id = UInt64Builder::with_capacity(rows.len());
    let mut pos = UInt32Builder::with_capacity(rows.len());
    let mut seq_pos = UInt32Builder::with_capacity(rows.len());
    let mut token_id = UInt32Builder::with_capacity(rows.len());
    let mut label = StringBuilder::new();
    let mut split = StringBuilder::new();
    let mut is_completion = BooleanBuilder::with_capacity(rows.len());
    let mut source = StringBuilder::new();
    let mut subset = StringBuilder::new();
    let mut pair_id = UInt64Builder::with_capacity(rows.len());
    for r in rows {
        doc_id.append_value(r.doc_id);
        pos.append_value(r.pos);
        seq_pos.append_value(r.seq_pos);
        token_id.append_value(r.token_id);
        label.append_option(r.label.as_deref());
        split.append_value(&r.split);
        is_completion.append_value(r.is_completion);
        source.append_value(&r.source);
        subset.append_option(r.subset.as_deref());
        pair_id.append_option(r.pair_id);
    }
    let schema = Schema::new(vec![
        Field::new("doc_id", DataType::UInt64, false),
        Field::new("pos", DataType::UInt32, false),
        Field::new("token_id", DataType::UInt32, false),
        Field::new("label", DataType::Utf8, true),
        Field::new("split", DataType::Utf8, false),
        Field::new("is_completion", DataType::Boolean, false),
        Field::new("seq_pos", DataType::UInt32, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("subset", DataType::Utf8, true),
        Field::new("pair_id", DataType::UInt64, true),
    ]);
    let columns: Vec<ArrayRef> = vec![
        Arc::new(doc_id.finish()),
        Arc::new(pos.finish()),
        Arc::new(token_id.finish()),
        Arc::new(label.finish()),
        Arc::new(split.finish()),
        Arc::new(is_completion.finish()),
        Arc::new(seq_pos.finish()),
        Arc::new(source.finish()),
        Arc::new(subset.finish()),
        Arc::new(pair_id.finish()),
    ];
    Ok(RecordBatch::try_new(Arc::new(schema), columns)?)
}

/// The columns of `tokens.parquet` that analyses of a capture need, labels and splits interned.
#[derive(Debug, Clone, Default)]
pub struct TokenTable {
    /// Document of each row.
    pub doc_id: Vec<u64>,
    /// Position of each row in its document's token sequence.
    pub pos: Vec<u32>,
    /// Token id of each row.
    pub token_id: Vec<u32>,
    /// Label of each row, as an index into `labels` (`None`: unlabelled).
    pub label: Vec<Option<u16>>,
    /// Distinct labels, sorted.
    pub labels: Vec<String>,
    /// Split of each row, as an index into `splits`.
    pub split: Vec<u8>,
    /// Distinct splits, sorted.
    pub splits: Vec<String>,
    /// Position of each row in its forward sequence.
    pub seq_pos: Vec<u32>,
    /// Whether each row is a completion (answer) token.
    pub is_completion: Vec<bool>,
    /// Source of each row, as an index into `sources`.
    pub source: Vec<u16>,
    /// Distinct sources, sorted.
    pub sources: Vec<String>,
    /// Pair of each row's document (`None`: unpaired).
    pub pair_id: Vec<Option<u64>>,
}

impl TokenTable {
    /// Reads `tokens.parquet` of a capture directory.
    pub fn read(dir: &Path) -> anyhow::Result<Self> {
        use arrow_array::cast::AsArray;
        use arrow_array::types::{UInt32Type, UInt64Type};
        let path = dir.join("tokens.parquet");
        let file = std::fs::File::open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .with_context(|| format!("{}: not a readable Parquet file", path.display()))?
            .build()?;
        let (mut table, mut labels, mut splits, mut sources) = (
            TokenTable::default(),
            BTreeMap::<String, Vec<u64>>::new(),
            BTreeMap::<String, Vec<u64>>::new(),
            BTreeMap::<String, Vec<u64>>::new(),
        );
        // Rows per distinct value first, indices once the sorted value lists are known.
        let (mut label_row, mut split_row, mut source_row) = (0u64, 0u64, 0u64);
        for batch in reader {
            let batch = batch.with_context(|| format!("reading {}", path.display()))?;
            let column = |name: &str| {
                batch
                    .column_by_name(name)
                    .with_context(|| format!("{}: no `{name}` column", path.display()))
            };
            table
                .doc_id
                .extend(column("doc_id")?.as_primitive::<UInt64Type>().values());
            table
                .pos
                .extend(column("pos")?.as_primitive::<UInt32Type>().values());
            table
                .token_id
                .extend(column("token_id")?.as_primitive::<UInt32Type>().values());
            for label in column("label")?.as_string::<i32>() {
                if let Some(l) = label {
                    labels.entry(l.to_string()).or_default().push(label_row);
                }
                label_row += 1;
            }
            for split in column("split")?.as_string::<i32>() {
                splits
                    .entry(split.unwrap_or_default().to_string())
                    .or_default()
                    .push(split_row);
                split_row += 1;
            }
            let old_format = || {
                format!(
                    "{}: no `seq_pos` column: a capture of store format 1, from before sources and \
                     sequence positions were stored; rerun its capture stage",
                    path.display()
                )
            };
            let seq_pos = batch.column_by_name("seq_pos").with_context(old_format)?;
            table
                .seq_pos
                .extend(seq_pos.as_primitive::<UInt32Type>().values());
            table.is_completion.extend(
                column("is_completion")?
                    .as_boolean()
                    .iter()
                    .map(|b| b == Some(true)),
            );
            for source in column("source")?.as_string::<i32>() {
                sources
                    .entry(source.unwrap_or_default().to_string())
                    .or_default()
                    .push(source_row);
                source_row += 1;
            }
            table
                .pair_id
                .extend(column("pair_id")?.as_primitive::<UInt64Type>().iter());
        }
        let rows = table.doc_id.len();
        if labels.len() > u16::MAX as usize
            || splits.len() > u8::MAX as usize
            || sources.len() > u16::MAX as usize
        {
            bail!(
                "{}: {} labels, {} splits and {} sources; at most {}, {} and {} are supported",
                path.display(),
                labels.len(),
                splits.len(),
                sources.len(),
                u16::MAX,
                u8::MAX,
                u16::MAX
            );
        }
        table.source = vec![0; rows];
        for (i, rows) in sources.values().enumerate() {
            for &r in rows {
                table.source[r as usize] = i as u16;
            }
        }
        table.sources = sources.into_keys().collect();
        table.label = vec![None; rows];
        for (i, rows) in labels.values().enumerate() {
            for &r in rows {
                table.label[r as usize] = Some(i as u16);
            }
        }
        table.split = vec![0; rows];
        for (i, rows) in splits.values().enumerate() {
            for &r in rows {
                table.split[r as usize] = i as u8;
            }
        }
        table.labels = labels.into_keys().collect();
        table.splits = splits.into_keys().collect();
        Ok(table)
    }

    /// Index of a split by name.
    pub fn split_index(&self, name: &str) -> Option<u8> {
        self.splits.iter().position(|s| s == name).map(|i| i as u8)
    }
}

/// Concatenates token tables (shards in order) into one deterministic `tokens.parquet`.
pub fn concat_tokens(parts: &[std::path::PathBuf], out: &Path) -> anyhow::Result<()> {
    let mut writer: Option<ArrowWriter<std::fs::File>> = None;
    for part in parts {
        let file =
            std::fs::File::open(part).with_context(|| format!("cannot open {}", part.display()))?;
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)?
            .build()?;
        for batch in reader {
            let batch = batch.with_context(|| format!("reading {}", part.display()))?;
            if writer.is_none() {
                let file = std::fs::File::create(out)
                    .with_context(|| format!("cannot create {}", out.display()))?;
                writer = Some(ArrowWriter::try_new(
                    file,
                    batch.schema(),
                    Some(super::parquet::writer_properties()),
                )?);
            }
            writer.as_mut().expect("created above").write(&batch)?;
        }
    }
    match writer {
        Some(w) => {
            w.close()?;
        }
        None => super::parquet::write_batches(out, &[tokens_batch(&[])?])?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_values_are_found_in_every_dtype() {
        let f32s: Vec<u8> = [1.0f32, f32::NAN]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(ActDtype::F32.first_non_finite(&f32s), Some(1));
        let f16s: Vec<u8> = [half::f16::from_f32(70000.0), half::f16::ONE]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(ActDtype::F16.first_non_finite(&f16s), Some(0));
        let bf16s: Vec<u8> = [half::bf16::ONE, half::bf16::from_f32(3.0)]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(ActDtype::Bf16.first_non_finite(&bf16s), None);
    }
}
