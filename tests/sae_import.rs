//! Published SAEs as inputs: SAEs written by SAELens' own save code (TopK; TopK with layer-norm inputs and
//! decoder-norm rescaling; JumpReLU with constant-norm inputs) and Gemma Scope's raw `params.npz`
//! (`tests/fixtures/saelens/`, made by `scripts/make_saelens_fixtures.py`) encode and decode as SAELens
//! does on fixed inputs; the `sae` stage brings them in from a folder or a pinned hub revision (loopback
//! server) and `eval` runs on them; what it cannot honour is refused naming the file and field.
mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::{assert_clean_failure, object_of, ok, run, write};
use saeflow_core::sae::format::Sae;
use serde_json::Value as Json;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/saelens")
        .join(name)
}

fn tiny_gemma2() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_hf/gemma2")
}

fn reference() -> Json {
    serde_json::from_slice(&std::fs::read(fixture("reference.json")).unwrap()).unwrap()
}

fn matrix(v: &Json) -> Tensor {
    let rows: Vec<Vec<f32>> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    let (n, d) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), (n, d), &Device::Cpu).unwrap()
}

/// The largest difference relative to the reference's largest magnitude.
fn relative_error(ours: &Tensor, theirs: &Tensor) -> f32 {
    let scale = theirs
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let diff = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap();
    diff.to_scalar::<f32>().unwrap() / scale.max(1e-30)
}

/// Latents and reconstructions of `sae` within 1e-5 relative of SAELens' `encode` and `decode(encode)`.
fn assert_as_saelens(name: &str, sae: &Sae) {
    let r = reference();
    let x = matrix(&r["inputs"]);
    let (latents, reconstruction) = sae.encode_and_reconstruct(&x).unwrap();
    let want = matrix(&r[name]["latents"]);
    // Same latents fire: the sparsity pattern is exact, values to rounding.
    let fired = |t: &Tensor| -> Vec<Vec<u32>> {
        t.to_vec2::<f32>()
            .unwrap()
            .iter()
            .map(|row| {
                (0..row.len() as u32)
                    .filter(|&j| row[j as usize] != 0.0)
                    .collect()
            })
            .collect()
    };
    assert_eq!(fired(&latents), fired(&want), "{name}: active latents");
    let e = relative_error(&latents, &want);
    assert!(e < 1e-5, "{name}: latents differ by {e} (relative)");
    let e = relative_error(&reconstruction, &matrix(&r[name]["reconstruction"]));
    assert!(e < 1e-5, "{name}: reconstructions differ by {e} (relative)");
}

#[test]
fn saelens_saes_encode_and_decode_as_saelens_does() {
    for name in ["topk", "topk_ln_rescaled", "jumprelu"] {
        let sae = Sae::load(&fixture(name), &Device::Cpu).unwrap();
        assert_as_saelens(name, &sae);
    }
    let scope = Sae::load_npz(&fixture("gemma_scope/params.npz"), &Device::Cpu).unwrap();
    assert!(!scope.apply_b_dec_to_input);
    assert_as_saelens("gemma_scope", &scope);
}

/// A dataset of sentences in the tiny Gemma 2's vocabulary, captured at `hook`.
fn data_and_capture(dir: &Path, hook: &str) -> String {
    let words =
        "the of and to in is was it for on with as by at from that this be are or an not but have";
    let words: Vec<&str> = words.split(' ').collect();
    let rows: String = (0..48)
        .map(|i| {
            let text: Vec<&str> = (0..12)
                .map(|j| words[(i * 7 + j * j * 3) % words.len()])
                .collect();
            format!(
                "{{\"text\": \"{}\", \"label\": \"{}\"}}\n",
                text.join(" "),
                i % 2
            )
        })
        .collect();
    let data = write(&dir.join("rows.jsonl"), &rows);
    format!(
        r#"[models.gemma]
kind = "huggingface"
path = "{model}"

[stages.data]
kind = "dataset"
sources = [{{ path = "{data}", text = "text", label = "label" }}]

[stages.acts]
kind = "capture"
input = "data"
model = "gemma"
hooks = ["{hook}"]
context = 16
batch_size = 8
"#,
        model = tiny_gemma2().display(),
        data = data.display()
    )
}

#[test]
fn an_imported_sae_is_checked_against_its_model_evaluated_labelled_and_steered() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = format!(
        "[pipeline]\nname = \"imported\"\n\n{}\n[stages.scope]\nkind = \"sae\"\npath = \"{}\"\nmodel = \"gemma\"\n\n\
         [stages.eval]\nkind = \"eval\"\nsae = \"scope\"\ninput = \"acts\"\nmodel = \"gemma\"\n\n\
         [stages.labels]\nkind = \"label\"\nsae = \"scope\"\ninput = \"acts\"\n\n\
         [stages.steer]\nkind = \"steer\"\nsae = \"scope\"\nmodel = \"gemma\"\nlabels = \"labels\"\n\
         input = \"data\"\nfeatures = [3, 17]\nprompt_count = 3\nmax_new_tokens = 6\n",
        data_and_capture(dir.path(), "blocks.1.hook_resid_post"),
        fixture("topk").display()
    );
    write(&dir.path().join("p.toml"), &pipeline);
    ok(dir.path(), &["run", "p.toml"]);
    let cache = dir.path().join("cache");
    let imported = object_of(&cache, "imported", "scope");
    // The export is SAELens' layout, loads back to the same maths, and records where it came from.
    assert_as_saelens("topk", &Sae::load(&imported, &Device::Cpu).unwrap());
    let source: Json =
        serde_json::from_slice(&std::fs::read(imported.join("source.json")).unwrap()).unwrap();
    assert_eq!(source["hook"], "blocks.1.hook_resid_post");
    assert_eq!(source["files"].as_array().unwrap().len(), 2, "{source}");
    let eval: Json = serde_json::from_slice(
        &std::fs::read(object_of(&cache, "imported", "eval").join("eval.json")).unwrap(),
    )
    .unwrap();
    let l0 = eval["sparsity"]["l0"].as_f64().unwrap();
    assert!((l0 - 8.0).abs() < 1e-9, "TopK k = 8 gives L0 8, got {l0}");
    let ce = &eval["model_performance_preservation"];
    assert!(
        ce["ce_loss_with_sae"].as_f64().unwrap().is_finite(),
        "{eval}"
    );
    // label and steer take it as they take a trained SAE.
    for (stage, file) in [
        ("labels", "features.parquet"),
        ("steer", "generations.parquet"),
    ] {
        assert!(
            object_of(&cache, "imported", stage).join(file).is_file(),
            "{stage}"
        );
    }
    // The report lists it with its origin.
    ok(dir.path(), &["report", "p.toml", "-o", "report"]);
    let page = std::fs::read_to_string(dir.path().join("report/index.html")).unwrap();
    let imported = &page[page
        .find("Imported SAEs")
        .expect("an Imported SAEs section")..];
    assert!(imported.contains("saelens/topk") && imported.contains("blocks.1.hook_resid_post"));

    // The layer-norm SAE reads blocks.2.hook_mlp_out, which the capture does not have; rescaled decoder
    // norms are folded and recorded as such.
    let pipeline = format!(
        "[pipeline]\nname = \"imported\"\n\n[stages.scope]\nkind = \"sae\"\npath = \"{}\"\n",
        fixture("topk_ln_rescaled").display()
    );
    write(&dir.path().join("p2.toml"), &pipeline);
    ok(dir.path(), &["run", "p2.toml"]);
    let folded = object_of(&cache, "imported", "scope");
    let cfg: Json =
        serde_json::from_slice(&std::fs::read(folded.join("cfg.json")).unwrap()).unwrap();
    assert_eq!(cfg["rescale_acts_by_decoder_norm"], false);
    assert_eq!(cfg["metadata"]["hook_name"], "blocks.2.hook_mlp_out");
    assert_as_saelens(
        "topk_ln_rescaled",
        &Sae::load(&folded, &Device::Cpu).unwrap(),
    );
}

#[test]
fn a_gemma_scope_sae_comes_from_a_pinned_hub_revision_checksum_verified() {
    use common::http::{Routes, Server};
    let rev = "0123456789abcdef0123456789abcdef01234567";
    let sub = "layer_1/width_64/average_l0_9";
    let npz = fixture("gemma_scope/params.npz");
    let bytes = std::fs::read(&npz).unwrap();
    let mut routes = Routes::default();
    let tree = serde_json::json!([
        {"type": "file", "path": format!("{sub}/params.npz"), "size": bytes.len(),
         "lfs": {"oid": saeflow_core::data::download::sha256_file(&npz).unwrap(), "size": bytes.len()}},
        {"type": "file", "path": "layer_2/width_64/average_l0_9/params.npz", "size": 3,
         "lfs": {"oid": "0".repeat(64), "size": 3}},
    ]);
    routes.bodies.insert(
        format!("/api/models/google/gemma-scope-tiny/tree/{rev}?recursive=true"),
        serde_json::to_vec(&tree).unwrap(),
    );
    routes.bodies.insert(
        format!("/google/gemma-scope-tiny/resolve/{rev}/{sub}/params.npz"),
        bytes.clone(),
    );
    let server = Server::start(routes);
    let dir = tempfile::tempdir().unwrap();
    let stage = |hook: &str| {
        format!(
            "[pipeline]\nname = \"scope\"\n\n[stages.scope]\nkind = \"sae\"\nhub = \"google/gemma-scope-tiny\"\n\
             revision = \"{rev}\"\nsubfolder = \"{sub}\"\n{hook}"
        )
    };
    write(&dir.path().join("p.toml"), &stage(""));
    let out = common::saeflow(dir.path())
        .env("HF_ENDPOINT", &server.base)
        .args(["run", "p.toml"])
        .output()
        .unwrap();
    assert_clean_failure(&out, dir.path(), 1, &["params.npz never does): set `hook`"]);
    write(
        &dir.path().join("p.toml"),
        &stage("hook = \"blocks.1.hook_resid_post\"\n"),
    );
    let out = common::saeflow(dir.path())
        .env("HF_ENDPOINT", &server.base)
        .args(["run", "p.toml"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::text(&out));
    let log = server.log.lock().unwrap().clone();
    assert!(
        !log.iter().any(|l| l.contains("layer_2")),
        "only the subfolder is fetched: {log:?}"
    );
    let imported = object_of(&dir.path().join("cache"), "scope", "scope");
    assert_as_saelens("gemma_scope", &Sae::load(&imported, &Device::Cpu).unwrap());
}

/// Runs an `sae` stage (with `extra` lines) over `folder`, expecting a clean failure naming `fragments`.
fn refused(folder: &Path, extra: &str, fragments: &[&str]) {
    refused_with(1, folder, extra, fragments)
}

/// [`refused`] with exit code `code` (2: the pipeline itself is invalid).
fn refused_with(code: i32, folder: &Path, extra: &str, fragments: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = format!(
        "[pipeline]\nname = \"bad\"\n\n[models.gemma]\nkind = \"huggingface\"\npath = \"{}\"\n\n\
         [models.narrow]\nkind = \"huggingface\"\npath = \"{}\"\n\n\
         [stages.scope]\nkind = \"sae\"\npath = \"{}\"\n{extra}",
        tiny_gemma2().display(),
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/bad_inputs/base/tiny-hf")
            .display(),
        folder.display()
    );
    write(&dir.path().join("p.toml"), &pipeline);
    let out = run(dir.path(), &["run", "p.toml"]);
    assert_clean_failure(&out, dir.path(), code, fragments);
}

/// A copy of SAELens fixture `name` with its `cfg.json` edited.
fn edited(dir: &Path, name: &str, edit: impl Fn(&mut Json)) -> PathBuf {
    let to = dir.join(name);
    std::fs::create_dir_all(&to).unwrap();
    for f in ["cfg.json", "sae_weights.safetensors"] {
        std::fs::copy(fixture(name).join(f), to.join(f)).unwrap();
    }
    let mut cfg: Json =
        serde_json::from_slice(&std::fs::read(to.join("cfg.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(to.join("cfg.json"), cfg.to_string()).unwrap();
    to
}

#[test]
fn saes_that_do_not_fit_or_cannot_be_computed_are_refused_by_file_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    // A hook beyond the model, and a width other than the model's.
    let far = edited(tmp.path(), "topk", |c| {
        c["metadata"]["hook_name"] = "blocks.9.hook_resid_post".into()
    });
    refused(
        &far,
        "model = \"gemma\"\n",
        &[
            "the SAE's hook does not fit model `gemma`",
            "blocks.9.hook_resid_post` is beyond the model",
        ],
    );
    let first = edited(tmp.path(), "topk", |c| {
        c["metadata"]["hook_name"] = "blocks.0.hook_resid_post".into()
    });
    refused(
        &first,
        "model = \"narrow\"\n",
        &["the SAE reads vectors of width 32 (d_in), but blocks.0.hook_resid_post of model `narrow` has width 8"],
    );
    // A hook the stage's `hook` contradicts, and one no model exposes.
    refused(
        &fixture("topk"),
        "hook = \"blocks.0.hook_resid_post\"\n",
        &["`hook` = \"blocks.0.hook_resid_post\" but the SAE's cfg.json says `hook_name` = \"blocks.1.hook_resid_post\""],
    );
    let z = edited(tmp.path(), "jumprelu", |c| {
        c["metadata"]["hook_name"] = "blocks.0.attn.hook_z".into()
    });
    refused(
        &z,
        "",
        &["reads `blocks.0.attn.hook_z`, which saeflow's models do not expose"],
    );
    // Activations and normalisations it cannot compute.
    let gated = edited(tmp.path(), "topk", |c| c["architecture"] = "gated".into());
    refused(
        &gated,
        "",
        &["cfg.json: architecture `gated` is not supported"],
    );
    let whitened = edited(tmp.path(), "jumprelu", |c| {
        c["normalize_activations"] = "covariance_whitening".into()
    });
    refused(
        &whitened,
        "",
        &["cfg.json: `normalize_activations` = \"covariance_whitening\" is not supported"],
    );
    let heads = edited(tmp.path(), "jumprelu", |c| {
        c["reshape_activations"] = "hook_z".into()
    });
    refused(
        &heads,
        "",
        &["cfg.json: `reshape_activations` = \"hook_z\" is not supported"],
    );
    // Gemma Scope arrays: one missing, one pickled (never unpickled).
    refused(
        &fixture("bad/no_threshold"),
        "hook = \"blocks.1.hook_resid_post\"\n",
        &["params.npz: no array `threshold`"],
    );
    refused(
        &fixture("bad/pickled"),
        "hook = \"blocks.1.hook_resid_post\"\n",
        &["params.npz: array `threshold`", "object arrays are refused"],
    );
    // A subfolder outside the SAE's folder, and a hub SAE without a pinned revision.
    refused_with(
        2,
        &fixture("topk"),
        "subfolder = \"../jumprelu\"\n",
        &[
            "p.toml:",
            "`subfolder` must be a plain relative path: `../jumprelu`: it has a `.` or `..`",
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("p.toml"),
        "[pipeline]\nname = \"bad\"\n\n[stages.scope]\nkind = \"sae\"\nhub = \"google/gemma-scope-2b-pt-res\"\n",
    );
    let out = run(dir.path(), &["run", "p.toml"]);
    assert_clean_failure(&out, dir.path(), 2, &["`revision` is required with `hub`"]);
}
