//! `sae`: brings in an SAE someone else trained — a SAELens folder (`cfg.json` + `sae_weights.safetensors`),
//! a sparsify folder, an OpenAI checkpoint, or Gemma Scope's raw `params.npz` — from a local path or from a
//! Hugging Face repository at a pinned revision and subfolder (downloaded once into the cache's download
//! area, every file checked against the hub's checksum). Its output is the same SAELens layout a `train`
//! stage writes, so `label`, `eval`, `steer` and `explain` take either.
//!
//! What changes the maths is read from `cfg.json` (activation, TopK `k`, JumpReLU thresholds,
//! `apply_b_dec_to_input`, `normalize_activations`, `rescale_acts_by_decoder_norm`, the hook); what the
//! stage cannot compute is refused by name (see `Sae::load`). With `model`, the SAE's width and hook are
//! checked against that model before anything downstream runs.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use saeflow_core::data::download::{fetch_repo, sha256_file, unsafe_repo_path, RepoKind};
use saeflow_core::fs::resolve_path;
use saeflow_core::models::Hook;
use saeflow_core::sae::format::Sae;
use saeflow_runner::stage::{key_path, ParamError, Reference, References, Stage, StageContext};

/// Parameters of an `sae` stage: exactly one of `path` and `hub`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SaeParams {
    /// A local SAE folder (or OpenAI `.pt` file); its content (under `subfolder`, when given) enters the
    /// cache key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// A Hugging Face model repository (`org/name`) holding the SAE, e.g. `google/gemma-scope-2b-pt-res`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<String>,
    /// The repository revision: a commit hash (or a tag) so the key names one SAE. Required with `hub`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// The folder inside `path` or the repository that holds the SAE, e.g.
    /// `layer_20/width_16k/average_l0_71`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subfolder: Option<String>,
    /// The hook the SAE reads (`blocks.N.hook_resid_post`, …). Required for Gemma Scope's `params.npz`,
    /// which names none; otherwise it must agree with `cfg.json`'s `hook_name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
    /// The model the SAE belongs to (a `[models.NAME]` entry): its width and hook are checked against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// The `sae` stage kind.
pub struct SaeSource;

impl Stage for SaeSource {
    type Params = SaeParams;
    const KIND: &'static str = "sae";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "Bring in a published SAE (SAELens, sparsify, OpenAI, Gemma Scope params.npz) from a folder or a pinned hub revision";

    fn references(p: &SaeParams) -> References {
        References {
            inputs: Vec::new(),
            models: p
                .model
                .iter()
                .map(|m| Reference {
                    role: String::new(),
                    target: m.clone(),
                    at: key_path(&["model"]),
                })
                .collect(),
            // Only the SAE's own folder enters the key: a local clone of a release with many SAEs is not
            // hashed whole.
            files: p
                .path
                .iter()
                .map(|path| Reference {
                    role: String::new(),
                    target: match &p.subfolder {
                        Some(sub) => format!("{}/{sub}", path.trim_end_matches('/')),
                        None => path.clone(),
                    },
                    at: key_path(&["path"]),
                })
                .collect(),
        }
    }

    fn validate(p: &SaeParams) -> Result<(), ParamError> {
        let err = |at: &str, message: String| {
            Err(ParamError {
                at: key_path(&[at]),
                message,
            })
        };
        match (&p.path, &p.hub) {
            (None, None) => return err("path", "an `sae` stage needs `path` or `hub`".into()),
            (Some(_), Some(_)) => {
                return err("hub", "give `path` or `hub`, not both".into());
            }
            (None, Some(hub)) => {
                if hub.split('/').count() != 2 || unsafe_repo_path(hub).is_some() {
                    return err("hub", format!("`hub` must be `org/name`, got `{hub}`"));
                }
                match &p.revision {
                    None => {
                        return err(
                            "revision",
                            "`revision` is required with `hub` (a commit hash), so the cache key names one SAE"
                                .into(),
                        )
                    }
                    Some(r) if unsafe_repo_path(r).is_some() || r.contains(char::is_whitespace) => {
                        return err("revision", format!("bad revision `{}`", r.escape_debug()))
                    }
                    _ => {}
                }
            }
            (Some(_), None) => {
                if p.revision.is_some() {
                    return err("revision", "`revision` applies to `hub` only".into());
                }
            }
        }
        if let Some(sub) = &p.subfolder {
            if let Some(why) = unsafe_repo_path(sub) {
                return err(
                    "subfolder",
                    format!(
                        "`subfolder` must be a plain relative path: `{}`: {why}",
                        sub.escape_debug()
                    ),
                );
            }
        }
        if let Some(h) = &p.hook {
            if let Err(message) = h.parse::<Hook>() {
                return err("hook", message);
            }
        }
        Ok(())
    }

    fn run(p: &SaeParams, ctx: &mut StageContext) -> anyhow::Result<()> {
        let folder = locate(p, ctx)?;
        let device = saeflow_core::models::device(ctx.device)?;
        let npz = folder.join("params.npz");
        let mut sae = if npz.is_file() {
            Sae::load_npz(&npz, &device)?
        } else {
            Sae::load(&folder, &device)?
        };
        let hook = hook_of(p, &sae, &folder)?;
        set_hook(&mut sae, &hook);
        if let Some(name) = &p.model {
            let (model, _) = crate::shared::load_model(ctx, name)?;
            let t = &model.transformer;
            t.check_hook(&hook)
                .with_context(|| format!("the SAE's hook does not fit model `{name}`"))?;
            if sae.d_in() != t.config.d_model {
                bail!(
                    "{}: the SAE reads vectors of width {} (d_in), but {hook} of model `{name}` has width {}",
                    folder.display(),
                    sae.d_in(),
                    t.config.d_model
                );
            }
        }
        sae.save(&ctx.out_dir)?;
        let files = source_files(&folder)?;
        let source = json!({
            "path": p.path,
            "hub": p.hub,
            "revision": p.revision,
            "subfolder": p.subfolder,
            "hook": hook.to_string(),
            "architecture": sae.cfg["architecture"],
            "d_in": sae.d_in(),
            "d_sae": sae.d_sae(),
            "files": files,
        });
        std::fs::write(
            ctx.out_dir.join("source.json"),
            serde_json::to_string_pretty(&source)? + "\n",
        )?;
        ctx.metrics.insert("d_in".into(), json!(sae.d_in()));
        ctx.metrics.insert("d_sae".into(), json!(sae.d_sae()));
        ctx.metrics.insert("hook".into(), json!(hook.to_string()));
        ctx.log(&format!(
            "{} SAE, {} → {} latents, reading {hook}, from {}",
            sae.cfg["architecture"].as_str().unwrap_or("?"),
            sae.d_in(),
            sae.d_sae(),
            p.hub
                .as_deref()
                .unwrap_or_else(|| p.path.as_deref().unwrap_or("?"))
        ));
        Ok(())
    }
}

/// The folder holding the SAE: under the local path, or downloaded from the hub (only the subfolder's files).
fn locate(p: &SaeParams, ctx: &StageContext) -> anyhow::Result<PathBuf> {
    let root = match (&p.path, &p.hub) {
        (Some(path), _) => resolve_path(&ctx.workdir, path),
        (None, Some(hub)) => {
            let revision = p
                .revision
                .as_deref()
                .context("`revision` is required with `hub`")?;
            let pattern = match &p.subfolder {
                Some(sub) => format!("{sub}/*"),
                None => "*".into(),
            };
            fetch_repo(
                RepoKind::Model,
                hub,
                revision,
                &[&pattern],
                &ctx.downloads_dir,
                &ctx.progress,
                &ctx.cancel,
            )?
        }
        (None, None) => bail!("an `sae` stage needs `path` or `hub`"),
    };
    let folder = match &p.subfolder {
        Some(sub) => root.join(sub),
        None => root,
    };
    if !folder.exists() {
        bail!("{}: no such SAE folder", folder.display());
    }
    Ok(folder)
}

/// The hook: the stage's `hook`, else `cfg.json`'s `hook_name`; both given must agree, and it must be one
/// of the hook points models expose.
fn hook_of(p: &SaeParams, sae: &Sae, folder: &Path) -> anyhow::Result<Hook> {
    let from_cfg = sae.hook_name();
    let name = match (&p.hook, from_cfg) {
        (Some(ours), Some(theirs)) if ours != theirs => bail!(
            "{}: `hook` = \"{ours}\" but the SAE's cfg.json says `hook_name` = \"{theirs}\"",
            folder.display()
        ),
        (Some(ours), _) => ours.clone(),
        (None, Some(theirs)) => theirs.to_string(),
        (None, None) => bail!(
            "{}: the SAE does not name its hook (Gemma Scope's params.npz never does): set `hook`, e.g. \
             \"blocks.20.hook_resid_post\" for a residual-stream SAE of layer 20",
            folder.display()
        ),
    };
    name.parse::<Hook>().map_err(|e| {
        anyhow::anyhow!(
            "{}: the SAE reads `{name}`, which saeflow's models do not expose: {e}",
            folder.display()
        )
    })
}

/// Records the hook in the exported `cfg.json` where SAELens 6 keeps it (`metadata.hook_name`).
fn set_hook(sae: &mut Sae, hook: &Hook) {
    if let Some(cfg) = sae.cfg.as_object_mut() {
        cfg.remove("hook_name");
        let metadata = cfg.entry("metadata").or_insert_with(|| json!({}));
        if let Some(m) = metadata.as_object_mut() {
            m.insert("hook_name".into(), json!(hook.to_string()));
        }
    }
}

/// Every file of the source folder with its size and SHA-256, for `source.json`.
fn source_files(folder: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    let mut entries: Vec<PathBuf> = if folder.is_file() {
        vec![folder.to_path_buf()]
    } else {
        std::fs::read_dir(folder)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect()
    };
    entries.sort();
    for path in entries {
        out.push(json!({
            "name": path.file_name().map(|n| n.to_string_lossy().into_owned()),
            "bytes": std::fs::metadata(&path)?.len(),
            "sha256": sha256_file(&path)?,
        }));
    }
    Ok(out)
}
