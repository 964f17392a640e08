//! What the pipeline commands share: the pipeline file with its `-S` overrides, opening the cache, loading
//! the plan, and the column width of instance names.

use std::path::PathBuf;

use saeflow_runner::cache::{Cache, Remote};
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

/// Where the cache is: global options of every command.
#[derive(clap::Args, Clone, Debug)]
pub struct CacheArgs {
    /// Cache directory; or a remote URL (`s3://bucket/prefix`, `gs://…`, `az://…`, `file:///dir`) to keep
    /// the cache only there, with `--scratch` as the local working copy.
    #[arg(long, global = true, env = "SAEFLOW_CACHE", default_value = "cache")]
    pub cache: String,
    /// A remote cache behind the local one: lookups that miss locally try it, results and partial work
    /// (capture shards, training checkpoints) go to it, so another machine resumes. Overrides the
    /// pipeline's `cache_remote`. Credentials come from the environment (AWS_*, GOOGLE_APPLICATION_CREDENTIALS,
    /// AZURE_*).
    #[arg(long, global = true, env = "SAEFLOW_CACHE_REMOTE", value_name = "URL")]
    pub cache_remote: Option<String>,
    /// The local working copy when `--cache` is a URL (default: a directory per URL under
    /// `$XDG_CACHE_HOME/saeflow/scratch`, or `~/.cache/...`); anything in it may be deleted at any time.
    #[arg(long, global = true, env = "SAEFLOW_SCRATCH")]
    pub scratch: Option<PathBuf>,
}

impl CacheArgs {
    /// The local directory and the remote URL, if any.
    fn resolve(&self) -> Result<(PathBuf, Option<String>), Error> {
        if !self.cache.contains("://") {
            return Ok((PathBuf::from(&self.cache), self.cache_remote.clone()));
        }
        if self.cache_remote.is_some() {
            return Err(Error::Usage(
                "--cache is already a remote URL; give --cache-remote only with a local --cache directory"
                    .into(),
            ));
        }
        let scratch = match &self.scratch {
            Some(dir) => dir.clone(),
            None => {
                let base = std::env::var_os("XDG_CACHE_HOME")
                    .map(PathBuf::from)
                    .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                    .unwrap_or_else(std::env::temp_dir);
                let id = blake3::hash(self.cache.as_bytes()).to_hex();
                base.join("saeflow/scratch").join(&id.as_str()[..16])
            }
        };
        Ok((scratch, Some(self.cache.clone())))
    }
}

/// Opens (creating if needed) the local cache, with the remote from `--cache`/`--cache-remote` behind it.
pub fn open_cache(args: &CacheArgs) -> Result<Cache, Error> {
    let (dir, remote) = args.resolve()?;
    let mut cache = Cache::open(&dir).map_err(Error::Other)?;
    if let Some(url) = remote {
        cache.set_remote(Remote::open(&url).map_err(Error::Other)?);
    }
    Ok(cache)
}

/// Puts the pipeline's `cache_remote` behind `cache` unless the command line named a remote already.
pub fn attach_pipeline_remote(cache: &mut Cache, plan: &Plan) -> Result<(), Error> {
    if cache.remote().is_some() {
        return Ok(());
    }
    if let Some(url) = &plan.pipeline.header.cache_remote {
        cache.set_remote(Remote::open(url).map_err(Error::Other)?);
    }
    Ok(())
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
