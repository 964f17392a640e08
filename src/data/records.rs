//! Reading generic record files (JSONL, CSV, Parquet) into JSON objects, with errors that name file and line.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use anyhow::{bail, Context};
use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type, UInt32Type,
    UInt64Type, UInt8Type,
};
use arrow_array::Array;
use arrow_schema::DataType;
use serde_json::{Map, Value as Json};

/// One record and where it came from (for messages).
#[derive(Debug, Clone)]
pub struct Record {
    /// Field values.
    pub fields: Map<String, Json>,
    /// `file:line` (JSONL, CSV) or `file:row N` (Parquet).
    pub location: String,
}

/// File formats of generic sources.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One JSON object per line.
    Jsonl,
    /// Comma-separated values with a header row.
    Csv,
    /// Apache Parquet.
    Parquet,
}

impl Format {
    /// Guesses the format from a file name.
    pub fn from_path(path: &str) -> Option<Self> {
        let p = path.to_ascii_lowercase();
        if p.ends_with(".jsonl") || p.ends_with(".ndjson") {
            Some(Self::Jsonl)
        } else if p.ends_with(".csv") {
            Some(Self::Csv)
        } else if p.ends_with(".parquet") {
            Some(Self::Parquet)
        } else {
            None
        }
    }
}

/// Reads every record of a file.
pub fn read(path: &Path, format: Format) -> anyhow::Result<Vec<Record>> {
    match format {
        Format::Jsonl => read_jsonl(path),
        Format::Csv => read_csv(path),
        Format::Parquet => read_parquet(path),
    }
}

/// JSON Lines; blank lines are skipped, anything else must be a JSON object.
pub fn read_jsonl(path: &Path) -> anyhow::Result<Vec<Record>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line =
            line.with_context(|| format!("{}:{}: cannot read line", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let location = format!("{}:{}", path.display(), i + 1);
        match serde_json::from_str::<Json>(&line) {
            Ok(Json::Object(fields)) => out.push(Record { fields, location }),
            Ok(other) => bail!(
                "{location}: expected a JSON object, found {}",
                type_name(&other)
            ),
            Err(e) => bail!("{location}: malformed JSON: {e}"),
        }
    }
    Ok(out)
}

/// CSV with a header row; every value is a string.
pub fn read_csv(path: &Path) -> anyhow::Result<Vec<Record>> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(false)
        .from_path(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let headers = reader
        .headers()
        .with_context(|| format!("{}: cannot read the header row", path.display()))?
        .clone();
    let mut out = Vec::new();
    for result in reader.records() {
        let record = result.map_err(|e| {
            let line = e.position().map_or(0, |p| p.line());
            anyhow::anyhow!("{}:{line}: malformed CSV: {e}", path.display())
        })?;
        let line = record.position().map_or(0, |p| p.line());
        let fields = headers
            .iter()
            .zip(record.iter())
            .map(|(h, v)| (h.to_string(), Json::String(v.to_string())))
            .collect();
        out.push(Record {
            fields,
            location: format!("{}:{line}", path.display()),
        });
    }
    Ok(out)
}

/// Parquet; strings, integers, floats and booleans become JSON values, other types are refused.
pub fn read_parquet(path: &Path) -> anyhow::Result<Vec<Record>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{}: not a readable Parquet file", path.display()))?
        .build()?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.with_context(|| format!("{}: cannot decode", path.display()))?;
        let base = out.len();
        let mut rows: Vec<Map<String, Json>> = vec![Map::new(); batch.num_rows()];
        for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
            for (i, row) in rows.iter_mut().enumerate() {
                let v = cell(column.as_ref(), i).with_context(|| {
                    format!(
                        "{}: column `{}` has unsupported type {}",
                        path.display(),
                        field.name(),
                        field.data_type()
                    )
                })?;
                row.insert(field.name().clone(), v);
            }
        }
        out.extend(rows.into_iter().enumerate().map(|(i, fields)| Record {
            fields,
            location: format!("{}:row {}", path.display(), base + i + 1),
        }));
    }
    Ok(out)
}

fn cell(a: &dyn Array, i: usize) -> Option<Json> {
    if a.is_null(i) {
        return Some(Json::Null);
    }
    Some(match a.data_type() {
        DataType::Utf8 => Json::from(a.as_string::<i32>().value(i)),
        DataType::LargeUtf8 => Json::from(a.as_string::<i64>().value(i)),
        DataType::Utf8View => Json::from(a.as_string_view().value(i)),
        DataType::Boolean => Json::from(a.as_boolean().value(i)),
        DataType::Int8 => Json::from(a.as_primitive::<Int8Type>().value(i)),
        DataType::Int16 => Json::from(a.as_primitive::<Int16Type>().value(i)),
        DataType::Int32 => Json::from(a.as_primitive::<Int32Type>().value(i)),
        DataType::Int64 => Json::from(a.as_primitive::<Int64Type>().value(i)),
        DataType::UInt8 => Json::from(a.as_primitive::<UInt8Type>().value(i)),
        DataType::UInt16 => Json::from(a.as_primitive::<UInt16Type>().value(i)),
        DataType::UInt32 => Json::from(a.as_primitive::<UInt32Type>().value(i)),
        DataType::UInt64 => Json::from(a.as_primitive::<UInt64Type>().value(i)),
        DataType::Float32 => Json::from(a.as_primitive::<Float32Type>().value(i) as f64),
        DataType::Float64 => Json::from(a.as_primitive::<Float64Type>().value(i)),
        _ => return None,
    })
}

fn type_name(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// A field as text: strings as they are, other values as JSON; `None` for missing or null.
pub fn field_text(fields: &Map<String, Json>, name: &str) -> Option<String> {
    match fields.get(name)? {
        Json::Null => None,
        Json::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_jsonl_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.jsonl");
        std::fs::write(&p, "{\"a\": 1}\n\n{\"a\": 2,}\n").unwrap();
        let err = read_jsonl(&p).unwrap_err().to_string();
        assert!(err.contains("x.jsonl:3: malformed JSON"), "{err}");
    }

    #[test]
    fn csv_and_parquet_round_trip_values() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.csv");
        std::fs::write(&p, "text,label\n\"a, b\",1\nc,0\n").unwrap();
        let rows = read_csv(&p).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].fields["text"], "a, b");
        assert!(
            rows[1].location.ends_with("x.csv:3"),
            "{}",
            rows[1].location
        );

        let batch = arrow_array::RecordBatch::try_from_iter([
            (
                "text",
                std::sync::Arc::new(arrow_array::StringArray::from(vec![Some("x"), None])) as _,
            ),
            (
                "n",
                std::sync::Arc::new(arrow_array::Int64Array::from(vec![3, 4])) as _,
            ),
        ])
        .unwrap();
        let pq = dir.path().join("x.parquet");
        crate::data::parquet::write_batches(&pq, &[batch]).unwrap();
        let rows = read_parquet(&pq).unwrap();
        assert_eq!(rows[0].fields["text"], "x");
        assert_eq!(rows[1].fields["text"], Json::Null);
        assert_eq!(rows[1].fields["n"], 4);
    }
}
