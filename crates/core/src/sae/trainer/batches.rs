//! The training data a run reads: an endless sequence of full, normalised batches in a seeded order per
//! epoch, and the held-out validation rows.

use anyhow::bail;
use candle_core::{DType, Device};

use super::TrainConfig;
use crate::data::activations::{ActivationStore, ReadOptions};

/// The training data as an endless sequence of full batches (epochs reshuffled with `seed + epoch`).
pub(super) struct TrainingData<'a> {
    store: &'a ActivationStore,
    cfg: &'a TrainConfig,
    /// The current epoch, from 0 (set ahead when resuming).
    pub(super) epoch: u64,
    batches: Option<crate::data::activations::reader::Batches>,
}

impl<'a> TrainingData<'a> {
    pub(super) fn new(store: &'a ActivationStore, cfg: &'a TrainConfig) -> Self {
        Self {
            store,
            cfg,
            epoch: 0,
            batches: None,
        }
    }

    pub(super) fn next(&mut self) -> anyhow::Result<(Vec<f32>, Vec<u64>)> {
        for _attempt in 0..2 {
            if self.batches.is_none() {
                let options = ReadOptions {
                    batch_size: self.cfg.batch_size,
                    shuffle: Some(self.cfg.seed.wrapping_add(self.epoch)),
                    buffer_rows: self.cfg.buffer_rows,
                    splits: self.cfg.train_splits.clone(),
                    dtype: DType::F32,
                };
                self.batches = Some(self.store.batches(&options, &Device::Cpu)?);
            }
            if let Some(batch) = self.batches.as_mut().expect("set above").next() {
                let batch = batch?;
                if batch.rows.len() == self.cfg.batch_size {
                    let mut x: Vec<f32> = batch.acts.flatten_all()?.to_vec1()?;
                    x.iter_mut().for_each(|v| *v *= self.cfg.scale);
                    return Ok((x, batch.rows));
                }
            }
            // End of an epoch (a short last batch is dropped, so every step has the same size).
            self.batches = None;
            self.epoch += 1;
        }
        bail!(
            "fewer than {} training rows: lower batch_size or capture more tokens",
            self.cfg.batch_size
        )
    }
}

/// Rows of the validation split, normalised, in store order.
pub(super) fn validation_rows(
    store: &ActivationStore,
    cfg: &TrainConfig,
) -> anyhow::Result<Option<Vec<f32>>> {
    let Some((split, rows)) = &cfg.validation else {
        return Ok(None);
    };
    let options = ReadOptions {
        batch_size: *rows,
        splits: Some(vec![split.clone()]),
        ..ReadOptions::default()
    };
    match store.batches(&options, &Device::Cpu)?.next() {
        Some(b) => {
            let b = b?;
            let mut x: Vec<f32> = b.acts.flatten_all()?.to_vec1()?;
            if let Some(i) = x.iter().position(|v| !v.is_finite()) {
                bail!(
                    "non-finite activation in tokens.parquet row {} (column {}) of the capture",
                    b.rows[i / store.d_model()],
                    i % store.d_model()
                );
            }
            x.iter_mut().for_each(|v| *v *= cfg.scale);
            Ok(Some(x))
        }
        None => Ok(None),
    }
}
