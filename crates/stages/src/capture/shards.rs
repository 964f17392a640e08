//! Resumable shard storage: the shard being filled, each finished shard written whole into the partial
//! directory with the batch the next one starts at (so a rerun finds where to resume), and the finished
//! shards put together into the output directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use saeflow_core::data::activations::{
    act_file_name, concat_tokens, tokens_batch, write_act_shard, ActDtype, ShardInfo, TokenRow,
};
use saeflow_core::models::Hook;
use serde::{Deserialize, Serialize};

/// A shard as kept in the partial directory.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ShardState {
    /// Batch the next shard starts at.
    pub(super) next_batch: u64,
    pub(super) rows: u64,
    /// Sum of vector norms per hook (for the mean in `capture.json`).
    norm_sums: BTreeMap<String, f64>,
    /// Tokens left out by the norm cut.
    #[serde(default)]
    dropped_norm: u64,
}

fn shard_dir(partial: &Path, shard: usize) -> PathBuf {
    partial.join(format!("shard-{shard:05}"))
}

/// Complete shards left by an interrupted run (a contiguous prefix); anything else there is removed.
pub(super) fn finished_shards(partial: &Path) -> anyhow::Result<Vec<ShardState>> {
    let mut shards = Vec::new();
    loop {
        let state = shard_dir(partial, shards.len()).join("state.json");
        match std::fs::read(&state) {
            Ok(bytes) => match serde_json::from_slice::<ShardState>(&bytes) {
                Ok(s) => shards.push(s),
                Err(_) => break,
            },
            Err(_) => break,
        }
    }
    if let Ok(entries) = std::fs::read_dir(partial) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let keep = name
                .strip_prefix("shard-")
                .and_then(|n| n.parse::<usize>().ok())
                .is_some_and(|n| n < shards.len());
            if !keep {
                let _ = std::fs::remove_dir_all(entry.path());
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    Ok(shards)
}

/// Activations and token rows of the shard being filled, and the norms the sink report needs.
pub(super) struct ShardBuffer {
    pub(super) acts: Vec<Vec<u8>>,
    pub(super) tokens: Vec<TokenRow>,
    pub(super) norm_sums: Vec<f64>,
    /// Squared norms per hook of the stored tokens, in order.
    pub(super) kept_sq_norms: Vec<Vec<f32>>,
    /// Squared norms per hook of the tokens left out as sinks or outliers.
    pub(super) dropped_sq_norms: Vec<Vec<f32>>,
    pub(super) dropped_norm: u64,
}

impl ShardBuffer {
    pub(super) fn new(hooks: usize) -> Self {
        Self {
            acts: vec![Vec::new(); hooks],
            tokens: Vec::new(),
            norm_sums: vec![0.0; hooks],
            kept_sq_norms: vec![Vec::new(); hooks],
            dropped_sq_norms: vec![Vec::new(); hooks],
            dropped_norm: 0,
        }
    }
}

/// What the finished shards hold together: their list, per-hook norm sums and the sink report's numbers.
pub(super) struct Assembled {
    pub(super) shards: Vec<ShardInfo>,
    pub(super) norm_sums: Vec<f64>,
    pub(super) dropped_norm: u64,
    /// Per hook: squared norms of the stored tokens and of those left out.
    pub(super) kept_sq_norms: Vec<Vec<f64>>,
    pub(super) dropped_sq_norms: Vec<Vec<f64>>,
}

fn read_f32s(path: &Path) -> anyhow::Result<Vec<f64>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f64::from(f32::from_ne_bytes(c.try_into().expect("4 bytes"))))
        .collect())
}

/// Puts the finished shards into the output directory: act files hard-linked (the partial copies stay valid
/// until publish), token tables concatenated; and sums up what they measured.
pub(super) fn assemble(
    partial: &Path,
    shard_count: usize,
    hooks: &[String],
    out_dir: &Path,
) -> anyhow::Result<Assembled> {
    let mut all = Assembled {
        shards: Vec::new(),
        norm_sums: vec![0.0f64; hooks.len()],
        dropped_norm: 0,
        kept_sq_norms: vec![Vec::new(); hooks.len()],
        dropped_sq_norms: vec![Vec::new(); hooks.len()],
    };
    let mut first_row = 0u64;
    let mut token_parts = Vec::new();
    for s in 0..shard_count {
        let dir = shard_dir(partial, s);
        let state: ShardState = serde_json::from_slice(&std::fs::read(dir.join("state.json"))?)?;
        all.dropped_norm += state.dropped_norm;
        for (i, h) in hooks.iter().enumerate() {
            all.norm_sums[i] += state.norm_sums[h];
            all.kept_sq_norms[i].extend(read_f32s(&dir.join(format!("sqnorms-{h}.f32")))?);
            all.dropped_sq_norms[i]
                .extend(read_f32s(&dir.join(format!("sqnorms-dropped-{h}.f32")))?);
            saeflow_core::fs::link_or_copy(
                &dir.join(format!("acts-{h}.parquet")),
                &out_dir.join(act_file_name(h, s)),
            )?;
        }
        token_parts.push(dir.join("tokens.parquet"));
        all.shards.push(ShardInfo {
            first_row,
            rows: state.rows,
        });
        first_row += state.rows;
    }
    concat_tokens(&token_parts, &out_dir.join("tokens.parquet"))?;
    Ok(all)
}

/// Writes the shard into a temporary directory, then renames it into place: a shard exists whole or not.
/// Returns the number of shards now written.
pub(super) fn write_shard(
    partial: &Path,
    index: usize,
    hooks: &[Hook],
    d: usize,
    dtype: ActDtype,
    shard: &mut ShardBuffer,
    next_batch: u64,
) -> anyhow::Result<usize> {
    let tmp = partial.join(format!("tmp-shard-{index:05}"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)
        .with_context(|| format!("creating capture shard {}", tmp.display()))?;
    let mut norm_sums = BTreeMap::new();
    for (i, hook) in hooks.iter().enumerate() {
        let name = hook.to_string();
        write_act_shard(
            &tmp.join(format!("acts-{name}.parquet")),
            std::mem::take(&mut shard.acts[i]),
            d,
            dtype,
        )?;
        // Native-endian f32, read back only by `assemble` on this machine for the sink report.
        std::fs::write(
            tmp.join(format!("sqnorms-{name}.f32")),
            bytemuck::cast_slice::<f32, u8>(&shard.kept_sq_norms[i]),
        )?;
        std::fs::write(
            tmp.join(format!("sqnorms-dropped-{name}.f32")),
            bytemuck::cast_slice::<f32, u8>(&shard.dropped_sq_norms[i]),
        )?;
        norm_sums.insert(name, shard.norm_sums[i]);
    }
    saeflow_core::data::parquet::write_batches(
        &tmp.join("tokens.parquet"),
        &[tokens_batch(&shard.tokens)?],
    )?;
    let state = ShardState {
        next_batch,
        rows: shard.tokens.len() as u64,
        norm_sums,
        dropped_norm: shard.dropped_norm,
    };
    saeflow_core::fs::write_atomic(
        &tmp.join("state.json"),
        serde_json::to_string_pretty(&state)?.as_bytes(),
    )?;
    let dest = shard_dir(partial, index);
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::rename(&tmp, &dest).with_context(|| format!("publishing shard {}", dest.display()))?;
    if let Ok(dir) = std::fs::File::open(partial) {
        let _ = dir.sync_all();
    }
    *shard = ShardBuffer::new(hooks.len());
    Ok(index + 1)
}

/// Writes finished shards on a background thread, one at a time and in order, so the forward goes on while
/// Parquet encodes and compresses the last one (on a GPU the forward would otherwise wait for it). At most
/// one shard waits to be written, so at most two shard buffers are in memory.
pub(super) struct ShardWriter<'scope> {
    queue: std::sync::mpsc::SyncSender<(usize, ShardBuffer, u64)>,
    written: std::sync::mpsc::Receiver<anyhow::Result<usize>>,
    thread: std::thread::ScopedJoinHandle<'scope, ()>,
}

impl<'scope> ShardWriter<'scope> {
    /// Starts the writer thread for shards of `hooks` (`d` wide, stored as `dtype`) in `partial`.
    pub(super) fn spawn<'env>(
        scope: &'scope std::thread::Scope<'scope, 'env>,
        partial: &'env Path,
        hooks: &'env [Hook],
        d: usize,
        dtype: ActDtype,
    ) -> Self {
        let (queue, jobs) = std::sync::mpsc::sync_channel::<(usize, ShardBuffer, u64)>(0);
        let (report, written) = std::sync::mpsc::channel();
        let thread = scope.spawn(move || {
            for (index, mut shard, next_batch) in jobs {
                let result = write_shard(partial, index, hooks, d, dtype, &mut shard, next_batch)
                    .map(|_| index);
                let failed = result.is_err();
                if report.send(result).is_err() || failed {
                    return;
                }
            }
        });
        Self {
            queue,
            written,
            thread,
        }
    }

    /// Hands shard `index` (to resume at batch `next_batch`) to the writer; waits while it still writes the
    /// one before. Fails with the writer's error if it has stopped.
    pub(super) fn send(
        &self,
        index: usize,
        shard: ShardBuffer,
        next_batch: u64,
    ) -> anyhow::Result<()> {
        if self.queue.send((index, shard, next_batch)).is_err() {
            // The writer stopped on an error, which it reported.
            self.written()?;
            anyhow::bail!("the shard writer stopped");
        }
        Ok(())
    }

    /// Indices of the shards published since the last call, or the first write error.
    pub(super) fn written(&self) -> anyhow::Result<Vec<usize>> {
        self.written.try_iter().collect()
    }

    /// Waits for every shard handed over; returns the indices published since the last [`Self::written`].
    pub(super) fn finish(self) -> anyhow::Result<Vec<usize>> {
        let Self {
            queue,
            written,
            thread,
        } = self;
        drop(queue);
        if thread.join().is_err() {
            anyhow::bail!("the shard writer panicked");
        }
        written.try_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use saeflow_core::models::HookPoint;

    fn one_token_shard(value: f32) -> ShardBuffer {
        let mut shard = ShardBuffer::new(1);
        shard.acts[0] = bytemuck::cast_slice(&[value, value]).to_vec();
        shard.kept_sq_norms[0].push(2.0 * value * value);
        shard.tokens.push(TokenRow {
            doc_id: 1,
            pos: 0,
            seq_pos: 0,
            token_id: 5,
            label: None,
            split: "train".into(),
            is_completion: false,
            source: "test".into(),
            subset: None,
            pair_id: None,
        });
        shard
    }

    #[test]
    fn the_writer_publishes_shards_in_order_and_reports_a_failed_write() {
        let dir = tempfile::tempdir().unwrap();
        let hooks = [Hook {
            layer: 0,
            point: HookPoint::ResidPost,
        }];
        let finished = std::thread::scope(|scope| {
            let writer = ShardWriter::spawn(scope, dir.path(), &hooks, 2, ActDtype::F32);
            for (i, v) in [1.0, 2.0, 3.0].into_iter().enumerate() {
                writer.send(i, one_token_shard(v), i as u64 + 1).unwrap();
            }
            writer.finish().unwrap()
        });
        // Every shard was reported (some maybe already through `written`, which this test did not call).
        assert_eq!(finished, [0, 1, 2]);
        let states = finished_shards(dir.path()).unwrap();
        assert_eq!(
            states.iter().map(|s| s.next_batch).collect::<Vec<_>>(),
            [1, 2, 3]
        );

        // A partial "directory" that is a file: the write fails, and the error reaches the caller.
        let file = dir.path().join("not-a-directory");
        std::fs::write(&file, b"").unwrap();
        // The writer stops at the failed shard, so the next hand-over fails with its error.
        let next = std::thread::scope(|scope| {
            let writer = ShardWriter::spawn(scope, &file, &hooks, 2, ActDtype::F32);
            writer.send(0, one_token_shard(1.0), 1).unwrap();
            let next = writer.send(1, one_token_shard(2.0), 2);
            assert!(writer.finish().unwrap().is_empty());
            next
        });
        let err = next.unwrap_err();
        assert!(format!("{err:#}").contains("not-a-directory"), "{err:#}");
    }
}
