//! The `saeflow` command line: the command list, parsing and exit codes here; each command's arguments and
//! body in its own module.

mod bench;
mod cache;
mod dag;
mod model;
mod report;
mod run;
mod sae_encode;
mod schema;
mod shared;
mod show;
mod status;
mod why;

use clap::{Parser, Subcommand};
use saeflow_core::progress::Reporter;
use saeflow_runner::Error;

/// The parsed command line: global options and the command.
#[derive(Parser)]
#[command(
    name = "saeflow",
    version,
    about = "Sparse-autoencoder interpretability pipelines with a content-addressed cache"
)]
struct Cli {
    /// Where the cache is.
    #[command(flatten)]
    cache: shared::CacheArgs,
    /// Print only errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// What to do.
    #[command(subcommand)]
    command: Command,
}

/// The commands; each variant's doc comment is its `--help` summary, its arguments live in its module.
#[derive(Subcommand)]
enum Command {
    /// Run every stage that is not cached yet (or only TARGETS and what they need).
    Run(run::RunArgs),
    /// Run exactly one stage instance against the cache (what a Slurm job runs; KEYS[SLURM_ARRAY_TASK_ID] in
    /// an array job).
    #[command(hide = true)]
    ExecStage(run::ExecStageArgs),
    /// Show every instance: cached, stale (and why) or missing.
    Status(shared::PipelineArgs),
    /// Why a stage would rerun: field by field, what changed in its key since its last successful run.
    Why(why::WhyArgs),
    /// Draw the pipeline's DAG.
    Dag(dag::DagArgs),
    /// Print the first rows and the label counts of a stage's tables.
    Show(show::ShowArgs),
    /// Write one self-contained HTML page of everything the pipeline has finished (charts inline, no
    /// network needed to view it).
    Report(report::ReportArgs),
    /// Delete cache objects and partial work that no ref reaches.
    Gc(cache::GcArgs),
    /// Cache maintenance.
    Cache {
        /// The maintenance task.
        #[command(subcommand)]
        command: cache::CacheCommand,
    },
    /// Load a model and report its architecture, tokens, next-token predictions, NLL and a greedy continuation.
    Model(model::ModelArgs),
    /// Run a saved SAE (SAELens or sparsify directory) over stored activations and write inputs, latent
    /// activations and reconstructions to a safetensors file (`x`, `acts`, `recon`), e.g. to compare with
    /// another implementation (`scripts/check_saelens.py`).
    SaeEncode(sae_encode::SaeEncodeArgs),
    /// Measure throughput (see BENCHMARKS.md).
    Bench {
        /// What to measure.
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
    /// Write the pipeline JSON Schema (for editors).
    Schema(schema::SchemaArgs),
}

/// Runs the CLI; returns the process exit code.
pub fn main() -> i32 {
    // Library errors (candle's) would otherwise carry backtraces into user-facing messages.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    // candle runs its element-wise ops on a pool of its own beside rayon's, whose idle workers spin
    // 25,000 pauses before sleeping: on a CPU whose cores the products (rayon) keep busy, that spin took
    // ~1.5% of a forward's samples in `perf`. 1,000 still covers back-to-back ops. A user's setting wins.
    // (Set here, before any thread exists: candle reads it when its pool first starts.)
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1000");
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("SAEFLOW_LOG"))
        .with_writer(std::io::stderr)
        .init();
    match dispatch(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!(
                "error: {}",
                saeflow_core::progress::terminal_safe(&e.to_string())
            );
            e.exit_code()
        }
    }
}

/// Commands that read and print, nothing else: no cache writes, no child processes, no sockets.
fn prints_only(command: &Command) -> bool {
    matches!(
        command,
        Command::Status(_)
            | Command::Why(_)
            | Command::Dag(_)
            | Command::Show(_)
            | Command::Bench { .. }
            | Command::Schema(_)
    )
}

/// Lets a closed stdout (`saeflow show … | head`) end the process as it ends `cat`, by SIGPIPE, where
/// `println!` would panic on the broken pipe. Only for [`prints_only`] commands: Rust ignores SIGPIPE so
/// that a write to a closed pipe is an error, and the runner, which writes to its children's pipes and to
/// sockets, must see that error rather than die mid-write.
fn stop_on_closed_stdout() {
    // SAFETY: restores the default disposition of one signal, before any thread writes to a pipe.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Hands the command to its module.
fn dispatch(cli: Cli) -> Result<(), Error> {
    let registry = saeflow_stages::builtin();
    let reporter = Reporter::new(cli.quiet);
    let cache_args = &cli.cache;
    if prints_only(&cli.command) {
        stop_on_closed_stdout();
    }
    match cli.command {
        Command::Run(args) => run::run(cache_args, args, &registry, &reporter),
        Command::ExecStage(args) => run::exec_stage(cache_args, args, &registry, &reporter),
        Command::Status(args) => status::status(cache_args, args, &registry),
        Command::Why(args) => why::why(cache_args, args, &registry),
        Command::Dag(args) => dag::dag(cache_args, args, &registry),
        Command::Show(args) => show::show(cache_args, args, &registry),
        Command::Report(args) => report::report(cache_args, args, &registry),
        Command::Gc(args) => cache::gc(cache_args, args),
        Command::Cache { command } => cache::cache(cache_args, command),
        Command::Model(args) => model::model(args),
        Command::SaeEncode(args) => sae_encode::sae_encode(args),
        Command::Bench { command } => bench::bench(command),
        Command::Schema(args) => schema::schema(args, &registry),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// A verb that is also a stage kind (as `explain` once was) reads as "run that stage"; keep them apart.
    #[test]
    fn no_command_shares_a_name_with_a_stage_kind() {
        let kinds = saeflow_stages::builtin().names();
        let commands: Vec<String> = super::Cli::command()
            .get_subcommands()
            .map(|c| c.get_name().to_string())
            .collect();
        assert!(commands.iter().any(|c| c == "why"), "{commands:?}");
        for command in &commands {
            assert!(
                !kinds.contains(&command.as_str()),
                "`saeflow {command}` is also a stage kind"
            );
        }
    }
}
