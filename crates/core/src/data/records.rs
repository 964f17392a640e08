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
            Err(e) if ["NaN", "Infinity"].iter().any(|w| line.contains(w)) => {
                bail!("{location}: malformed JSON: {e} (NaN and Infinity are not JSON numbers)")
            }
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
    if headers.is_empty() {
        bail!("{}: empty file (no header row)", path.display());
    }
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
    check_parquet_footer(&file)
        .with_context(|| format!("{}: not a readable Parquet file", path.display()))?;
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
                let v = match cell(column.as_ref(), i) {
                    Ok(v) => v,
                    Err(Cell::Unsupported) => bail!(
                        "{}: column `{}` has unsupported type {}",
                        path.display(),
                        field.name(),
                        field.data_type()
                    ),
                    Err(Cell::Infinite(x)) => bail!(
                        "{}:row {}: column `{}` holds {x}, which has no JSON value",
                        path.display(),
                        base + i + 1,
                        field.name()
                    ),
                };
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

/// Why a Parquet cell has no JSON value.
enum Cell {
    /// A column type records do not carry.
    Unsupported,
    /// ±infinity (JSON has no such number; NaN is read as null, pandas' missing value).
    Infinite(f64),
}

fn float(x: f64) -> Result<Json, Cell> {
    if x.is_infinite() {
        return Err(Cell::Infinite(x));
    }
    // serde_json turns NaN into null.
    Ok(Json::from(x))
}

fn cell(a: &dyn Array, i: usize) -> Result<Json, Cell> {
    if a.is_null(i) {
        return Ok(Json::Null);
    }
    Ok(match a.data_type() {
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
        DataType::Float32 => float(a.as_primitive::<Float32Type>().value(i) as f64)?,
        DataType::Float64 => float(a.as_primitive::<Float64Type>().value(i))?,
        _ => return Err(Cell::Unsupported),
    })
}

/// Deepest struct/list nesting accepted in a Parquet footer (real files nest a handful of levels).
const MAX_FOOTER_DEPTH: usize = 64;

/// Walks the Parquet footer's thrift (compact protocol) without building it, refusing any list, set, map or
/// binary whose declared size exceeds the bytes left in the footer, and nesting deeper than
/// [`MAX_FOOTER_DEPTH`]. The parquet crate reserves room for a declared list before reading it, so a
/// few-hundred-byte file claiming 2^31 schema elements would otherwise abort the process in the allocator.
/// Files too short to have a footer, or without the `PAR1` magic, are left to the parquet crate's own errors.
fn check_parquet_footer(file: &File) -> anyhow::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let len = file.metadata()?.len();
    if len < 12 {
        return Ok(());
    }
    let mut f = file;
    f.seek(SeekFrom::End(-8))?;
    let mut tail = [0u8; 8];
    f.read_exact(&mut tail)?;
    if &tail[4..] != b"PAR1" {
        return Ok(());
    }
    let meta_len = u32::from_le_bytes(tail[..4].try_into().expect("4 bytes")) as u64;
    if meta_len + 8 > len {
        bail!("the footer claims {meta_len} bytes of metadata but the file holds {len} bytes");
    }
    f.seek(SeekFrom::Start(len - 8 - meta_len))?;
    let mut meta = vec![0u8; meta_len as usize];
    f.read_exact(&mut meta)?;
    f.seek(SeekFrom::Start(0))?;
    let mut walker = Thrift { buf: &meta, pos: 0 };
    walker
        .skip(12, 0)
        .map_err(|e| anyhow::anyhow!("corrupt footer metadata: {e}"))
}

/// A cursor over thrift compact-protocol bytes that only checks sizes.
struct Thrift<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Thrift<'_> {
    fn byte(&mut self) -> Result<u8, String> {
        let b = *self
            .buf
            .get(self.pos)
            .ok_or_else(|| format!("ends early at byte {}", self.pos))?;
        self.pos += 1;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..70).step_by(7) {
            let b = self.byte()?;
            if shift < 64 {
                v |= u64::from(b & 0x7f) << shift;
            }
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(format!("overlong varint at byte {}", self.pos))
    }

    fn left(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    /// Declared element count `n` of `what`, each taking at least `min` bytes, must fit in what is left.
    fn fits(&self, n: u64, min: u64, what: &str) -> Result<(), String> {
        if n.saturating_mul(min) > self.left() {
            return Err(format!(
                "a {what} at byte {} declares {n} elements but only {} bytes remain",
                self.pos,
                self.left()
            ));
        }
        Ok(())
    }

    fn skip(&mut self, ty: u8, depth: usize) -> Result<(), String> {
        if depth > MAX_FOOTER_DEPTH {
            return Err(format!("nested deeper than {MAX_FOOTER_DEPTH} levels"));
        }
        match ty {
            1 | 2 => {}
            3 => {
                self.byte()?;
            }
            4..=6 => {
                self.varint()?;
            }
            7 => self.advance(8)?,
            8 => {
                let n = self.varint()?;
                self.fits(n, 1, "binary")?;
                self.advance(n as usize)?;
            }
            9 | 10 => {
                let h = self.byte()?;
                let n = match h >> 4 {
                    15 => self.varint()?,
                    n => u64::from(n),
                };
                self.fits(n, 1, "list")?;
                let elem = h & 0x0f;
                for _ in 0..n {
                    // Booleans in lists take a byte each.
                    if elem == 1 || elem == 2 {
                        self.byte()?;
                    } else {
                        self.skip(elem, depth + 1)?;
                    }
                }
            }
            11 => {
                let n = self.varint()?;
                if n > 0 {
                    self.fits(n, 2, "map")?;
                    let kv = self.byte()?;
                    for _ in 0..n {
                        self.skip(kv >> 4, depth + 1)?;
                        self.skip(kv & 0x0f, depth + 1)?;
                    }
                }
            }
            12 => loop {
                let h = self.byte()?;
                if h == 0 {
                    break;
                }
                if h >> 4 == 0 {
                    self.varint()?; // long-form field id
                }
                self.skip(h & 0x0f, depth + 1)?;
            },
            13 => self.advance(16)?, // UUID
            other => return Err(format!("unknown thrift type {other} at byte {}", self.pos)),
        }
        Ok(())
    }

    fn advance(&mut self, n: usize) -> Result<(), String> {
        if n > self.buf.len() - self.pos {
            return Err(format!("ends early at byte {}", self.pos));
        }
        self.pos += n;
        Ok(())
    }
}

/// "a string", "an array", ...: a JSON value's type, for error messages.
pub(crate) fn type_name(v: &Json) -> &'static str {
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
    fn parquet_footer_declaring_a_huge_list_is_refused_before_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bomb.parquet");
        // FileMetaData { version: 1, schema: list<struct> of 2^31 - 1 elements } and nothing else.
        let meta = [0x15, 0x02, 0x19, 0xFC, 0xFF, 0xFF, 0xFF, 0xFF, 0x07];
        let mut bytes = b"PAR1".to_vec();
        bytes.extend(meta);
        bytes.extend((meta.len() as u32).to_le_bytes());
        bytes.extend(b"PAR1");
        std::fs::write(&p, bytes).unwrap();
        let err = format!("{:#}", read_parquet(&p).unwrap_err());
        assert!(
            err.contains("bomb.parquet: not a readable Parquet file: corrupt footer metadata: a list at byte 9 declares 2147483647 elements"),
            "{err}"
        );
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
