//! Chaos on the real quickstart pipeline (dataset → capture → 3-member training sweep → label, eval,
//! steer): SIGKILL inside every stage kind, SIGINT and SIGTERM, a flipped byte in a published capture, and
//! four runs at once on one cache. Each time the published artifacts must be byte-identical to an
//! uninterrupted run's, and every key computed once.
//!
//! `SAEFLOW_CHAOS_KILLS=N` adds N kills at random moments (seed printed) to the targeted ones; RELIABILITY.md
//! records a long run (`SAEFLOW_CHAOS_KILLS=40 cargo test --release --test chaos -- --nocapture`).
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{published_outputs, text};

const PIPELINE: &str = "pipelines/quickstart.toml";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn saeflow(cache: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_saeflow"));
    c.current_dir(repo())
        .env_remove("SAEFLOW_LOG")
        .args(["run", "-j", "2", "--cache"])
        .arg(cache)
        .arg(PIPELINE)
        .args(extra);
    c
}

fn run_to_end(cache: &Path, extra: &[&str]) -> String {
    let out = saeflow(cache, extra).output().unwrap();
    assert!(out.status.success(), "run failed:\n{}", text(&out));
    text(&out)
}

/// An uninterrupted run: its artifacts' hashes, and which instance each key belongs to.
struct Reference {
    outputs: BTreeMap<String, String>,
    instance_of: BTreeMap<String, String>,
    took: Duration,
}

fn reference() -> &'static Reference {
    static REFERENCE: OnceLock<Reference> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let started = Instant::now();
        run_to_end(&dir, &[]);
        let took = started.elapsed();
        let mut instance_of = BTreeMap::new();
        for entry in std::fs::read_dir(dir.join("objects")).unwrap() {
            let path = entry.unwrap().path();
            let m: serde_json::Value =
                serde_json::from_slice(&std::fs::read(path.join("manifest.json")).unwrap())
                    .unwrap();
            instance_of.insert(
                m["key"].as_str().unwrap().to_string(),
                m["instance"].as_str().unwrap().to_string(),
            );
        }
        assert_eq!(instance_of.len(), 14, "{instance_of:?}");
        let outputs = published_outputs(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        println!("uninterrupted quickstart: {took:?}");
        Reference {
            outputs,
            instance_of,
            took,
        }
    })
}

/// The stage kinds (instance name up to `[`) that process `pid` is computing right now: their temp
/// directories `tmp/<key>.<pid>.<n>` exist (a killed run's stay behind until `gc`).
fn in_flight(cache: &Path, pid: u32, reference: &Reference) -> BTreeSet<String> {
    let Ok(entries) = std::fs::read_dir(cache.join("tmp")) else {
        return BTreeSet::new();
    };
    entries
        .filter_map(|e| {
            let name = e.ok()?.file_name().to_string_lossy().into_owned();
            let mut parts = name.split('.');
            let key = parts.next()?;
            if parts.next()? != pid.to_string() {
                return None;
            }
            let instance = reference.instance_of.get(key)?;
            Some(instance.split('[').next().unwrap().to_string())
        })
        .collect()
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

fn assert_cache_clean(cache: &Path, when: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_saeflow"))
        .args(["cache", "verify", "--cache"])
        .arg(cache)
        .output()
        .unwrap();
    assert!(out.status.success(), "{when}: {}", text(&out));
    for entry in std::fs::read_dir(cache.join("objects")).unwrap() {
        let dir = entry.unwrap().path();
        assert!(
            dir.join("manifest.json").is_file(),
            "{when}: half-published {dir:?}"
        );
    }
}

/// Starts a run and, once a stage of `kind` is being computed (or at once for `None`), waits `delay` and
/// delivers `sig`. Returns what was in flight at that moment and the run's output, or `None` if the run
/// finished first.
fn interrupt(
    cache: &Path,
    kind: Option<&str>,
    delay: Duration,
    sig: i32,
    reference: &Reference,
) -> Option<(BTreeSet<String>, Output)> {
    let mut child = saeflow(cache, &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(kind) = kind {
        while !in_flight(cache, child.id(), reference).contains(kind) {
            if child.try_wait().unwrap().is_some() {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    std::thread::sleep(delay);
    let flying = in_flight(cache, child.id(), reference);
    if child.try_wait().unwrap().is_some() {
        return None;
    }
    signal(&child, sig);
    Some((flying, child.wait_with_output().unwrap()))
}

#[test]
fn kills_and_signals_in_every_stage_leave_artifacts_identical_to_an_uninterrupted_run() {
    let reference = reference();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path();
    let mut killed_in: BTreeMap<String, usize> = BTreeMap::new();
    let (mut kills, mut restarts) = (0usize, 0usize);
    let mut note = |flying: &BTreeSet<String>| {
        for k in flying {
            *killed_in.entry(k.clone()).or_default() += 1;
        }
    };
    // Targeted: signals inside each stage kind in pipeline order, each run resuming the last. SIGINT and
    // SIGTERM must stop cleanly (exit 130, "partial work kept"); SIGKILL gives no chance to clean up.
    let seed = 0x5eed ^ u64::from(std::process::id());
    println!("kill-moment seed {seed}");
    let mut rng = common::Rng(seed | 1);
    let mut clean_stops = 0;
    for (kind, sig) in [
        ("acts", libc::SIGKILL),
        ("acts", libc::SIGTERM),
        ("sae", libc::SIGKILL),
        ("sae", libc::SIGINT),
        ("labels", libc::SIGKILL),
        ("labels", libc::SIGTERM),
        ("eval", libc::SIGKILL),
        ("steer", libc::SIGKILL),
        ("steer", libc::SIGINT),
    ] {
        let delay = Duration::from_secs_f64(0.05 + 0.5 * rng.next_f64());
        let Some((flying, out)) = interrupt(cache, Some(kind), delay, sig, reference) else {
            continue;
        };
        if sig == libc::SIGKILL {
            assert_eq!(out.status.code(), None, "killed by signal");
            kills += 1;
            note(&flying);
        } else {
            assert_eq!(out.status.code(), Some(130), "signal {sig}: {}", text(&out));
            // Stages that poll for cancellation stop at once ("partial work kept"); others finish first.
            assert!(
                !text(&out).contains("FAILED"),
                "signal {sig}: {}",
                text(&out)
            );
            clean_stops += 1;
        }
        assert_cache_clean(cache, &format!("after signal {sig} in {kind}"));
    }
    // Random: kill moments uniform over an uninterrupted run's length; a run that finishes first starts
    // over from an empty cache so later kills land in stages again.
    let extra: usize = std::env::var("SAEFLOW_CHAOS_KILLS")
        .ok()
        .map_or(0, |v| v.parse().expect("SAEFLOW_CHAOS_KILLS is a number"));
    let mut random = 0;
    while random < extra {
        let delay = reference.took.mul_f64(rng.next_f64());
        match interrupt(cache, None, delay, libc::SIGKILL, reference) {
            Some((flying, _)) => {
                random += 1;
                kills += 1;
                note(&flying);
                assert_cache_clean(cache, &format!("after random SIGKILL at {delay:?}"));
            }
            None => {
                restarts += 1;
                assert_eq!(published_outputs(cache), reference.outputs);
                std::fs::remove_dir_all(cache).unwrap();
            }
        }
    }
    let out = run_to_end(cache, &[]);
    assert!(out.contains("0 failed"), "{out}");
    assert_eq!(published_outputs(cache), reference.outputs);

    println!(
        "{kills} SIGKILLs (in flight: {killed_in:?}), {clean_stops} SIGINT/SIGTERM stops, {restarts} runs \
         finished before their kill; artifacts identical"
    );
    assert!(clean_stops >= 3, "most clean stops must land in a stage");
    for kind in ["acts", "sae", "labels", "eval", "steer"] {
        assert!(
            killed_in.contains_key(kind),
            "no kill landed in {kind}: {killed_in:?}"
        );
    }
}

fn object_of_instance(cache: &Path, reference: &Reference, instance: &str) -> PathBuf {
    let key = reference
        .instance_of
        .iter()
        .find(|(_, i)| *i == instance)
        .unwrap()
        .0;
    cache.join("objects").join(key)
}

#[test]
fn a_flipped_byte_in_a_capture_is_caught_and_its_producer_rerun() {
    let reference = reference();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path();
    run_to_end(cache, &["eval"]);
    let acts = object_of_instance(cache, reference, "acts");
    let shard = std::fs::read_dir(&acts)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| p.metadata().unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&shard).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(&shard, &bytes).unwrap();

    let verify = Command::new(env!("CARGO_BIN_EXE_saeflow"))
        .args(["cache", "verify", "--cache"])
        .arg(cache)
        .output()
        .unwrap();
    assert_eq!(verify.status.code(), Some(1), "{}", text(&verify));
    assert!(text(&verify).contains("has blake3"), "{}", text(&verify));

    // Every eval reads the capture; drop one so the next run must read it again.
    std::fs::remove_dir_all(object_of_instance(cache, reference, "eval[sae.k=8]")).unwrap();
    let out = run_to_end(cache, &["eval"]);
    assert!(
        out.contains("the output of acts is damaged"),
        "the reader must notice: {out}"
    );
    assert!(
        out.contains("done acts"),
        "the capture is recomputed: {out}"
    );
    assert_eq!(
        std::fs::read_dir(cache.join("quarantine")).unwrap().count(),
        1
    );
    assert_cache_clean(cache, "after the repair");
    let want: BTreeMap<_, _> = reference
        .outputs
        .iter()
        .filter(|(k, _)| !k.starts_with("labels") && !k.starts_with("steer"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(published_outputs(cache), want);
}

#[test]
fn four_runs_at_once_two_of_them_overlapping_sweeps_compute_each_key_once() {
    let reference = reference();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path();
    let runs: [&[&str]; 4] = [&[], &[], &["-S", "sae.k=4,8"], &["-S", "sae.k=8,16"]];
    let children: Vec<_> = runs
        .iter()
        .map(|extra| {
            saeflow(cache, extra)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut computed: BTreeMap<String, usize> = BTreeMap::new();
    for (extra, child) in runs.iter().zip(children) {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{extra:?}: {}", text(&out));
        for line in text(&out).lines() {
            if let Some(rest) = line.strip_prefix("done ") {
                let name = rest.rsplit_once(" in ").unwrap().0;
                *computed.entry(name.to_string()).or_default() += 1;
            }
        }
    }
    let all: BTreeSet<&String> = reference.instance_of.values().collect();
    assert_eq!(computed.keys().collect::<BTreeSet<_>>(), all);
    assert!(
        computed.values().all(|&n| n == 1),
        "computed more than once: {computed:?}"
    );
    assert_cache_clean(cache, "after four concurrent runs");
    assert_eq!(published_outputs(cache), reference.outputs);
}
