//! `saeflow status`: every instance's state in the cache (and where it lives: local, remote or both), with its
//! Slurm job where one was submitted.

use saeflow_runner::exec::slurm;
use saeflow_runner::exec::status::{self, State};
use saeflow_runner::stage::Registry;
use saeflow_runner::Error;

use super::shared::{
    attach_pipeline_remote, load_plan, name_width, open_cache, CacheArgs, PipelineArgs,
};

/// Prints one line per instance, in run order: cached, missing or stale (and why), and the state of the
/// Slurm job last submitted for it, if any.
pub fn status(
    cache_args: &CacheArgs,
    args: PipelineArgs,
    registry: &Registry,
) -> Result<(), Error> {
    let mut cache = open_cache(cache_args)?;
    let plan = load_plan(&args, registry, &cache)?;
    attach_pipeline_remote(&mut cache, &plan)?;
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
            State::Cached => match cache.remote() {
                None => ("cached", String::new()),
                Some(remote) => match remote.has_object(&inst.key) {
                    Ok(true) => ("cached", "  (local + remote)".into()),
                    Ok(false) => ("cached", "  (local only: the next run pushes it)".into()),
                    Err(e) => ("cached", format!("  (local; remote: {e:#})")),
                },
            },
            State::Remote => ("cached", "  (remote only: a run pulls it)".into()),
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
