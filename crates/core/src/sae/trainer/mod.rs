//! The training loop: batches from the activation store, a step of the configured architecture, gradient
//! clipping, decoder handling, Adam with warm-up and final decay, dead-latent statistics, validation, logs and
//! exact-resume checkpoints. Several SAEs can share one pass over the data ([`train_group`]).
//!
//! Recipe (see ARCHITECTURE.md): inputs scaled so E‖x‖ = √d_in (the capture's mean norm gives the scale);
//! decoder rows random unit vectors, encoder = decoder, b_dec = mean of the first batch (sparsify); every
//! step: loss = MSE plus AuxK (TopK, BatchTopK) or the sparsity penalty, ramped up over
//! `penalty_warmup_steps` (JumpReLU, ReLU); the decoder gradient's component along each row removed; global
//! gradient-norm clip; Adam; decoder rows renormalised (OpenAI / sparsify; ReLU skips both decoder steps, as
//! its L1 is weighted by the row norms). A latent is dead after `dead_tokens` tokens without firing.
//! Everything runs in a fixed order, so a fixed thread count gives bit-identical weights, and a resumed run
//! (state + data position from the last checkpoint) ends with the same bits.
//!
//! This file holds the group pass; its submodules hold the configuration (`config`), the state and its
//! optimiser step (`state`), checkpoints (`checkpoint`), export (`export`) and the data order (`batches`).

mod batches;
mod checkpoint;
mod config;
mod export;
mod state;

use std::path::{Path, PathBuf};

use anyhow::bail;

pub use config::{Engine, TrainConfig};
pub use state::{LogRow, State};

use crate::data::activations::ActivationStore;
use crate::sae::step::Grads;
use batches::{validation_rows, TrainingData};

/// Where a run reports to.
pub trait Callbacks {
    /// Called after every step with the number of steps done.
    fn progress(&self, _step: u64) {}
    /// Polled between steps; `true` stops every member with a checkpoint.
    fn cancelled(&self) -> bool {
        false
    }
    /// A line for the user.
    fn log(&self, _msg: &str) {}
    /// A checkpoint was just written (whole) into the run's checkpoint directory: a chance to copy it
    /// elsewhere. An error stops the run.
    fn checkpointed(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Why a run stopped early.
#[derive(Debug, thiserror::Error)]
pub enum Stop {
    /// Asked to stop; a checkpoint at `step` was written.
    #[error("stopped at step {0} (checkpoint written)")]
    Cancelled(u64),
}

/// One SAE of a group trained on a shared pass over the data.
pub struct Run<'a> {
    /// Its configuration (the data settings must equal the other members').
    pub cfg: &'a TrainConfig,
    /// Its checkpoint directory.
    pub checkpoints: PathBuf,
    /// Where it reports.
    pub callbacks: &'a dyn Callbacks,
}

/// Trains (or resumes from the checkpoint in `checkpoints`) to `cfg.steps` steps.
pub fn train(
    store: &ActivationStore,
    cfg: &TrainConfig,
    checkpoints: &Path,
    callbacks: &dyn Callbacks,
) -> anyhow::Result<State> {
    let run = Run {
        cfg,
        checkpoints: checkpoints.to_path_buf(),
        callbacks,
    };
    train_group(store, &[run])
        .pop()
        .expect("one result per run")
}

/// A group member during the pass.
enum Member {
    Training {
        state: Box<State>,
        grads: Box<Grads>,
        last_good: u64,
    },
    Finished(anyhow::Result<Box<State>>),
}

/// Trains several SAEs on one pass over the activations: each batch is read once and fed to every member
/// whose next step it is. Members only differ in what the data order does not depend on (architecture,
/// size, k, penalties, learning rate and schedule, step count); each ends exactly as it would alone, and
/// resumes from its own checkpoints. Returns one result per run, in order.
pub fn train_group(store: &ActivationStore, runs: &[Run]) -> Vec<anyhow::Result<State>> {
    let mut members: Vec<Member> = Vec::new();
    if let Err(e) = shared_pass(store, runs, &mut members) {
        // Errors of the shared data (unreadable store, NaN in a batch) stop every member still training.
        let msg = format!("{e:#}");
        members.resize_with(runs.len(), || {
            Member::Finished(Err(anyhow::anyhow!(msg.clone())))
        });
        for m in &mut members {
            if matches!(m, Member::Training { .. }) {
                *m = Member::Finished(Err(anyhow::anyhow!(msg.clone())));
            }
        }
    }
    members
        .into_iter()
        .map(|m| match m {
            Member::Finished(result) => result.map(|state| *state),
            Member::Training { .. } => unreachable!("the pass finishes every member"),
        })
        .collect()
}

fn shared_pass(
    store: &ActivationStore,
    runs: &[Run],
    members: &mut Vec<Member>,
) -> anyhow::Result<()> {
    let Some(first_run) = runs.first() else {
        return Ok(());
    };
    let data_cfg = first_run.cfg;
    for r in runs {
        let c = r.cfg;
        if (
            c.batch_size,
            c.seed,
            &c.train_splits,
            c.scale.to_bits(),
            c.buffer_rows,
            &c.validation,
        ) != (
            data_cfg.batch_size,
            data_cfg.seed,
            &data_cfg.train_splits,
            data_cfg.scale.to_bits(),
            data_cfg.buffer_rows,
            &data_cfg.validation,
        ) {
            bail!("members of a training group must share batch size, seed, splits, scale and validation");
        }
    }
    let d_in = store.d_model();
    let val = validation_rows(store, data_cfg)?;
    let mut first_batch = None;
    for r in runs {
        let member = match State::load_checkpoint(&r.checkpoints, d_in, r.cfg.d_sae) {
            Ok(Some(state)) => {
                r.callbacks.log(&format!(
                    "resuming from the checkpoint at step {}",
                    state.step
                ));
                Member::Training {
                    last_good: state.step,
                    state: Box::new(state),
                    grads: Box::default(),
                }
            }
            Ok(None) => {
                if first_batch.is_none() {
                    first_batch = Some(TrainingData::new(store, data_cfg).next()?.0);
                }
                let first = first_batch.as_deref().expect("read above");
                Member::Training {
                    state: Box::new(State::init(r.cfg, d_in, first)),
                    grads: Box::default(),
                    last_good: 0,
                }
            }
            Err(e) => Member::Finished(Err(e)),
        };
        members.push(member);
    }
    let steps_done = |m: &Member| match m {
        Member::Training { state, .. } => Some(state.step),
        Member::Finished(_) => None,
    };
    let Some(mut position) = members.iter().filter_map(steps_done).min() else {
        return Ok(());
    };
    // Every epoch yields exactly ⌊rows / batch⌋ full batches, so whole epochs are skipped and only the
    // current one is replayed up to the earliest member's step (reading is far cheaper than training).
    let mut data = TrainingData::new(store, data_cfg);
    let rows = match &data_cfg.train_splits {
        Some(splits) => splits
            .iter()
            .map(|s| store.info.splits.get(s).copied().unwrap_or(0))
            .sum(),
        None => store.rows(),
    };
    let per_epoch = (rows / data_cfg.batch_size as u64).max(1);
    data.epoch = position / per_epoch;
    for _ in 0..position % per_epoch {
        data.next()?;
    }
    loop {
        let cancelled = runs.iter().any(|r| r.callbacks.cancelled());
        for (m, r) in members.iter_mut().zip(runs) {
            let Member::Training { state, .. } = m else {
                continue;
            };
            let finished = if state.step >= r.cfg.steps {
                None
            } else if cancelled {
                Some(
                    state
                        .save_checkpoint(&r.checkpoints)
                        .and_then(|()| r.callbacks.checkpointed())
                        .map(|()| state.step),
                )
            } else {
                continue;
            };
            let taken = std::mem::replace(m, Member::Finished(Ok(Box::default())));
            let Member::Training { state, .. } = taken else {
                unreachable!("matched above")
            };
            *m = Member::Finished(match finished {
                None => Ok(state),
                Some(Ok(step)) => Err(Stop::Cancelled(step).into()),
                Some(Err(e)) => Err(e),
            });
        }
        if members.iter().all(|m| matches!(m, Member::Finished(_))) {
            return Ok(());
        }
        let (x, rows) = data.next()?;
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            bail!(
                "non-finite activation in tokens.parquet row {} (column {}) of the capture",
                rows[i / d_in],
                i % d_in
            );
        }
        for (m, r) in members.iter_mut().zip(runs) {
            if let Member::Training {
                state,
                grads,
                last_good,
            } = m
            {
                if state.step != position {
                    continue; // resumed ahead of this batch
                }
                if let Err(e) = member_step(state, r, &x, grads, val.as_deref(), last_good) {
                    *m = Member::Finished(Err(e));
                }
            }
        }
        position += 1;
    }
}

/// One step of one member on batch `x`, with its log row, checkpoint and progress report.
fn member_step(
    state: &mut State,
    run: &Run,
    x: &[f32],
    grads: &mut Grads,
    val: Option<&[f32]>,
    last_good: &mut u64,
) -> anyhow::Result<()> {
    let cfg = run.cfg;
    let lr = cfg.lr_at(state.step + 1) as f64;
    let stats = state.step(cfg, x, grads)?;
    let loss = stats.mse + stats.aux + stats.penalty;
    if !loss.is_finite() || state.weights.w_dec.iter().any(|v| !v.is_finite()) {
        bail!(
            "training diverged at step {} (loss {loss}); the last good checkpoint (step {last_good}) is \
             kept: lower lr and rerun to resume from it",
            state.step
        );
    }
    let step = state.step;
    if step.is_multiple_of(cfg.log_every) || step == cfg.steps {
        let v = val.map(|v| state.weights.evaluate(v, state.inference_sparsity(cfg)));
        let dead = state.dead(cfg).iter().filter(|&&b| b).count();
        state.log.push(LogRow {
            step,
            tokens: step * cfg.batch_size as u64,
            loss,
            mse: stats.mse,
            aux: stats.aux,
            penalty: stats.penalty,
            fvu: stats.fvu,
            l0: stats.l0,
            dead_fraction: dead as f64 / cfg.d_sae as f64,
            lr,
            val_fvu: v.map(|s| s.fvu),
            val_l0: v.map(|s| s.l0),
        });
    }
    if step.is_multiple_of(cfg.checkpoint_every) && step < cfg.steps {
        state.save_checkpoint(&run.checkpoints)?;
        run.callbacks.checkpointed()?;
        *last_good = step;
    }
    run.callbacks.progress(step);
    Ok(())
}
