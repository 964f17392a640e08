//! Exact-resume checkpoints of a [`State`]: `step-N/state.safetensors` (weights, Adam moments, firing
//! counts) and `state.json` (step, log, BatchTopK threshold), written atomically, latest kept.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};

use super::State;
use crate::sae::adam::Moments;
use crate::sae::step::Weights;

impl State {
    /// Everything a checkpoint's `state.safetensors` holds, by name.
    fn tensors(&self) -> anyhow::Result<Vec<(String, Tensor)>> {
        let cpu = Device::Cpu;
        let f = |v: &[f32]| Tensor::from_slice(v, v.len(), &cpu);
        let weights = &self.weights;
        let i = |v: &[u64]| {
            let v: Vec<i64> = v.iter().map(|&x| x as i64).collect();
            Tensor::from_vec(v, self.since_fired.len(), &cpu)
        };
        let mut out = vec![
            ("w_enc".to_string(), f(&weights.w_enc)?),
            ("threshold".into(), f(&weights.threshold)?),
            ("b_enc".into(), f(&weights.b_enc)?),
            ("w_dec".into(), f(&weights.w_dec)?),
            ("b_dec".into(), f(&weights.b_dec)?),
            ("since_fired".into(), i(&self.since_fired)?),
            ("fired_total".into(), i(&self.fired_total)?),
        ];
        for (name, m) in ["w_enc", "b_enc", "w_dec", "b_dec", "threshold"]
            .iter()
            .zip(&self.moments)
        {
            out.push((format!("adam_m.{name}"), f(&m.m)?));
            out.push((format!("adam_v.{name}"), f(&m.v)?));
        }
        Ok(out)
    }

    /// Writes a checkpoint into `dir/step-N/` (temporary name, fsync, rename) and drops older ones.
    pub fn save_checkpoint(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!("tmp-{}", self.step));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        let tensors: std::collections::HashMap<String, Tensor> =
            self.tensors()?.into_iter().collect();
        candle_core::safetensors::save(&tensors, tmp.join("state.safetensors"))?;
        let meta =
            serde_json::json!({"step": self.step, "log": self.log, "threshold": self.threshold});
        std::fs::write(tmp.join("state.json"), serde_json::to_vec(&meta)?)?;
        for f in ["state.safetensors", "state.json"] {
            std::fs::File::open(tmp.join(f))?.sync_all()?;
        }
        let dest = dir.join(format!("step-{:09}", self.step));
        let _ = std::fs::remove_dir_all(&dest);
        std::fs::rename(&tmp, &dest)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        for entry in std::fs::read_dir(dir)?.flatten() {
            if entry.path() != dest {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        Ok(())
    }

    /// The latest complete checkpoint in `dir`, if any.
    pub fn load_checkpoint(dir: &Path, d_in: usize, d_sae: usize) -> anyhow::Result<Option<Self>> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Ok(None);
        };
        let mut steps: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
            })
            .collect();
        steps.sort();
        let Some(last) = steps.pop() else {
            return Ok(None);
        };
        let ts = candle_core::safetensors::load(last.join("state.safetensors"), &Device::Cpu)
            .with_context(|| format!("reading checkpoint {}", last.display()))?;
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(last.join("state.json"))?)?;
        let f = |name: &str| -> anyhow::Result<Vec<f32>> {
            Ok(ts
                .get(name)
                .with_context(|| format!("checkpoint lacks {name}"))?
                .to_vec1()?)
        };
        let u = |name: &str| -> anyhow::Result<Vec<u64>> {
            let v: Vec<i64> = ts
                .get(name)
                .with_context(|| format!("checkpoint lacks {name}"))?
                .to_vec1()?;
            Ok(v.into_iter().map(|x| x as u64).collect())
        };
        let weights = Weights {
            d_in,
            d_sae,
            w_enc: f("w_enc")?,
            b_enc: f("b_enc")?,
            w_dec: f("w_dec")?,
            b_dec: f("b_dec")?,
            threshold: f("threshold")?,
        };
        if weights.w_enc.len() != d_in * d_sae || weights.b_dec.len() != d_in {
            bail!(
                "checkpoint {} has other shapes than this run",
                last.display()
            );
        }
        let m = |name: &str| -> anyhow::Result<Moments> {
            Ok(Moments {
                m: f(&format!("adam_m.{name}"))?,
                v: f(&format!("adam_v.{name}"))?,
            })
        };
        Ok(Some(Self {
            moments: [
                m("w_enc")?,
                m("b_enc")?,
                m("w_dec")?,
                m("b_dec")?,
                m("threshold")?,
            ],
            weights,
            step: meta["step"].as_u64().context("checkpoint without step")?,
            since_fired: u("since_fired")?,
            fired_total: u("fired_total")?,
            log: serde_json::from_value(meta["log"].clone())?,
            threshold: meta["threshold"].as_f64().unwrap_or(0.0),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_data::random;
    use crate::sae::step::{Grads, L0Mode, Sparsity};
    use crate::sae::trainer::config::tests::test_config;
    use crate::sae::trainer::{LogRow, TrainConfig};

    #[test]
    fn checkpoints_round_trip_the_whole_state_of_every_architecture() {
        let x = random(4 * 6, 7, 1.0);
        for sparsity in [
            Sparsity::TopK(2),
            Sparsity::BatchTopK(2),
            Sparsity::JumpRelu {
                l0: 0.1,
                bandwidth: 0.5,
                mode: L0Mode::Step,
                pre_act: 0.0,
            },
            Sparsity::Relu { l1: 0.1 },
        ] {
            let c = TrainConfig {
                sparsity,
                lr: 0.01,
                aux_coef: 0.5,
                dead_tokens: 0,
                ..test_config(10, 2, 0.2)
            };
            let mut state = State::init(&c, 6, &x);
            let mut grads = Grads::default();
            for _ in 0..3 {
                state.step(&c, &x, &mut grads).unwrap();
            }
            state.log.push(LogRow {
                step: 3,
                tokens: 12,
                loss: 0.1 + 0.2,
                mse: 1.0 / 3.0,
                aux: 0.0,
                penalty: 0.0,
                fvu: 0.7,
                l0: 2.0,
                dead_fraction: 0.0,
                lr: 0.01,
                val_fvu: None,
                val_l0: Some(2.5),
            });
            let dir = tempfile::tempdir().unwrap();
            state.save_checkpoint(dir.path()).unwrap();
            let loaded = State::load_checkpoint(dir.path(), 6, 8).unwrap().unwrap();
            assert_eq!(loaded, state, "{sparsity:?}");
        }
    }
}
