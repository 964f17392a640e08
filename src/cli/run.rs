//! `saeflow run` (with `--dry-run` and the choice of executor) and `saeflow exec-stage`, the one-instance
//! run a Slurm job makes.

use std::collections::BTreeSet;

use petgraph::graph::NodeIndex;
use saeflow_core::cancel::Cancel;
use saeflow_core::progress::Reporter;
use saeflow_runner::cache::Cache;
use saeflow_runner::exec::status::{self, State};
use saeflow_runner::exec::{self, slurm, Options, Outcome};
use saeflow_runner::plan::Plan;
use saeflow_runner::stage::Registry;
use saeflow_runner::Error;

use super::shared::{attach_pipeline_remote, load_plan, open_cache, CacheArgs, PipelineArgs};

/// Where `run` executes stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Executor {
    /// On this machine.
    Local,
    /// As Slurm batch jobs.
    Slurm,
}

/// Arguments of `saeflow run`.
#[derive(clap::Args)]
pub struct RunArgs {
    /// The pipeline file and its overrides.
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// Stage or instance names to run, with their upstream stages.
    targets: Vec<String>,
    /// How many stages may run at once.
    #[arg(short, long, default_value_t = 1)]
    jobs: usize,
    /// Only say, per instance, whether it would run and why.
    #[arg(long)]
    dry_run: bool,
    /// Run every instance on its own, even those a stage kind could run as one group (e.g. the members
    /// of a training sweep, which otherwise share one pass over the activations). Results are the same.
    #[arg(long)]
    no_group: bool,
    /// Where stages run: `local` (this machine) or `slurm` (one batch job per instance, a job array per
    /// stage, on a cache every node shares).
    #[arg(long, value_enum, default_value_t = Executor::Local)]
    executor: Executor,
    /// Slurm partition for the jobs.
    #[arg(long)]
    partition: Option<String>,
    /// Slurm account for the jobs.
    #[arg(long)]
    account: Option<String>,
    /// Most Slurm jobs (array tasks included) queued or running at once.
    #[arg(long)]
    max_jobs: Option<usize>,
}

/// Arguments of `saeflow exec-stage`.
#[derive(clap::Args)]
pub struct ExecStageArgs {
    /// Action keys, as written by `run --executor slurm`.
    #[arg(required = true)]
    keys: Vec<String>,
}

/// `saeflow run`: runs the selected instances that are not cached, here or on Slurm.
pub fn run(
    cache_args: &CacheArgs,
    args: RunArgs,
    registry: &Registry,
    reporter: &Reporter,
) -> Result<(), Error> {
    // Checked before anything is read or written: these values go into Slurm job scripts verbatim.
    for (option, value) in [("partition", &args.partition), ("account", &args.account)] {
        if let Some(v) = value {
            slurm::check_slurm_name(option, v).map_err(Error::Usage)?;
        }
    }
    let mut cache = open_cache(cache_args)?;
    let plan = load_plan(&args.pipeline, registry, &cache)?;
    attach_pipeline_remote(&mut cache, &plan)?;
    let selected = exec::selection(&plan, &args.targets).map_err(Error::Usage)?;
    if args.dry_run {
        print_dry_run(&plan, &cache, &selected);
        return Ok(());
    }
    let cancel = Cancel::new();
    install_signal_handlers(&cancel)?;
    let outcome = match args.executor {
        Executor::Local => {
            let options = Options {
                jobs: args.jobs,
                targets: args.targets,
                group: !args.no_group,
            };
            exec::run(&plan, registry, &cache, &options, &cancel, reporter).map_err(Error::Usage)?
        }
        Executor::Slurm => {
            let spec = slurm::JobSpec {
                pipeline: std::path::absolute(&args.pipeline.pipeline)
                    .map_err(anyhow::Error::from)?,
                set: args.pipeline.set.iter().map(|o| o.arg.clone()).collect(),
                workdir: std::env::current_dir().map_err(anyhow::Error::from)?,
                instance: String::new(),
            };
            let options = slurm::SlurmOptions {
                partition: args.partition,
                account: args.account,
                max_jobs: args.max_jobs,
                poll: std::time::Duration::from_millis(500),
            };
            slurm::run(&plan, &cache, &selected, &spec, &options, &cancel, reporter)
                .map_err(Error::Other)?
        }
    };
    let pulled = if outcome.pulled.is_empty() {
        String::new()
    } else {
        format!(" ({} pulled from the remote)", outcome.pulled.len())
    };
    reporter.println(&format!(
        "{} computed, {} cached{pulled}, {} failed, {} skipped",
        outcome.computed.len(),
        outcome.cached.len(),
        outcome.failed.len(),
        outcome.skipped.len()
    ));
    if !outcome.failed.is_empty() {
        let names: Vec<_> = outcome.failed.iter().map(|(n, _)| n.as_str()).collect();
        return Err(Error::Failed(format!("stage failed: {}", names.join(", "))));
    }
    interrupted_if_cancelled(&outcome)
}

/// `--dry-run`: per selected instance, in run order, whether it would run and why.
fn print_dry_run(plan: &Plan, cache: &Cache, selected: &BTreeSet<NodeIndex>) {
    for &n in plan.order.iter().filter(|n| selected.contains(n)) {
        let name = &plan.instance(n).name;
        match status::state(plan, cache, n) {
            State::Cached => println!("{name}: cached, would not run"),
            State::Remote => println!("{name}: cached on the remote, would pull it"),
            State::Missing => println!("{name}: would run (never run before)"),
            State::Stale(reasons) => {
                println!("{name}: would run ({})", reasons.join("; "))
            }
        }
    }
}

/// `saeflow exec-stage`: runs the one instance a Slurm job (or array task) stands for, as submitted: the
/// pipeline, overrides and working directory come from the job spec `run --executor slurm` wrote.
pub fn exec_stage(
    cache_args: &CacheArgs,
    args: ExecStageArgs,
    registry: &Registry,
    reporter: &Reporter,
) -> Result<(), Error> {
    let mut cache = open_cache(cache_args)?;
    let key = slurm::key_for_task(&args.keys)?;
    let path = slurm::job_spec_path(&cache, key);
    let spec: slurm::JobSpec = std::fs::read(&path)
        .map_err(anyhow::Error::from)
        .and_then(|b| serde_json::from_slice(&b).map_err(anyhow::Error::from))
        .map_err(|e| Error::Other(anyhow::anyhow!("{}: {e}", path.display())))?;
    std::env::set_current_dir(&spec.workdir)
        .map_err(|e| Error::Other(anyhow::anyhow!("{}: {e}", spec.workdir.display())))?;
    let pipeline = PipelineArgs {
        pipeline: spec.pipeline.clone(),
        set: spec
            .set
            .iter()
            .map(|s| s.parse())
            .collect::<Result<_, String>>()
            .map_err(Error::Usage)?,
    };
    let plan = load_plan(&pipeline, registry, &cache)?;
    attach_pipeline_remote(&mut cache, &plan)?;
    let Some(&n) = plan.order.iter().find(|&&n| plan.instance(n).key.0 == key) else {
        return Err(Error::Failed(format!(
            "{} no longer has an instance with key {key} (`{}` changed since submission?)",
            spec.pipeline.display(),
            spec.instance
        )));
    };
    for (role, &up) in &plan.instance(n).inputs {
        if !cache.has_object(&plan.instance(up).key) {
            return Err(Error::Failed(format!(
                "input `{role}` ({}) of {} is not in the cache",
                plan.instance(up).name,
                spec.instance
            )));
        }
    }
    let cancel = Cancel::new();
    install_signal_handlers(&cancel)?;
    let options = Options {
        jobs: 1,
        targets: vec![plan.instance(n).name.clone()],
        group: false,
    };
    let outcome =
        exec::run(&plan, registry, &cache, &options, &cancel, reporter).map_err(Error::Usage)?;
    if let Some((name, msg)) = outcome.failed.first() {
        return Err(Error::Failed(format!("{name}: {msg}")));
    }
    interrupted_if_cancelled(&outcome)
}

/// A run stopped by a signal exits as interrupted even when every stage it finished succeeded.
fn interrupted_if_cancelled(outcome: &Outcome) -> Result<(), Error> {
    if outcome.cancelled {
        return Err(Error::Interrupted);
    }
    Ok(())
}

/// The first SIGINT or SIGTERM sets `cancel` (stages stop and keep their partial work); a second exits at
/// once with status 130.
fn install_signal_handlers(cancel: &Cancel) -> Result<(), Error> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    for sig in [SIGINT, SIGTERM] {
        // A second signal while stopping exits at once.
        signal_hook::flag::register_conditional_shutdown(sig, 130, cancel.flag())
            .map_err(anyhow::Error::from)?;
        signal_hook::flag::register(sig, cancel.flag()).map_err(anyhow::Error::from)?;
    }
    Ok(())
}
