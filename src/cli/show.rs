//! `saeflow show`: the first rows and label counts of a stage's tables, in the terminal.

use saeflow_runner::stage::Registry;
use saeflow_runner::Error;

use super::shared::{load_plan, open_cache, CacheArgs, PipelineArgs};

/// Arguments of `saeflow show`.
#[derive(clap::Args)]
pub struct ShowArgs {
    /// The pipeline file and its overrides.
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// Stage or instance name.
    stage: String,
    /// Rows to print per table.
    #[arg(short = 'n', long, default_value_t = 10)]
    limit: usize,
}

/// Prints the tables of every computed instance of the stage; for one not computed yet, the command that
/// computes it.
pub fn show(cache_args: &CacheArgs, args: ShowArgs, registry: &Registry) -> Result<(), Error> {
    let cache = open_cache(cache_args)?;
    let plan = load_plan(&args.pipeline, registry, &cache)?;
    let nodes = plan.select_named(&args.stage).map_err(Error::Usage)?;
    for n in nodes {
        let inst = plan.instance(n);
        if !cache.has_object(&inst.key) {
            println!(
                "{}: not computed yet (run `saeflow run {} {}`)",
                inst.name,
                args.pipeline.pipeline.display(),
                inst.name
            );
            continue;
        }
        println!("== {} ({})", inst.name, inst.key.short());
        print!(
            "{}",
            crate::report::show::show(&cache.object_dir(&inst.key), args.limit)?
        );
    }
    Ok(())
}
