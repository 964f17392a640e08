//! `saeflow status`: every instance's state in the cache, with its Slurm job where one was submitted.

use std::path::Path;

use saeflow_runner::exec::slurm;
use saeflow_runner::exec::status::{self, State};
use saeflow_runner::stage::Registry;
use saeflow_runner::Error;

use super::shared::{load_plan, name_width, open_cache, PipelineArgs};

/// Prints one line per instance, in run order: cached, missing or stale (and why), and the state of the
/// Slurm job last submitted for it, if any.
pub fn status(cache_dir: &Path, args: PipelineArgs, registry: &Registry) -> Result<(), Error> {
    let cache = open_cache(cache_dir)?;
    let plan = load_plan(&args, registry, &cache)?;
    let jobs = slurm::read_submitted(&cache, &plan.pipeline.header.name).jobs;
    let queue = if jobs.is_empty() {
        Default::default()
    } else {
        let ids: Vec<String> = jobs.values().cloned().collect();
        slurm::queue_states(&ids).unwrap_or_default()
    };
    let width = name_width(&plan);
    for &n in &plan.order {
        let inst = plan.instance(n);
        let (word, why) = match status::state(&plan, &cache, n) {
            State::Cached => ("cached", String::new()),
            State::Missing => ("missing", String::new()),
            State::Stale(r) => ("stale", format!("  ({})", r.join("; "))),
        };
        let slurm = jobs
            .get(&inst.name)
            .and_then(|job| {
                let (state, reason) = queue.get(job)?;
                Some(format!("  slurm job {job}: {state} {reason}"))
            })
            .unwrap_or_default();
        println!(
            "{:width$}  {:7}  {}{why}{slurm}",
            inst.name,
            word,
            inst.key.short()
        );
    }
    Ok(())
}
