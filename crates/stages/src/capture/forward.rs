//! The model pass: a batch of sequences through the model, and the activations of the stored positions
//! appended to the shard buffer in the store's element type, checked for NaN and Inf before anything is
//! published.

use anyhow::bail;
use candle_core::{Device, Tensor};
use saeflow_core::data::activations::ActDtype;
use saeflow_core::data::rows::Row;
use saeflow_core::models::{Hook, Hooks, LoadedModel};

use super::sequences::Entry;
use super::shards::ShardBuffer;

/// Runs batches through the model and stores what they capture.
pub(super) struct Forward<'a> {
    pub(super) model: &'a LoadedModel,
    pub(super) capture: Hooks,
    pub(super) hooks: &'a [Hook],
    pub(super) dtype: ActDtype,
    pub(super) device: &'a Device,
    /// Leave out tokens whose norm at any hook exceeds this multiple of the batch's median stored norm.
    pub(super) norm_cut: Option<f64>,
}

/// Median of non-empty `v` (upper median for an even count).
fn median(v: &[f32]) -> f32 {
    let mut sorted = v.to_vec();
    sorted.sort_unstable_by(f32::total_cmp);
    sorted[sorted.len() / 2]
}

impl Forward<'_> {
    /// Runs one batch and appends the stored activations to the shard; returns the stored entries in
    /// order. Sinks (and, with `norm_cut`, outliers) are measured, not stored. A NaN or Inf among the stored
    /// values is an error naming the document and position.
    pub(super) fn run(
        &self,
        batch: &[Vec<Entry>],
        rows: &[Row],
        shard: &mut ShardBuffer,
    ) -> anyhow::Result<Vec<Entry>> {
        let t = batch.iter().map(Vec::len).max().unwrap_or(0);
        // Right padding with token 0: attention is causal, so padding never reaches a real position.
        let mut ids = vec![0u32; batch.len() * t];
        let (mut index, mut candidates) = (Vec::new(), Vec::new());
        for (b, seq) in batch.iter().enumerate() {
            for (i, e) in seq.iter().enumerate() {
                ids[b * t + i] = e.token;
                if e.store || e.sink {
                    index.push((b * t + i) as u32);
                    candidates.push(*e);
                }
            }
        }
        let input = Tensor::from_vec(ids, (batch.len(), t), self.device)?;
        let out = self
            .model
            .transformer
            .forward(&input, &self.capture, None)?;
        let index = Tensor::from_vec(index, candidates.len(), self.device)?;
        let d = self.model.transformer.config.d_model;
        // Every candidate's vector and norm per hook, then which are stored.
        let mut acts = Vec::new();
        let mut norms: Vec<Vec<f32>> = Vec::new();
        for hook in self.hooks {
            let a = out.activations[hook]
                .reshape((batch.len() * t, d))?
                .index_select(&index, 0)?;
            norms.push(a.sqr()?.sum(1)?.sqrt()?.to_vec1()?);
            acts.push(a);
        }
        let mut keep: Vec<bool> = candidates.iter().map(|e| e.store).collect();
        let mut dropped_norm = 0u64;
        if let Some(cut) = self.norm_cut {
            for n in &norms {
                let stored: Vec<f32> = n.iter().zip(&keep).filter(|p| *p.1).map(|p| *p.0).collect();
                if stored.is_empty() {
                    continue;
                }
                let limit = cut as f32 * median(&stored);
                for (k, &v) in keep.iter_mut().zip(n) {
                    if *k && v > limit {
                        *k = false;
                        dropped_norm += 1;
                    }
                }
            }
        }
        shard.dropped_norm += dropped_norm;
        let kept: Vec<u32> = (0..candidates.len() as u32)
            .filter(|&i| keep[i as usize])
            .collect();
        let stored: Vec<Entry> = kept.iter().map(|&i| candidates[i as usize]).collect();
        let kept_index = Tensor::from_vec(kept.clone(), kept.len(), self.device)?;
        for (i, hook) in self.hooks.iter().enumerate() {
            for (c, &n) in norms[i].iter().enumerate() {
                let sq = f64::from(n) * f64::from(n);
                if keep[c] {
                    shard.norm_sums[i] += f64::from(n);
                    shard.kept_sq_norms[i].push(sq as f32);
                } else {
                    shard.dropped_sq_norms[i].push(sq as f32);
                }
            }
            if kept.is_empty() {
                continue;
            }
            let acts = acts[i]
                .index_select(&kept_index, 0)?
                .to_dtype(self.dtype.dtype())?
                .flatten_all()?;
            let buf = &mut shard.acts[i];
            let start = buf.len();
            match self.dtype {
                ActDtype::F32 => {
                    buf.extend_from_slice(bytemuck::cast_slice(&acts.to_vec1::<f32>()?))
                }
                ActDtype::F16 => {
                    buf.extend_from_slice(bytemuck::cast_slice(&acts.to_vec1::<half::f16>()?))
                }
                ActDtype::Bf16 => {
                    buf.extend_from_slice(bytemuck::cast_slice(&acts.to_vec1::<half::bf16>()?))
                }
            }
            if let Some(at) = self.dtype.first_non_finite(&buf[start..]) {
                let e = stored[at / d];
                bail!(
                    "non-finite activation at {hook} in doc_id {} pos {} (token {}): nothing was published",
                    rows[e.row as usize].doc_id,
                    e.pos,
                    e.token
                );
            }
        }
        Ok(stored)
    }
}
