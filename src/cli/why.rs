//! `saeflow why`: what changed in a stage's key since its last successful run, field by field.

use saeflow_runner::exec::status;
use saeflow_runner::stage::Registry;
use saeflow_runner::Error;

use super::shared::{load_plan, open_cache, CacheArgs, PipelineArgs};

/// Arguments of `saeflow why`.
#[derive(clap::Args)]
pub struct WhyArgs {
    /// The pipeline file and its overrides.
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// Stage or instance name.
    stage: String,
}

/// Prints, per instance of the stage, whether its key changed since the run its ref records and, if so,
/// the reasons (the fields of the key that differ).
pub fn why(cache_args: &CacheArgs, args: WhyArgs, registry: &Registry) -> Result<(), Error> {
    let cache = open_cache(cache_args)?;
    let plan = load_plan(&args.pipeline, registry, &cache)?;
    let nodes = plan.select_named(&args.stage).map_err(Error::Usage)?;
    for n in nodes {
        let inst = plan.instance(n);
        match cache.read_ref(&plan.pipeline.header.name, &inst.name) {
            None => println!(
                "{}: never run successfully; current key {}",
                inst.name, inst.key
            ),
            Some(r) if r.key == inst.key.0 => println!(
                "{}: unchanged since its last run (key {})",
                inst.name, inst.key
            ),
            Some(r) => {
                println!(
                    "{}: key {} -> {}",
                    inst.name,
                    // The ref file is data: its key may be anything, so cut on characters, not bytes.
                    r.key.chars().take(12).collect::<String>(),
                    inst.key.short()
                );
                for reason in status::reasons(&plan, n, &r.preimage) {
                    println!("  {reason}");
                }
            }
        }
    }
    Ok(())
}
