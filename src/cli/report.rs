//! `saeflow report`: collects what the pipeline has finished and writes the HTML page (built by
//! `crate::report::html`).

use std::path::PathBuf;

use saeflow_runner::stage::Registry;
use saeflow_runner::Error;

use crate::report::html::{self, Entry, Tokenizers};

use super::shared::{load_plan, open_cache, CacheArgs, PipelineArgs};

/// Arguments of `saeflow report`.
#[derive(clap::Args)]
pub struct ReportArgs {
    /// The pipeline file and its overrides.
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// Directory the page (`index.html`) is written into.
    #[arg(short = 'o', long, default_value = "report")]
    out: PathBuf,
}

/// Writes `OUT/index.html` for the instances already in the cache and names the ones not computed yet.
pub fn report(cache_args: &CacheArgs, args: ReportArgs, registry: &Registry) -> Result<(), Error> {
    let cache = open_cache(cache_args)?;
    let plan = load_plan(&args.pipeline, registry, &cache)?;
    let (mut entries, mut missing) = (Vec::new(), Vec::new());
    for &n in &plan.order {
        let inst = plan.instance(n);
        if cache.has_object(&inst.key) {
            entries.push(Entry {
                name: inst.name.clone(),
                kind: inst.kind.clone(),
                dir: cache.object_dir(&inst.key),
            });
        } else {
            missing.push(inst.name.clone());
        }
    }
    // Tokenizers of local models only: a report never downloads anything.
    let mut tokenizers = Tokenizers::new();
    for (name, spec) in &plan.pipeline.models {
        if let Some(path) = &spec.path {
            let path = saeflow_core::fs::resolve_path(&plan.pipeline.workdir, path);
            if let Ok(t) = saeflow_core::models::load_tokenizer(&path, spec.kind) {
                tokenizers.insert(name.clone(), t);
            }
        }
    }
    let page = html::render(&plan.pipeline.header.name, &entries, &missing, &tokenizers)?;
    let out = &args.out;
    std::fs::create_dir_all(out)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", out.display()))?;
    let file = out.join("index.html");
    std::fs::write(&file, page)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", file.display()))?;
    println!(
        "wrote {} ({} finished instances, {} not computed yet)",
        file.display(),
        entries.len(),
        missing.len()
    );
    Ok(())
}
