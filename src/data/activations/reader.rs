//! Streams `[n, d_model]` batches out of a capture: shuffled (seeded block order across shards, then a mixing
//! buffer) or in store order, optionally restricted to splits, in bounded memory. Decoding runs on a
//! background thread so it overlaps with whatever consumes the batches.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};

use anyhow::{bail, Context};
use arrow_array::cast::AsArray;
use arrow_array::Array;
use candle_core::{DType, Device, Tensor};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::reader::{FileReader, SerializedFileReader};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{act_file_name, CaptureInfo, ACT_COLUMN};

/// How to read batches.
#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// Rows per batch (the last batch may be smaller).
    pub batch_size: usize,
    /// Seed of the shuffle; `None` reads rows in store order.
    pub shuffle: Option<u64>,
    /// Rows held in the mixing buffer when shuffling (memory ≈ rows × d_model × element size).
    pub buffer_rows: usize,
    /// Only rows whose `split` is one of these.
    pub splits: Option<Vec<String>>,
    /// Element type of the returned tensors.
    pub dtype: DType,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self {
            batch_size: 4096,
            shuffle: None,
            buffer_rows: 1 << 18,
            splits: None,
            dtype: DType::F32,
        }
    }
}

/// One batch: activations and the `tokens.parquet` row index of each.
#[derive(Debug)]
pub struct Batch {
    /// `[n, d_model]`.
    pub acts: Tensor,
    /// Row of `tokens.parquet` each activation belongs to.
    pub rows: Vec<u64>,
}

/// One hook's activations in a capture directory.
#[derive(Debug, Clone)]
pub struct ActivationStore {
    dir: PathBuf,
    /// The capture's `capture.json`.
    pub info: CaptureInfo,
    hook: String,
    /// (file, first row, rows) per Parquet row group, in store order.
    blocks: Vec<(PathBuf, usize, u64, usize)>,
}

impl ActivationStore {
    /// Opens the shards of `hook` in a capture directory; checks they hold the rows `capture.json` lists.
    pub fn open(dir: &Path, hook: &str) -> anyhow::Result<Self> {
        let info = CaptureInfo::read(dir)?;
        if !info.hooks.iter().any(|h| h == hook) {
            bail!(
                "{}: hook `{hook}` was not captured (captured: {})",
                dir.display(),
                info.hooks.join(", ")
            );
        }
        let mut blocks = Vec::new();
        for (i, shard) in info.shards.iter().enumerate() {
            let path = dir.join(act_file_name(hook, i));
            let file = std::fs::File::open(&path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            let meta = SerializedFileReader::new(file)
                .with_context(|| format!("{}: not a readable Parquet file", path.display()))?
                .metadata()
                .clone();
            let mut row = shard.first_row;
            for (g, group) in meta.row_groups().iter().enumerate() {
                blocks.push((path.clone(), g, row, group.num_rows() as usize));
                row += group.num_rows() as u64;
            }
            if row != shard.first_row + shard.rows {
                bail!(
                    "{}: holds {} rows, capture.json says {}",
                    path.display(),
                    row - shard.first_row,
                    shard.rows
                );
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            info,
            hook: hook.to_string(),
            blocks,
        })
    }

    /// The hook read.
    pub fn hook(&self) -> &str {
        &self.hook
    }

    /// Rows (tokens) in the store.
    pub fn rows(&self) -> u64 {
        self.info.tokens
    }

    /// Width of each vector.
    pub fn d_model(&self) -> usize {
        self.info.d_model
    }

    /// For each row, whether its split is one of `splits` (read from `tokens.parquet`).
    pub fn split_mask(&self, splits: &[String]) -> anyhow::Result<Vec<bool>> {
        let path = self.dir.join("tokens.parquet");
        let file = std::fs::File::open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)?;
        let index = builder
            .schema()
            .index_of("split")
            .with_context(|| format!("{}: no split column", path.display()))?;
        let mask = parquet::arrow::ProjectionMask::roots(builder.parquet_schema(), [index]);
        let wanted: BTreeSet<&str> = splits.iter().map(String::as_str).collect();
        let mut out = Vec::with_capacity(self.rows() as usize);
        for batch in builder.with_projection(mask).build()? {
            let batch = batch?;
            let column = batch.column(0).as_string::<i32>();
            out.extend(column.iter().map(|s| s.is_some_and(|s| wanted.contains(s))));
        }
        if out.len() as u64 != self.rows() {
            bail!(
                "{}: {} rows, the activations have {}",
                path.display(),
                out.len(),
                self.rows()
            );
        }
        Ok(out)
    }

    /// Streams batches on `device`.
    pub fn batches(&self, options: &ReadOptions, device: &Device) -> anyhow::Result<Batches> {
        if options.batch_size == 0 {
            bail!("batch size must be at least 1");
        }
        let mask = match &options.splits {
            Some(s) => Some(self.split_mask(s)?),
            None => None,
        };
        let mut blocks = self.blocks.clone();
        if let Some(seed) = options.shuffle {
            blocks.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        }
        let width = self.info.d_model * self.info.dtype.size();
        // Two blocks in flight: enough to overlap decoding with consumption, bounded in memory.
        let (tx, rx) = sync_channel(2);
        std::thread::Builder::new()
            .name("saeflow-act-reader".into())
            .spawn(move || {
                for (path, group, first_row, _) in blocks {
                    let block = read_block(&path, group, first_row, width, mask.as_deref());
                    let failed = block.is_err();
                    if tx.send(block).is_err() || failed {
                        return;
                    }
                }
            })?;
        Ok(Batches {
            rx,
            done: false,
            width,
            store_dtype: self.info.dtype.dtype(),
            d_model: self.info.d_model,
            options: options.clone(),
            rng: options
                .shuffle
                .map(|s| ChaCha8Rng::seed_from_u64(s ^ 0x5eed)),
            buffer: Vec::new(),
            rows: Vec::new(),
            consumed: 0,
            device: device.clone(),
        })
    }
}

struct Block {
    bytes: Vec<u8>,
    rows: Vec<u64>,
}

fn read_block(
    path: &Path,
    group: usize,
    first_row: u64,
    width: usize,
    mask: Option<&[bool]>,
) -> anyhow::Result<Block> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)?
        .with_row_groups(vec![group])
        .with_batch_size(usize::MAX >> 1)
        .build()?;
    let mut block = Block {
        bytes: Vec::new(),
        rows: Vec::new(),
    };
    for batch in reader {
        let batch = batch.with_context(|| format!("decoding {}", path.display()))?;
        let column = batch
            .column_by_name(ACT_COLUMN)
            .with_context(|| format!("{}: no `{ACT_COLUMN}` column", path.display()))?
            .as_fixed_size_binary_opt()
            .with_context(|| {
                format!(
                    "{}: `{ACT_COLUMN}` is not fixed-size binary",
                    path.display()
                )
            })?
            .clone();
        if column.value_length() as usize != width {
            bail!(
                "{}: rows of {} bytes, expected {width}",
                path.display(),
                column.value_length()
            );
        }
        let start = first_row + block.rows.len() as u64;
        let data = column.value_data();
        match mask {
            None => {
                block.bytes.extend_from_slice(data);
                block.rows.extend(start..start + column.len() as u64);
            }
            Some(mask) => {
                for i in 0..column.len() {
                    let row = start + i as u64;
                    if mask[row as usize] {
                        block
                            .bytes
                            .extend_from_slice(&data[i * width..(i + 1) * width]);
                        block.rows.push(row);
                    }
                }
            }
        }
    }
    Ok(block)
}

/// Iterator over batches; see [`ActivationStore::batches`].
pub struct Batches {
    rx: Receiver<anyhow::Result<Block>>,
    done: bool,
    width: usize,
    store_dtype: DType,
    d_model: usize,
    options: ReadOptions,
    rng: Option<ChaCha8Rng>,
    /// Rows waiting to be served, `width` bytes each; rows `consumed..` of it are still unserved.
    buffer: Vec<u8>,
    rows: Vec<u64>,
    consumed: usize,
    device: Device,
}

impl Batches {
    fn pending(&self) -> usize {
        self.rows.len() - self.consumed
    }

    /// Receives blocks until `target` rows are pending or the store is exhausted.
    fn fill(&mut self, target: usize) -> anyhow::Result<()> {
        if self.consumed > 0 {
            self.buffer.drain(..self.consumed * self.width);
            self.rows.drain(..self.consumed);
            self.consumed = 0;
        }
        while !self.done && self.pending() < target {
            match self.rx.recv() {
                Ok(block) => {
                    let block = block?;
                    self.buffer.extend_from_slice(&block.bytes);
                    self.rows.extend_from_slice(&block.rows);
                }
                Err(_) => self.done = true,
            }
        }
        Ok(())
    }

    fn shuffle_pending(&mut self) {
        let Some(rng) = &mut self.rng else {
            return;
        };
        let mut order: Vec<usize> = (0..self.rows.len()).collect();
        order.shuffle(rng);
        let w = self.width;
        let mut bytes = Vec::with_capacity(self.buffer.len());
        for &i in &order {
            bytes.extend_from_slice(&self.buffer[i * w..(i + 1) * w]);
        }
        self.rows = order.iter().map(|&i| self.rows[i]).collect();
        self.buffer = bytes;
    }

    fn next_batch(&mut self) -> anyhow::Result<Option<Batch>> {
        let size = self.options.batch_size;
        if self.rng.is_some() {
            // Serve only the first half of a full mixing buffer, then mix fresh blocks in and reshuffle, so
            // rows from far-apart blocks meet.
            let full = self.options.buffer_rows.max(size);
            if !self.done && self.pending() < (full / 2).max(size) {
                self.fill(full)?;
                self.shuffle_pending();
            }
        } else if !self.done && self.pending() < size {
            self.fill(size)?;
        }
        let n = size.min(self.pending());
        if n == 0 {
            return Ok(None);
        }
        let (from, to) = (self.consumed, self.consumed + n);
        let bytes = &self.buffer[from * self.width..to * self.width];
        let acts =
            Tensor::from_raw_buffer(bytes, self.store_dtype, &[n, self.d_model], &self.device)?
                .to_dtype(self.options.dtype)?;
        let rows = self.rows[from..to].to_vec();
        self.consumed = to;
        Ok(Some(Batch { acts, rows }))
    }
}

impl Iterator for Batches {
    type Item = anyhow::Result<Batch>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_batch().transpose()
    }
}
