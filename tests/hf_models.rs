//! Hugging Face models against `transformers` itself: tiny random models (`tests/fixtures/tiny_hf/`, written
//! and run by `scripts/make_tiny_hf_models.py`) — Llamas with Llama 3 and linear rope scaling (transformers 4
//! and 5 config forms, and a GGUF file as llama.cpp writes it, `rope_freqs.weight`), and a Qwen2 with q/k/v
//! biases and tied embeddings, a Gemma 2 (post-norms, GeGLU, softcaps, sliding-window layers) and a GPT-2
//! (learned positions, LayerNorm, Conv1D, biases). Top-5 logits at every position of an 80-token prompt (past the Llama 3
//! fixture's 64-token original context) within 1e-4 and the same greedy tokens; for the scaled models, the
//! same weights with plain rotary differ from the reference, so the comparison can fail (for Gemma 2, the same
//! weights without the window and without the score softcap). What the loaders
//! cannot compute (other rope scalings, other architectures, weights nothing reads) is an error naming the
//! field or tensor.
mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use saeflow_core::models::generate::{generate, Sampling};
use saeflow_core::models::hf::load_dir as load_hf_dir;
use saeflow_core::models::llama::load_gguf;
use saeflow_core::models::transformer::{Config, Hooks, RopeScaling, Transformer, Weights};
use serde_json::Value as Json;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny_hf")
        .join(name)
}

fn reference() -> Json {
    serde_json::from_slice(&std::fs::read(fixture("reference.json")).unwrap()).unwrap()
}

fn ids(v: &Json) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Logits `[position][vocab]` of the prompt.
fn logits(model: &Transformer, prompt: &[u32]) -> Vec<Vec<f32>> {
    let input = Tensor::from_vec(prompt.to_vec(), (1, prompt.len()), &Device::Cpu).unwrap();
    let out = model.forward(&input, &Hooks::logits(), None).unwrap();
    out.logits.unwrap().squeeze(0).unwrap().to_vec2().unwrap()
}

/// The largest difference between our logits at the reference's top-5 ids and the reference's values;
/// also checks that the top-5 ids agree wherever the reference's 5th and 6th logits are not tied.
fn max_top5_error(ours: &[Vec<f32>], top5: &Json) -> f64 {
    let mut worst = 0f64;
    let (all_ids, all_values) = (
        top5["ids"].as_array().unwrap(),
        top5["values"].as_array().unwrap(),
    );
    for (t, (want_ids, want_values)) in all_ids.iter().zip(all_values).enumerate() {
        for (id, value) in ids(want_ids)
            .into_iter()
            .zip(want_values.as_array().unwrap())
        {
            let got = ours[t][id as usize] as f64;
            worst = worst.max((got - value.as_f64().unwrap()).abs());
        }
        let mut order: Vec<u32> = (0..ours[t].len() as u32).collect();
        order.sort_by(|&a, &b| ours[t][b as usize].total_cmp(&ours[t][a as usize]));
        assert_eq!(order[..5], ids(want_ids)[..], "position {t}: top-5 ids");
    }
    worst
}

fn model(config: Config, weights: Weights) -> Transformer {
    Transformer::new(config, weights, &Device::Cpu).unwrap()
}

/// Top-5 logits at every position within 1e-4 of `transformers`, and the same greedy tokens.
fn check_parity(name: &str, model: &Transformer) {
    let reference = reference();
    let prompt = ids(&reference["prompt"]);
    let r = &reference[name];
    let error = max_top5_error(&logits(model, &prompt), &r["top5"]);
    assert!(error < 1e-4, "{name}: top-5 logits differ by {error}");
    let greedy = generate(
        model,
        &prompt,
        8,
        &[],
        &Sampling::default(),
        &Hooks::default(),
    )
    .unwrap();
    assert_eq!(greedy, ids(&r["greedy"]), "{name}: greedy tokens");
}

/// Parity of a scaled model, and its plain-rotary twin: ours matches transformers' twin, and neither matches
/// the scaled reference, so a loader that ignored the scaling would fail.
fn check(name: &str, config: Config, weights: Weights) {
    let reference = reference();
    let prompt = ids(&reference["prompt"]);
    let r = &reference[name];
    let plain = {
        let mut c = config.clone();
        c.rope_scaling = RopeScaling::None;
        model(c, weights.clone())
    };
    check_parity(name, &model(config, weights));
    let plain_logits = logits(&plain, &prompt);
    let plain_error = max_top5_error(&plain_logits, &r["plain_top5"]);
    assert!(
        plain_error < 1e-4,
        "{name}: plain rotary differs by {plain_error}"
    );
    let mut apart = 0f64;
    for (t, want) in r["top5"]["values"].as_array().unwrap().iter().enumerate() {
        let top = ids(&r["top5"]["ids"][t]);
        for (id, v) in top.iter().zip(want.as_array().unwrap()) {
            apart = apart.max((plain_logits[t][*id as usize] as f64 - v.as_f64().unwrap()).abs());
        }
    }
    assert!(
        apart > 1e-2,
        "{name}: scaling changes the logits by only {apart}"
    );
}

#[test]
fn llama3_rope_scaling_from_a_transformers_4_config_matches_transformers() {
    let (config, weights) = load_hf_dir(&fixture("llama3"), &Device::Cpu).unwrap();
    assert!(
        matches!(config.rope_scaling, RopeScaling::Llama3 { .. }),
        "{:?}",
        config.rope_scaling
    );
    check("llama3", config, weights);
}

#[test]
fn linear_rope_scaling_from_a_transformers_5_config_matches_transformers() {
    let (config, weights) = load_hf_dir(&fixture("linear"), &Device::Cpu).unwrap();
    assert_eq!(config.rope_scaling, RopeScaling::Linear { factor: 4.0 });
    check("linear", config, weights);
}

#[test]
fn dynamic_ntk_rope_scaling_matches_transformers_with_its_kv_cache() {
    let (config, weights) = load_hf_dir(&fixture("dynamic"), &Device::Cpu).unwrap();
    assert_eq!(
        config.rope_scaling,
        RopeScaling::Dynamic {
            factor: 2.0,
            original_context: 64
        }
    );
    check("dynamic", config, weights);
}

#[test]
fn llama3_rope_scaling_from_a_gguf_rope_freqs_tensor_matches_transformers() {
    let (config, weights, _) = load_gguf(&fixture("llama3.gguf"), &Device::Cpu, false).unwrap();
    assert!(matches!(config.rope_scaling, RopeScaling::Divisors(ref d) if d.len() == 8));
    check("llama3", config, weights);
}

#[test]
fn qwen2_with_qkv_biases_and_tied_embeddings_matches_transformers() {
    let (config, weights) = load_hf_dir(&fixture("qwen2"), &Device::Cpu).unwrap();
    assert_eq!(config.family, "qwen2");
    assert!(weights.blocks.iter().all(|b| b.qkv_bias.is_some()));
    check_parity("qwen2", &model(config, weights));
}

/// How far our logits at the reference's top-5 ids are from another reference's values (which must be far).
fn distance(ours: &[Vec<f32>], top5: &Json) -> f64 {
    let mut apart = 0f64;
    for (t, want) in top5["values"].as_array().unwrap().iter().enumerate() {
        let top = ids(&top5["ids"][t]);
        for (id, v) in top.iter().zip(want.as_array().unwrap()) {
            apart = apart.max((ours[t][*id as usize] as f64 - v.as_f64().unwrap()).abs());
        }
    }
    apart
}

#[test]
fn gemma2_with_post_norms_geglu_softcaps_and_sliding_windows_matches_transformers() {
    let (config, weights) = load_hf_dir(&fixture("gemma2"), &Device::Cpu).unwrap();
    assert_eq!(config.family, "gemma2");
    // Layers alternate, local first (transformers' default `layer_types`).
    assert_eq!(config.attn_windows, [Some(16), None, Some(16), None]);
    let ours = model(config.clone(), weights.clone());
    check_parity("gemma2", &ours);
    // The window and the score softcap each change the output: computing without either would fail above.
    let reference = reference();
    let prompt = ids(&reference["prompt"]);
    let ours = logits(&ours, &prompt);
    for twin in ["no_window_top5", "no_softcap_top5"] {
        let apart = distance(&ours, &reference["gemma2"][twin]);
        assert!(apart > 1e-2, "gemma2: {twin} is only {apart} away");
    }
    let unwindowed = {
        let mut c = config;
        c.attn_windows = vec![None; 4];
        logits(&model(c, weights), &prompt)
    };
    let error = max_top5_error(&unwindowed, &reference["gemma2"]["no_window_top5"]);
    assert!(error < 1e-4, "gemma2 without windows differs by {error}");
}

#[test]
fn qwen2_with_sliding_window_layers_matches_transformers() {
    let (config, weights) = load_hf_dir(&fixture("qwen2_sliding"), &Device::Cpu).unwrap();
    assert_eq!(config.attn_windows, [None, Some(16)]);
    let ours = model(config, weights);
    check_parity("qwen2_sliding", &ours);
    let reference = reference();
    let apart = distance(
        &logits(&ours, &ids(&reference["prompt"])),
        &reference["qwen2_sliding"]["no_window_top5"],
    );
    assert!(
        apart > 1e-2,
        "the window changes the logits by only {apart}"
    );
    // A config without `layer_types` (before transformers 4.53) derives them from `max_window_layers`.
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("qwen2_sliding").join(f), dir.path().join(f)).unwrap();
    }
    let path = dir.path().join("config.json");
    let mut cfg: Json = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("layer_types");
    std::fs::write(&path, cfg.to_string()).unwrap();
    let (config, _) = load_hf_dir(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(config.attn_windows, [None, Some(16)]);
}

#[test]
fn gpt2_with_learned_positions_layernorm_and_conv1d_weights_matches_transformers() {
    let (config, weights) = load_hf_dir(&fixture("gpt2"), &Device::Cpu).unwrap();
    assert_eq!(config.family, "gpt2");
    assert!(config.rope.is_none() && weights.positions.is_some());
    check_parity("gpt2", &model(config, weights));
}

/// Qwen2, Gemma 2 and GPT-2 as llama.cpp's converter writes them into GGUF files match transformers as
/// their Hugging Face directories do.
#[test]
fn qwen2_gemma2_and_gpt2_gguf_files_match_transformers() {
    for (file, reference, family) in [
        ("qwen2.gguf", "qwen2", "qwen2"),
        ("gemma2.gguf", "gemma2_gguf", "gemma2"),
        ("gpt2.gguf", "gpt2", "gpt2"),
    ] {
        let (config, weights, _) = load_gguf(&fixture(file), &Device::Cpu, false).unwrap();
        assert_eq!(config.family, family);
        check_parity(reference, &model(config, weights));
    }
}

/// Copies the `llama3` fixture with `config.json` edited by `edit`; returns the error of loading it.
fn load_error(edit: impl Fn(&mut Json)) -> String {
    load_error_of("llama3", edit, |_| {})
}

/// Copies fixture `name`, edits its config and its tensors, and returns the error of loading it.
fn load_error_of(
    name: &str,
    edit: impl Fn(&mut Json),
    edit_tensors: impl Fn(&mut std::collections::HashMap<String, Tensor>),
) -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture(name).join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let mut tensors =
        candle_core::safetensors::load(fixture(name).join("model.safetensors"), &Device::Cpu)
            .unwrap();
    edit_tensors(&mut tensors);
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    let path = dir.path().join("config.json");
    let mut config: Json = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
    match load_hf_dir(dir.path(), &Device::Cpu) {
        Ok(_) => panic!("loaded a config it should refuse: {config}"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn rope_scalings_it_cannot_compute_are_refused_by_field() {
    let e = load_error(|c| c["rope_scaling"]["rope_type"] = "yarn".into());
    assert!(
        e.contains("config.json: `rope_scaling.rope_type` is \"yarn\""),
        "{e}"
    );
    let e = load_error(|c| {
        c["rope_scaling"] = serde_json::json!({ "type": "longrope", "factor": 2.0 });
    });
    assert!(
        e.contains("`rope_scaling.rope_type` is \"longrope\""),
        "{e}"
    );
    let e = load_error(|c| {
        c["rope_scaling"]
            .as_object_mut()
            .unwrap()
            .remove("low_freq_factor");
    });
    assert!(
        e.contains("`rope_scaling.low_freq_factor` is missing"),
        "{e}"
    );
    let e = load_error(|c| c["rope_scaling"]["factor"] = (-1.0).into());
    assert!(
        e.contains("`rope_scaling.factor` is missing or not a positive number"),
        "{e}"
    );
    let e = load_error(|c| {
        c["rope_parameters"] = serde_json::json!({
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5
        });
    });
    assert!(
        e.contains("`rope_parameters.partial_rotary_factor` = 0.5"),
        "{e}"
    );
}

#[test]
fn architectures_and_weights_the_loader_does_not_know_are_refused_by_name() {
    let e = load_error(|c| c["model_type"] = "mistral".into());
    assert!(
        e.contains("config.json: `model_type` is \"mistral\""),
        "{e}"
    );
    let e = load_error_of("gemma2", |c| c["hidden_activation"] = "relu".into(), |_| {});
    assert!(e.contains("`hidden_activation` is \"relu\""), "{e}");
    let e = load_error_of(
        "gemma2",
        |c| c["layer_types"][2] = "chunked_attention".into(),
        |_| {},
    );
    assert!(
        e.contains("`layer_types[2]` is \"chunked_attention\""),
        "{e}"
    );
    let e = load_error_of(
        "gpt2",
        |c| c["scale_attn_by_inverse_layer_idx"] = true.into(),
        |_| {},
    );
    assert!(
        e.contains("`scale_attn_by_inverse_layer_idx` = true is not supported"),
        "{e}"
    );
    let e = load_error_of("gpt2", |c| c["activation_function"] = "relu".into(), |_| {});
    assert!(e.contains("`activation_function` is \"relu\""), "{e}");
    let e = load_error_of(
        "gpt2",
        |_| {},
        |t| {
            t.remove("transformer.h.1.ln_2.bias");
        },
    );
    assert!(
        e.contains("missing tensor `transformer.h.1.ln_2.bias`"),
        "{e}"
    );
    let e = load_error_of(
        "qwen2",
        |c| c["layer_types"][1] = "sliding_attention".into(),
        |_| {},
    );
    assert!(
        e.contains("layer 1 uses sliding-window attention but `sliding_window` is not set"),
        "{e}"
    );
    // A Llama with attention_bias = true has an o_proj bias too: nothing reads it, so it is refused.
    let e = load_error_of(
        "llama3",
        |_| {},
        |t| {
            let zeros = Tensor::zeros(32, candle_core::DType::F32, &Device::Cpu).unwrap();
            t.insert("model.layers.1.self_attn.o_proj.bias".into(), zeros);
        },
    );
    assert!(
        e.contains("1 tensors that a llama model does not have, e.g. `model.layers.1.self_attn.o_proj.bias`"),
        "{e}"
    );
    let e = load_error_of(
        "qwen2",
        |_| {},
        |t| {
            t.remove("model.layers.0.self_attn.k_proj.bias");
        },
    );
    assert!(
        e.contains("layer 0 has biases on some of its q, k and v projections but not all"),
        "{e}"
    );
}

#[test]
fn a_gguf_rope_scaling_it_cannot_compute_is_refused_by_key() {
    // Rewrite one metadata string of the fixture in place: `llama3.gguf` has no scaling type, so build a
    // GGUF with one from the fixture's tensors via candle's writer.
    use candle_core::quantized::gguf_file;
    let path = fixture("llama3.gguf");
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut tensors = Vec::new();
    for name in content.tensor_infos.keys() {
        if name != "rope_freqs.weight" {
            tensors.push((
                name.clone(),
                content.tensor(&mut file, name, &Device::Cpu).unwrap(),
            ));
        }
    }
    let mut metadata: Vec<(String, gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.push((
        "llama.rope.scaling.type".into(),
        gguf_file::Value::String("yarn".into()),
    ));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("yarn.gguf");
    let mut w = std::fs::File::create(&out).unwrap();
    let meta: Vec<(&str, &gguf_file::Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tens: Vec<(&str, &candle_core::quantized::QTensor)> =
        tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    gguf_file::write(&mut w, &meta, &tens).unwrap();
    drop(w);
    let e = match load_gguf(&out, &Device::Cpu, false) {
        Ok(_) => panic!("loaded a GGUF with yarn scaling"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        e.contains("yarn.gguf: GGUF `llama.rope.scaling.type` is `yarn`"),
        "{e}"
    );
}

/// Batched generation (left padding, one KV cache, rows stopping on their own) against one prompt at a
/// time, token for token, on every family: with and without a steering edit at a hook, with prompts of
/// different lengths, stop tokens that end some rows early, and (GPT-2, 128 positions) a row that runs
/// into the context limit.
#[test]
fn batched_generation_equals_one_prompt_at_a_time() {
    use saeflow_core::models::generate::generate_batch;
    use saeflow_core::models::transformer::{Hook, HookPoint};
    let prompt = ids(&reference()["prompt"]);
    let nanochat = saeflow_core::models::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/quickstart/nanochat-d4"),
        None,
        &Device::Cpu,
    )
    .unwrap()
    .transformer;
    let mut models: Vec<(&str, Transformer)> = [
        "gemma2",
        "gpt2",
        "qwen2",
        "qwen2_sliding",
        "linear",
        "dynamic",
    ]
    .iter()
    .map(|name| {
        let (c, w) = load_hf_dir(&fixture(name), &Device::Cpu).unwrap();
        (*name, model(c, w))
    })
    .collect();
    let (c, w, _) = load_gguf(&fixture("llama3.gguf"), &Device::Cpu, false).unwrap();
    models.push(("llama3.gguf", model(c, w)));
    models.push(("nanochat-d4", nanochat));
    for (name, m) in &models {
        let vocab = m.config.vocab_size as u32;
        let prompts: Vec<Vec<u32>> = [(0, 5), (10, 33), (40, 41), (3, 20), (0, 80)]
            .iter()
            .map(|&(a, b)| prompt[a..b].iter().map(|t| t % vocab).collect())
            .collect();
        // Stop tokens: what two of the rows produce early on alone, so those rows end first.
        let alone = |hooks: &Hooks, stop: &[u32], max_new: usize| -> Vec<Vec<u32>> {
            prompts
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let s = Sampling {
                        seed: i as u64,
                        ..Sampling::default()
                    };
                    generate(m, p, max_new, stop, &s, hooks).unwrap()
                })
                .collect()
        };
        let max_new = 60; // past GPT-2's 128 positions for the 80-token prompt
        let free = alone(&Hooks::default(), &[], 6);
        let stop = [free[1][3], free[3][1]];
        let direction: Vec<f32> = (0..m.config.d_model)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.2)
            .collect();
        let direction = Tensor::from_vec(direction, m.config.d_model, &Device::Cpu).unwrap();
        let mut steered = Hooks::default();
        steered.interventions.insert(
            Hook {
                layer: 1,
                point: HookPoint::ResidPost,
            },
            std::sync::Arc::new(move |x: &Tensor| x.broadcast_add(&direction)),
        );
        for (what, hooks) in [("plain", Hooks::default()), ("steered", steered)] {
            let want = alone(&hooks, &stop, max_new);
            let got =
                generate_batch(m, &prompts, max_new, &stop, &Sampling::default(), &hooks).unwrap();
            assert_eq!(got, want, "{name} {what}");
            if what == "steered" {
                assert_ne!(
                    want,
                    alone(&Hooks::default(), &stop, max_new),
                    "{name}: the edit matters"
                );
            }
        }
    }
}

/// `saeflow model` with several `--prompt`s continues them in one batch, each as it would be alone, and a
/// Hugging Face Gemma 2 directory renders its own chat template (BOS written by the template, the
/// `<end_of_turn>` of generation_config.json among the stop tokens).
#[test]
fn the_model_command_batches_prompts_and_renders_gemmas_chat_template() {
    let gemma = fixture("gemma2");
    let dir = tempfile::tempdir().unwrap();
    let report = |prompts: &[&str], chat: bool| -> Json {
        let mut args = vec![
            "model",
            gemma.to_str().unwrap(),
            "--json",
            "--generate",
            "10",
        ];
        for p in prompts {
            args.extend(["--prompt", p]);
        }
        if chat {
            args.push("--chat");
        }
        let out = common::run(dir.path(), &args);
        assert!(out.status.success(), "{}", common::text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let (a, b) = (
        "the man was with his",
        "all of them have been there for one",
    );
    let both = report(&[a, b], false);
    assert_eq!(both["family"], "gemma2");
    for (i, p) in [a, b].iter().enumerate() {
        let alone = report(&[p], false);
        assert_eq!(
            both["continuations"][i]["greedy_ids"], alone["greedy_ids"],
            "{p}"
        );
    }
    let chat = report(&[a], true);
    // <bos> <start_of_turn> user (unknown) … : the template's own text, tokenized with its specials.
    let input: Vec<u64> = chat["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(
        &input[..2],
        &[2, 3],
        "<bos><start_of_turn> first: {input:?}"
    );
    assert_eq!(input.iter().filter(|&&t| t == 2).count(), 1, "one BOS");
    assert!(
        input.ends_with(&[4, 3, 5]),
        "…<end_of_turn><start_of_turn>model: {input:?}"
    );
}

/// The bf16 and f16 forward (`dtype = "bf16" | "f16"`) against `transformers` running the same models in
/// bfloat16 / float16 (`scripts/make_tiny_hf_low_precision_reference.py`). f16 here takes the candle ops a
/// GPU takes for both dtypes (weights and activations in the low dtype); bf16 on the CPU is its own mode
/// (bf16 products in the linear layers, everything else f32: `Transformer::to_dtype`). The two round in
/// different places (transformers multiplies norm weights after casting back to bf16, rotates in bf16; we
/// do both in f32), so their low-precision logits are not each other's. What must hold is that our error
/// against the f32 logits is of the size transformers' own is (`max_diff_from_f32`: 0.02–0.5 on these
/// models; measured, ours 0.4–0.8 of it in bf16 on the CPU, 0.7–1.4 in f16), and not zero (the dtype is
/// used).
#[test]
fn bf16_and_f16_forwards_match_transformers_in_the_same_dtype() {
    let reference: Json =
        serde_json::from_slice(&std::fs::read(fixture("reference_low_precision.json")).unwrap())
            .unwrap();
    let prompt = ids(&reference["prompt"]);
    for name in ["llama3", "qwen2", "gemma2", "gpt2"] {
        let (config, weights) = load_hf_dir(&fixture(name), &Device::Cpu).unwrap();
        let f32_model = model(config, weights);
        let f32_logits = logits(&f32_model, &prompt);
        let mut lowered = Some(f32_model);
        for (dtype, key) in [
            (candle_core::DType::BF16, "bfloat16"),
            (candle_core::DType::F16, "float16"),
        ] {
            let (config, weights) = load_hf_dir(&fixture(name), &Device::Cpu).unwrap();
            let m = lowered
                .take()
                .unwrap_or_else(|| model(config, weights))
                .to_dtype(dtype)
                .unwrap();
            assert_eq!(m.dtype(), dtype);
            let ours = logits(&m, &prompt);
            let r = &reference[name][key];
            let theirs: Vec<Vec<f64>> = r["logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|row| {
                    row.as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_f64().unwrap())
                        .collect()
                })
                .collect();
            let gap = r["max_diff_from_f32"].as_f64().unwrap();
            let (mut to_theirs, mut from_f32) = (0f64, 0f64);
            for (t, row) in ours.iter().enumerate() {
                for (j, &v) in row.iter().enumerate() {
                    to_theirs = to_theirs.max((v as f64 - theirs[t][j]).abs());
                    from_f32 = from_f32.max((v - f32_logits[t][j]).abs() as f64);
                }
            }
            eprintln!("{name} {key}: ours vs transformers {to_theirs:.4}, ours vs f32 {from_f32:.4}, transformers vs f32 {gap:.4}");
            assert!(
                from_f32 > 0.1 * gap,
                "{name} {key}: no different from f32 ({from_f32})"
            );
            assert!(
                from_f32 < 2.0 * gap,
                "{name} {key}: {from_f32} from the f32 logits, where transformers' {key} is {gap} away"
            );
            assert!(
                to_theirs < 2.0 * gap,
                "{name} {key}: {to_theirs} from transformers' {key} logits"
            );
        }
    }
}
