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
//! optimiser step (`state`), checkpoints (`checkpoint`), export (`export`), the data order (`batches`), the
//! device-resident engine (`resident`) and the batches' way onto its device (`upload`).

mod batches;
mod checkpoint;
mod config;
mod export;
mod resident;
mod state;
mod upload;

use std::path::{Path, PathBuf};

use anyhow::bail;

pub use config::{Engine, TrainConfig};
pub use resident::{Launched, Resident, STEP_SCALARS};
pub use state::{LogRow, State};
pub use upload::{upload_batch, Traffic, Uploader};

use candle_core::Tensor;

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
    // One uploader per device of the resident members (a group on one GPU shares its batch copy).
    let mut uploaders: Vec<Uploader> = Vec::new();
    for (m, r) in members.iter().zip(runs) {
        if let (
            Member::Training {
                resident: Some(_), ..
            },
            Engine::Dense(device),
        ) = (m, &r.cfg.engine)
        {
            if !uploaders.iter().any(|u| u.device().same_device(device)) {
                uploaders.push(Uploader::new(device));
            }
        }
    }
    // The next batch, read while the devices compute the current one.
    let mut ahead: Option<anyhow::Result<Batch>> = None;
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
        let mut batch = match ahead.take() {
            Some(read) => read?,
            None => Batch::read(&mut data, d_in, &mut uploaders)?,
        };
        // Resident members' steps are queued on their devices, host members step here.
        let mut launched = Vec::new();
        for (i, (m, r)) in members.iter_mut().zip(runs).enumerate() {
            let Member::Training {
                state,
                grads,
                resident,
                last_good,
            } = m
            else {
                continue;
            };
            if state.step != position {
                continue; // resumed ahead of this batch
            }
            let result = match resident {
                None => member_step(state, r, &batch.x, grads, val.as_deref(), last_good),
                Some(on_device) => batch
                    .on_device_of(r, on_device)
                    .and_then(|x| {
                        Ok(on_device.launch(r.cfg, state.step + 1, &x, batch.variance)?)
                    })
                    .map(|step| launched.push((i, step))),
            };
            if let Err(e) = result {
                *m = Member::Finished(Err(e));
            }
        }
        // While the devices compute, the next batch is read, checked and queued behind this one.
        if !launched.is_empty() {
            ahead = Some(Batch::read(&mut data, d_in, &mut uploaders));
        }
        for (i, step) in launched {
            let Member::Training {
                state,
                resident: Some(on_device),
                last_good,
                ..
            } = &mut members[i]
            else {
                unreachable!("launched members are resident")
            };
            if let Err(e) = resident_finish(state, on_device, &runs[i], step, last_good) {
                members[i] = Member::Finished(Err(e));
            }
        }
        position += 1;
    }
}

/// A training batch as the loop uses it: on the host, and on each training device.
struct Batch {
    x: Vec<f32>,
    /// Its total variance (FVU's denominator for resident members; 0 without any).
    variance: f64,
    /// The batch on each device, with the bytes that took (counted for the first member to use it).
    on_devices: Vec<(Tensor, Option<Traffic>)>,
}

impl Batch {
    /// Reads the next batch, refuses non-finite values (naming the capture row), and sends it to every
    /// uploader's device.
    fn read(
        data: &mut TrainingData,
        d_in: usize,
        uploaders: &mut [Uploader],
    ) -> anyhow::Result<Self> {
        let (x, rows) = data.next()?;
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            bail!(
                "non-finite activation in tokens.parquet row {} (column {}) of the capture",
                rows[i / d_in],
                i % d_in
            );
        }
        let mut on_devices = Vec::with_capacity(uploaders.len());
        for u in uploaders.iter_mut() {
            let (t, traffic) = u.upload(&x, d_in)?;
            on_devices.push((t, Some(traffic)));
        }
        let variance = if uploaders.is_empty() {
            0.0
        } else {
            total_variance(&x, d_in)
        };
        Ok(Self {
            x,
            variance,
            on_devices,
        })
    }

    /// The batch on `run`'s device (a dense engine's), charging the copy to `resident` if it is the first
    /// to use it.
    fn on_device_of(&mut self, run: &Run, resident: &mut Resident) -> anyhow::Result<Tensor> {
        let Engine::Dense(device) = &run.cfg.engine else {
            unreachable!("only dense members are resident")
        };
        let (t, traffic) = self
            .on_devices
            .iter_mut()
            .find(|(t, _)| t.device().same_device(device))
            .ok_or_else(|| anyhow::anyhow!("no copy of the batch on {device:?}"))?;
        if let Some(traffic) = traffic.take() {
            resident.step_traffic += traffic;
        }
        Ok(t.clone())
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

/// The end of a device-resident member's launched step: its statistics read back, its log row, checkpoint
/// and progress report.
fn resident_finish(
    state: &mut State,
    resident: &mut Resident,
    run: &Run,
    launched: Launched,
    last_good: &mut u64,
) -> anyhow::Result<()> {
    let (stats, finite) = resident.finish(launched)?;
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
