//! Executing a plan on this machine: ready instances run in dependency order, independent ones in parallel.
//!
//! For each instance: if its object exists, it is cached. Otherwise take the key's lock (another process may
//! be computing it: wait, then reuse its result), run the stage into a fresh temp directory and publish it.
//! A failure skips the instance's dependents and keeps everything else; cancellation stops scheduling, lets
//! running stages stop cooperatively, and keeps their partial work.

pub mod progress;
pub mod status;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc;
use std::time::Instant;

use petgraph::graph::NodeIndex;
use petgraph::Direction;

use crate::cache::{now_ms, Cache, Manifest, RefRecord};
use crate::config::resolve_path;
use crate::plan::Plan;
use crate::stages::{Cancel, Cancelled, Registry, StageContext};
pub use progress::{Progress, Reporter};

/// Executor settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Maximum number of stages running at once.
    pub jobs: usize,
    /// Only run these instances (by stage or instance name) and what they need; empty means all.
    pub targets: Vec<String>,
}

/// What happened to each instance.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Instances computed by this run.
    pub computed: Vec<String>,
    /// Instances whose result was already in the cache (or computed meanwhile by another run).
    pub cached: Vec<String>,
    /// Instances that failed, with the error.
    pub failed: Vec<(String, String)>,
    /// Instances not run because something upstream failed or the run was cancelled.
    pub skipped: Vec<String>,
    /// Whether the run was cancelled.
    pub cancelled: bool,
}

enum Done {
    Computed,
    Cached,
}

/// Instances to run: the targets and all their ancestors (everything when there are no targets).
pub fn selection(plan: &Plan, targets: &[String]) -> Result<BTreeSet<NodeIndex>, String> {
    if targets.is_empty() {
        return Ok(plan.order.iter().copied().collect());
    }
    let mut selected = BTreeSet::new();
    for t in targets {
        let nodes = plan.select_named(t)?;
        let mut stack = nodes;
        while let Some(n) = stack.pop() {
            if selected.insert(n) {
                stack.extend(plan.graph.neighbors_directed(n, Direction::Incoming));
            }
        }
    }
    Ok(selected)
}

/// Runs the plan.
pub fn run(
    plan: &Plan,
    registry: &Registry,
    cache: &Cache,
    options: &Options,
    cancel: &Cancel,
    reporter: &Reporter,
) -> Result<Outcome, String> {
    let selected = selection(plan, &options.targets)?;
    let pipeline_name = plan.pipeline.header.name.as_str();
    let mut outcome = Outcome::default();
    let mut waiting: BTreeMap<NodeIndex, usize> = BTreeMap::new();
    for &n in &plan.order {
        if selected.contains(&n) {
            waiting.insert(
                n,
                plan.graph
                    .neighbors_directed(n, Direction::Incoming)
                    .count(),
            );
        }
    }
    let mut ready: Vec<NodeIndex> = plan
        .order
        .iter()
        .copied()
        .filter(|n| waiting.get(n) == Some(&0))
        .collect();
    let mut blocked: BTreeSet<NodeIndex> = BTreeSet::new();
    let mut running = 0usize;
    let (tx, rx) = mpsc::channel::<(NodeIndex, Result<Done, anyhow::Error>)>();

    let record = |n: NodeIndex| {
        let inst = plan.instance(n);
        let unchanged = cache
            .read_ref(pipeline_name, &inst.name)
            .is_some_and(|r| r.key == inst.key.0);
        if unchanged {
            return Ok(());
        }
        cache.write_ref(
            pipeline_name,
            &RefRecord {
                instance: inst.name.clone(),
                key: inst.key.0.clone(),
                preimage: inst.preimage.clone(),
            },
        )
    };

    std::thread::scope(|scope| {
        loop {
            // Launch what is ready, in plan order; cached instances finish inline without a thread.
            while !ready.is_empty() && running < options.jobs.max(1) && !cancel.is_cancelled() {
                let n = ready.remove(0);
                if cache.has_object(&plan.instance(n).key) {
                    tx.send((n, Ok(Done::Cached))).expect("receiver alive");
                    running += 1;
                    continue;
                }
                running += 1;
                let tx = tx.clone();
                scope.spawn(move || {
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        compute(plan, registry, cache, n, cancel, reporter)
                    }))
                    .unwrap_or_else(|panic| {
                        let msg = panic
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default();
                        Err(anyhow::anyhow!("internal error (panic): {msg}"))
                    });
                    let _ = tx.send((n, result));
                });
            }
            if running == 0 {
                break;
            }
            let (n, result) = rx.recv().expect("a running stage always reports");
            running -= 1;
            let name = plan.instance(n).name.clone();
            match result {
                Ok(done) => {
                    if let Err(e) = record(n) {
                        outcome.failed.push((name, format!("{e:#}")));
                        block_descendants(plan, n, &mut blocked);
                        continue;
                    }
                    match done {
                        Done::Computed => outcome.computed.push(name),
                        Done::Cached => outcome.cached.push(name),
                    }
                    for child in plan.graph.neighbors_directed(n, Direction::Outgoing) {
                        if let Some(count) = waiting.get_mut(&child) {
                            *count -= 1;
                            if *count == 0 && !blocked.contains(&child) {
                                ready.push(child);
                            }
                        }
                    }
                    ready.sort_by_key(|c| plan.order.iter().position(|o| o == c));
                }
                Err(e) if e.downcast_ref::<Cancelled>().is_some() => {
                    outcome.cancelled = true;
                    reporter.println(&format!("stopped {name} (partial work kept)"));
                    block_descendants(plan, n, &mut blocked);
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    reporter.println(&format!("FAILED {name}: {msg}"));
                    outcome.failed.push((name, msg));
                    block_descendants(plan, n, &mut blocked);
                }
            }
        }
    });
    outcome.cancelled |= cancel.is_cancelled();
    let done: BTreeSet<&String> = outcome
        .computed
        .iter()
        .chain(&outcome.cached)
        .chain(outcome.failed.iter().map(|(n, _)| n))
        .collect();
    for &n in &plan.order {
        let name = &plan.instance(n).name;
        if selected.contains(&n) && !done.contains(name) {
            outcome.skipped.push(name.clone());
        }
    }
    Ok(outcome)
}

fn block_descendants(plan: &Plan, n: NodeIndex, blocked: &mut BTreeSet<NodeIndex>) {
    let mut stack = vec![n];
    while let Some(n) = stack.pop() {
        for child in plan.graph.neighbors_directed(n, Direction::Outgoing) {
            if blocked.insert(child) {
                stack.push(child);
            }
        }
    }
}

/// Computes one instance under its key lock and publishes it.
fn compute(
    plan: &Plan,
    registry: &Registry,
    cache: &Cache,
    n: NodeIndex,
    cancel: &Cancel,
    reporter: &Reporter,
) -> anyhow::Result<Done> {
    let inst = plan.instance(n);
    let Some(_lock) = cache.lock(&inst.key, cancel, |holder| {
        reporter.println(&format!(
            "waiting for {}: {holder} is computing it",
            inst.name
        ))
    })?
    else {
        return Err(Cancelled.into());
    };
    if cache.has_object(&inst.key) {
        return Ok(Done::Cached);
    }
    let kind = registry.get(&inst.kind).expect("kinds were validated");
    let mut inputs = BTreeMap::new();
    for (role, &up) in &inst.inputs {
        let key = &plan.instance(up).key;
        cache.check_sizes(key)?;
        inputs.insert(role.clone(), cache.object_dir(key));
    }
    let pipeline = &plan.pipeline;
    let models = inst
        .models
        .iter()
        .map(|m| {
            let mut spec = pipeline.models[m].clone();
            spec.path = spec
                .path
                .map(|p| resolve_path(&pipeline.workdir, &p).display().to_string());
            (m.clone(), spec)
        })
        .collect();
    let model_keys = inst
        .models
        .iter()
        .map(|m| {
            let id = &inst.preimage["models"][m];
            (m.clone(), crate::plan::key::key_of(id).to_string())
        })
        .collect();
    let tmp = cache.new_tmp_dir(&inst.key)?;
    let progress = reporter.stage(&inst.name);
    let mut ctx = StageContext {
        instance: inst.name.clone(),
        inputs,
        models,
        model_keys,
        out_dir: tmp.clone(),
        partial_dir: cache.partial_dir(&inst.key)?,
        log_path: cache.log_path(&inst.key),
        downloads_dir: cache.root().join("downloads"),
        workdir: pipeline.workdir.clone(),
        device: pipeline.header.device,
        seed: pipeline.header.seed,
        progress: progress.clone(),
        cancel: cancel.clone(),
        metrics: Default::default(),
    };
    reporter.println(&format!("running {} ({})", inst.name, inst.key.short()));
    let started = now_ms();
    let clock = Instant::now();
    let result = kind.run(&inst.params, &mut ctx);
    progress.finish();
    let publish = result.and_then(|()| {
        let manifest = Manifest {
            key: inst.key.0.clone(),
            kind: inst.kind.clone(),
            version: kind.version(),
            instance: inst.name.clone(),
            params: inst.params.clone(),
            inputs: inst
                .inputs
                .iter()
                .map(|(r, &u)| (r.clone(), plan.instance(u).key.0.clone()))
                .collect(),
            outputs: Vec::new(),
            started_unix_ms: started,
            finished_unix_ms: now_ms(),
            metrics: std::mem::take(&mut ctx.metrics),
            saeflow_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        cache.publish(&tmp, manifest)
    });
    if let Err(e) = publish {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    reporter.println(&format!(
        "done {} in {:.1}s",
        inst.name,
        clock.elapsed().as_secs_f64()
    ));
    Ok(Done::Computed)
}
