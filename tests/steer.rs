//! Steering: edits are no-ops where they should be, act in prefill and decode alike (KV cache = full
//! recompute), and the `steer` stage runs end to end on nanochat-d4 with a trained SAE and its labels.
mod common;

use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::Float64Type;
use candle_core::{DType, Device, Tensor};
use common::{
    cached_logits, max_abs_diff, nanochat_chain, nanochat_d4, object_of, ok, read_parquet, run,
    text, write,
};
use saeflow_core::models::{Hook, HookPoint, Hooks};
use saeflow_core::sae::edit::Edit;
use saeflow_core::sae::format::{Activation, Sae};

fn nanochat() -> saeflow_core::models::LoadedModel {
    saeflow_core::models::load(&nanochat_d4(), None, &Device::Cpu).unwrap()
}

/// A random TopK SAE over nanochat-d4's width (128), 256 latents, unit decoder rows.
fn random_sae() -> Sae {
    let cpu = Device::Cpu;
    let w_enc = (Tensor::randn(0f32, 1.0, (128, 256), &cpu).unwrap() * 0.1).unwrap();
    let w_dec = w_enc.t().unwrap().contiguous().unwrap();
    let norms = w_dec.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap();
    Sae {
        activation: Activation::TopK(8),
        w_enc,
        w_dec: w_dec.broadcast_div(&norms).unwrap(),
        b_enc: Tensor::zeros(256, DType::F32, &cpu).unwrap(),
        b_dec: Tensor::zeros(128, DType::F32, &cpu).unwrap(),
        threshold: None,
        apply_b_dec_to_input: true,
        input_norm: saeflow_core::sae::format::InputNorm::None,
        cfg: serde_json::Value::Null,
    }
}

const HOOK: Hook = Hook {
    layer: 2,
    point: HookPoint::ResidPost,
};

fn logits(model: &saeflow_core::models::LoadedModel, ids: &[u32], hooks: &Hooks) -> Tensor {
    let input = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap();
    model
        .transformer
        .forward(&input, hooks, None)
        .unwrap()
        .logits
        .unwrap()
}

/// `[t, d]` activations at [`HOOK`] of one sequence, unsteered.
fn hook_acts(model: &saeflow_core::models::LoadedModel, ids: &[u32]) -> Tensor {
    let input = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap();
    model
        .transformer
        .forward(&input, &Hooks::capture([HOOK]), None)
        .unwrap()
        .activations[&HOOK]
        .squeeze(0)
        .unwrap()
}

/// How many positions each latent fires on.
fn firing_counts(codes: &Tensor) -> Vec<f32> {
    codes
        .ne(0f32)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .sum(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn steered(edit: Edit) -> Hooks {
    let mut hooks = Hooks::logits();
    hooks.interventions.insert(HOOK, edit.intervention());
    hooks
}

#[test]
fn no_op_edits_leave_logits_unchanged() {
    let model = nanochat();
    let sae = random_sae();
    let ids = model
        .encode_document("The river flows north through a wide valley")
        .unwrap();
    let clean = logits(&model, &ids, &Hooks::logits());
    let add_nothing = Edit::Add {
        direction: sae.w_dec.get(3).unwrap(),
        amount: 0.0,
    };
    assert_eq!(
        max_abs_diff(&logits(&model, &ids, &steered(add_nothing)), &clean),
        0.0
    );
    // A latent that is zero at every position: clamping it to 0 (its current value) changes nothing.
    let x = hook_acts(&model, &ids);
    let codes = sae.encode(&x).unwrap();
    let fired = firing_counts(&codes);
    let silent = fired
        .iter()
        .position(|&n| n == 0.0)
        .expect("some latent is silent");
    let clamp = Edit::Clamp {
        sae: sae.clone(),
        feature: silent,
        target: 0.0,
    };
    assert_eq!(
        max_abs_diff(&logits(&model, &ids, &steered(clamp)), &clean),
        0.0
    );
    // Adding the decoder row for real changes the logits.
    let add = Edit::Add {
        direction: sae.w_dec.get(3).unwrap(),
        amount: 20.0,
    };
    assert!(max_abs_diff(&logits(&model, &ids, &steered(add)), &clean) > 1e-2);
}

#[test]
fn ablation_sets_the_latent_to_zero_at_the_hook() {
    // The ablated activation is the SAE's reconstruction with the latent set to 0, plus the SAE's error.
    let model = nanochat();
    let sae = random_sae();
    let ids = model
        .encode_document("Sometimes one must lie to succeed")
        .unwrap();
    let x = hook_acts(&model, &ids);
    let codes = sae.encode(&x).unwrap();
    let fired = firing_counts(&codes);
    let active = fired.iter().position(|&n| n > 0.0).unwrap();
    let ablated = Edit::Clamp {
        sae: sae.clone(),
        feature: active,
        target: 0.0,
    }
    .apply(&x)
    .unwrap();
    let error = (&x - sae.decode(&codes).unwrap()).unwrap();
    let mut zeroed = codes.to_vec2::<f32>().unwrap();
    for row in &mut zeroed {
        row[active] = 0.0;
    }
    let zeroed = Tensor::new(zeroed, &Device::Cpu).unwrap();
    let expected = (sae.decode(&zeroed).unwrap() + error).unwrap();
    assert!(max_abs_diff(&ablated, &expected) < 1e-4);
    assert!(
        max_abs_diff(&ablated, &x) > 1e-3,
        "the latent was active: something changed"
    );
}

#[test]
fn steering_acts_in_prefill_and_decode_alike() {
    // Decoding with a KV cache under a clamp equals recomputing the whole sequence under the same clamp.
    let model = nanochat();
    let sae = random_sae();
    let ids = model
        .encode_document("Sometimes one must deceive others to succeed")
        .unwrap();
    let hooks = steered(Edit::Clamp {
        sae,
        feature: 7,
        target: 5.0,
    });
    let full = logits(&model, &ids, &hooks);
    let cached = cached_logits(&model, &ids, &hooks, 4);
    assert!(
        max_abs_diff(&cached, &full) < 1e-4,
        "{}",
        max_abs_diff(&cached, &full)
    );
    assert!(max_abs_diff(&full, &logits(&model, &ids, &Hooks::logits())) > 1e-3);
}

fn pipeline(dir: &Path, steer: &str) {
    let steer = format!(
        r#"
[stages.steer]
kind = "steer"
sae = "sae"
model = "nc"
labels = "labels"
input = "data"
prompt_count = 3
max_new_tokens = 6
{steer}"#
    );
    write(
        &dir.join("p.toml"),
        &nanochat_chain(dir, "st", "alpha = 0.5\nmin_effect = 0.0", &steer),
    );
}

#[test]
fn steer_stage_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    pipeline(
        dir.path(),
        "select = \"top:true\"\ndiffmean = \"true\"\nstrengths = [-8.0, 0.0, 8.0]\nunit = \"native\"\n\
         random_directions = 0\n",
    );
    ok(dir.path(), &["run", "p.toml"]);
    let object = object_of(&dir.path().join("cache"), "st", "steer");
    let read = |file: &str| read_parquet(&object.join(file));
    let g = read("generations.parquet");
    // The unsteered baseline, then a feature and the DiffMean direction at three strengths; 3 prompts each.
    assert_eq!(g.num_rows(), (1 + 2 * 3) * 3);
    let target = g.column_by_name("target").unwrap().as_string::<i32>();
    let strength = g
        .column_by_name("strength")
        .unwrap()
        .as_primitive::<Float64Type>();
    let texts = g.column_by_name("text").unwrap().as_string::<i32>();
    let none: Vec<&str> = (0..3).map(|i| texts.value(i)).collect();
    assert!((0..3).all(|i| target.value(i) == "none"));
    // Strength 0 adds nothing: greedy generations equal the unsteered ones.
    for i in 0..g.num_rows() {
        if strength.value(i) == 0.0 {
            assert_eq!(texts.value(i), none[i % 3], "row {i} ({})", target.value(i));
        }
    }
    let e = read("effects.parquet");
    let e_target = e.column_by_name("target").unwrap().as_string::<i32>();
    let e_strength = e
        .column_by_name("strength")
        .unwrap()
        .as_primitive::<Float64Type>();
    let kl = e
        .column_by_name("kl_neutral")
        .unwrap()
        .as_primitive::<Float64Type>();
    let probe = e
        .column_by_name("probe_probability")
        .unwrap()
        .as_primitive::<Float64Type>();
    for i in 0..e.num_rows() {
        if e_strength.value(i) == 0.0 {
            assert_eq!(kl.value(i), 0.0, "{}", e_target.value(i));
        } else {
            assert!(kl.value(i) > 0.0, "{}", e_target.value(i));
        }
        assert!((0.0..=1.0).contains(&probe.value(i)));
    }
    // Strength 0 generates what the unsteered model does, so the readings agree too.
    let at = |t: &str, s: f64| {
        (0..e.num_rows())
            .find(|&i| e_target.value(i).starts_with(t) && e_strength.value(i) == s)
            .map(|i| probe.value(i))
            .unwrap()
    };
    assert_eq!(at("diffmean:true", 0.0), at("none", 0.0));
    assert_eq!(at("feature:", 0.0).to_bits(), at("none", 0.0).to_bits());
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(object.join("steer.json")).unwrap()).unwrap();
    assert_eq!(summary["probe_class"], "true");
    assert!(
        summary["targets"]["diffmean:true"]["kl_neutral_at_strongest"]
            .as_f64()
            .unwrap()
            > 0.0
    );

    // Residual-norm units (the default): the same targets and two random directions, all edits of one
    // size per strength; every reading with a 95% interval over the prompts, KL over the neutral texts.
    pipeline(
        dir.path(),
        "select = \"top:true\"\ndiffmean = \"true\"\nstrengths = [-1.0, 0.0, 1.0]\n",
    );
    ok(dir.path(), &["run", "p.toml"]);
    let object = object_of(&dir.path().join("cache"), "st", "steer");
    let e = read_parquet(&object.join("effects.parquet"));
    let column = |n: &str| {
        e.column_by_name(n)
            .unwrap_or_else(|| panic!("no {n}"))
            .as_primitive::<Float64Type>()
            .clone()
    };
    let e_target = e.column_by_name("target").unwrap().as_string::<i32>();
    let targets: std::collections::BTreeSet<&str> =
        (0..e.num_rows()).map(|i| e_target.value(i)).collect();
    assert!(
        targets.contains("random:0") && targets.contains("random:1") && targets.len() == 5,
        "{targets:?}"
    );
    let e_strength = column("strength");
    for name in ["probe_probability", "kl_neutral", "diffmean_score"] {
        let (v, low, high) = (
            column(name),
            column(&format!("{name}_low")),
            column(&format!("{name}_high")),
        );
        for i in 0..e.num_rows() {
            assert!(
                low.value(i) <= v.value(i) && v.value(i) <= high.value(i),
                "{name} row {i}"
            );
            if name == "kl_neutral" {
                assert_eq!(
                    v.value(i) == 0.0,
                    e_strength.value(i) == 0.0,
                    "{} row {i}",
                    e_target.value(i)
                );
            }
        }
    }
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(object.join("steer.json")).unwrap()).unwrap();
    assert_eq!(summary["unit"], "residual");
    assert!(
        summary["residual_norm"].as_f64().unwrap() > 0.0,
        "{summary}"
    );
    let g = read_parquet(&object.join("generations.parquet"));
    let source = g.column_by_name("source").unwrap().as_string::<i32>();
    assert!((0..g.num_rows()).all(|i| !source.value(i).is_empty()));

    // Bad inputs: a class with no labelled feature, a feature the SAE does not have, clamping in residual
    // units, random directions in native units.
    for (steer, message) in [
        (
            "features = [0]\nmode = \"clamp\"\n",
            "mode = \"clamp\" sets a latent's value, which has no residual-norm size",
        ),
        (
            "features = [0]\nunit = \"native\"\n",
            "random directions have no native scale",
        ),
    ] {
        pipeline(dir.path(), steer);
        let out = run(dir.path(), &["run", "p.toml"]);
        assert!(!out.status.success(), "{steer}");
        assert!(text(&out).contains(message), "{}", text(&out));
    }
    pipeline(dir.path(), "select = \"top:maybe\"\n");
    let out = run(dir.path(), &["run", "p.toml"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("labelled no feature with `maybe`"),
        "{}",
        text(&out)
    );
    pipeline(dir.path(), "features = [100000]\n");
    let out = run(dir.path(), &["run", "p.toml"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("feature 100000 does not exist"),
        "{}",
        text(&out)
    );
}
