//! `saeflow model`: loads a model and reports its architecture, tokens, next-token predictions, NLL and a
//! greedy continuation.

use std::path::PathBuf;

use saeflow_core::models::spec::DeviceSpec;
use saeflow_core::models::WeightFormat;
use saeflow_runner::Error;

/// Arguments of `saeflow model`.
#[derive(clap::Args)]
pub struct ModelArgs {
    /// A nanochat checkpoint (file or directory), a .gguf file or a Hugging Face directory.
    path: PathBuf,
    /// Text to run; repeat for several prompts, continued together in one batch (the report's details are
    /// of the first).
    #[arg(long, default_value = "The capital of France is")]
    prompt: Vec<String>,
    /// Greedy tokens to generate.
    #[arg(long, default_value_t = 16)]
    generate: usize,
    /// Wrap the prompt in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Weights: f32 (default), bf16 or f16 (matrix products in that dtype, norms and softmax f32; on the CPU bf16 uses AMX / AVX512-BF16), or quantized (GGUF only).
    #[arg(long, default_value = "f32")]
    dtype: WeightFormat,
}

/// Prints the model report as text or, with `--json`, as JSON.
pub fn model(args: ModelArgs) -> Result<(), Error> {
    let report = model_report(&args).map_err(Error::Other)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).expect("JSON"));
    } else {
        print_model_report(&report);
    }
    Ok(())
}

/// Loads the model, runs the prompt and generates greedily; the report is JSON so `--json` prints it as is.
fn model_report(args: &ModelArgs) -> anyhow::Result<serde_json::Value> {
    use saeflow_core::models::{generate as gen, transformer};
    let device = saeflow_core::models::device(args.device)?;
    let started = std::time::Instant::now();
    let model = saeflow_core::models::load_with(&args.path, None, args.dtype, &device)?;
    let load_s = started.elapsed().as_secs_f64();
    let encode = |prompt: &str| -> anyhow::Result<Vec<u32>> {
        if args.chat {
            model
                .tokenizer
                .encode_with_specials(&model.render_chat(prompt, None)?)
        } else {
            model.encode_document(prompt)
        }
    };
    let all_ids = args
        .prompt
        .iter()
        .map(|p| encode(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let ids = all_ids.first().cloned().unwrap_or_default();
    if ids.is_empty() {
        anyhow::bail!("the prompt encodes to no tokens");
    }
    let input = candle_core::Tensor::from_vec(ids.clone(), (1, ids.len()), &device)?;
    let logits = model
        .transformer
        .forward(&input, &transformer::Hooks::logits(), None)?
        .logits
        .expect("logits");
    let logits = logits.squeeze(0)?;
    let nll = if ids.len() > 1 {
        Some(transformer::mean_nll(&logits, &ids)?)
    } else {
        None
    };
    let top5 = gen::top_k(&logits.get(ids.len() - 1)?, 5)?;
    let outs = gen::generate_batch(
        &model.transformer,
        &all_ids,
        args.generate,
        &model.stop,
        &gen::Sampling::default(),
        &transformer::Hooks::default(),
    )?;
    let out = outs[0].clone();
    let continuations = args
        .prompt
        .iter()
        .zip(&outs)
        .map(|(p, o)| -> anyhow::Result<serde_json::Value> {
            Ok(serde_json::json!({"prompt": p, "greedy_ids": o, "greedy_text": model.tokenizer.decode(o)?}))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let c = &model.transformer.config;
    Ok(serde_json::json!({
        "source": model.source.display().to_string(),
        "family": c.family,
        "layers": c.n_layer,
        "d_model": c.d_model,
        "heads": c.n_head,
        "kv_heads": c.n_kv_head,
        "head_dim": c.head_dim,
        "d_mlp": c.d_mlp,
        "vocab_size": c.vocab_size,
        "max_seq_len": c.max_seq_len,
        "bos": model.bos,
        "load_seconds": load_s,
        "input_ids": ids,
        "mean_nll": nll,
        "top5": top5.iter().map(|(i, l)| serde_json::json!({"id": i, "logit": l, "token": model.tokenizer.decode(&[*i]).unwrap_or_default()})).collect::<Vec<_>>(),
        "greedy_ids": out,
        "greedy_text": model.tokenizer.decode(&out)?,
        "continuations": continuations,
    }))
}

/// The report as text, one fact per line.
fn print_model_report(r: &serde_json::Value) {
    println!(
        "{} ({}): {} layers, d_model {}, {} heads ({} kv, head_dim {}), d_mlp {}, vocab {}, context {}",
        r["source"].as_str().unwrap_or(""),
        r["family"].as_str().unwrap_or(""),
        r["layers"], r["d_model"], r["heads"], r["kv_heads"], r["head_dim"], r["d_mlp"], r["vocab_size"], r["max_seq_len"]
    );
    println!(
        "loaded in {:.2}s",
        r["load_seconds"].as_f64().unwrap_or(0.0)
    );
    println!("input ids: {}", r["input_ids"]);
    if let Some(n) = r["mean_nll"].as_f64() {
        println!("mean next-token NLL: {n:.4}");
    }
    println!("top-5 next tokens:");
    for t in r["top5"].as_array().into_iter().flatten() {
        println!(
            "  {:>7}  {:>9.4}  {:?}",
            t["id"],
            t["logit"].as_f64().unwrap_or(0.0),
            t["token"].as_str().unwrap_or("")
        );
    }
    println!("greedy: {:?}", r["greedy_text"].as_str().unwrap_or(""));
    let all = r["continuations"].as_array().map_or(&[][..], |v| &v[..]);
    if all.len() > 1 {
        println!("batch of {} prompts, greedily:", all.len());
        for c in all {
            println!(
                "  {:?} → {:?}",
                c["prompt"].as_str().unwrap_or(""),
                c["greedy_text"].as_str().unwrap_or("")
            );
        }
    }
}
