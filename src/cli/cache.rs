//! Cache maintenance: `saeflow gc` and `saeflow cache verify`.

use clap::Subcommand;
use saeflow_runner::cache::GcOptions;
use saeflow_runner::Error;

use super::shared::{open_cache, CacheArgs};

/// Arguments of `saeflow gc`.
#[derive(clap::Args)]
pub struct GcArgs {
    /// List what would be deleted, delete nothing.
    #[arg(long)]
    dry_run: bool,
    /// Keep whatever was written more recently than this (`0`, `30s`, `10m`, `2h`, `7days`). Live runs'
    /// inputs are kept however old, by their leases.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    grace: std::time::Duration,
    /// Also delete the partial work of unfinished (killed or failed) runs, which their next run would resume
    /// from.
    #[arg(long)]
    partial: bool,
}

/// Subcommands of `saeflow cache`.
#[derive(Subcommand)]
pub enum CacheCommand {
    /// Re-hash every object's files against its manifest.
    Verify {
        /// Move damaged objects to the cache's `quarantine/`, so the next run recomputes them (runs also do
        /// this on their own when a stage is about to read a damaged input).
        #[arg(long)]
        repair: bool,
    },
}

/// `saeflow gc`: deletes (or with `--dry-run` lists) what no ref reaches, with sizes, and says what it kept
/// and why.
pub fn gc(cache_args: &CacheArgs, args: GcArgs) -> Result<(), Error> {
    let cache = open_cache(cache_args)?;
    let report = cache.gc(&GcOptions {
        dry_run: args.dry_run,
        grace: args.grace,
        partial: args.partial,
    })?;
    let verb = if args.dry_run {
        "would remove"
    } else {
        "removed"
    };
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
    if report.in_use > 0 {
        println!(
            "kept {} unreferenced keys a running pipeline reads or computes",
            report.in_use
        );
    }
    if report.recent > 0 {
        println!(
            "kept {} unreferenced entries younger than the grace period ({}); `--grace 0` removes them",
            report.recent,
            humantime::format_duration(args.grace)
        );
    }
    if !report.partial_kept.is_empty() {
        let size: u64 = report.partial_kept.iter().map(|(_, s)| s).sum();
        println!(
            "kept the partial work of {} unfinished runs ({}), which their next run resumes from; \
             `--partial` removes it",
            report.partial_kept.len(),
            human_bytes(size)
        );
    }
    Ok(())
}

/// Runs a `saeflow cache` subcommand.
pub fn cache(cache_args: &CacheArgs, command: CacheCommand) -> Result<(), Error> {
    match command {
        CacheCommand::Verify { repair } => verify(cache_args, repair),
    }
}

/// `saeflow cache verify`: re-hashes every object, lists the damaged ones and, with `repair`, quarantines
/// them; without `repair`, damage fails the command.
fn verify(cache_args: &CacheArgs, repair: bool) -> Result<(), Error> {
    let cache = open_cache(cache_args)?;
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

/// `n` bytes in binary units with one decimal (`1.5 GiB`); exact below 1 KiB.
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
