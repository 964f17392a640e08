//! The Slurm executor against a real single-node cluster (`scripts/slurm-local.sh`, which `.ci/run` starts):
//! the quickstart's 3-member sweep gives the same bytes as the local executor with each key computed once,
//! and a training job cancelled with `scancel` resumes from its checkpoint when the pipeline is rerun.
//!
//! Where Slurm's commands are not installed the tests are ignored (and listed so by `cargo test`); where
//! they are, a cluster must answer.
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{published_outputs, text};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Checks that the Slurm cluster answers (the tests are ignored where `sinfo` is not installed; one that is
/// installed but has no usable node is a failure that says how to start one).
fn cluster() {
    let why = match Command::new("sinfo").args(["-h", "-o", "%T"]).output() {
        Ok(o) if o.status.success() => {
            let states = String::from_utf8_lossy(&o.stdout).to_string();
            if states.contains("idle") || states.contains("mixed") || states.contains("alloc") {
                return;
            }
            format!("no usable node (sinfo: {})", states.trim())
        }
        Ok(o) => format!("sinfo failed: {}", text(&o).trim()),
        Err(e) => format!("sinfo cannot run ({e})"),
    };
    panic!("no Slurm cluster answers: {why}; start one with scripts/slurm-local.sh start");
}

fn saeflow(cache: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_saeflow"));
    c.current_dir(repo())
        .env_remove("SAEFLOW_LOG")
        .arg("--cache")
        .arg(cache)
        .args(args);
    c
}

#[test]
#[cfg_attr(
    missing = "slurm",
    ignore = "needs Slurm (scripts/slurm-local.sh start)"
)]
fn a_sweep_on_slurm_gives_the_local_executors_bytes_and_computes_each_key_once() {
    cluster();
    let local = tempfile::tempdir().unwrap();
    let out = saeflow(
        local.path(),
        &["run", "-j", "2", "pipelines/quickstart.toml"],
    )
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", text(&out));

    let shared = tempfile::tempdir().unwrap();
    let out = saeflow(
        shared.path(),
        &[
            "run",
            "--executor",
            "slurm",
            "--max-jobs",
            "4",
            "pipelines/quickstart.toml",
        ],
    )
    .output()
    .unwrap();
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    // One job array per swept stage, dependencies on the upstream jobs.
    assert!(
        log.contains("submitted sae[k=4], sae[k=8], sae[k=16] as job"),
        "{log}"
    );
    assert!(log.contains("(after "), "{log}");
    let mut done: BTreeMap<String, usize> = BTreeMap::new();
    for line in log.lines() {
        if let Some(rest) = line.strip_prefix("done ") {
            *done
                .entry(rest.split(" (job").next().unwrap().to_string())
                .or_default() += 1;
        }
    }
    assert_eq!(done.len(), 14, "{done:?}");
    assert!(done.values().all(|&n| n == 1), "{done:?}");
    assert!(log.contains("14 computed, 0 cached, 0 failed"), "{log}");
    assert_eq!(
        published_outputs(shared.path()),
        published_outputs(local.path())
    );
    // A second submission finds everything cached and submits nothing.
    let again = saeflow(
        shared.path(),
        &["run", "--executor", "slurm", "pipelines/quickstart.toml"],
    )
    .output()
    .unwrap();
    assert!(
        text(&again).contains("0 computed, 14 cached"),
        "{}",
        text(&again)
    );
    assert!(!text(&again).contains("submitted"), "{}", text(&again));
}

/// Slurm job id of `instance` as recorded by the submitter.
fn job_of(cache: &Path, instance: &str) -> Option<String> {
    let bytes = std::fs::read(cache.join("slurm/quickstart.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v["jobs"][instance].as_str().map(str::to_string)
}

/// Arguments submitting one long training run of the quickstart (many passes over the capture, checkpoints
/// every 100 steps) on Slurm; `k` picks the sweep member (and so the key).
fn long_training(k: &'static str) -> [&'static str; 11] {
    [
        "run",
        "--executor",
        "slurm",
        "pipelines/quickstart.toml",
        "sae",
        "-S",
        k,
        "-S",
        "sae.tokens=4000000",
        "-S",
        "sae.checkpoint_every=100",
    ]
}

/// Polls `ok` every 200 ms; fails naming `what` after 5 minutes.
fn wait_for(what: &str, ok: &dyn Fn() -> bool) {
    let started = Instant::now();
    while !ok() {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "never: {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether the submitted `sae` job is running and has written a checkpoint into the cache's partial work.
fn training_checkpointed(cache: &Path) -> bool {
    job_of(cache, "sae").is_some_and(|job| job_state(&job) == "RUNNING")
        && walk_has_files(&cache.join("partial"))
}

fn job_state(job: &str) -> String {
    let out = Command::new("squeue")
        .args(["-h", "-o", "%T", "-j", job])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
#[cfg_attr(
    missing = "slurm",
    ignore = "needs Slurm (scripts/slurm-local.sh start)"
)]
fn scancel_of_a_training_job_then_rerun_resumes_from_its_checkpoint() {
    cluster();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path();
    let args = long_training("sae.k=8");
    let submitter = saeflow(cache, &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("a training checkpoint", &|| training_checkpointed(cache));
    let job = job_of(cache, "sae").unwrap();
    // `status` shows the queued/running job beside the instance.
    let mut status_args = vec!["status", "pipelines/quickstart.toml"];
    status_args.extend(&args[5..]);
    let status = saeflow(cache, &status_args).output().unwrap();
    assert!(
        text(&status).contains(&format!("slurm job {job}: RUNNING")),
        "{}",
        text(&status)
    );
    let cancel = Command::new("scancel").arg(&job).output().unwrap();
    assert!(cancel.status.success(), "{}", text(&cancel));
    let out = submitter.wait_with_output().unwrap();
    let log = text(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains("FAILED sae: job"), "{log}");

    let out = saeflow(cache, &args).output().unwrap();
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    let job = job_of(cache, "sae").unwrap();
    let job_log = std::fs::read_to_string(
        cache
            .join("slurm/logs")
            .join(format!("quickstart-sae-{job}.out")),
    )
    .unwrap();
    let step: u64 = job_log
        .split("resuming from the checkpoint at step ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("the rerun must resume from a checkpoint:\n{job_log}"));
    assert!(step >= 100, "resumed at step {step}");
    println!("scancel'd training resumed at step {step}");
}

fn walk_has_files(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok).any(|e| {
                let p = e.path();
                if p.is_dir() {
                    walk_has_files(&p)
                } else {
                    true
                }
            })
        })
        .unwrap_or(false)
}

#[test]
#[cfg_attr(
    missing = "slurm",
    ignore = "needs Slurm (scripts/slurm-local.sh start)"
)]
fn a_requeued_job_resumes_and_ctrl_c_cancels_what_was_submitted() {
    cluster();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path();
    let args = long_training("sae.k=16");
    let submitter = saeflow(cache, &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let job = || job_of(cache, "sae").unwrap_or_default();
    let log = || {
        std::fs::read_to_string(
            cache
                .join("slurm/logs")
                .join(format!("quickstart-sae-{}.out", job())),
        )
        .unwrap_or_default()
    };
    wait_for("a training checkpoint", &|| training_checkpointed(cache));
    // Preemption as the scheduler does it: the job goes back to the queue and runs again.
    let requeue = Command::new("scontrol")
        .args(["requeue", &job()])
        .output()
        .unwrap();
    assert!(requeue.status.success(), "{}", text(&requeue));
    wait_for("the requeued job to resume", &|| {
        log().contains("resuming from the checkpoint at step")
    });
    // Ctrl-C on the submitter cancels the jobs it submitted.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(submitter.id() as i32, libc::SIGINT) };
    let out = submitter.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));
    assert!(text(&out).contains("scancel"), "{}", text(&out));
    wait_for("the job to leave the queue", &|| {
        job_state(&job()).is_empty()
    });
}
