//! How the unsteered model reads what steering did: the target feature's activation and the label
//! stage's DiffMean and logistic-probe scores on each generation, and the edit's side effects (KL and
//! perplexity) on neutral text.

use anyhow::Context;
use candle_core::{DType, Tensor};
use saeflow_core::models::transformer::{kl_per_position, next_token_nll};
use saeflow_core::models::{Hook, Hooks, LoadedModel};
use saeflow_core::sae::format::Sae;

use super::targets::Labels;

/// `[t, d]` activations at `hook` for one sequence.
pub(super) fn hook_activations(
    model: &LoadedModel,
    hook: &Hook,
    ids: &[u32],
    hooks: &Hooks,
) -> anyhow::Result<Tensor> {
    let input = Tensor::from_vec(ids.to_vec(), (1, ids.len()), model.transformer.device())?;
    let out = model.transformer.forward(&input, hooks, None)?;
    Ok(out.activations[hook].squeeze(0)?.to_dtype(DType::F32)?)
}

/// The label stage's probes for one class.
pub(super) struct Probe {
    diffmean_unit: Tensor,
    logistic: Tensor,
    bias: f64,
}

impl Probe {
    pub(super) fn from_labels(l: &Labels, class: &str, stage: &str) -> anyhow::Result<Self> {
        let get = |name: String| {
            l.directions.get(&name).cloned().with_context(|| {
                format!("label stage `{stage}` has no `{name}` in directions.safetensors")
            })
        };
        let diffmean = get(format!("diffmean.{class}"))?;
        let norm = diffmean.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64;
        Ok(Probe {
            diffmean_unit: (diffmean / norm.max(1e-12))?,
            logistic: get(format!("logistic.{class}"))?,
            bias: get(format!("logistic_bias.{class}"))?
                .flatten_all()?
                .to_vec1::<f32>()?[0] as f64,
        })
    }
}

/// How the unsteered model reads a generation.
#[derive(Debug, Clone, Default)]
pub(super) struct Reading {
    pub(super) feature_activation: Option<f64>,
    pub(super) diffmean_score: Option<f64>,
    pub(super) probe_probability: Option<f64>,
}

/// The unsteered model with the SAE and the probes, reading token sequences.
pub(super) struct Reader<'a> {
    pub(super) model: &'a LoadedModel,
    pub(super) sae: &'a Sae,
    pub(super) hook: Hook,
    pub(super) probe: Option<&'a Probe>,
}

impl Reader<'_> {
    /// Means over the generated tokens of the unsteered model's reading of prompt + generation.
    pub(super) fn read(
        &self,
        prompt: &[u32],
        new: &[u32],
        feature: Option<usize>,
    ) -> anyhow::Result<Reading> {
        if new.is_empty() {
            return Ok(Reading::default());
        }
        let ids: Vec<u32> = prompt.iter().chain(new).copied().collect();
        let x = hook_activations(self.model, &self.hook, &ids, &Hooks::capture([self.hook]))?
            .narrow(0, prompt.len(), new.len())?;
        let mean =
            |t: Tensor| -> anyhow::Result<f64> { Ok(t.mean_all()?.to_scalar::<f32>()? as f64) };
        let feature_activation = match feature {
            Some(f) => Some(mean(self.sae.encode(&x)?.narrow(1, f, 1)?)?),
            None => None,
        };
        let (diffmean_score, probe_probability) = match self.probe {
            Some(probe) => {
                let projection = x.matmul(&probe.diffmean_unit.unsqueeze(1)?)?;
                let logit = (x.matmul(&probe.logistic.unsqueeze(1)?)? + probe.bias)?;
                let probability = candle_nn::ops::sigmoid(&logit)?;
                (Some(mean(projection)?), Some(mean(probability)?))
            }
            None => (None, None),
        };
        Ok(Reading {
            feature_activation,
            diffmean_score,
            probe_probability,
        })
    }

    /// Logits `[t, vocab]` of each text under `hooks`.
    pub(super) fn logits(&self, texts: &[Vec<u32>], hooks: &Hooks) -> anyhow::Result<Vec<Tensor>> {
        texts
            .iter()
            .map(|ids| {
                let input =
                    Tensor::from_vec(ids.clone(), (1, ids.len()), self.model.transformer.device())?;
                let out = self.model.transformer.forward(&input, hooks, None)?;
                Ok(out.logits.context("no logits")?.to_dtype(DType::F32)?)
            })
            .collect()
    }
}

/// Per neutral text, the mean KL(unsteered ‖ steered) over its positions; and the steered mean next-token
/// loss over all of them.
pub(super) fn side_effects(
    clean: &[Tensor],
    steered: &[Tensor],
    texts: &[Vec<u32>],
) -> anyhow::Result<(Vec<f64>, f64)> {
    let (mut kl, mut nll, mut nll_n) = (Vec::new(), 0.0, 0usize);
    for ((c, s), ids) in clean.iter().zip(steered).zip(texts) {
        let k = kl_per_position(c, s)?.flatten_all()?.to_vec1::<f32>()?;
        kl.push(k.iter().map(|&v| v as f64).sum::<f64>() / k.len().max(1) as f64);
        if ids.len() >= 2 {
            let tokens = Tensor::from_vec(ids.clone(), (1, ids.len()), s.device())?;
            let l = next_token_nll(s, &tokens)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            nll += l.iter().map(|&v| v as f64).sum::<f64>();
            nll_n += l.len();
        }
    }
    Ok((kl, nll / nll_n.max(1) as f64))
}
