//! Running a plan on a Slurm cluster, the way Snakemake's Slurm executor does, with no control plane of our
//! own: every uncached instance becomes a batch job running `saeflow exec-stage <key>` against the shared
//! cache, the instances of one stage become one job array, data-flow edges become `--dependency=afterok`.
//! The cache's lock files and atomic publish keep every key computed once, whichever node runs it; a
//! preempted (`--requeue`) or resubmitted job resumes from the stage's partial work in the cache.
//!
//! The submitting process follows the jobs with `squeue`; a job that left the queue succeeded exactly when
//! its object was published (no accounting database needed). Ctrl-C cancels what it submitted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use petgraph::graph::NodeIndex;
use petgraph::Direction;
use serde::{Deserialize, Serialize};

use super::{Outcome, Reporter};
use crate::cache::Cache;
use crate::config::Resources;
use crate::plan::Plan;
use saeflow_core::cancel::Cancel;
use saeflow_core::fs::write_atomic;

/// Slurm settings from the command line.
#[derive(Debug, Clone, Default)]
pub struct SlurmOptions {
    /// `--partition`.
    pub partition: Option<String>,
    /// `--account`.
    pub account: Option<String>,
    /// Most array tasks and jobs queued or running at once (none: no limit).
    pub max_jobs: Option<usize>,
    /// How often to poll `squeue`.
    pub poll: Duration,
}

/// What `exec-stage` needs to rebuild the plan on a node: written to `cache/slurm/jobs/<key>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobSpec {
    /// Pipeline file, absolute.
    pub pipeline: PathBuf,
    /// `-S` arguments as typed.
    pub set: Vec<String>,
    /// Working directory relative paths resolve against.
    pub workdir: PathBuf,
    /// The instance this key belongs to.
    pub instance: String,
}

/// Submitted jobs of a pipeline, for `saeflow status`: `cache/slurm/<pipeline>.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Submitted {
    /// Slurm job id (`123` or `123_4` for array tasks) by instance name.
    pub jobs: BTreeMap<String, String>,
}

fn slurm_dir(cache: &Cache) -> PathBuf {
    cache.root().join("slurm")
}

/// Path of the job spec of `key`.
pub fn job_spec_path(cache: &Cache, key: &str) -> PathBuf {
    slurm_dir(cache).join("jobs").join(format!("{key}.json"))
}

fn submitted_path(cache: &Cache, pipeline: &str) -> PathBuf {
    slurm_dir(cache).join(format!("{pipeline}.json"))
}

/// The jobs last submitted for a pipeline.
pub fn read_submitted(cache: &Cache, pipeline: &str) -> Submitted {
    std::fs::read(submitted_path(cache, pipeline))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Runs a Slurm client command and returns its stdout.
fn slurm(program: &str, args: &[String]) -> anyhow::Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| {
        format!("cannot run `{program}`: the slurm executor needs Slurm's client commands on PATH")
    })?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `squeue` states of jobs that will not run again (`squeue` lists finished jobs for a while on some setups).
const FINISHED: &[&str] = &[
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
];

/// Job states of the given ids as `squeue` reports them (jobs that left the queue are absent), with the
/// pending reason: `123_4 -> ("PENDING", "Dependency")`.
pub fn queue_states(ids: &[String]) -> anyhow::Result<BTreeMap<String, (String, String)>> {
    if ids.is_empty() {
        return Ok(BTreeMap::new());
    }
    // `%i` prints array tasks as `<array job>_<task>`; pending arrays as `<array job>_[0-2]`.
    let out = slurm(
        "squeue",
        &[
            "-h".into(),
            "-o".into(),
            "%i %T %r".into(),
            "-j".into(),
            ids.iter()
                .map(|i| i.split('_').next().unwrap_or(i).to_string())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
                .join(","),
        ],
    )?;
    let mut states = BTreeMap::new();
    for line in out.lines() {
        let mut f = line.split_whitespace();
        let (Some(id), Some(state)) = (f.next(), f.next()) else {
            continue;
        };
        let reason = f.collect::<Vec<_>>().join(" ");
        for one in expand_array_id(id) {
            states.insert(one, (state.to_string(), reason.clone()));
        }
    }
    Ok(states)
}

/// `12_[0-2,5]` → `12_0, 12_1, 12_2, 12_5`; `12_3` and `12` → themselves.
fn expand_array_id(id: &str) -> Vec<String> {
    let Some((job, rest)) = id.split_once("_[") else {
        return vec![id.to_string()];
    };
    let body = rest.trim_end_matches(']');
    let body = body.split('%').next().unwrap_or(body);
    let mut out = Vec::new();
    for part in body.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<u64>(), b.parse::<u64>()) {
                    out.extend((a..=b).map(|t| format!("{job}_{t}")));
                }
            }
            None => out.push(format!("{job}_{part}")),
        }
    }
    out
}

/// Checks a `--partition` or `--account` value: Slurm names of letters, digits and `_.,:-` only (a comma
/// separates several partitions). Anything else, a newline above all, could add lines to the job script.
/// The error names the option.
pub fn check_slurm_name(option: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("--{option} must not be empty"));
    }
    match value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "_.,:-".contains(*c)))
    {
        Some(c) => Err(format!(
            "--{option} `{}`: `{}` is not allowed (letters, digits and `_.,:-` only)",
            crate::config::printable(value),
            crate::config::printable(&c.to_string())
        )),
        None => Ok(()),
    }
}

/// The job script: `#SBATCH` lines, then the command. Every value in it must stay on its line: the
/// names in it are validated upstream, and this refuses any line break or control character that got
/// through (a path, say) rather than write a script whose directives say something else.
fn job_script(lines: &[String], command: &str) -> anyhow::Result<String> {
    let mut script = String::from("#!/bin/sh\n");
    for line in lines {
        // `#SBATCH` values are split on whitespace by sbatch, so they must not contain any either.
        if line.chars().any(|c| c.is_control() || c.is_whitespace()) {
            bail!(
                "cannot write the Slurm job script: `#SBATCH {}` contains whitespace or a control character",
                crate::config::printable(line)
            );
        }
        script.push_str(&format!("#SBATCH {line}\n"));
    }
    if command.chars().any(char::is_control) {
        bail!(
            "cannot write the Slurm job script: the command `{}` contains a control character",
            crate::config::printable(command)
        );
    }
    script.push_str(command);
    script.push('\n');
    Ok(script)
}

/// The `#SBATCH` lines of a job.
fn sbatch_lines(
    name: &str,
    log: &Path,
    resources: &Resources,
    options: &SlurmOptions,
    array: Option<usize>,
    dependencies: &[String],
) -> Vec<String> {
    let mut lines = vec![
        format!("--job-name={name}"),
        format!("--output={}", log.display()),
        "--requeue".into(),
        "--kill-on-invalid-dep=yes".into(),
        "--open-mode=append".into(),
    ];
    if let Some(n) = array {
        let throttle = options
            .max_jobs
            .map(|m| format!("%{}", m.max(1)))
            .unwrap_or_default();
        lines.push(format!("--array=0-{}{throttle}", n - 1));
    }
    if !dependencies.is_empty() {
        lines.push(format!("--dependency=afterok:{}", dependencies.join(":")));
    }
    if let Some(p) = &options.partition {
        lines.push(format!("--partition={p}"));
    }
    if let Some(a) = &options.account {
        lines.push(format!("--account={a}"));
    }
    if let Some(c) = resources.cpus {
        lines.push(format!("--cpus-per-task={c}"));
    }
    if let Some(m) = &resources.mem {
        lines.push(format!("--mem={m}"));
    }
    if let Some(g) = resources.gpus {
        lines.push(format!("--gpus={g}"));
    }
    if let Some(t) = &resources.time {
        lines.push(format!("--time={t}"));
    }
    lines
}

/// A stage's uncached instances, submitted as one job (or array).
struct Batch {
    stage: String,
    members: Vec<NodeIndex>,
}

/// Submits the selected, uncached instances of `plan` to Slurm and follows them to the end.
pub fn run(
    plan: &Plan,
    cache: &Cache,
    selected: &BTreeSet<NodeIndex>,
    spec: &JobSpec,
    options: &SlurmOptions,
    cancel: &Cancel,
    reporter: &Reporter,
) -> anyhow::Result<Outcome> {
    let pipeline = plan.pipeline.header.name.clone();
    // Held while the jobs run, so `gc` keeps what they will read between one job and the next.
    let _lease = cache.lease(plan.order.iter().map(|&n| &plan.instance(n).key))?;
    let mut outcome = Outcome::default();
    // Batches in stage order (a stage's first instance comes after all its upstream stages' first ones).
    let mut batches: Vec<Batch> = Vec::new();
    for &n in plan.order.iter().filter(|n| selected.contains(n)) {
        let inst = plan.instance(n);
        if cache.has_object(&inst.key) && cache.check_sizes(&inst.key).is_ok() {
            outcome.cached.push(inst.name.clone());
            continue;
        }
        match batches.iter_mut().find(|b| b.stage == inst.stage) {
            Some(b) => b.members.push(n),
            None => batches.push(Batch {
                stage: inst.stage.clone(),
                members: vec![n],
            }),
        }
    }
    std::fs::create_dir_all(slurm_dir(cache).join("jobs"))?;
    std::fs::create_dir_all(slurm_dir(cache).join("logs"))?;
    let exe = std::env::current_exe().context("cannot locate the saeflow executable")?;
    let mut job_of: BTreeMap<NodeIndex, String> = BTreeMap::new();
    let mut log_of: BTreeMap<NodeIndex, PathBuf> = BTreeMap::new();
    let mut pending: Vec<Batch> = batches;
    let mut in_flight: BTreeSet<NodeIndex> = BTreeSet::new();
    let mut last_state: BTreeMap<NodeIndex, String> = BTreeMap::new();
    let mut submitted = read_submitted(cache, &pipeline);
    let cancel_all = |job_of: &BTreeMap<NodeIndex, String>| {
        let ids: BTreeSet<String> = job_of
            .values()
            .map(|j| j.split('_').next().unwrap_or(j).to_string())
            .collect();
        if !ids.is_empty() {
            let _ = slurm("scancel", &ids.into_iter().collect::<Vec<_>>());
        }
    };
    loop {
        if cancel.is_cancelled() {
            cancel_all(&job_of);
            reporter.alert(&format!(
                "cancelled {} submitted jobs (scancel); partial work stays in the cache",
                in_flight.len()
            ));
            outcome.cancelled = true;
            break;
        }
        // Submit while under the limit; a batch needs its upstream batches submitted (or cached).
        while !pending.is_empty() {
            let room = options.max_jobs.is_none_or(|m| in_flight.len() < m);
            if !room && !in_flight.is_empty() {
                break;
            }
            let batch = pending.remove(0);
            let mut deps = BTreeSet::new();
            for &m in &batch.members {
                for up in plan.graph.neighbors_directed(m, Direction::Incoming) {
                    if let Some(job) = job_of.get(&up) {
                        if in_flight.contains(&up) {
                            deps.insert(job.clone());
                        }
                    }
                }
            }
            let keys: Vec<String> = batch
                .members
                .iter()
                .map(|&m| plan.instance(m).key.0.clone())
                .collect();
            for &m in &batch.members {
                let inst = plan.instance(m);
                let job = JobSpec {
                    instance: inst.name.clone(),
                    ..spec.clone()
                };
                write_atomic(
                    &job_spec_path(cache, &inst.key.0),
                    &serde_json::to_vec_pretty(&job)?,
                )?;
            }
            let resources = plan
                .pipeline
                .stages
                .get(&batch.stage)
                .map(|s| s.resources.clone())
                .unwrap_or_default();
            let array = (batch.members.len() > 1).then_some(batch.members.len());
            let log = slurm_dir(cache).join("logs").join(if array.is_some() {
                format!("{pipeline}-{}-%A_%a.out", batch.stage)
            } else {
                format!("{pipeline}-{}-%j.out", batch.stage)
            });
            let deps: Vec<String> = deps.into_iter().collect();
            let script = job_script(
                &sbatch_lines(
                    &format!("saeflow:{pipeline}:{}", batch.stage),
                    &log,
                    &resources,
                    options,
                    array,
                    &deps,
                ),
                &format!(
                    "exec {} --cache {} exec-stage {}",
                    shell_quote(&exe.display().to_string()),
                    shell_quote(&cache.root().display().to_string()),
                    keys.join(" ")
                ),
            )?;
            let script_path = slurm_dir(cache)
                .join("jobs")
                .join(format!("{}.sbatch", keys[0]));
            write_atomic(&script_path, script.as_bytes())?;
            let id = slurm(
                "sbatch",
                &["--parsable".into(), script_path.display().to_string()],
            )?;
            let id = id.trim().split(';').next().unwrap_or_default().to_string();
            for (i, &m) in batch.members.iter().enumerate() {
                let job = if array.is_some() {
                    format!("{id}_{i}")
                } else {
                    id.clone()
                };
                let name = &plan.instance(m).name;
                let log = log
                    .display()
                    .to_string()
                    .replace("%A", &id)
                    .replace("%a", &i.to_string())
                    .replace("%j", &id);
                log_of.insert(m, PathBuf::from(log));
                submitted.jobs.insert(name.clone(), job.clone());
                job_of.insert(m, job);
                in_flight.insert(m);
            }
            reporter.println(&format!(
                "submitted {} as job {id}{}",
                batch
                    .members
                    .iter()
                    .map(|&m| plan.instance(m).name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                if deps.is_empty() {
                    String::new()
                } else {
                    format!(" (after {})", deps.join(", "))
                }
            ));
            write_atomic(
                &submitted_path(cache, &pipeline),
                &serde_json::to_vec_pretty(&submitted)?,
            )?;
        }
        if in_flight.is_empty() && pending.is_empty() {
            break;
        }
        std::thread::sleep(options.poll);
        let ids: Vec<String> = in_flight.iter().map(|m| job_of[m].clone()).collect();
        let states = match queue_states(&ids) {
            Ok(s) => s,
            Err(e) => {
                reporter.alert(&format!("squeue failed ({e:#}); retrying"));
                continue;
            }
        };
        for m in in_flight.clone() {
            let inst = plan.instance(m);
            let job = &job_of[&m];
            match states
                .get(job)
                .filter(|(state, _)| !FINISHED.contains(&state.as_str()))
            {
                Some((state, reason)) => {
                    if last_state.get(&m) != Some(state) {
                        reporter.println(&format!("{}: {state} (job {job})", inst.name));
                        last_state.insert(m, state.clone());
                    }
                    if reason.contains("DependencyNeverSatisfied") {
                        let _ = slurm("scancel", std::slice::from_ref(job));
                        in_flight.remove(&m);
                        outcome.skipped.push(inst.name.clone());
                    }
                }
                None => {
                    in_flight.remove(&m);
                    if cache.has_object(&inst.key) {
                        reporter.println(&format!("done {} (job {job})", inst.name));
                        outcome.computed.push(inst.name.clone());
                        let record = crate::cache::RefRecord {
                            instance: inst.name.clone(),
                            key: inst.key.0.clone(),
                            preimage: inst.preimage.clone(),
                        };
                        cache.write_ref(&pipeline, &record)?;
                    } else {
                        let log = &log_of[&m];
                        let tail = std::fs::read_to_string(log)
                            .map(|t| {
                                let lines: Vec<&str> = t.lines().collect();
                                lines[lines.len().saturating_sub(5)..].join("\n  ")
                            })
                            .unwrap_or_default();
                        let msg = format!(
                            "job {job} ended without a result; log {}:\n  {tail}",
                            log.display()
                        );
                        reporter.alert(&format!("FAILED {}: {msg}", inst.name));
                        outcome.failed.push((inst.name.clone(), msg));
                        // Dependents never start (afterok); cancel them now rather than leave them queued.
                        for d in descendants(plan, m) {
                            if in_flight.remove(&d) {
                                let _ = slurm("scancel", std::slice::from_ref(&job_of[&d]));
                                outcome.skipped.push(plan.instance(d).name.clone());
                            }
                            pending
                                .iter_mut()
                                .for_each(|b| b.members.retain(|&x| x != d));
                        }
                        pending.retain(|b| !b.members.is_empty());
                    }
                }
            }
        }
    }
    Ok(outcome)
}

fn descendants(plan: &Plan, n: NodeIndex) -> BTreeSet<NodeIndex> {
    let mut out = BTreeSet::new();
    let mut stack = vec![n];
    while let Some(n) = stack.pop() {
        for c in plan.graph.neighbors_directed(n, Direction::Outgoing) {
            if out.insert(c) {
                stack.push(c);
            }
        }
    }
    out
}

/// Quotes a string for `sh`.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The one key an `exec-stage` process runs: `keys[SLURM_ARRAY_TASK_ID]` in an array job, else the only key.
pub fn key_for_task(keys: &[String]) -> anyhow::Result<&str> {
    match std::env::var("SLURM_ARRAY_TASK_ID") {
        Ok(t) => {
            let i: usize = t
                .parse()
                .with_context(|| format!("SLURM_ARRAY_TASK_ID is `{t}`"))?;
            keys.get(i)
                .map(String::as_str)
                .with_context(|| format!("array task {i} but only {} keys were given", keys.len()))
        }
        Err(_) if keys.len() == 1 => Ok(&keys[0]),
        Err(_) => bail!(
            "{} keys given outside an array job (no SLURM_ARRAY_TASK_ID)",
            keys.len()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slurm_names_refuse_what_could_break_the_script() {
        assert!(check_slurm_name("partition", "gpu,gpu-large").is_ok());
        assert!(check_slurm_name("account", "lab_1.a:b").is_ok());
        for bad in ["gpu\n#SBATCH --wrap=x", "", "a b", "a;b", "a\0b", "\u{e9}"] {
            let e = check_slurm_name("partition", bad).unwrap_err();
            assert!(e.contains("--partition"), "{e}");
        }
    }

    #[test]
    fn job_script_refuses_line_breaks_in_values() {
        let lines = vec!["--job-name=a\n#SBATCH --wrap=x".to_string()];
        assert!(job_script(&lines, "exec x").is_err());
        assert!(job_script(&["--output=/my drive/x".into()], "exec x").is_err());
        assert!(job_script(&["--job-name=a".into()], "exec 'x\ny'").is_err());
        let ok = job_script(&["--job-name=a".into()], "exec x").unwrap();
        assert_eq!(ok, "#!/bin/sh\n#SBATCH --job-name=a\nexec x\n");
    }

    #[test]
    fn array_ids_expand() {
        assert_eq!(expand_array_id("12"), ["12"]);
        assert_eq!(expand_array_id("12_3"), ["12_3"]);
        assert_eq!(
            expand_array_id("12_[0-2,5%2]"),
            ["12_0", "12_1", "12_2", "12_5"]
        );
    }

    #[test]
    fn sbatch_lines_carry_resources_dependencies_and_throttle() {
        let r = Resources {
            cpus: Some(4),
            mem: Some("8G".into()),
            gpus: Some(1),
            time: Some("01:00:00".into()),
        };
        let o = SlurmOptions {
            partition: Some("gpu".into()),
            account: Some("lab".into()),
            max_jobs: Some(2),
            poll: Duration::from_secs(1),
        };
        let lines = sbatch_lines(
            "n",
            Path::new("/l"),
            &r,
            &o,
            Some(3),
            &["7".into(), "8_1".into()],
        );
        for want in [
            "--array=0-2%2",
            "--dependency=afterok:7:8_1",
            "--partition=gpu",
            "--account=lab",
            "--cpus-per-task=4",
            "--mem=8G",
            "--gpus=1",
            "--time=01:00:00",
            "--requeue",
        ] {
            assert!(lines.iter().any(|l| l == want), "{want} in {lines:?}");
        }
    }
}
