//! Streams `[n, d_model]` batches out of a capture: shuffled (seeded block order across shards, then a mixing
//! buffer) or in store order, optionally restricted to splits, in bounded memory. Decoding runs on a
//! background thread so it overlaps with whatever consumes the batches.

use std::collections::{BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};

use anyhow::{bail, Context};
use arrow_array::cast::AsArray;
use arrow_array::Array;
use candle_core::{DType, Device, Tensor};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::reader::{FileReader, SerializedFileReader};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{act_file_name, CaptureInfo, ACT_COLUMN};

/// How to read batches.
#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// Rows per batch (the last batch may be smaller).
    pub batch_size: usize,
    /// Seed of the shuffle; `None` reads rows in store order.
    pub shuffle: Option<u64>,
    /// Rows held in the mixing buffer (memory ≈ rows × d_model × element size); shuffled batches draw
    /// from the whole buffer, which is refilled whenever it is half empty.
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
            buffer_rows: 1 << 16,
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
                for (path, group, first_row, rows) in blocks {
                    // A block without a wanted row is not read at all (a split filter on a big store).
                    if let Some(mask) = &mask {
                        let start = first_row as usize;
                        if !mask[start..start + rows].iter().any(|&m| m) {
                            continue;
                        }
                    }
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
            slots: Vec::new(),
            slot_rows: Vec::new(),
            live: VecDeque::new(),
            free: Vec::new(),
            device: device.clone(),
        })
    }
}

/// Decoded rows of one row group: `width`-byte rows in Arrow buffers (no copy unless a split filter drops
/// rows) and the tokens.parquet row of each.
struct Block {
    parts: Vec<arrow_buffer::Buffer>,
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
        parts: Vec::new(),
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
            })?;
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
                block.parts.push(
                    column
                        .values()
                        .slice_with_length(column.value_offset(0) as usize, column.len() * width),
                );
                block.rows.extend(start..start + column.len() as u64);
            }
            Some(mask) => {
                let mut kept = Vec::new();
                for i in 0..column.len() {
                    let row = start + i as u64;
                    if mask[row as usize] {
                        kept.extend_from_slice(&data[i * width..(i + 1) * width]);
                        block.rows.push(row);
                    }
                }
                block.parts.push(arrow_buffer::Buffer::from_vec(kept));
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
    /// Row slots of `width` bytes each, and the tokens.parquet row in each slot.
    slots: Vec<u8>,
    slot_rows: Vec<u64>,
    /// Slots holding rows not served yet (in arrival order when not shuffling).
    live: VecDeque<usize>,
    /// Slots whose row was served, to be refilled.
    free: Vec<usize>,
    device: Device,
}

impl Batches {
    /// Receives blocks until `target` rows are waiting or the store is exhausted.
    fn fill(&mut self, target: usize) -> anyhow::Result<()> {
        while !self.done && self.live.len() < target {
            let block = match self.rx.recv() {
                Ok(block) => block?,
                Err(_) => {
                    self.done = true;
                    break;
                }
            };
            let rows_of_parts = block.parts.iter().flat_map(|p| p.chunks_exact(self.width));
            for (bytes, &row) in rows_of_parts.zip(&block.rows) {
                let slot = match self.free.pop() {
                    Some(slot) => {
                        self.slots[slot * self.width..(slot + 1) * self.width]
                            .copy_from_slice(bytes);
                        self.slot_rows[slot] = row;
                        slot
                    }
                    None => {
                        self.slots.extend_from_slice(bytes);
                        self.slot_rows.push(row);
                        self.slot_rows.len() - 1
                    }
                };
                self.live.push_back(slot);
            }
        }
        Ok(())
    }

    fn next_batch(&mut self) -> anyhow::Result<Option<Batch>> {
        let size = self.options.batch_size;
        // Shuffled: keep the mixing buffer at least half full and draw rows from all of it at random, so
        // rows from far-apart blocks meet in a batch; each row is copied in once and out once.
        let low_water = match self.rng {
            Some(_) => (self.options.buffer_rows / 2).max(size),
            None => size,
        };
        if self.live.len() < low_water {
            self.fill(self.options.buffer_rows.max(size))?;
        }
        let n = size.min(self.live.len());
        if n == 0 {
            return Ok(None);
        }
        // Gathered into f32-aligned memory, so f32 rows become a tensor without another copy.
        let mut gathered = vec![0f32; (n * self.width).div_ceil(4)];
        let bytes = &mut bytemuck::cast_slice_mut::<f32, u8>(&mut gathered)[..n * self.width];
        let mut rows = Vec::with_capacity(n);
        for out in bytes.chunks_exact_mut(self.width) {
            let slot = match &mut self.rng {
                Some(rng) => {
                    let pick = rng.random_range(0..self.live.len());
                    self.live.swap_remove_back(pick).expect("in range")
                }
                None => self.live.pop_front().expect("non-empty"),
            };
            out.copy_from_slice(&self.slots[slot * self.width..(slot + 1) * self.width]);
            rows.push(self.slot_rows[slot]);
            self.free.push(slot);
        }
        let acts = to_tensor(
            gathered,
            n * self.width,
            self.store_dtype,
            self.options.dtype,
            (n, self.d_model),
            &self.device,
        )?;
        Ok(Some(Batch { acts, rows }))
    }
}

/// A `[n, d]` tensor of `to` values from the first `len` bytes of `data` (little-endian `from` values).
/// On the CPU, f32 rows are used in place and half precision goes through `half`'s SIMD slice conversion
/// (several times faster than an element-wise cast).
fn to_tensor(
    data: Vec<f32>,
    len: usize,
    from: DType,
    to: DType,
    shape: (usize, usize),
    device: &Device,
) -> anyhow::Result<Tensor> {
    use half::slice::HalfFloatSliceExt;
    let bytes = &bytemuck::cast_slice::<f32, u8>(&data)[..len];
    if device.is_cpu() && to == DType::F32 {
        let floats = match from {
            DType::F32 => data,
            DType::F16 => {
                let mut out = vec![0f32; shape.0 * shape.1];
                bytemuck::cast_slice::<u8, half::f16>(bytes).convert_to_f32_slice(&mut out);
                out
            }
            DType::BF16 => {
                let mut out = vec![0f32; shape.0 * shape.1];
                bytemuck::cast_slice::<u8, half::bf16>(bytes).convert_to_f32_slice(&mut out);
                out
            }
            other => bail!("unsupported stored dtype {other:?}"),
        };
        return Ok(Tensor::from_vec(floats, shape, device)?);
    }
    Ok(Tensor::from_raw_buffer(bytes, from, &[shape.0, shape.1], device)?.to_dtype(to)?)
}

impl Iterator for Batches {
    type Item = anyhow::Result<Batch>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_batch().transpose()
    }
}
