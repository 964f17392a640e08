//! Executing a plan on this machine: ready instances run in dependency order, independent ones in parallel.
//!
//! For each instance: if its object exists, it is cached. Otherwise take the key's lock (another process may
//! be computing it: wait, then reuse its result), run the stage into a fresh temp directory and publish it.
//! A failure skips the instance's dependents and keeps everything else; cancellation stops scheduling, lets
//! running stages stop cooperatively, and keeps their partial work. Inputs are re-hashed before a stage reads
//! them; a damaged one is moved to quarantine and its producer recomputed before the reader runs.

pub mod slurm;
pub mod status;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::mpsc;
use std::time::Instant;

use petgraph::graph::NodeIndex;
use petgraph::Direction;

use crate::cache::remote::{Pulled, RemoteLock};
use crate::cache::{now_ms, Cache, Key, Manifest, RefRecord};
use crate::plan::Plan;
use crate::stage::{PartialSync, Registry, StageContext};
use saeflow_core::cancel::{Cancel, Cancelled};
use saeflow_core::fs::resolve_path;
use saeflow_core::progress::Reporter;

/// Executor settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Maximum number of stages running at once.
    pub jobs: usize,
    /// Only run these instances (by stage or instance name) and what they need; empty means all.
    pub targets: Vec<String>,
    /// Run instances that only differ in groupable parameters (see `Stage::GROUPABLE`) as one group.
    pub group: bool,
}

/// What happened to each instance.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Instances computed by this run.
    pub computed: Vec<String>,
    /// Instances whose result was already in the cache (or computed meanwhile by another run).
    pub cached: Vec<String>,
    /// Of those, the ones brought from the remote cache.
    pub pulled: Vec<String>,
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
    /// Cached on the remote, now pulled into the local cache.
    Pulled,
}

/// An input object failed its check as a stage was about to read it (it has been quarantined).
#[derive(Debug)]
struct DamagedInput {
    producer: NodeIndex,
    problems: Vec<String>,
}

impl std::fmt::Display for DamagedInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "input damaged: {}", self.problems.join("; "))
    }
}

impl std::error::Error for DamagedInput {}

/// Whether an error comes from a full disk (or quota), anywhere in its chain.
fn is_no_space(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            .is_some_and(|code| code == libc::ENOSPC || code == libc::EDQUOT)
            || c.to_string().contains("No space left on device")
    })
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
    // Before any key is looked up, so `gc` keeps every object this run reads (see `cache/lease.rs`).
    let _lease = cache
        .lease(plan.order.iter().map(|&n| &plan.instance(n).key))
        .map_err(|e| format!("{e:#}"))?;
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
    // Position of each node in the plan order: the ready set is ordered by it, so instances launch in plan
    // order without re-sorting (or searching `plan.order`) on every step.
    let mut position = vec![0usize; plan.graph.node_count()];
    for (i, &n) in plan.order.iter().enumerate() {
        position[n.index()] = i;
    }
    let group_keys: Vec<Option<String>> = if options.group {
        plan.order
            .iter()
            .map(|&n| {
                if selected.contains(&n) {
                    group_key(plan, registry, n)
                } else {
                    None
                }
            })
            .collect()
    } else {
        vec![None; plan.order.len()]
    };
    let mut ready = Ready::new(group_keys);
    for (i, &n) in plan.order.iter().enumerate() {
        if waiting.get(&n) == Some(&0) {
            ready.push(i);
        }
    }
    let mut blocked: BTreeSet<NodeIndex> = BTreeSet::new();
    // Producers being recomputed because a reader found their object damaged, with the readers waiting;
    // then those recomputed (a second failure of the same object is an error, not a loop).
    let mut repairing: BTreeMap<NodeIndex, Vec<NodeIndex>> = BTreeMap::new();
    let mut repaired: BTreeSet<NodeIndex> = BTreeSet::new();
    let mut running = 0usize;
    // One message per launched group (a lone instance is a group of one): each member's result.
    let (tx, rx) = mpsc::channel::<Vec<(NodeIndex, Result<Done, anyhow::Error>)>>();

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
            while running < options.jobs.max(1) && !cancel.is_cancelled() {
                let Some(i) = ready.pop() else { break };
                let n = plan.order[i];
                running += 1;
                let key = &plan.instance(n).key;
                if cache.has_object(key) {
                    match cache.check_sizes(key) {
                        Ok(()) => {
                            tx.send(vec![(n, Ok(Done::Cached))])
                                .expect("receiver alive");
                            continue;
                        }
                        Err(e) => {
                            reporter.alert(&format!(
                                "{}: cached result damaged ({e:#}); moving it to quarantine and recomputing",
                                plan.instance(n).name
                            ));
                            if let Err(e) = cache.quarantine(key) {
                                tx.send(vec![(n, Err(e))]).expect("receiver alive");
                                continue;
                            }
                        }
                    }
                }
                let mut group = vec![n];
                group.extend(
                    ready
                        .take_group(i, |m| !cache.has_object(&plan.instance(plan.order[m]).key))
                        .into_iter()
                        .map(|m| plan.order[m]),
                );
                let position = &position;
                let tx = tx.clone();
                scope.spawn(move || {
                    let results = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        compute_group(plan, registry, cache, &group, position, cancel, reporter)
                    }))
                    .unwrap_or_else(|panic| {
                        let msg = panic
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default();
                        group
                            .iter()
                            .map(|&m| (m, Err(anyhow::anyhow!("internal error (panic): {msg}"))))
                            .collect()
                    });
                    let _ = tx.send(results);
                });
            }
            if running == 0 {
                break;
            }
            let results = rx.recv().expect("a running group always reports");
            running -= 1;
            for (n, result) in results {
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
                            Done::Pulled => {
                                outcome.pulled.push(name.clone());
                                outcome.cached.push(name);
                            }
                        }
                        if let Some(readers) = repairing.remove(&n) {
                            repaired.insert(n);
                            for r in readers.into_iter().filter(|r| !blocked.contains(r)) {
                                ready.push(position[r.index()]);
                            }
                            continue;
                        }
                        for child in plan.graph.neighbors_directed(n, Direction::Outgoing) {
                            if let Some(count) = waiting.get_mut(&child) {
                                *count -= 1;
                                if *count == 0 && !blocked.contains(&child) {
                                    ready.push(position[child.index()]);
                                }
                            }
                        }
                    }
                    Err(e) if e.downcast_ref::<Cancelled>().is_some() => {
                        outcome.cancelled = true;
                        reporter.println(&format!("stopped {name} (partial work kept)"));
                        block_descendants(plan, n, &mut blocked);
                    }
                    Err(e)
                        if e.downcast_ref::<DamagedInput>()
                            .is_some_and(|d| !repaired.contains(&d.producer)) =>
                    {
                        let damaged = e.downcast_ref::<DamagedInput>().expect("matched");
                        let producer = damaged.producer;
                        if let Some(readers) = repairing.get_mut(&producer) {
                            readers.push(n);
                            continue;
                        }
                        let producer_name = &plan.instance(producer).name;
                        reporter.alert(&format!(
                            "{name}: the output of {producer_name} is damaged ({}); moved it to quarantine, recomputing it",
                            damaged.problems.join("; ")
                        ));
                        outcome.cached.retain(|c| c != producer_name);
                        outcome.computed.retain(|c| c != producer_name);
                        repairing.insert(producer, vec![n]);
                        ready.push(position[producer.index()]);
                    }
                    Err(e) => {
                        let mut msg = format!("{e:#}");
                        if is_no_space(&e) {
                            msg = format!(
                                "no space left on the cache's filesystem ({}): free space and rerun; finished stages are kept. {msg}",
                                cache.root().display()
                            );
                        }
                        reporter.alert(&format!("FAILED {name}: {msg}"));
                        outcome.failed.push((name, msg));
                        block_descendants(plan, n, &mut blocked);
                        repairing.remove(&n);
                    }
                }
            }
        }
    });
    outcome.cancelled |= cancel.is_cancelled();
    if cache.remote().is_some() && !cancel.is_cancelled() {
        push_cached(plan, cache, &mut outcome, reporter);
    }
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

/// Instances ready to launch, by plan position (smallest first), with an index of the groupable ones by
/// group key so a launch finds its group without scanning everything ready.
struct Ready {
    set: BTreeSet<usize>,
    keys: Vec<Option<String>>,
    groups: HashMap<String, BTreeSet<usize>>,
}

impl Ready {
    fn new(keys: Vec<Option<String>>) -> Self {
        Self {
            set: BTreeSet::new(),
            keys,
            groups: HashMap::new(),
        }
    }

    fn push(&mut self, i: usize) {
        self.set.insert(i);
        if let Some(k) = &self.keys[i] {
            self.groups.entry(k.clone()).or_default().insert(i);
        }
    }

    fn remove_from_group(&mut self, i: usize) {
        if let Some(k) = &self.keys[i] {
            if let Some(g) = self.groups.get_mut(k) {
                g.remove(&i);
                if g.is_empty() {
                    self.groups.remove(k);
                }
            }
        }
    }

    /// The first ready instance in plan order.
    fn pop(&mut self) -> Option<usize> {
        let i = self.set.pop_first()?;
        self.remove_from_group(i);
        Some(i)
    }

    /// Takes the ready instances with the same group key as `i` (just popped) that `eligible` accepts, in
    /// plan order; the others stay ready.
    fn take_group(&mut self, i: usize, eligible: impl Fn(usize) -> bool) -> Vec<usize> {
        let Some(k) = self.keys[i].clone() else {
            return Vec::new();
        };
        let Some(members) = self.groups.get(&k) else {
            return Vec::new();
        };
        let taken: Vec<usize> = members.iter().copied().filter(|&m| eligible(m)).collect();
        for &m in &taken {
            self.set.remove(&m);
            self.remove_from_group(m);
        }
        taken
    }
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

/// Instances whose kind declares groupable parameters run together when this key is equal: same kind,
/// same upstream objects, same models, same parameters apart from the groupable ones.
fn group_key(plan: &Plan, registry: &Registry, n: NodeIndex) -> Option<String> {
    let inst = plan.instance(n);
    let groupable = registry.get(&inst.kind)?.groupable();
    if groupable.is_empty() {
        return None;
    }
    let mut params = inst.params.clone();
    if let Some(table) = params.as_object_mut() {
        for name in groupable {
            table.remove(*name);
        }
    }
    let inputs: BTreeMap<&String, &String> = inst
        .inputs
        .iter()
        .map(|(role, &up)| (role, &plan.instance(up).key.0))
        .collect();
    Some(serde_json::json!([inst.kind, inputs, inst.models, params]).to_string())
}

/// An instance being computed: its context (whose `out_dir`, a temp directory, becomes its object).
struct Member {
    n: NodeIndex,
    ctx: StageContext,
    started: u64,
}

/// Computes a group of instances of one kind (usually one instance) under their key locks, runs them with
/// one `run_group` call and publishes each member on its own.
fn compute_group(
    plan: &Plan,
    registry: &Registry,
    cache: &Cache,
    group: &[NodeIndex],
    position: &[usize],
    cancel: &Cancel,
    reporter: &Reporter,
) -> Vec<(NodeIndex, anyhow::Result<Done>)> {
    let mut results = Vec::new();
    // Locks are taken in key order, so two processes grouping overlapping sets cannot deadlock.
    let mut order = group.to_vec();
    order.sort_by(|&a, &b| plan.instance(a).key.0.cmp(&plan.instance(b).key.0));
    let mut locks = Vec::new();
    let mut remote_locks: Vec<RemoteLock> = Vec::new();
    let mut members = Vec::new();
    for &n in &order {
        let inst = plan.instance(n);
        let lock = cache.lock(&inst.key, cancel, |holder| {
            reporter.println(&format!(
                "waiting for {}: {holder} is computing it",
                inst.name
            ))
        });
        match lock {
            Ok(Some(lock)) => locks.push(lock),
            Ok(None) => {
                results.push((n, Err(Cancelled.into())));
                continue;
            }
            Err(e) => {
                results.push((n, Err(e)));
                continue;
            }
        }
        if cache.has_object(&inst.key) {
            results.push((n, Ok(Done::Cached)));
            continue;
        }
        if cache.remote().is_some() {
            match remote_tier(cache, &inst.name, &inst.key, cancel, reporter) {
                Ok(Tier::Pulled) => {
                    results.push((n, Ok(Done::Pulled)));
                    continue;
                }
                Ok(Tier::Compute(lock)) => remote_locks.push(lock),
                Ok(Tier::Cancelled) => {
                    results.push((n, Err(Cancelled.into())));
                    continue;
                }
                Err(e) => {
                    results.push((n, Err(e)));
                    continue;
                }
            }
        }
        match prepare(plan, cache, n, cancel, reporter) {
            Ok(member) => members.push(member),
            Err(e) => results.push((n, Err(e))),
        }
    }
    // Members run in plan order (as they would one by one).
    members.sort_by_key(|m| position[m.n.index()]);
    if members.is_empty() {
        return results;
    }
    let kind = registry
        .get(&plan.instance(members[0].n).kind)
        .expect("kinds were validated");
    let names: Vec<&str> = members
        .iter()
        .map(|m| plan.instance(m.n).name.as_str())
        .collect();
    if members.len() > 1 {
        reporter.println(&format!(
            "running {} together (one group: shared inputs, one pass)",
            names.join(", ")
        ));
    } else {
        let inst = plan.instance(members[0].n);
        reporter.println(&format!("running {} ({})", inst.name, inst.key.short()));
    }
    let clock = Instant::now();
    let params: Vec<&serde_json::Value> =
        members.iter().map(|m| &plan.instance(m.n).params).collect();
    let mut ctxs: Vec<StageContext> = Vec::new();
    let mut rest = Vec::new();
    for m in members {
        ctxs.push(m.ctx);
        rest.push((m.n, m.started));
    }
    let outcomes = kind.run_group(&params, &mut ctxs);
    for ((ctx, (n, started)), result) in ctxs.into_iter().zip(rest).zip(outcomes) {
        ctx.progress.finish();
        let tmp = ctx.out_dir;
        let inst = plan.instance(n);
        let published = result.and_then(|()| {
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
                metrics: ctx.metrics,
                saeflow_version: env!("CARGO_PKG_VERSION").to_string(),
            };
            cache.publish(&tmp, manifest)?;
            push_computed(cache, &inst.key, &inst.name, reporter)
        });
        match published {
            Ok(()) => {
                reporter.println(&format!(
                    "done {} in {:.1}s",
                    inst.name,
                    clock.elapsed().as_secs_f64()
                ));
                results.push((n, Ok(Done::Computed)));
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                results.push((n, Err(e)));
            }
        }
    }
    // Remote locks go first: another machine may take the key once the object is on the remote.
    drop(remote_locks);
    drop(locks);
    results
}

/// What the remote tier decided for an instance missing here.
enum Tier {
    /// The remote had it; it is now in the local cache.
    Pulled,
    /// Nobody has it: compute it under this remote lock (partial work, if the remote had any, restored).
    Compute(RemoteLock),
    Cancelled,
}

/// Looks `key` up on the remote (pulling it, checked, if there), else takes its remote lock, looks again
/// (another machine may have published it meanwhile) and restores the remote's partial work into an
/// empty partial directory. A damaged remote object is quarantined there under the lock and recomputed.
fn remote_tier(
    cache: &Cache,
    name: &str,
    key: &Key,
    cancel: &Cancel,
    reporter: &Reporter,
) -> anyhow::Result<Tier> {
    let remote = cache.remote().expect("called with a remote");
    let mut lock: Option<RemoteLock> = None;
    loop {
        let progress = reporter.stage(name);
        progress.set_message("checking the remote cache");
        let pulled = remote.pull(cache, key, &progress);
        progress.finish();
        match pulled? {
            Pulled::Done(t) => {
                if t.bytes > 0 {
                    reporter.println(&format!(
                        "pulled {name} ({}) from {}: {} files, {:.1} MB, checked",
                        key.short(),
                        remote.url(),
                        t.files,
                        t.bytes as f64 / 1e6
                    ));
                }
                return Ok(Tier::Pulled);
            }
            Pulled::Missing => {}
            Pulled::Damaged {
                problems,
                bad_blobs,
            } => {
                if lock.is_some() {
                    reporter.alert(&format!(
                        "{name}: the remote's copy is damaged ({}); moved it to the remote's quarantine, recomputing it",
                        problems.join("; ")
                    ));
                    remote.quarantine(key, &bad_blobs)?;
                }
            }
        }
        if let Some(lock) = lock {
            restore_partial(cache, name, key, reporter)?;
            return Ok(Tier::Compute(lock));
        }
        let waiting = |holder: &str| {
            reporter.println(&format!("waiting for {name}: {holder} is computing it"))
        };
        match remote.lock(key, cancel, waiting, || {
            remote.has_object(key).unwrap_or(false)
        })? {
            Some(l) => lock = Some(l), // look again under the lock
            None if cancel.is_cancelled() => return Ok(Tier::Cancelled),
            None => {} // published elsewhere meanwhile: pull it
        }
    }
}

/// Brings the remote's partial work of `key` into the local partial directory when that is empty.
fn restore_partial(
    cache: &Cache,
    name: &str,
    key: &Key,
    reporter: &Reporter,
) -> anyhow::Result<()> {
    let remote = cache.remote().expect("called with a remote");
    let dir = cache.partial_dir(key)?;
    if std::fs::read_dir(&dir)?.next().is_some() {
        return Ok(()); // this machine's own partial work stands
    }
    match remote.restore_partial(key, &dir)? {
        Ok(t) => reporter.println(&format!(
            "resuming {name} from the partial work on {}: {} files, {:.1} MB",
            remote.url(),
            t.files,
            t.bytes as f64 / 1e6
        )),
        Err(why) if why == "none recorded" => {}
        Err(why) => reporter.alert(&format!(
            "{name}: the partial work on {} is unusable ({why}); starting over",
            remote.url()
        )),
    }
    Ok(())
}

/// After a local publish: sends the object to the remote and forgets the remote's partial work of it.
fn push_computed(cache: &Cache, key: &Key, name: &str, reporter: &Reporter) -> anyhow::Result<()> {
    let Some(remote) = cache.remote() else {
        return Ok(());
    };
    let progress = reporter.stage(name);
    progress.set_message(&format!("pushing to {}", remote.url()));
    let pushed = remote.push(cache, key, &progress);
    progress.finish();
    pushed.map_err(|e| {
        e.context(format!(
            "{name} is computed and kept in the local cache, but not on the remote; rerun to push it"
        ))
    })?;
    remote.drop_partial(key)
}

/// Results that were cached here but are missing on the remote (computed before the remote was added, or
/// by a run whose push failed) are pushed at the end of a run, checked first.
fn push_cached(plan: &Plan, cache: &Cache, outcome: &mut Outcome, reporter: &Reporter) {
    let remote = cache.remote().expect("called with a remote");
    let names: BTreeSet<&String> = outcome
        .cached
        .iter()
        .filter(|name| !outcome.pulled.contains(name))
        .collect();
    let mut failed = Vec::new();
    for &n in &plan.order {
        let inst = plan.instance(n);
        if !names.contains(&inst.name) || !cache.has_object(&inst.key) {
            continue;
        }
        let result = remote.has_object(&inst.key).and_then(|there| {
            if there {
                return Ok(false);
            }
            let problems = cache.verify_for_read(&inst.key);
            if !problems.is_empty() {
                anyhow::bail!(
                    "the local copy is damaged ({}); not pushed",
                    problems.join("; ")
                );
            }
            let progress = reporter.stage(&inst.name);
            progress.set_message(&format!("pushing to {}", remote.url()));
            let pushed = remote.push(cache, &inst.key, &progress);
            progress.finish();
            pushed.map(|_| true)
        });
        match result {
            Ok(true) => reporter.println(&format!("pushed {} to {}", inst.name, remote.url())),
            Ok(false) => {}
            Err(e) => {
                reporter.alert(&format!("FAILED pushing {}: {e:#}", inst.name));
                failed.push((inst.name.clone(), format!("{e:#}")));
            }
        }
    }
    outcome.failed.extend(failed);
}

/// The context of an instance about to run (under its lock, not cached).
fn prepare(
    plan: &Plan,
    cache: &Cache,
    n: NodeIndex,
    cancel: &Cancel,
    reporter: &Reporter,
) -> anyhow::Result<Member> {
    let inst = plan.instance(n);
    let mut inputs = BTreeMap::new();
    for (role, &up) in &inst.inputs {
        let key = &plan.instance(up).key;
        let problems = cache.verify_for_read(key);
        if !problems.is_empty() {
            cache.quarantine(key)?;
            return Err(DamagedInput {
                producer: up,
                problems,
            }
            .into());
        }
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
    let partial_dir = cache.partial_dir(&inst.key)?;
    let partial_sync = match cache.remote() {
        Some(remote) => {
            let mirror = crate::cache::remote::PartialMirror::new(remote, &inst.key, &partial_dir);
            PartialSync::new(move || mirror.sync())
        }
        None => PartialSync::default(),
    };
    let ctx = StageContext {
        instance: inst.name.clone(),
        inputs,
        models,
        model_keys,
        out_dir: tmp,
        partial_dir,
        partial_sync,
        log_path: cache.log_path(&inst.key),
        downloads_dir: cache.root().join("downloads"),
        workdir: pipeline.workdir.clone(),
        device: pipeline.header.device,
        seed: pipeline.header.seed,
        progress: reporter.stage(&inst.name),
        cancel: cancel.clone(),
        metrics: Default::default(),
    };
    Ok(Member {
        n,
        ctx,
        started: now_ms(),
    })
}
