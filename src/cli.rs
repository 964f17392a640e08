//! The `saeflow` command line.

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

use crate::render::{render, DagFormat};
use saeflow_core::cancel::Cancel;
use saeflow_core::progress::Reporter;
use saeflow_runner::cache::Cache;
use saeflow_runner::config::Override;
use saeflow_runner::exec::status::{self, State};
use saeflow_runner::exec::{self, Options};
use saeflow_runner::plan::{self, FileHasher, Plan};
use saeflow_runner::stage::Registry;
use saeflow_runner::Error;

#[derive(Parser)]
#[command(
    name = "saeflow",
    version,
    about = "Sparse-autoencoder interpretability pipelines with a content-addressed cache"
)]
struct Cli {
    /// Cache directory.
    #[arg(long, global = true, env = "SAEFLOW_CACHE", default_value = "cache")]
    cache: PathBuf,
    /// Print only errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

/// Where `run` executes stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Executor {
    /// On this machine.
    Local,
    /// As Slurm batch jobs.
    Slurm,
}

#[derive(clap::Args)]
struct PipelineArgs {
    /// Pipeline file (TOML).
    pipeline: PathBuf,
    /// Override a parameter (`stage.param=value`) or sweep it (`stage.param=a,b,c`); repeat for a grid.
    #[arg(short = 'S', long = "set", value_name = "STAGE.PARAM=VALUES")]
    set: Vec<Override>,
}

#[derive(Subcommand)]
enum Command {
    /// Run every stage that is not cached yet (or only TARGETS and what they need).
    Run {
        #[command(flatten)]
        args: PipelineArgs,
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
    },
    /// Run exactly one stage instance against the cache (what a Slurm job runs; KEYS[SLURM_ARRAY_TASK_ID] in
    /// an array job).
    #[command(hide = true)]
    ExecStage {
        /// Action keys, as written by `run --executor slurm`.
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Show every instance: cached, stale (and why) or missing.
    Status {
        #[command(flatten)]
        args: PipelineArgs,
    },
    /// Why a stage would rerun: field by field, what changed in its key since its last successful run.
    Why {
        #[command(flatten)]
        args: PipelineArgs,
        /// Stage or instance name.
        stage: String,
    },
    /// Draw the pipeline's DAG.
    Dag {
        #[command(flatten)]
        args: PipelineArgs,
        /// Output format.
        #[arg(long, value_enum, default_value = "ascii")]
        format: DagFormat,
    },
    /// Print the first rows and the label counts of a stage's tables.
    Show {
        #[command(flatten)]
        args: PipelineArgs,
        /// Stage or instance name.
        stage: String,
        /// Rows to print per table.
        #[arg(short = 'n', long, default_value_t = 10)]
        limit: usize,
    },
    /// Write one self-contained HTML page of everything the pipeline has finished (charts inline, no
    /// network needed to view it).
    Report {
        #[command(flatten)]
        args: PipelineArgs,
        /// Directory the page (`index.html`) is written into.
        #[arg(short = 'o', long, default_value = "report")]
        out: PathBuf,
    },
    /// Delete cache objects and partial work that no ref reaches.
    Gc {
        /// List what would be deleted, delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Cache maintenance.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Load a model and report its architecture, tokens, next-token predictions, NLL and a greedy continuation.
    Model {
        /// A nanochat checkpoint (file or directory), a .gguf file or a Hugging Face directory.
        path: PathBuf,
        /// Text to run.
        #[arg(long, default_value = "The capital of France is")]
        prompt: String,
        /// Greedy tokens to generate.
        #[arg(long, default_value_t = 16)]
        generate: usize,
        /// Wrap the prompt in the model's chat template.
        #[arg(long)]
        chat: bool,
        /// auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: saeflow_core::models::spec::DeviceSpec,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Weights: f32 (default) or quantized (GGUF only).
        #[arg(long, default_value = "f32")]
        dtype: saeflow_core::models::WeightFormat,
    },
    /// Run a saved SAE (SAELens or sparsify directory) over stored activations and write inputs, latent
    /// activations and reconstructions to a safetensors file (`x`, `acts`, `recon`), e.g. to compare with
    /// another implementation (`scripts/check_saelens.py`).
    SaeEncode {
        /// The SAE directory.
        sae: PathBuf,
        /// A capture's object directory.
        #[arg(long)]
        capture: PathBuf,
        /// Hook to read (default: the SAE's `metadata.hook_name`).
        #[arg(long)]
        hook: Option<String>,
        /// Rows, from the start of the store.
        #[arg(long, default_value_t = 256)]
        rows: usize,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Measure throughput (see BENCHMARKS.md).
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Write the pipeline JSON Schema (for editors).
    Schema {
        /// Output file (`-` for stdout).
        #[arg(short, long, default_value = "schemas/pipeline.schema.json")]
        output: PathBuf,
    },
}

/// The encoder product's precision, as `bench train --encoder` spells it.
#[derive(Clone, Copy, clap::ValueEnum)]
enum EncoderPrecision {
    /// f32 throughout.
    F32,
    /// Latents ranked by a bf16 product.
    Bf16,
}

impl From<EncoderPrecision> for saeflow_core::kernels::gemm::Precision {
    fn from(p: EncoderPrecision) -> Self {
        match p {
            EncoderPrecision::F32 => Self::F32,
            EncoderPrecision::Bf16 => Self::Bf16,
        }
    }
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Forward passes over random token batches: tokens/s and peak memory.
    Forward {
        /// Model path (as for `saeflow model`).
        path: PathBuf,
        /// Sequences per batch.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Tokens per sequence.
        #[arg(long, default_value_t = 128)]
        seq: usize,
        /// Stop after this block (capturing its hook_resid_post); default: full depth with logits.
        #[arg(long)]
        layer: Option<usize>,
        /// Timed passes (after one warm-up pass).
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: saeflow_core::models::spec::DeviceSpec,
        /// Weights: f32 (default) or quantized (GGUF only).
        #[arg(long, default_value = "f32")]
        dtype: saeflow_core::models::WeightFormat,
    },
    /// TopK SAE training steps on random inputs: tokens/s, ms/step, GFLOP/s.
    Train {
        /// Input width.
        #[arg(long, default_value_t = 576)]
        d_in: usize,
        /// d_sae / d_in.
        #[arg(long, default_value_t = 8)]
        expansion: usize,
        /// Active latents.
        #[arg(long, default_value_t = 32)]
        k: usize,
        /// Tokens per step.
        #[arg(long, default_value_t = 4096)]
        batch: usize,
        /// Timed steps (after 3 warm-up steps).
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Encoder product that ranks the latents: f32 or bf16.
        #[arg(long, default_value = "f32")]
        encoder: EncoderPrecision,
    },
    /// Activation reader: tokens/s and GB/s in store order and shuffled, from a capture directory or a
    /// synthetic store of the given shape.
    Reader {
        /// A capture's object directory (default: write a synthetic store into a temporary directory).
        #[arg(long)]
        store: Option<PathBuf>,
        /// Hook to read (default: the store's first).
        #[arg(long)]
        hook: Option<String>,
        /// Synthetic store: vector width.
        #[arg(long, default_value_t = 576)]
        d_model: usize,
        /// Synthetic store: rows.
        #[arg(long, default_value_t = 1 << 18)]
        rows: usize,
        /// Synthetic store: f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Rows per batch.
        #[arg(long, default_value_t = 4096)]
        batch: usize,
        /// Timed passes over the store per mode.
        #[arg(long, default_value_t = 3)]
        passes: usize,
    },
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Re-hash every object's files against its manifest.
    Verify {
        /// Move damaged objects to the cache's `quarantine/`, so the next run recomputes them (runs also do
        /// this on their own when a stage is about to read a damaged input).
        #[arg(long)]
        repair: bool,
    },
}

/// Runs the CLI; returns the process exit code.
pub fn main() -> i32 {
    // Library errors (candle's) would otherwise carry backtraces into user-facing messages.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
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
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

fn open_cache(path: &Path) -> Result<Cache, Error> {
    Cache::open(path).map_err(Error::Other)
}

fn load_plan(args: &PipelineArgs, registry: &Registry, cache: &Cache) -> Result<Plan, Error> {
    let mut hasher = FileHasher::open(cache.filehash_memo());
    plan::load(&args.pipeline, &args.set, registry, &mut hasher)
}

fn dispatch(cli: Cli) -> Result<(), Error> {
    let registry = saeflow_stages::builtin();
    let reporter = Reporter::new(cli.quiet);
    match cli.command {
        Command::Run {
            args,
            targets,
            jobs,
            dry_run,
            no_group,
            executor,
            partition,
            account,
            max_jobs,
        } => {
            let cache = open_cache(&cli.cache)?;
            let plan = load_plan(&args, &registry, &cache)?;
            let selected = exec::selection(&plan, &targets).map_err(Error::Usage)?;
            if dry_run {
                for &n in plan.order.iter().filter(|n| selected.contains(n)) {
                    let name = &plan.instance(n).name;
                    match status::state(&plan, &cache, n) {
                        State::Cached => println!("{name}: cached, would not run"),
                        State::Missing => println!("{name}: would run (never run before)"),
                        State::Stale(reasons) => {
                            println!("{name}: would run ({})", reasons.join("; "))
                        }
                    }
                }
                return Ok(());
            }
            let cancel = Cancel::new();
            install_signal_handlers(&cancel)?;
            let outcome = match executor {
                Executor::Local => {
                    let options = Options {
                        jobs,
                        targets,
                        group: !no_group,
                    };
                    exec::run(&plan, &registry, &cache, &options, &cancel, &reporter)
                        .map_err(Error::Usage)?
                }
                Executor::Slurm => {
                    let spec = exec::slurm::JobSpec {
                        pipeline: std::path::absolute(&args.pipeline)
                            .map_err(anyhow::Error::from)?,
                        set: args.set.iter().map(|o| o.arg.clone()).collect(),
                        workdir: std::env::current_dir().map_err(anyhow::Error::from)?,
                        instance: String::new(),
                    };
                    let options = exec::slurm::SlurmOptions {
                        partition,
                        account,
                        max_jobs,
                        poll: std::time::Duration::from_millis(500),
                    };
                    exec::slurm::run(
                        &plan, &cache, &selected, &spec, &options, &cancel, &reporter,
                    )
                    .map_err(Error::Other)?
                }
            };
            reporter.println(&format!(
                "{} computed, {} cached, {} failed, {} skipped",
                outcome.computed.len(),
                outcome.cached.len(),
                outcome.failed.len(),
                outcome.skipped.len()
            ));
            if !outcome.failed.is_empty() {
                let names: Vec<_> = outcome.failed.iter().map(|(n, _)| n.as_str()).collect();
                return Err(Error::Failed(format!("stage failed: {}", names.join(", "))));
            }
            if outcome.cancelled {
                return Err(Error::Interrupted);
            }
            Ok(())
        }
        Command::ExecStage { keys } => {
            let cache = open_cache(&cli.cache)?;
            let key = exec::slurm::key_for_task(&keys)?;
            let path = exec::slurm::job_spec_path(&cache, key);
            let spec: exec::slurm::JobSpec = std::fs::read(&path)
                .map_err(anyhow::Error::from)
                .and_then(|b| serde_json::from_slice(&b).map_err(anyhow::Error::from))
                .map_err(|e| Error::Other(anyhow::anyhow!("{}: {e}", path.display())))?;
            std::env::set_current_dir(&spec.workdir)
                .map_err(|e| Error::Other(anyhow::anyhow!("{}: {e}", spec.workdir.display())))?;
            let args = PipelineArgs {
                pipeline: spec.pipeline.clone(),
                set: spec
                    .set
                    .iter()
                    .map(|s| s.parse())
                    .collect::<Result<_, String>>()
                    .map_err(Error::Usage)?,
            };
            let plan = load_plan(&args, &registry, &cache)?;
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
            let outcome = exec::run(&plan, &registry, &cache, &options, &cancel, &reporter)
                .map_err(Error::Usage)?;
            if let Some((name, msg)) = outcome.failed.first() {
                return Err(Error::Failed(format!("{name}: {msg}")));
            }
            if outcome.cancelled {
                return Err(Error::Interrupted);
            }
            Ok(())
        }
        Command::Status { args } => {
            let cache = open_cache(&cli.cache)?;
            let plan = load_plan(&args, &registry, &cache)?;
            let jobs = exec::slurm::read_submitted(&cache, &plan.pipeline.header.name).jobs;
            let queue = if jobs.is_empty() {
                Default::default()
            } else {
                let ids: Vec<String> = jobs.values().cloned().collect();
                exec::slurm::queue_states(&ids).unwrap_or_default()
            };
            let width = plan
                .order
                .iter()
                .map(|&n| plan.instance(n).name.len())
                .max()
                .unwrap_or(0);
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
        Command::Why { args, stage } => {
            let cache = open_cache(&cli.cache)?;
            let plan = load_plan(&args, &registry, &cache)?;
            let nodes = plan.select_named(&stage).map_err(Error::Usage)?;
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
                            &r.key[..12.min(r.key.len())],
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
        Command::Dag { args, format } => {
            let cache = open_cache(&cli.cache)?;
            let plan = load_plan(&args, &registry, &cache)?;
            print!("{}", render(&plan, format));
            Ok(())
        }
        Command::Show { args, stage, limit } => {
            let cache = open_cache(&cli.cache)?;
            let plan = load_plan(&args, &registry, &cache)?;
            let nodes = plan.select_named(&stage).map_err(Error::Usage)?;
            for n in nodes {
                let inst = plan.instance(n);
                if !cache.has_object(&inst.key) {
                    println!(
                        "{}: not computed yet (run `saeflow run {} {}`)",
                        inst.name,
                        args.pipeline.display(),
                        inst.name
                    );
                    continue;
                }
                println!("== {} ({})", inst.name, inst.key.short());
                print!(
                    "{}",
                    crate::report::show::show(&cache.object_dir(&inst.key), limit)?
                );
            }
            Ok(())
        }
        Command::Report { args, out } => {
            let cache = open_cache(&cli.cache)?;
            let plan = load_plan(&args, &registry, &cache)?;
            let (mut entries, mut missing) = (Vec::new(), Vec::new());
            for &n in &plan.order {
                let inst = plan.instance(n);
                if cache.has_object(&inst.key) {
                    entries.push(crate::report::html::Entry {
                        name: inst.name.clone(),
                        kind: inst.kind.clone(),
                        dir: cache.object_dir(&inst.key),
                    });
                } else {
                    missing.push(inst.name.clone());
                }
            }
            // Tokenizers of local models only: a report never downloads anything.
            let mut tokenizers = crate::report::html::Tokenizers::new();
            for (name, spec) in &plan.pipeline.models {
                if let Some(path) = &spec.path {
                    let path = saeflow_core::fs::resolve_path(&plan.pipeline.workdir, path);
                    if let Ok(t) = saeflow_core::models::load_tokenizer(&path, spec.kind) {
                        tokenizers.insert(name.clone(), t);
                    }
                }
            }
            let page = crate::report::html::render(
                &plan.pipeline.header.name,
                &entries,
                &missing,
                &tokenizers,
            )?;
            std::fs::create_dir_all(&out)
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
        Command::Gc { dry_run } => {
            let cache = open_cache(&cli.cache)?;
            let report = cache.gc(dry_run)?;
            let verb = if dry_run { "would remove" } else { "removed" };
            for (path, size) in &report.removed {
                println!("{verb} {} ({})", path.display(), human_bytes(*size));
            }
            let total: u64 = report.removed.iter().map(|(_, s)| s).sum();
            println!(
                "{verb} {} entries, {}; kept {} referenced objects",
                report.removed.len(),
                human_bytes(total),
                report.kept
            );
            Ok(())
        }
        Command::Cache {
            command: CacheCommand::Verify { repair },
        } => {
            let cache = open_cache(&cli.cache)?;
            let keys = cache.object_keys()?;
            let mut bad = 0;
            for key in &keys {
                let problems = cache.verify_object(key);
                if !problems.is_empty() {
                    bad += 1;
                    println!("BAD {key}");
                    for p in problems {
                        println!("  {p}");
                    }
                    if repair {
                        if let Some(to) = cache.quarantine(key)? {
                            println!("  moved to {}", to.display());
                        }
                    }
                }
            }
            println!("{} objects verified, {bad} damaged", keys.len());
            if bad > 0 && !repair {
                return Err(Error::Failed(format!(
                    "{bad} damaged objects; `saeflow cache verify --repair` moves them aside, and the next run \
                     recomputes them"
                )));
            }
            Ok(())
        }
        Command::Model {
            path,
            prompt,
            generate,
            chat,
            device,
            json,
            dtype,
        } => {
            let report = model_report(&path, &prompt, generate, chat, device, dtype)
                .map_err(Error::Other)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report).expect("JSON"));
            } else {
                print_model_report(&report);
            }
            Ok(())
        }
        Command::Bench {
            command:
                BenchCommand::Forward {
                    path,
                    batch,
                    seq,
                    layer,
                    iters,
                    device,
                    dtype,
                },
        } => crate::bench::forward(&path, batch, seq, layer, iters, device, dtype)
            .map_err(Error::Other),
        Command::Bench {
            command:
                BenchCommand::Train {
                    d_in,
                    expansion,
                    k,
                    batch,
                    steps,
                    encoder,
                },
        } => crate::bench::train(d_in, expansion, k, batch, steps, encoder.into())
            .map_err(Error::Other),
        Command::Bench {
            command:
                BenchCommand::Reader {
                    store,
                    hook,
                    d_model,
                    rows,
                    dtype,
                    batch,
                    passes,
                },
        } => crate::bench::reader(
            store.as_deref(),
            hook.as_deref(),
            d_model,
            rows,
            &dtype,
            batch,
            passes,
        )
        .map_err(Error::Other),
        Command::SaeEncode {
            sae,
            capture,
            hook,
            rows,
            out,
        } => sae_encode(&sae, &capture, hook.as_deref(), rows, &out).map_err(Error::Other),
        Command::Schema { output } => {
            let schema = saeflow_runner::config::pipeline_schema(&registry);
            let text = serde_json::to_string_pretty(&schema).expect("JSON") + "\n";
            if output == Path::new("-") {
                print!("{text}");
            } else {
                saeflow_core::fs::write_atomic(&output, text.as_bytes())?;
                eprintln!("wrote {}", output.display());
            }
            Ok(())
        }
    }
}

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

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn model_report(
    path: &Path,
    prompt: &str,
    generate: usize,
    chat: bool,
    device: saeflow_core::models::spec::DeviceSpec,
    dtype: saeflow_core::models::WeightFormat,
) -> anyhow::Result<serde_json::Value> {
    use saeflow_core::models::{generate as gen, transformer};
    let device = saeflow_core::models::device(device)?;
    let started = std::time::Instant::now();
    let model = saeflow_core::models::load_with(path, None, dtype, &device)?;
    let load_s = started.elapsed().as_secs_f64();
    let ids = if chat {
        model
            .tokenizer
            .encode_with_specials(&model.render_chat(prompt, None)?)?
    } else {
        model.encode_document(prompt)?
    };
    let input = candle_core::Tensor::from_vec(ids.clone(), (1, ids.len()), &device)?;
    let logits = model
        .transformer
        .forward(&input, &transformer::Hooks::logits(), None)?
        .logits
        .expect("logits");
    let logits = logits.squeeze(0)?;
    let nll = if ids.len() > 1 {
        Some(transformer::mean_nll(&logits, &ids)?)
    } else {
        None
    };
    let top5 = gen::top_k(&logits.get(ids.len() - 1)?, 5)?;
    let out = gen::generate(
        &model.transformer,
        &ids,
        generate,
        &model.stop,
        &gen::Sampling::default(),
        &transformer::Hooks::default(),
    )?;
    let c = &model.transformer.config;
    Ok(serde_json::json!({
        "source": model.source.display().to_string(),
        "family": c.family,
        "layers": c.n_layer,
        "d_model": c.d_model,
        "heads": c.n_head,
        "kv_heads": c.n_kv_head,
        "head_dim": c.head_dim,
        "d_mlp": c.d_mlp,
        "vocab_size": c.vocab_size,
        "max_seq_len": c.max_seq_len,
        "bos": model.bos,
        "load_seconds": load_s,
        "input_ids": ids,
        "mean_nll": nll,
        "top5": top5.iter().map(|(i, l)| serde_json::json!({"id": i, "logit": l, "token": model.tokenizer.decode(&[*i]).unwrap_or_default()})).collect::<Vec<_>>(),
        "greedy_ids": out,
        "greedy_text": model.tokenizer.decode(&out)?,
    }))
}

fn print_model_report(r: &serde_json::Value) {
    println!(
        "{} ({}): {} layers, d_model {}, {} heads ({} kv, head_dim {}), d_mlp {}, vocab {}, context {}",
        r["source"].as_str().unwrap_or(""),
        r["family"].as_str().unwrap_or(""),
        r["layers"], r["d_model"], r["heads"], r["kv_heads"], r["head_dim"], r["d_mlp"], r["vocab_size"], r["max_seq_len"]
    );
    println!(
        "loaded in {:.2}s",
        r["load_seconds"].as_f64().unwrap_or(0.0)
    );
    println!("input ids: {}", r["input_ids"]);
    if let Some(n) = r["mean_nll"].as_f64() {
        println!("mean next-token NLL: {n:.4}");
    }
    println!("top-5 next tokens:");
    for t in r["top5"].as_array().into_iter().flatten() {
        println!(
            "  {:>7}  {:>9.4}  {:?}",
            t["id"],
            t["logit"].as_f64().unwrap_or(0.0),
            t["token"].as_str().unwrap_or("")
        );
    }
    println!("greedy: {:?}", r["greedy_text"].as_str().unwrap_or(""));
}

fn sae_encode(
    sae_dir: &Path,
    capture: &Path,
    hook: Option<&str>,
    rows: usize,
    out: &Path,
) -> anyhow::Result<()> {
    use anyhow::Context;
    use saeflow_core::data::activations::{ActivationStore, ReadOptions};
    let device = candle_core::Device::Cpu;
    let sae = saeflow_core::sae::format::Sae::load(sae_dir, &device)?;
    let hook = match hook {
        Some(h) => h.to_string(),
        None => sae.cfg["metadata"]["hook_name"]
            .as_str()
            .context("the SAE's cfg.json names no hook; pass --hook")?
            .to_string(),
    };
    let store = ActivationStore::open(capture, &hook)?;
    let options = ReadOptions {
        batch_size: rows,
        ..ReadOptions::default()
    };
    let x = store
        .batches(&options, &device)?
        .next()
        .context("the capture is empty")??
        .acts;
    let acts = sae.encode(&x)?;
    let recon = sae.decode(&acts)?;
    let tensors = std::collections::HashMap::from([
        ("x".to_string(), x),
        ("acts".to_string(), acts),
        ("recon".to_string(), recon),
    ]);
    candle_core::safetensors::save(&tensors, out)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
