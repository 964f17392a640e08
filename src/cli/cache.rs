//! Cache maintenance: `saeflow gc`, `saeflow cache verify`, and `saeflow cache push|pull` between the local
//! cache and its remote.

use clap::Subcommand;
use saeflow_core::progress::Reporter;
use saeflow_runner::cache::{GcOptions, Pulled, SyncReport};
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
    /// Collect garbage on the remote cache (`--cache-remote`, or `--cache URL`) instead of the local one:
    /// manifests no remote ref reaches, then every blob no manifest or partial work names.
    #[arg(long)]
    remote: bool,
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
        /// Verify the remote cache instead: download every blob and check it against its manifest.
        #[arg(long)]
        remote: bool,
    },
    /// Copy every object the remote lacks (and the local refs) to the remote.
    Push,
    /// Copy every object a remote ref reaches into the local cache, each checked byte for byte.
    Pull,
}

/// `saeflow gc`: deletes (or with `--dry-run` lists) what no ref reaches, with sizes, and says what it kept
/// and why.
pub fn gc(cache_args: &CacheArgs, args: GcArgs) -> Result<(), Error> {
    let cache = open_cache(cache_args)?;
    let options = GcOptions {
        dry_run: args.dry_run,
        grace: args.grace,
        partial: args.partial,
    };
    // Remote paths are shown under the remote's URL.
    let (report, prefix) = if args.remote {
        let remote = cache.require_remote().map_err(Error::Other)?;
        let report = remote.gc(&options).map_err(Error::Other)?;
        (report, format!("{}/", remote.url()))
    } else {
        (cache.gc(&options)?, String::new())
    };
    let verb = if args.dry_run {
        "would remove"
    } else {
        "removed"
    };
    for (path, size) in &report.removed {
        println!("{verb} {prefix}{} ({})", path.display(), human_bytes(*size));
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
        CacheCommand::Verify {
            repair,
            remote: false,
        } => verify(cache_args, repair),
        CacheCommand::Verify {
            repair,
            remote: true,
        } => verify_remote(cache_args, repair),
        CacheCommand::Push => sync(cache_args, true),
        CacheCommand::Pull => sync(cache_args, false),
    }
}

/// `saeflow cache push` and `saeflow cache pull`.
fn sync(cache_args: &CacheArgs, push: bool) -> Result<(), Error> {
    let cache = open_cache(cache_args)?;
    let remote = cache.require_remote().map_err(Error::Other)?;
    let reporter = Reporter::new(false);
    let bar = |key: &saeflow_runner::cache::Key| reporter.stage(&key.0[..16.min(key.0.len())]);
    let report: SyncReport = if push {
        cache.push_all(bar)
    } else {
        cache.pull_all(bar)
    }
    .map_err(Error::Other)?;
    let (verb, there) = if push {
        ("pushed", "the remote already had")
    } else {
        ("pulled", "the local cache already had")
    };
    let bytes: u64 = report.copied.iter().map(|(_, t)| t.bytes).sum();
    println!(
        "{verb} {} objects ({}) {} {}; {there} {}; {} refs written",
        report.copied.len(),
        human_bytes(bytes),
        if push { "to" } else { "from" },
        remote.url(),
        report.already,
        report.refs
    );
    for (key, why) in &report.skipped {
        println!("skipped {}: {why}", key.0);
    }
    if report.skipped.is_empty() {
        Ok(())
    } else {
        Err(Error::Failed(format!(
            "{} objects were not {verb}",
            report.skipped.len()
        )))
    }
}

/// `saeflow cache verify --remote`: downloads every remote object's blobs and checks them, keeping nothing;
/// with `repair`, damaged objects go to the remote's `quarantine/`.
fn verify_remote(cache_args: &CacheArgs, repair: bool) -> Result<(), Error> {
    let cache = open_cache(cache_args)?;
    let remote = cache.require_remote().map_err(Error::Other)?;
    let reporter = Reporter::new(false);
    let keys = remote.object_keys().map_err(Error::Other)?;
    let mut bad = 0;
    for key in &keys {
        let bar = reporter.stage(&key.0[..16.min(key.0.len())]);
        let checked = remote.verify(key, &bar).map_err(Error::Other)?;
        bar.finish();
        if let Pulled::Damaged {
            problems,
            bad_blobs,
        } = checked
        {
            bad += 1;
            println!("BAD {}/objects/{}", remote.url(), key.0);
            for p in problems {
                println!("  {p}");
            }
            if repair {
                remote.quarantine(key, &bad_blobs).map_err(Error::Other)?;
                println!("  moved to {}/quarantine/", remote.url());
            }
        }
    }
    println!(
        "{} objects verified on {}, {bad} damaged",
        keys.len(),
        remote.url()
    );
    if bad > 0 && !repair {
        return Err(Error::Failed(format!(
            "{bad} damaged objects on the remote; `saeflow cache verify --remote --repair` moves them \
             aside, and the next run recomputes them"
        )));
    }
    Ok(())
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
