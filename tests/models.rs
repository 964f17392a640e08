//! Model parity and safety: nanochat-d4 against nanochat's own outputs, SmolLM2 GGUF against float32
//! references, hook semantics, KV cache, GQA, malicious pickles and corrupt files.
mod common;

use common::checkpoints::make_nanochat;
use common::{max_abs_diff, nanochat_d4, shared};

use std::io::Write;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use saeflow_core::models::generate::{generate, top_k, Sampling};
use saeflow_core::models::transformer::{mean_nll, Hook, HookPoint, Hooks, Intervention};
use saeflow_core::models::{self, LoadedModel};
use serde_json::Value as Json;

fn nanochat() -> LoadedModel {
    models::load(&nanochat_d4(), None, &Device::Cpu).unwrap()
}

fn smollm() -> LoadedModel {
    models::load(
        &shared("models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf"),
        None,
        &Device::Cpu,
    )
    .unwrap()
}

fn json(p: &Path) -> Json {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn ids_of(v: &Json) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn run(
    model: &LoadedModel,
    ids: &[u32],
    hooks: &Hooks,
) -> saeflow_core::models::transformer::Output {
    let input = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap();
    model.transformer.forward(&input, hooks, None).unwrap()
}

#[test]
#[cfg_attr(missing = "shared", ignore = "needs ../shared")]
fn nanochat_matches_reference_logits_residuals_greedy_and_nll() {
    let model = nanochat();
    let reference = json(&shared("fixtures/nanochat-d4/reference_outputs.json"));
    let tensors = candle_core::safetensors::load(
        shared("fixtures/nanochat-d4/reference_tensors.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        model.bos,
        Some(reference["bos_id"].as_u64().unwrap() as u32)
    );
    for (case, c) in reference["cases"].as_array().unwrap().iter().enumerate() {
        let prompt = c["prompt"].as_str().unwrap();
        let ids = model.encode_document(prompt).unwrap();
        assert_eq!(ids, ids_of(&c["input_ids"]), "case {case}: tokenizer ids");
        assert_eq!(
            model.tokenizer.decode(&ids[1..]).unwrap(),
            prompt,
            "case {case}: decode round trip"
        );
        let hooks = Hooks {
            logits: true,
            capture: (0..4)
                .map(|layer| Hook {
                    layer,
                    point: HookPoint::ResidPost,
                })
                .collect(),
            ..Default::default()
        };
        let out = run(&model, &ids, &hooks);
        let logits = out.logits.unwrap().squeeze(0).unwrap();
        let d = max_abs_diff(&logits, &tensors[&format!("logits_{case}")]);
        assert!(d <= 1e-4, "case {case}: logits differ by {d}");
        for layer in 0..4 {
            let got = out.activations[&Hook {
                layer,
                point: HookPoint::ResidPost,
            }]
                .squeeze(0)
                .unwrap();
            let d = max_abs_diff(&got, &tensors[&format!("resid_post_{case}_{layer}")]);
            assert!(
                d <= 1e-4,
                "case {case}: blocks.{layer}.hook_resid_post differs by {d}"
            );
        }
        let nll = mean_nll(&logits, &ids).unwrap();
        assert!(
            (nll - c["mean_nll"].as_f64().unwrap()).abs() < 1e-4,
            "case {case}: nll {nll}"
        );
        let top = top_k(&logits.get(ids.len() - 1).unwrap(), 5).unwrap();
        assert_eq!(
            top.iter().map(|t| t.0).collect::<Vec<_>>(),
            ids_of(&c["last_top5_ids"]),
            "case {case}: top-5"
        );
        let greedy = generate(
            &model.transformer,
            &ids,
            24,
            &model.stop,
            &Sampling::default(),
            &Hooks::default(),
        )
        .unwrap();
        assert_eq!(
            greedy,
            ids_of(&c["greedy_24"]),
            "case {case}: greedy tokens"
        );
        assert_eq!(
            model.tokenizer.decode(&greedy).unwrap(),
            c["greedy_text"].as_str().unwrap()
        );
    }
}

#[test]
#[cfg_attr(missing = "shared", ignore = "needs ../shared")]
fn smollm2_gguf_matches_reference_ids_top5_and_greedy() {
    let model = smollm();
    let reference = json(&shared(
        "models/smollm2-135m-instruct-q4_1/reference_outputs.json",
    ));
    assert_eq!(model.bos, None, "SmolLM2's GGUF says add_bos_token = false");
    for (case, c) in reference["cases"].as_array().unwrap().iter().enumerate() {
        let ids = model
            .tokenizer
            .encode_with_specials(c["prompt"].as_str().unwrap())
            .unwrap();
        assert_eq!(ids, ids_of(&c["input_ids"]), "case {case}: ids");
        let logits = run(&model, &ids, &Hooks::logits())
            .logits
            .unwrap()
            .squeeze(0)
            .unwrap();
        let top = top_k(&logits.get(ids.len() - 1).unwrap(), 5).unwrap();
        assert_eq!(
            top.iter().map(|t| t.0).collect::<Vec<_>>(),
            ids_of(&c["last_pos_top5_ids"]),
            "case {case}"
        );
        for (got, want) in top
            .iter()
            .zip(c["last_pos_top5_logits"].as_array().unwrap())
        {
            assert!(
                (got.1 as f64 - want.as_f64().unwrap()).abs() < 1e-3,
                "case {case}: logit {} vs {want}",
                got.1
            );
        }
        let nll = mean_nll(&logits, &ids).unwrap();
        assert!(
            (nll - c["mean_nll_of_prompt_tokens"].as_f64().unwrap()).abs() < 1e-3,
            "case {case}: nll {nll}"
        );
        let greedy = generate(
            &model.transformer,
            &ids,
            16,
            &model.stop,
            &Sampling::default(),
            &Hooks::default(),
        )
        .unwrap();
        assert_eq!(greedy, ids_of(&c["greedy_16_ids"]), "case {case}: greedy");
    }
}

#[test]
fn hooks_chain_interventions_apply_and_the_pass_stops_early() {
    let model = nanochat();
    let ids = model
        .encode_document("I will support you in Burgundy, I promise.")
        .unwrap();
    let all: Vec<Hook> = (0..4)
        .flat_map(|layer| {
            [
                HookPoint::ResidPre,
                HookPoint::AttnOut,
                HookPoint::ResidMid,
                HookPoint::MlpOut,
                HookPoint::ResidPost,
            ]
            .into_iter()
            .map(move |point| Hook { layer, point })
        })
        .collect();
    let base = run(
        &model,
        &ids,
        &Hooks {
            logits: true,
            capture: all.iter().copied().collect(),
            ..Default::default()
        },
    );
    let act = |o: &saeflow_core::models::transformer::Output, layer, point| {
        o.activations[&Hook { layer, point }].clone()
    };
    for layer in 0..3 {
        assert_eq!(
            max_abs_diff(
                &act(&base, layer, HookPoint::ResidPost),
                &act(&base, layer + 1, HookPoint::ResidPre)
            ),
            0.0
        );
    }
    // resid_mid = resid_pre + attn_out; resid_post = resid_mid + mlp_out.
    let sum = (act(&base, 2, HookPoint::ResidPre) + act(&base, 2, HookPoint::AttnOut)).unwrap();
    assert!(max_abs_diff(&sum, &act(&base, 2, HookPoint::ResidMid)) < 1e-6);

    // An identity intervention changes nothing.
    let identity: Intervention = std::sync::Arc::new(|x: &Tensor| Ok(x.clone()));
    let hook = Hook {
        layer: 1,
        point: HookPoint::ResidPost,
    };
    let mut hooks = Hooks {
        logits: true,
        ..Default::default()
    };
    hooks.interventions.insert(hook, identity);
    let same = run(&model, &ids, &hooks);
    assert_eq!(
        max_abs_diff(base.logits.as_ref().unwrap(), same.logits.as_ref().unwrap()),
        0.0
    );

    // Adding a vector at block 2 leaves earlier hooks alone and changes later ones and the logits.
    let add: Intervention = std::sync::Arc::new(|x: &Tensor| x + 1.0);
    let mut hooks = Hooks {
        logits: true,
        capture: all.iter().copied().collect(),
        ..Default::default()
    };
    hooks.interventions.insert(
        Hook {
            layer: 2,
            point: HookPoint::ResidPre,
        },
        add,
    );
    let steered = run(&model, &ids, &hooks);
    for h in &all {
        let d = max_abs_diff(&base.activations[h], &steered.activations[h]);
        if h.layer < 2 {
            assert_eq!(d, 0.0, "{h} changed by an intervention at blocks.2");
        } else {
            assert!(d > 1e-3, "{h} did not change");
        }
    }
    assert!(
        max_abs_diff(
            base.logits.as_ref().unwrap(),
            steered.logits.as_ref().unwrap()
        ) > 1e-3
    );

    // Capturing blocks.1 without logits runs only blocks 0..=1, and gives the same values.
    let early = run(
        &model,
        &ids,
        &Hooks::capture([Hook {
            layer: 1,
            point: HookPoint::ResidPost,
        }]),
    );
    assert!(early.logits.is_none());
    assert_eq!(
        max_abs_diff(
            &early.activations[&Hook {
                layer: 1,
                point: HookPoint::ResidPost
            }],
            &act(&base, 1, HookPoint::ResidPost)
        ),
        0.0
    );
    assert!(model
        .transformer
        .check_hook(&"blocks.4.hook_resid_post".parse().unwrap())
        .unwrap_err()
        .to_string()
        .contains("4 blocks"));
    assert!("blocks.1.hook_resid"
        .parse::<Hook>()
        .unwrap_err()
        .contains("hook_resid_post"));
}

#[test]
fn kv_cache_decoding_equals_a_full_recompute_with_interventions_active() {
    let model = nanochat();
    let ids = model
        .encode_document("Sometimes one must deceive others to succeed")
        .unwrap();
    let steer: Intervention = std::sync::Arc::new(|x: &Tensor| x * 1.5);
    let mut hooks = Hooks {
        logits: true,
        ..Default::default()
    };
    hooks.interventions.insert(
        Hook {
            layer: 1,
            point: HookPoint::MlpOut,
        },
        steer,
    );
    let full = run(&model, &ids, &hooks).logits.unwrap();
    let cached = common::cached_logits(&model, &ids, &hooks, 5);
    let d = max_abs_diff(&full, &cached);
    assert!(d < 1e-4, "cached decoding differs by {d}");
    // A batch of prompts of different lengths gives each prompt's own greedy continuation.
    let other = model
        .encode_document("The city of Paris is in France.")
        .unwrap();
    let batch = saeflow_core::models::generate::generate_batch(
        &model.transformer,
        &[ids.clone(), other.clone()],
        6,
        &[],
        &Sampling::default(),
        &hooks,
    )
    .unwrap();
    assert_eq!(
        batch[1],
        generate(
            &model.transformer,
            &other,
            6,
            &[],
            &Sampling::default(),
            &hooks
        )
        .unwrap()
    );
    // Seeded sampling is reproducible and differs across seeds.
    let s = |seed| {
        generate(
            &model.transformer,
            &ids,
            12,
            &[],
            &Sampling {
                temperature: 1.0,
                top_k: 50,
                top_p: 0.9,
                seed,
            },
            &hooks,
        )
        .unwrap()
    };
    assert_eq!(s(1), s(1));
    assert_ne!(s(1), s(2));
}

#[test]
fn a_handmade_mqa_checkpoint_with_compiled_keys_loads_and_agrees_with_its_mha_twin() {
    let tmp = tempfile::tempdir().unwrap();
    make_nanochat(&tmp.path().join("mqa"), 1, &[]);
    make_nanochat(&tmp.path().join("mha"), 3, &[]);
    let mqa = models::load(&tmp.path().join("mqa"), None, &Device::Cpu).unwrap();
    let mha = models::load(&tmp.path().join("mha"), None, &Device::Cpu).unwrap();
    assert_eq!(
        (
            mqa.transformer.config.n_kv_head,
            mha.transformer.config.n_kv_head
        ),
        (1, 3)
    );
    let ids = mqa
        .encode_document("The city of Lodz is in Poland.")
        .unwrap();
    let (a, b) = (
        run(&mqa, &ids, &Hooks::logits()).logits.unwrap(),
        run(&mha, &ids, &Hooks::logits()).logits.unwrap(),
    );
    assert!(
        max_abs_diff(&a, &b) < 1e-5,
        "GQA with one kv head must equal MHA with that head repeated"
    );
    assert_eq!(a.dims(), &[1, ids.len(), 4096]);
}

#[test]
fn newer_nanochat_architecture_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    make_nanochat(tmp.path(), 3, &["value_embeds.0.weight", "resid_lambdas"]);
    let err = format!(
        "{:#}",
        models::load(tmp.path(), None, &Device::Cpu).err().unwrap()
    );
    assert!(
        err.contains("newer (2026) nanochat architecture")
            && err.contains("value embeddings")
            && err.contains("residual lambdas"),
        "{err}"
    );
}

#[test]
fn malicious_pickles_are_refused_and_nothing_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let marker = tmp.path().join("pwned");
    let cmd = format!("touch {}", marker.display());
    // GLOBAL posix.system, ('touch <marker>',), REDUCE — what pickle.dumps of an os.system __reduce__ gives.
    let mut evil = b"\x80\x02cposix\nsystem\nq\x00X".to_vec();
    evil.extend((cmd.len() as u32).to_le_bytes());
    evil.extend(cmd.as_bytes());
    evil.extend(b"q\x01\x85q\x02Rq\x03.");

    let ckpt = tmp.path().join("ckpt");
    make_nanochat(&ckpt, 3, &[]);
    let file = std::fs::File::create(ckpt.join("model_000010.pt")).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", opts).unwrap();
    zip.write_all(&evil).unwrap();
    zip.finish().unwrap();
    let out = common::run(tmp.path(), &["model", ckpt.to_str().unwrap()]);
    let text = common::text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("refusing pickle global `posix.system`"),
        "{text}"
    );

    let tok = tmp.path().join("tok");
    make_nanochat(&tok, 3, &[]);
    std::fs::write(tok.join("tokenizer.pkl"), &evil).unwrap();
    let out = common::run(tmp.path(), &["model", tok.to_str().unwrap()]);
    let text = common::text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("tokenizer pickle") && text.contains("refusing pickle global `posix.system`"),
        "{text}"
    );
    assert!(!marker.exists(), "the pickle's command ran");
}

#[test]
#[cfg_attr(missing = "shared", ignore = "needs ../shared")]
fn truncated_or_corrupt_model_files_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let expect = |path: &Path, fragment: &str| {
        let out = common::run(d, &["model", path.to_str().unwrap()]);
        let text = common::text(&out);
        assert_eq!(out.status.code(), Some(1), "{}: {text}", path.display());
        assert!(
            text.contains(fragment),
            "{}: want `{fragment}` in {text}",
            path.display()
        );
        assert!(
            !text.contains("panicked") && !text.contains("stack backtrace"),
            "{text}"
        );
    };
    // nanochat .pt cut in half.
    let nc = d.join("nc");
    std::fs::create_dir_all(&nc).unwrap();
    let src = nanochat_d4().join("base_checkpoints/d4");
    let pt = std::fs::read(src.join("model_001200.pt")).unwrap();
    std::fs::write(nc.join("model_001200.pt"), &pt[..pt.len() / 2]).unwrap();
    std::fs::copy(src.join("meta_001200.json"), nc.join("meta_001200.json")).unwrap();
    std::fs::copy(
        nanochat_d4().join("tokenizer/tokenizer.pkl"),
        nc.join("tokenizer.pkl"),
    )
    .unwrap();
    expect(&nc, "not a torch zip checkpoint");
    // GGUF cut short (its tensors extend past the end).
    let gg = d.join("gg");
    std::fs::create_dir_all(&gg).unwrap();
    let smol = shared("models/smollm2-135m-instruct-q4_1");
    let bytes = std::fs::read(smol.join("SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    std::fs::write(gg.join("m.gguf"), &bytes[..bytes.len() / 3]).unwrap();
    std::fs::copy(smol.join("tokenizer.json"), gg.join("tokenizer.json")).unwrap();
    expect(&gg.join("m.gguf"), "truncated or corrupt");
    std::fs::write(gg.join("m.gguf"), &bytes[..100]).unwrap();
    expect(&gg.join("m.gguf"), "not a readable GGUF file");
    // A broken tokenizer.json beside a good GGUF.
    std::fs::write(gg.join("m.gguf"), &bytes).unwrap();
    std::fs::write(gg.join("tokenizer.json"), b"{\"model\": ").unwrap();
    expect(&gg.join("m.gguf"), "not a valid tokenizer.json");
    // A Hugging Face directory with a truncated safetensors shard.
    let hf = d.join("hf");
    std::fs::create_dir_all(&hf).unwrap();
    std::fs::write(hf.join("config.json"), r#"{"vocab_size": 8, "hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1}"#).unwrap();
    std::fs::copy(smol.join("tokenizer.json"), hf.join("tokenizer.json")).unwrap();
    let t = std::collections::HashMap::from([(
        "model.embed_tokens.weight".to_string(),
        Tensor::zeros((8, 4), DType::F32, &Device::Cpu).unwrap(),
    )]);
    candle_core::safetensors::save(&t, hf.join("model.safetensors")).unwrap();
    let st = std::fs::read(hf.join("model.safetensors")).unwrap();
    std::fs::write(hf.join("model.safetensors"), &st[..st.len() - 10]).unwrap();
    expect(&hf, "not a readable safetensors file");
}

#[test]
#[cfg_attr(missing = "shared", ignore = "needs ../shared")]
fn hugging_face_layout_of_the_gguf_weights_gives_the_same_logits() {
    // Undo llama.cpp's Q/K permutation, save as a Hugging Face directory, and compare with the GGUF path:
    // this checks the safetensors loader, the half-split rotary and the permutation in one go.
    let (config, weights, _) = saeflow_core::models::llama::load_gguf(
        &shared("models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf"),
        &Device::Cpu,
        false,
    )
    .unwrap();
    let unpermute = |w: &Tensor, heads: usize| -> Tensor {
        let (out, inp) = w.dims2().unwrap();
        let hd = out / heads;
        w.reshape((heads, hd / 2, 2, inp))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((out, inp))
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let mut sd: std::collections::HashMap<String, Tensor> = std::collections::HashMap::new();
    sd.insert("model.embed_tokens.weight".into(), weights.embed.clone());
    sd.insert(
        "model.norm.weight".into(),
        weights.final_norm.clone().unwrap(),
    );
    for (i, b) in weights.blocks.iter().enumerate() {
        let p = |s: &str| format!("model.layers.{i}.{s}.weight");
        sd.insert(p("input_layernorm"), b.attn_norm.clone().unwrap());
        sd.insert(p("post_attention_layernorm"), b.mlp_norm.clone().unwrap());
        sd.insert(
            p("self_attn.q_proj"),
            unpermute(&b.q.dense().unwrap(), config.n_head),
        );
        sd.insert(
            p("self_attn.k_proj"),
            unpermute(&b.k.dense().unwrap(), config.n_kv_head),
        );
        sd.insert(p("self_attn.v_proj"), b.v.dense().unwrap());
        sd.insert(p("self_attn.o_proj"), b.o.dense().unwrap());
        sd.insert(
            p("mlp.gate_proj"),
            b.gate.as_ref().unwrap().dense().unwrap(),
        );
        sd.insert(p("mlp.up_proj"), b.up.dense().unwrap());
        sd.insert(p("mlp.down_proj"), b.down.dense().unwrap());
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    candle_core::safetensors::save(&sd, dir.join("model.safetensors")).unwrap();
    let smol = shared("models/smollm2-135m-instruct-q4_1");
    std::fs::copy(smol.join("config.json"), dir.join("config.json")).unwrap();
    std::fs::copy(smol.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    std::fs::copy(
        smol.join("tokenizer_config.json"),
        dir.join("tokenizer_config.json"),
    )
    .unwrap();
    let hf = models::load(dir, None, &Device::Cpu).unwrap();
    let gguf = smollm();
    let ids = gguf.tokenizer.encode("The capital of France is").unwrap();
    let d = max_abs_diff(
        &run(&hf, &ids, &Hooks::logits()).logits.unwrap(),
        &run(&gguf, &ids, &Hooks::logits()).logits.unwrap(),
    );
    assert!(d < 1e-3, "HF layout differs from GGUF by {d}");
    // Both layouts carry SmolLM2's own Jinja chat template, which adds its default system turn; the
    // tokens of a chat are those of its rendered text, split where the answer starts.
    assert!(matches!(hf.chat, models::ChatFormat::Template(_)));
    let text = hf.render_chat("Is Paris in France?", Some("Yes.")).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nIs Paris in France?<|im_end|>\n<|im_start|>assistant\nYes.<|im_end|>\n"
    );
    assert_eq!(
        gguf.render_chat("Is Paris in France?", Some("Yes."))
            .unwrap(),
        text
    );
    for model in [&hf, &gguf] {
        let (prompt, answer) = model
            .chat_tokens("Is Paris in France?", Some("Yes."))
            .unwrap();
        let whole = model.tokenizer.encode_with_specials(&text).unwrap();
        assert_eq!([prompt.clone(), answer].concat(), whole);
        let head = model.render_chat("Is Paris in France?", None).unwrap();
        assert_eq!(prompt, model.tokenizer.encode_with_specials(&head).unwrap());
    }
}

#[test]
#[cfg_attr(missing = "shared", ignore = "needs ../shared")]
fn quantized_mode_is_an_opt_in_with_bounded_measured_deviation() {
    let path = shared("models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf");
    let q = models::load_with(&path, None, models::WeightFormat::Quantized, &Device::Cpu).unwrap();
    let reference = json(&shared(
        "models/smollm2-135m-instruct-q4_1/reference_outputs.json",
    ));
    let c = &reference["cases"][0];
    let ids = q.tokenizer.encode(c["prompt"].as_str().unwrap()).unwrap();
    let logits = run(&q, &ids, &Hooks::logits())
        .logits
        .unwrap()
        .squeeze(0)
        .unwrap();
    let top = top_k(&logits.get(ids.len() - 1).unwrap(), 5).unwrap();
    let mut worst = 0.0f64;
    for (got, (id, want)) in top.iter().zip(
        ids_of(&c["last_pos_top5_ids"])
            .into_iter()
            .zip(c["last_pos_top5_logits"].as_array().unwrap()),
    ) {
        assert_eq!(
            got.0, id,
            "8-bit activations keep this prompt's top-5 order"
        );
        worst = worst.max((got.1 as f64 - want.as_f64().unwrap()).abs());
    }
    // Measured on this model: up to 0.09 here and up to 0.40 on the other reference prompts (README).
    assert!(worst > 1e-3 && worst < 0.5, "quantized deviation {worst}");
    let err = models::load_with(
        &nanochat_d4(),
        None,
        models::WeightFormat::Quantized,
        &Device::Cpu,
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("GGUF files only"));
}

#[test]
fn hub_model_repositories_download_resumably_and_load() {
    use common::http::{Routes, Server};
    let rev = "f00dfeedf00dfeedf00dfeedf00dfeedf00dfeed";
    let src = nanochat_d4();
    let files = [
        (
            "model_001200.pt",
            src.join("base_checkpoints/d4/model_001200.pt"),
            true,
        ),
        (
            "meta_001200.json",
            src.join("base_checkpoints/d4/meta_001200.json"),
            false,
        ),
        ("tokenizer.pkl", src.join("tokenizer/tokenizer.pkl"), true),
        ("README.md", src.join("SOURCE.md"), false),
    ];
    let mut routes = Routes::default();
    let mut tree = Vec::new();
    for (name, path, lfs) in &files {
        let bytes = std::fs::read(path).unwrap();
        let mut entry = serde_json::json!({"type": "file", "path": name, "size": bytes.len()});
        if *lfs {
            entry["lfs"] = serde_json::json!({"oid": saeflow_core::data::download::sha256_file(path).unwrap(), "size": bytes.len()});
        } else {
            entry["oid"] = saeflow_core::data::download::git_blob_oid(path)
                .unwrap()
                .into();
        }
        tree.push(entry);
        routes
            .bodies
            .insert(format!("/org/nanochat-d4/resolve/{rev}/{name}"), bytes);
    }
    routes.bodies.insert(
        format!("/api/models/org/nanochat-d4/tree/{rev}?recursive=true"),
        serde_json::to_vec(&tree).unwrap(),
    );
    routes.cut_first.insert(
        format!("/org/nanochat-d4/resolve/{rev}/model_001200.pt"),
        100_000,
    );
    let server = Server::start(routes);
    std::env::set_var("HF_ENDPOINT", &server.base);
    let spec = saeflow_core::models::spec::ModelSpec {
        kind: saeflow_core::models::spec::ModelKind::Nanochat,
        path: None,
        hub: Some("org/nanochat-d4".into()),
        revision: Some(rev.into()),
        dtype: None,
    };
    let tmp = tempfile::tempdir().unwrap();
    let cancel = saeflow_core::cancel::Cancel::new();
    let progress = saeflow_core::progress::Progress::hidden();
    let dir = models::resolve(
        &spec,
        tmp.path(),
        &tmp.path().join("downloads"),
        &progress,
        &cancel,
    )
    .unwrap();
    assert!(
        !dir.join("README.md").exists(),
        "only model files are fetched"
    );
    let model = models::load(&dir, None, &Device::Cpu).unwrap();
    let ids = model
        .encode_document("The city of Paris is in France.")
        .unwrap();
    let logits = run(&model, &ids, &Hooks::logits())
        .logits
        .unwrap()
        .squeeze(0)
        .unwrap();
    assert_eq!(
        top_k(&logits.get(ids.len() - 1).unwrap(), 1).unwrap()[0].0,
        4087
    );
    let log = server.log.lock().unwrap().clone();
    assert!(
        log.iter()
            .any(|l| l.contains("model_001200.pt range=Some(100000)")),
        "the cut download resumed: {log:?}"
    );
    // A second resolve downloads nothing.
    let before = server.log.lock().unwrap().len();
    models::resolve(
        &spec,
        tmp.path(),
        &tmp.path().join("downloads"),
        &progress,
        &cancel,
    )
    .unwrap();
    let after: Vec<String> = server.log.lock().unwrap()[before..].to_vec();
    assert!(
        after.iter().all(|l| l.contains("/api/models/")),
        "{after:?}"
    );
}

#[test]
#[cfg_attr(missing = "shared", ignore = "needs ../shared")]
fn a_gguf_without_tokenizer_json_rebuilds_its_tokenizer_from_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let src = shared("models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf");
    let gguf = tmp.path().join("m.gguf");
    if std::fs::hard_link(&src, &gguf).is_err() {
        std::fs::copy(&src, &gguf).unwrap();
    }
    let model = models::load(&gguf, None, &Device::Cpu).unwrap();
    let reference = json(&shared(
        "models/smollm2-135m-instruct-q4_1/reference_outputs.json",
    ));
    for c in reference["cases"].as_array().unwrap() {
        let prompt = c["prompt"].as_str().unwrap();
        let ids = model.tokenizer.encode_with_specials(prompt).unwrap();
        assert_eq!(ids, ids_of(&c["input_ids"]), "{prompt:?}");
        assert_eq!(model.tokenizer.decode(&ids).unwrap(), prompt);
    }
    let digits = model.tokenizer.encode("In 2024, 1234 tokens.").unwrap();
    let json_tok = saeflow_core::models::Tokenizer::from_hf_file(&shared(
        "models/smollm2-135m-instruct-q4_1/tokenizer.json",
    ))
    .unwrap();
    assert_eq!(
        digits,
        json_tok.encode("In 2024, 1234 tokens.").unwrap(),
        "digits are split as tokenizer.json does"
    );
}

/// The CPU's bf16 compute mode (`dtype = "bf16"`: linear layers take bf16-rounded inputs and weights on
/// AMX tiles or AVX512-BF16, with f32 sums; everything else f32) against f32 on SmolLM2's reference prompts:
/// the deviation of the last layer's residual and of the logits, stated relative to their scales, and the
/// 16-token greedy continuations, which stay the f32 ones.
#[test]
#[cfg_attr(missing = "shared", ignore = "needs ../shared")]
fn smollm2_in_bf16_keeps_f32s_greedy_output_within_a_stated_deviation() {
    let path = shared("models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf");
    let f32_model = smollm();
    let bf16_model =
        models::load_with(&path, None, models::WeightFormat::Bf16, &Device::Cpu).unwrap();
    assert_eq!(bf16_model.transformer.dtype(), DType::BF16);
    let reference = json(&shared(
        "models/smollm2-135m-instruct-q4_1/reference_outputs.json",
    ));
    let hook = Hook {
        layer: 29,
        point: HookPoint::ResidPost,
    };
    let hooks = Hooks {
        logits: true,
        ..Hooks::capture([hook])
    };
    let relative = |a: &Tensor, b: &Tensor| -> f32 {
        let scale = a
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        max_abs_diff(a, b) / scale
    };
    let (mut worst_resid, mut worst_logits) = (0f32, 0f32);
    for (case, c) in reference["cases"].as_array().unwrap().iter().enumerate() {
        let ids = ids_of(&c["input_ids"]);
        let (a, b) = (
            run(&f32_model, &ids, &hooks),
            run(&bf16_model, &ids, &hooks),
        );
        worst_resid = worst_resid.max(relative(&a.activations[&hook], &b.activations[&hook]));
        worst_logits = worst_logits.max(relative(
            a.logits.as_ref().unwrap(),
            b.logits.as_ref().unwrap(),
        ));
        let greedy = |m: &LoadedModel| {
            generate(
                &m.transformer,
                &ids,
                16,
                &m.stop,
                &Sampling::default(),
                &Hooks::default(),
            )
            .unwrap()
        };
        assert_eq!(
            greedy(&bf16_model),
            ids_of(&c["greedy_16_ids"]),
            "case {case}: greedy"
        );
    }
    eprintln!(
        "bf16 vs f32: residual {worst_resid:.4}, logits {worst_logits:.4} of their max |value|"
    );
    assert!(
        worst_resid > 0.0 && worst_logits > 0.0,
        "bf16 changed nothing"
    );
    // Measured on SmolLM2 (Intel Xeon): 0.0072 and 0.0096 on AMX, 0.0098 and 0.0136 on AVX512-BF16
    // (`SAEFLOW_AMX=0`: the path of CPUs without AMX).
    assert!(
        worst_resid < 0.02,
        "residual off by {worst_resid} of its scale"
    );
    assert!(
        worst_logits < 0.02,
        "logits off by {worst_logits} of their scale"
    );
}

/// `saeflow model`'s top-5 logits and greedy text for SmolLM2, with `env` set.
fn smollm2_cli(dtype: &str, env: &[(&str, &str)]) -> (Vec<f64>, String) {
    let d = tempfile::tempdir().unwrap();
    let model = shared("models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut cmd = common::saeflow(d.path());
    cmd.args([
        "model",
        model.to_str().unwrap(),
        "--generate",
        "12",
        "--dtype",
        dtype,
    ]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let t = common::text(&out);
    assert!(out.status.success(), "{env:?}: {t}");
    let logits = t
        .lines()
        .skip_while(|l| !l.starts_with("top-5"))
        .skip(1)
        .take(5)
        .map(|l| l.split_whitespace().nth(1).unwrap().parse().unwrap())
        .collect();
    let greedy = t.lines().find(|l| l.starts_with("greedy:")).unwrap();
    (logits, greedy.to_string())
}

#[test]
#[cfg_attr(missing = "shared", ignore = "needs ../shared")]
fn cpus_without_avx512_or_amx_run_the_same_model() {
    // The paths of CPUs without AVX-512 (candle's matmul on the weights as tensors, AVX2 loops) or
    // without AMX (AVX512-BF16, or bf16-rounded values in f32), forced on this CPU by the switches every
    // kernel obeys. Where this CPU lacks a feature the switch changes nothing and the test still holds.
    let (f32_logits, f32_greedy) = smollm2_cli("f32", &[]);
    let (plain_logits, plain_greedy) = smollm2_cli("f32", &[("SAEFLOW_AVX512", "0")]);
    assert_eq!(plain_greedy, f32_greedy);
    for (a, b) in f32_logits.iter().zip(&plain_logits) {
        // The printed logits (4 decimals) of two f32 summation orders.
        assert!((a - b).abs() < 2e-3, "{f32_logits:?} vs {plain_logits:?}");
    }
    // Every bf16 path (AMX, AVX512-BF16, rounded values in f32) keeps the bf16 contract of
    // `smollm2_in_bf16_keeps_f32s_greedy_output_within_a_stated_deviation`: f32's greedy text, logits
    // within 2% of their scale.
    let scale = f32_logits.iter().fold(0f64, |m, x| m.max(x.abs()));
    for env in [
        &[][..],
        &[("SAEFLOW_AMX", "0")][..],
        &[("SAEFLOW_AMX", "0"), ("SAEFLOW_AVX512", "0")][..],
    ] {
        let (logits, greedy) = smollm2_cli("bf16", env);
        assert_eq!(greedy, f32_greedy, "{env:?}");
        for (a, b) in f32_logits.iter().zip(&logits) {
            assert!(
                (a - b).abs() < 0.02 * scale,
                "{env:?}: {f32_logits:?} vs {logits:?}"
            );
        }
    }
}
