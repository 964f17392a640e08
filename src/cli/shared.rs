//! What the pipeline commands share: the pipeline file with its `-S` overrides, opening the cache, loading
//! the plan, and the column width of instance names.

use std::path::{Path, PathBuf};

use saeflow_runner::cache::Cache;
use saeflow_runner::config::Override;
use saeflow_runner::plan::{self, FileHasher, Plan};
use saeflow_runner::stage::Registry;
use saeflow_runner::Error;

/// The pipeline a command works on, flattened into every pipeline command's arguments.
#[derive(clap::Args)]
pub struct PipelineArgs {
    /// Pipeline file (TOML).
    pub pipeline: PathBuf,
    /// Override a parameter (`stage.param=value`) or sweep it (`stage.param=a,b,c`); repeat for a grid.
    #[arg(short = 'S', long = "set", value_name = "STAGE.PARAM=VALUES")]
    pub set: Vec<Override>,
}

/// Opens (creating if needed) the cache at `path`.
pub fn open_cache(path: &Path) -> Result<Cache, Error> {
    Cache::open(path).map_err(Error::Other)
}

/// Loads and plans the pipeline, hashing input files through the cache's memo of file hashes.
pub fn load_plan(args: &PipelineArgs, registry: &Registry, cache: &Cache) -> Result<Plan, Error> {
    let mut hasher = FileHasher::open(cache.filehash_memo());
    plan::load(&args.pipeline, &args.set, registry, &mut hasher)
}

/// Width of the longest instance name, so listings of one instance a line align their second column.
pub fn name_width(plan: &Plan) -> usize {
    plan.order
        .iter()
        .map(|&n| plan.instance(n).name.len())
        .max()
        .unwrap_or(0)
}
