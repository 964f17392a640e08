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
mod resident;
mod state;

use std::path::{Path, PathBuf};

use anyhow::bail;

pub use config::{Engine, TrainConfig};
pub use resident::{upload_batch, Resident, Traffic, STEP_SCALARS};
pub use state::{LogRow, State};

use candle_core::{Device, Tensor};

use crate::data::activations::ActivationStore;
use crate::sae::step::{total_variance, Grads};
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
    /// A device-resident run (`Engine::Dense`) ended: the bytes its steps moved between host and device
    /// (batches in, scalars out; a batch shared by a group counts once, for its first member on the
    /// device), and those of whole-state copies (setup, checkpoints, the end).
    fn traffic(&self, _steps: Traffic, _state_copies: Traffic) {}
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
        /// The state on the device (`Engine::Dense`); `state` is then current only after a download.
        resident: Option<Box<Resident>>,
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
                    resident: None,
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
                    resident: None,
                    last_good: 0,
                }
            }
            Err(e) => Member::Finished(Err(e)),
        };
        members.push(member);
    }
    for (m, r) in members.iter_mut().zip(runs) {
        if let (
            Member::Training {
                state, resident, ..
            },
            Engine::Dense(device),
        ) = (&mut *m, &r.cfg.engine)
        {
            match Resident::new(state, r.cfg, device, val.as_deref()) {
                Ok(on_device) => *resident = Some(Box::new(on_device)),
                Err(e) => {
                    let e = anyhow::Error::from(e)
                        .context(format!("putting the training state on {device:?}"));
                    *m = Member::Finished(Err(e));
                }
            }
        }
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
            let Member::Training {
                state, resident, ..
            } = m
            else {
                continue;
            };
            if state.step < r.cfg.steps && !cancelled {
                continue;
            }
            let downloaded = match resident {
                Some(on_device) => on_device
                    .download(state)
                    .map(|()| {
                        r.callbacks
                            .traffic(on_device.step_traffic, on_device.sync_traffic)
                    })
                    .map_err(anyhow::Error::from),
                None => Ok(()),
            };
            let finished = if let Err(e) = downloaded {
                Some(Err(e))
            } else if state.step >= r.cfg.steps {
                None
            } else {
                Some(
                    state
                        .save_checkpoint(&r.checkpoints)
                        .and_then(|()| r.callbacks.checkpointed())
                        .map(|()| state.step),
                )
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
        // Device-resident members get the batch on their device, copied once per device for the group.
        let mut on_devices: Vec<(Device, Tensor)> = Vec::new();
        let mut variance = None;
        for (m, r) in members.iter_mut().zip(runs) {
            if let Member::Training {
                state,
                grads,
                resident,
                last_good,
            } = m
            {
                if state.step != position {
                    continue; // resumed ahead of this batch
                }
                let result = match resident {
                    None => member_step(state, r, &x, grads, val.as_deref(), last_good),
                    Some(on_device) => {
                        let Engine::Dense(device) = &r.cfg.engine else {
                            unreachable!("only dense members are resident")
                        };
                        let batch = match on_devices.iter().find(|(d, _)| d.same_device(device)) {
                            Some((_, batch)) => Ok(batch.clone()),
                            None => upload_batch(&x, d_in, device).map(|(batch, traffic)| {
                                on_device.step_traffic += traffic;
                                on_devices.push((device.clone(), batch.clone()));
                                batch
                            }),
                        };
                        let variance = *variance.get_or_insert_with(|| total_variance(&x, d_in));
                        batch.map_err(anyhow::Error::from).and_then(|batch| {
                            resident_step(state, on_device, r, &batch, variance, last_good)
                        })
                    }
                };
                if let Err(e) = result {
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
    let stats = state.step(run.cfg, x, grads)?;
    let finite = state.weights.w_dec.iter().all(|v| v.is_finite());
    after_step(state, &mut OnHost(val), run, &stats, finite, last_good)
}

/// One step of a device-resident member on `batch` (already on its device).
fn resident_step(
    state: &mut State,
    resident: &mut Resident,
    run: &Run,
    batch: &Tensor,
    variance: f64,
    last_good: &mut u64,
) -> anyhow::Result<()> {
    let (stats, finite) = resident.step(run.cfg, state.step + 1, batch, variance)?;
    state.step += 1;
    state.track_threshold(run.cfg, &stats);
    after_step(state, resident, run, &stats, finite, last_good)
}

/// Where a member's weights are between steps, for what follows a step.
trait Holder {
    /// `(FVU, L0)` on the validation rows, if any.
    fn validate(&mut self, state: &State, cfg: &TrainConfig) -> anyhow::Result<Option<(f64, f64)>>;
    /// Dead latents now.
    fn dead(&self, state: &State, cfg: &TrainConfig) -> usize;
    /// Brings `state` up to date (before a checkpoint).
    fn sync(&mut self, state: &mut State) -> anyhow::Result<()>;
}

/// The weights are `state`'s own (the sparse engine); `.0` are the validation rows.
struct OnHost<'a>(Option<&'a [f32]>);

impl Holder for OnHost<'_> {
    fn validate(&mut self, state: &State, cfg: &TrainConfig) -> anyhow::Result<Option<(f64, f64)>> {
        Ok(self.0.map(|v| {
            let s = state.weights.evaluate(v, state.inference_sparsity(cfg));
            (s.fvu, s.l0)
        }))
    }
    fn dead(&self, state: &State, cfg: &TrainConfig) -> usize {
        state.dead(cfg).iter().filter(|&&b| b).count()
    }
    fn sync(&mut self, _: &mut State) -> anyhow::Result<()> {
        Ok(())
    }
}

impl Holder for Resident {
    fn validate(&mut self, state: &State, cfg: &TrainConfig) -> anyhow::Result<Option<(f64, f64)>> {
        Ok(Resident::validate(self, state.inference_sparsity(cfg))?)
    }
    fn dead(&self, _: &State, _: &TrainConfig) -> usize {
        self.dead_count()
    }
    fn sync(&mut self, state: &mut State) -> anyhow::Result<()> {
        Ok(self.download(state)?)
    }
}

/// What follows every step: the divergence check, the log row (validation and dead count computed only
/// when a row is due), the checkpoint (after the state is brought to the host) and progress.
fn after_step(
    state: &mut State,
    holder: &mut dyn Holder,
    run: &Run,
    stats: &crate::sae::step::StepStats,
    finite: bool,
    last_good: &mut u64,
) -> anyhow::Result<()> {
    let cfg = run.cfg;
    let lr = cfg.lr_at(state.step) as f64;
    let loss = stats.mse + stats.aux + stats.penalty;
    if !loss.is_finite() || !finite {
        bail!(
            "training diverged at step {} (loss {loss}); the last good checkpoint (step {last_good}) is \
             kept: lower lr and rerun to resume from it",
            state.step
        );
    }
    let step = state.step;
    if step.is_multiple_of(cfg.log_every) || step == cfg.steps {
        let v = holder.validate(state, cfg)?;
        let dead = holder.dead(state, cfg);
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
            val_fvu: v.map(|s| s.0),
            val_l0: v.map(|s| s.1),
        });
    }
    if step.is_multiple_of(cfg.checkpoint_every) && step < cfg.steps {
        holder.sync(state)?;
        state.save_checkpoint(&run.checkpoints)?;
        run.callbacks.checkpointed()?;
        *last_good = step;
    }
    run.callbacks.progress(step);
    Ok(())
}
