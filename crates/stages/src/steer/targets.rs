//! What a `steer` stage steers: features by id or chosen from a label stage's output, each with its
//! typical activation (the unit of a strength), and DiffMean directions; the unsteered baseline first.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, UInt32Type, UInt64Type};
use candle_core::{Device, Tensor};
use saeflow_core::models::{Hook, Hooks, LoadedModel};
use saeflow_core::sae::edit::Edit;
use saeflow_core::sae::format::Sae;

use super::readings::hook_activations;
use super::{Mode, SteerParams};

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
}

impl Target {
    /// The target's name in the outputs: `none`, `feature:<id>` or `diffmean:<class>`.
    pub(super) fn name(&self) -> String {
        match self {
            Target::None => "none".into(),
            Target::Feature { id, .. } => format!("feature:{id}"),
            Target::DiffMean { class, .. } => format!("diffmean:{class}"),
        }
    }

    /// The edit that steers this target at strength `s` (`None` for the baseline).
    pub(super) fn edit(&self, sae: &Sae, mode: Mode, s: f64) -> anyhow::Result<Option<Edit>> {
        Ok(match self {
            Target::None => None,
            Target::DiffMean { direction, .. } => Some(Edit::Add {
                direction: direction.clone(),
                amount: s,
            }),
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
