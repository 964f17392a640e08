//! `saeflow show`: the first rows and the label counts of a stage's Parquet outputs.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::fs::File;
use std::path::Path;

use anyhow::Context;
use arrow_array::cast::AsArray;
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

/// Widest a cell may be before it is cut.
const CELL: usize = 48;

fn cell_text(column: &dyn Array, row: usize) -> String {
    if column.is_null(row) {
        return "∅".into();
    }
    let text = match column.data_type() {
        DataType::Utf8 => column.as_string::<i32>().value(row).to_string(),
        DataType::LargeUtf8 => column.as_string::<i64>().value(row).to_string(),
        _ => arrow_cast::display::ArrayFormatter::try_new(column, &Default::default())
            .map(|f| f.value(row).to_string())
            .unwrap_or_else(|_| "?".into()),
    };
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { '⏎' } else { c })
        .collect();
    if flat.chars().count() > CELL {
        format!("{}…", flat.chars().take(CELL - 1).collect::<String>())
    } else {
        flat
    }
}

/// Renders the first `limit` rows of a batch as an aligned text table.
fn table(batch: &RecordBatch, limit: usize) -> String {
    let names: Vec<String> = batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let rows: Vec<Vec<String>> = (0..batch.num_rows().min(limit))
        .map(|r| {
            batch
                .columns()
                .iter()
                .map(|c| cell_text(c.as_ref(), r))
                .collect()
        })
        .collect();
    let widths: Vec<usize> = (0..names.len())
        .map(|c| {
            rows.iter()
                .map(|r| r[c].chars().count())
                .chain([names[c].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| -> String {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
            .collect::<Vec<_>>()
            .join("  ")
    };
    let mut out = line(&names) + "\n";
    for r in &rows {
        out += &(line(r) + "\n");
    }
    out
}

/// A label object's `evaluation.parquet` as one line per (class, scope, method): the test AUROC with its
/// 95% interval, within-pair AUROC, recall at 1% false positives and the unit counts — every number beside
/// its interval and its baselines (empty when the object has none).
fn evaluation(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join("evaluation.parquet");
    if !path.is_file() {
        return Ok(String::new());
    }
    let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(&path)?)
        .with_context(|| format!("{}: not a readable Parquet file", path.display()))?
        .build()?;
    let number = |c: &dyn Array, r: usize| -> Option<f64> {
        (!c.is_null(r)).then(|| c.as_primitive::<arrow_array::types::Float64Type>().value(r))
    };
    let mut out = String::from(
        "every method on one unit, test split (AUROC [95% interval]; within pairs; recall at 1% FPR on the control; units of the class / the rest):\n",
    );
    // (class, scope rank, scope, file order) → the line: pooled first, then each source, then the matrix.
    let mut lines: Vec<((String, u8, String, usize), String)> = Vec::new();
    for batch in reader {
        let batch = batch?;
        let column = |name: &str| -> anyhow::Result<&dyn Array> {
            batch
                .column_by_name(name)
                .map(|c| c.as_ref())
                .with_context(|| format!("{}: no column `{name}`", path.display()))
        };
        let (class, method, scope) = (column("class")?, column("method")?, column("scope")?);
        let (auroc, low, high) = (
            column("auroc")?,
            column("auroc_low")?,
            column("auroc_high")?,
        );
        let (pair, n_pos, n_neg) = (
            column("within_pair_auroc")?,
            column("n_pos")?,
            column("n_neg")?,
        );
        let recall = batch
            .column_by_name("recall_at_1pct_fpr")
            .map(|c| c.as_ref());
        for r in 0..batch.num_rows() {
            let estimate = match (number(auroc, r), number(low, r), number(high, r)) {
                (Some(a), Some(l), Some(h)) => format!("{a:.3} [{l:.3}, {h:.3}]"),
                _ => "–".into(),
            };
            let optional = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.3}"));
            let scope = cell_text(scope, r);
            let rank = match scope.as_str() {
                "pooled" => 0,
                s if s.starts_with("source:") => 1,
                _ => 2,
            };
            lines.push((
                (cell_text(class, r), rank, scope, lines.len()),
                format!(
                    "    {:<20} {estimate:<22} pairs {:<6} recall {:<6} n {} / {}",
                    cell_text(method, r),
                    optional(number(pair, r)),
                    optional(recall.and_then(|c| number(c, r))),
                    cell_text(n_pos, r),
                    cell_text(n_neg, r),
                ),
            ));
        }
    }
    lines.sort();
    let mut heading = String::new();
    for ((class, _, scope, _), line) in lines {
        let here = format!("{class} · {scope}");
        if here != heading {
            writeln!(out, "  {here}")?;
            heading = here;
        }
        writeln!(out, "{line}")?;
    }
    Ok(out + "\n")
}

/// Describes every Parquet file of an object directory: row count, first rows, label counts; for a label
/// object, first its evaluation with intervals.
pub fn show(dir: &Path, limit: usize) -> anyhow::Result<String> {
    let mut out = evaluation(dir)?;
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    for path in files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
    {
        let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(path)?)
            .with_context(|| format!("{}: not a readable Parquet file", path.display()))?;
        let total = builder.metadata().file_metadata().num_rows();
        let schema = builder.metadata().file_metadata().schema_descr_ptr();
        let label_index = builder
            .schema()
            .fields()
            .iter()
            .position(|f| f.name() == "label");
        let split_index = builder
            .schema()
            .fields()
            .iter()
            .position(|f| f.name() == "split");
        let name = path.file_name().expect("file").to_string_lossy();
        writeln!(out, "{name}: {total} rows")?;
        if let Some(first) = builder.with_batch_size(limit.max(1)).build()?.next() {
            out += &table(&first?, limit);
        }
        if let Some(li) = label_index {
            let indices: Vec<usize> = [Some(li), split_index].into_iter().flatten().collect();
            let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(path)?)?
                .with_projection(ProjectionMask::roots(&schema, indices.clone()))
                .build()?;
            let mut counts: BTreeMap<(String, String), u64> = BTreeMap::new();
            for batch in reader {
                let batch = batch?;
                for r in 0..batch.num_rows() {
                    let label = cell_text(batch.column(0).as_ref(), r);
                    let split = if indices.len() > 1 {
                        cell_text(batch.column(1).as_ref(), r)
                    } else {
                        String::new()
                    };
                    *counts.entry((label, split)).or_default() += 1;
                }
            }
            writeln!(out, "label counts (label, split: rows):")?;
            for ((label, split), n) in counts {
                writeln!(out, "  {label:<24} {split:<6} {n}")?;
            }
        }
        out.push('\n');
    }
    if out.is_empty() {
        out = format!("no Parquet files in {}\n", dir.display());
    }
    Ok(out)
}
