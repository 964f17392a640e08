//! What a `steer` stage steers: features by id or chosen from a label stage's output, each with its
//! typical activation, DiffMean directions, and seeded random directions; the unsteered baseline first.
//! How big an edit of strength s is depends on the stage's `unit` ([`Scale`]).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, UInt32Type, UInt64Type};
use candle_core::{Device, Tensor};
use saeflow_core::models::{Hook, Hooks, LoadedModel};
use saeflow_core::sae::edit::Edit;
use saeflow_core::sae::format::Sae;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use super::readings::hook_activations;
use super::{Mode, SteerParams};

/// What strength 1 means.
#[derive(Debug, Clone, Copy)]
pub(super) enum Scale {
    /// An added vector of this norm along the target's unit direction (the typical residual norm).
    Residual(f64),
    /// The target's own scale (a feature's typical activation, the DiffMean vector as it is).
    Native,
}

/// What the label stage provides.
pub(super) struct Labels {
    pub(super) hook: String,
    /// Per feature: typical active value over all labelled tokens of the fit split.
    pub(super) typical: BTreeMap<u32, f64>,
    /// Labelled features per class, best held-out AUROC first.
    pub(super) ranked: BTreeMap<String, Vec<u32>>,
    pub(super) directions: std::collections::HashMap<String, Tensor>,
}

/// One thing steered: a feature or the DiffMean direction (or nothing, the unsteered baseline).
#[derive(Debug, Clone)]
pub(super) enum Target {
    None,
    Feature { id: u32, typical: f64 },
    DiffMean { class: String, direction: Tensor },
    Random { index: usize, direction: Tensor },
}

impl Target {
    /// The target's name in the outputs: `none`, `feature:<id>` or `diffmean:<class>`.
    pub(super) fn name(&self) -> String {
        match self {
            Target::None => "none".into(),
            Target::Feature { id, .. } => format!("feature:{id}"),
            Target::DiffMean { class, .. } => format!("diffmean:{class}"),
            Target::Random { index, .. } => format!("random:{index}"),
        }
    }

    /// The edit that steers this target at strength `s` (`None` for the baseline).
    pub(super) fn edit(
        &self,
        sae: &Sae,
        mode: Mode,
        scale: Scale,
        s: f64,
    ) -> anyhow::Result<Option<Edit>> {
        let unit = |v: &Tensor| -> anyhow::Result<Tensor> {
            let norm = v.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
            anyhow::ensure!(
                norm > 0.0,
                "{}: a zero direction cannot be steered along",
                self.name()
            );
            Ok((v / norm as f64)?)
        };
        if let (Scale::Residual(r), false) = (scale, matches!(self, Target::None)) {
            let direction = match self {
                Target::Feature { id, .. } => sae.w_dec.get(*id as usize)?,
                Target::DiffMean { direction, .. } | Target::Random { direction, .. } => {
                    direction.clone()
                }
                Target::None => unreachable!("handled above"),
            };
            return Ok(Some(Edit::Add {
                direction: unit(&direction)?,
                amount: s * r,
            }));
        }
        Ok(match self {
            Target::None => None,
            Target::DiffMean { direction, .. } => Some(Edit::Add {
                direction: direction.clone(),
                amount: s,
            }),
            Target::Random { .. } => {
                anyhow::bail!("random directions are steered in residual-norm units only")
            }
            Target::Feature { id, typical } => {
                let feature = *id as usize;
                Some(match mode {
                    Mode::Add => Edit::Add {
                        direction: sae.w_dec.get(feature)?,
                        amount: s * typical,
                    },
                    Mode::Clamp => Edit::Clamp {
                        sae: sae.clone(),
                        feature,
                        target: s * typical,
                    },
                    Mode::Ablate => Edit::Clamp {
                        sae: sae.clone(),
                        feature,
                        target: 0.0,
                    },
                })
            }
        })
    }
}

/// Per feature, its typical active value; per class, its labelled features ranked; the directions.
pub(super) fn read_labels(name: &str, dir: &Path, device: &Device) -> anyhow::Result<Labels> {
    let summary = crate::artifacts::LabelSummary::read(dir, name)?;
    let hook = summary.json["hook"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    // Ranked by validation AUROC: `top:<class>` must not choose by the test split it is judged on.
    let unit_column = summary.val_auroc_column;
    let path = dir.join("features.parquet");
    let file =
        std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)?.build()?;
    let mut typical = BTreeMap::new();
    let mut ranked: BTreeMap<String, Vec<(f64, u32)>> = BTreeMap::new();
    for batch in reader {
        let batch = batch?;
        let col = |n: &str| {
            batch
                .column_by_name(n)
                .with_context(|| format!("{}: no `{n}` column", path.display()))
        };
        let feature = col("feature")?.as_primitive::<UInt32Type>().clone();
        let class = col("class")?.as_string::<i32>().clone();
        let labelled = col("labelled")?.as_boolean().clone();
        let f64s = |n: &str| -> anyhow::Result<Vec<f64>> {
            Ok(col(n)?.as_primitive::<Float64Type>().values().to_vec())
        };
        let counts = |n: &str| -> anyhow::Result<Vec<u64>> {
            Ok(col(n)?.as_primitive::<UInt64Type>().values().to_vec())
        };
        let (rate, rate_rest) = (f64s("fire_rate")?, f64s("fire_rate_rest")?);
        let (active, active_rest) = (f64s("mean_active")?, f64s("mean_active_rest")?);
        let (n_pos, n_neg) = (counts("n_pos")?, counts("n_neg")?);
        let val_auroc = f64s(&unit_column)?;
        for i in 0..batch.num_rows() {
            let (fires, fires_rest) = (rate[i] * n_pos[i] as f64, rate_rest[i] * n_neg[i] as f64);
            if fires + fires_rest > 0.0 {
                typical.entry(feature.value(i)).or_insert(
                    (fires * active[i] + fires_rest * active_rest[i]) / (fires + fires_rest),
                );
            }
            if labelled.value(i) {
                ranked
                    .entry(class.value(i).to_string())
                    .or_default()
                    .push((val_auroc[i], feature.value(i)));
            }
        }
    }
    let ranked = ranked
        .into_iter()
        .map(|(c, mut v)| {
            v.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            (c, v.into_iter().map(|(_, f)| f).collect())
        })
        .collect();
    let directions = candle_core::safetensors::load(dir.join("directions.safetensors"), device)
        .with_context(|| format!("`{name}`: reading directions.safetensors"))?;
    Ok(Labels {
        hook,
        typical,
        ranked,
        directions,
    })
}

/// The features and directions to steer, after the unsteered baseline (always first).
pub(super) fn targets(
    p: &SteerParams,
    sae: &Sae,
    labels: Option<&Labels>,
    model: &LoadedModel,
    hook: &Hook,
    neutral: &[Vec<u32>],
    seed: u64,
) -> anyhow::Result<Vec<Target>> {
    let mut ids: Vec<u32> = p.features.clone();
    if let (Some(select), Some(l)) = (&p.select, labels) {
        let class = &select[4..];
        let ranked = l.ranked.get(class).with_context(|| {
            format!(
                "label stage `{}` labelled no feature with `{class}` (classes with labelled features: {})",
                p.labels.as_deref().unwrap_or(""),
                l.ranked.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })?;
        ids.extend(ranked.iter().take(p.count));
    }
    let mut targets = vec![Target::None];
    for id in ids {
        if id as usize >= sae.d_sae() {
            bail!(
                "feature {id} does not exist: the SAE of `{}` has {} latents",
                p.sae,
                sae.d_sae()
            );
        }
        let typical = match labels.and_then(|l| l.typical.get(&id)) {
            Some(&a) => a,
            None => typical_on(sae, model, hook, neutral, id as usize)?.with_context(|| {
                format!(
                    "feature {id} never fires on the neutral texts, so its typical activation is unknown: \
                     give `labels`"
                )
            })?,
        };
        targets.push(Target::Feature { id, typical });
    }
    if let (Some(class), Some(l)) = (&p.diffmean, labels) {
        let direction = l
            .directions
            .get(&format!("diffmean.{class}"))
            .with_context(|| {
                format!(
                    "label stage `{}` has no DiffMean direction for `{class}`",
                    p.labels.as_deref().unwrap_or("")
                )
            })?
            .clone();
        targets.push(Target::DiffMean {
            class: class.clone(),
            direction,
        });
    }
    // Random directions: isotropic Gaussian, seeded by the pipeline seed and their index.
    let d = sae.d_in();
    for index in 0..p.random_directions {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (0x5eed_0000 + index as u64));
        let v: Vec<f32> = (0..d).map(|_| StandardNormal.sample(&mut rng)).collect();
        targets.push(Target::Random {
            index,
            direction: Tensor::from_vec(v, d, sae.w_dec.device())?,
        });
    }
    Ok(targets)
}

/// A feature's mean activation where active, over the given texts (unsteered).
fn typical_on(
    sae: &Sae,
    model: &LoadedModel,
    hook: &Hook,
    texts: &[Vec<u32>],
    feature: usize,
) -> anyhow::Result<Option<f64>> {
    let (mut sum, mut count) = (0.0, 0usize);
    for ids in texts {
        let x = hook_activations(model, hook, ids, &Hooks::capture([*hook]))?;
        for v in sae
            .encode(&x)?
            .narrow(1, feature, 1)?
            .flatten_all()?
            .to_vec1::<f32>()?
        {
            if v != 0.0 {
                sum += v as f64;
                count += 1;
            }
        }
    }
    Ok((count > 0).then(|| sum / count as f64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use saeflow_core::sae::format::Activation;

    fn norm(t: &Tensor) -> f32 {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn at_one_strength_every_target_is_an_edit_of_the_same_size() {
        let cpu = Device::Cpu;
        // Decoder row 0 has norm 3; the DiffMean direction norm 7; the random one norm 11.
        let mut w_dec = vec![0f32; 2 * 4];
        w_dec[0] = 3.0;
        let sae = Sae {
            activation: Activation::Relu,
            w_enc: Tensor::zeros((4, 2), DType::F32, &cpu).unwrap(),
            w_dec: Tensor::from_vec(w_dec, (2, 4), &cpu).unwrap(),
            b_enc: Tensor::zeros(2, DType::F32, &cpu).unwrap(),
            b_dec: Tensor::zeros(4, DType::F32, &cpu).unwrap(),
            threshold: None,
            apply_b_dec_to_input: true,
            input_norm: saeflow_core::sae::format::InputNorm::None,
            cfg: serde_json::Value::Null,
        };
        let targets = [
            Target::Feature {
                id: 0,
                typical: 5.0,
            },
            Target::DiffMean {
                class: "c".into(),
                direction: Tensor::new(&[0f32, 7.0, 0.0, 0.0], &cpu).unwrap(),
            },
            Target::Random {
                index: 0,
                direction: Tensor::new(&[0f32, 0.0, 11.0, 0.0], &cpu).unwrap(),
            },
        ];
        for t in &targets {
            let Some(Edit::Add { direction, amount }) =
                t.edit(&sae, Mode::Add, Scale::Residual(2.0), 0.5).unwrap()
            else {
                panic!("{}: not an addition", t.name());
            };
            // 0.5 × the residual norm 2 along a unit direction: an added vector of norm 1 for each.
            assert!((norm(&direction) - 1.0).abs() < 1e-6, "{}", t.name());
            assert_eq!(amount, 1.0, "{}", t.name());
        }
        // Native units: the feature moves by s × its typical activation along its (norm-3) row, DiffMean
        // by s × its own vector; they differ in size (15 vs 3.5 at s = 1 and 0.5).
        let Some(Edit::Add { direction, amount }) = targets[0]
            .edit(&sae, Mode::Add, Scale::Native, 1.0)
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(norm(&direction) as f64 * amount, 15.0);
        assert!(targets[2]
            .edit(&sae, Mode::Add, Scale::Native, 1.0)
            .is_err());
        assert!(Target::None
            .edit(&sae, Mode::Add, Scale::Residual(2.0), 1.0)
            .unwrap()
            .is_none());
    }
}
