//! Deterministic Parquet: identical batches give identical bytes, whoever writes them and whenever.
//!
//! parquet-rs writes no timestamps itself; what varies between writers is `created_by` (it embeds the
//! library version), so it is fixed here. zstd with a fixed level; statistics are a function of the data.

use std::fs::File;
use std::path::Path;

use anyhow::Context;
use arrow_array::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

/// The `created_by` string of every Parquet file saeflow writes.
pub const CREATED_BY: &str = "saeflow";

/// Writer settings used for every Parquet file saeflow writes.
pub fn writer_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_created_by(CREATED_BY.to_string())
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(3).expect("valid zstd level"),
        ))
        .set_max_row_group_size(64 * 1024)
        .build()
}

/// Writes batches (all with the same schema) to `path`.
pub fn write_batches(path: &Path, batches: &[RecordBatch]) -> anyhow::Result<()> {
    let schema = batches.first().context("no batches to write")?.schema();
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut writer = ArrowWriter::try_new(file, schema, Some(writer_properties()))?;
    for batch in batches {
        writer
            .write(batch)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    writer
        .close()
        .with_context(|| format!("finishing {}", path.display()))?;
    Ok(())
}

/// Every record batch of a Parquet file, errors naming the file.
pub fn read_batches(path: &Path) -> anyhow::Result<Vec<RecordBatch>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{}: not a readable Parquet file", path.display()))?
        .build()?
        .map(|b| b.with_context(|| format!("reading {}", path.display())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use arrow_array::{Float32Array, StringArray, UInt64Array};
    use parquet::file::reader::{FileReader, SerializedFileReader};

    fn batch() -> RecordBatch {
        RecordBatch::try_from_iter([
            ("doc_id", Arc::new(UInt64Array::from(vec![3u64, 1, 2])) as _),
            (
                "text",
                Arc::new(StringArray::from(vec!["a", "bb", "ccc"])) as _,
            ),
            (
                "score",
                Arc::new(Float32Array::from(vec![0.5f32, -1.0, 2.25])) as _,
            ),
        ])
        .unwrap()
    }

    #[test]
    fn same_batches_give_identical_bytes_with_fixed_created_by() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.parquet"), dir.path().join("b.parquet"));
        write_batches(&a, &[batch()]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        write_batches(&b, &[batch()]).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        let reader = SerializedFileReader::new(File::open(&a).unwrap()).unwrap();
        assert_eq!(
            reader.metadata().file_metadata().created_by(),
            Some(CREATED_BY)
        );
        assert_eq!(reader.metadata().file_metadata().num_rows(), 3);
    }
}
