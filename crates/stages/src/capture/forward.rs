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
}

impl Forward<'_> {
    /// Runs one batch and appends the stored activations to the shard; returns the stored entries in
    /// order. A NaN or Inf among them is an error naming the document and position.
    pub(super) fn run(
        &self,
        batch: &[Vec<Entry>],
        rows: &[Row],
        shard: &mut ShardBuffer,
    ) -> anyhow::Result<Vec<Entry>> {
        let t = batch.iter().map(Vec::len).max().unwrap_or(0);
        // Right padding with token 0: attention is causal, so padding never reaches a real position.
        let mut ids = vec![0u32; batch.len() * t];
        let mut index = Vec::new();
        let mut stored = Vec::new();
        for (b, seq) in batch.iter().enumerate() {
            for (i, e) in seq.iter().enumerate() {
                ids[b * t + i] = e.token;
                if e.store {
                    index.push((b * t + i) as u32);
                    stored.push(*e);
                }
            }
        }
        let input = Tensor::from_vec(ids, (batch.len(), t), self.device)?;
        let out = self
            .model
            .transformer
            .forward(&input, &self.capture, None)?;
        let index = Tensor::from_vec(index, stored.len(), self.device)?;
        let d = self.model.transformer.config.d_model;
        for (i, hook) in self.hooks.iter().enumerate() {
            let acts = out.activations[hook]
                .reshape((batch.len() * t, d))?
                .index_select(&index, 0)?;
            let norms: Vec<f32> = acts.sqr()?.sum(1)?.sqrt()?.to_vec1()?;
            shard.norm_sums[i] += norms.iter().map(|&n| n as f64).sum::<f64>();
            let acts = acts.to_dtype(self.dtype.dtype())?.flatten_all()?;
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
