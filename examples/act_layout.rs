use arrow_array::{Array, FixedSizeBinaryArray, FixedSizeListArray, Float32Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use std::sync::Arc;

fn main() {
    let d = 576usize;
    let n = 65536usize;
    let vals: Vec<f32> = (0..n * d).map(|i| ((i as f32) * 0.37).sin()).collect();
    let props = || {
        WriterProperties::builder()
            .set_compression(Compression::UNCOMPRESSED)
            .set_dictionary_enabled(false)
            .set_statistics_enabled(parquet::file::properties::EnabledStatistics::None)
            .set_max_row_group_size(8192)
            .build()
    };
    // A
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    let list = FixedSizeListArray::new(
        item.clone(),
        d as i32,
        Arc::new(Float32Array::from(vals.clone())),
        None,
    );
    let schema = Arc::new(Schema::new(vec![Field::new(
        "act",
        DataType::FixedSizeList(item, d as i32),
        false,
    )]));
    let b = RecordBatch::try_new(schema.clone(), vec![Arc::new(list)]).unwrap();
    let t = std::time::Instant::now();
    let mut w = ArrowWriter::try_new(
        std::fs::File::create("/tmp/a.parquet").unwrap(),
        schema,
        Some(props()),
    )
    .unwrap();
    w.write(&b).unwrap();
    w.close().unwrap();
    println!("A write {:?}", t.elapsed());
    // B
    let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    let fsb = FixedSizeBinaryArray::try_new((d * 4) as i32, bytes.into(), None).unwrap();
    let schema = Arc::new(Schema::new(vec![Field::new(
        "act",
        DataType::FixedSizeBinary((d * 4) as i32),
        false,
    )]));
    let b = RecordBatch::try_new(schema.clone(), vec![Arc::new(fsb)]).unwrap();
    let t = std::time::Instant::now();
    let mut w = ArrowWriter::try_new(
        std::fs::File::create("/tmp/b.parquet").unwrap(),
        schema,
        Some(props()),
    )
    .unwrap();
    w.write(&b).unwrap();
    w.close().unwrap();
    println!("B write {:?}", t.elapsed());
    for f in ["/tmp/a.parquet", "/tmp/b.parquet"] {
        for _ in 0..3 {
            let t = std::time::Instant::now();
            let r = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(f).unwrap())
                .unwrap()
                .with_batch_size(8192)
                .build()
                .unwrap();
            let mut total = 0usize;
            let mut s = 0f32;
            for b in r {
                let b = b.unwrap();
                let c = b.column(0);
                if let Some(l) = c.as_any().downcast_ref::<FixedSizeListArray>() {
                    let v = l.values().as_any().downcast_ref::<Float32Array>().unwrap();
                    s += v.values()[0];
                    total += v.len();
                } else {
                    let l = c.as_any().downcast_ref::<FixedSizeBinaryArray>().unwrap();
                    total += l.value_data().len() / 4;
                    s += l.value(0)[0] as f32;
                }
            }
            let e = t.elapsed();
            println!(
                "{f} read {:?} {:.2} GB/s {} {}",
                e,
                (total * 4) as f64 / e.as_secs_f64() / 1e9,
                total,
                s
            );
        }
    }
}
