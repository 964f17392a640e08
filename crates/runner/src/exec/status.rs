//! Whether each instance is cached, stale (and why) or missing.

use petgraph::graph::NodeIndex;

use crate::cache::Cache;
use crate::plan::{key, Plan};

/// The state of one instance against the cache.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    /// An object exists for the current key in the local cache.
    Cached,
    /// Only the remote cache has an object for the current key (a run pulls it).
    Remote,
    /// An earlier run exists under another key; the reasons say what changed.
    Stale(Vec<String>),
    /// Never run.
    Missing,
}

/// Computes an instance's state.
pub fn state(plan: &Plan, cache: &Cache, n: NodeIndex) -> State {
    let inst = plan.instance(n);
    if cache.has_object(&inst.key) {
        return State::Cached;
    }
    if cache
        .remote()
        .is_some_and(|r| r.has_object(&inst.key).unwrap_or(false))
    {
        return State::Remote;
    }
    match cache.read_ref(&plan.pipeline.header.name, &inst.name) {
        Some(r) => State::Stale(reasons(plan, n, &r.preimage)),
        None => State::Missing,
    }
}

/// What changed between the last run's key preimage and the current one, in words.
pub fn reasons(plan: &Plan, n: NodeIndex, old: &serde_json::Value) -> Vec<String> {
    let inst = plan.instance(n);
    let mut out = Vec::new();
    for line in key::diff(old, &inst.preimage) {
        let explained = match line.split_once(':') {
            Some((path, _)) if path.starts_with("inputs.") => {
                let role = &path["inputs.".len()..];
                match inst.inputs.get(role) {
                    Some(&up) => format!(
                        "input `{role}` changed (upstream {} has a new key)",
                        plan.instance(up).name
                    ),
                    None => line.clone(),
                }
            }
            Some((path, _)) if path.starts_with("files.") => {
                format!("{} content changed", &path["files.".len()..])
            }
            Some((path, _)) if path.starts_with("models.") => format!("model {line}"),
            Some(("version", _)) => format!("stage implementation {line}"),
            _ => line.clone(),
        };
        out.push(explained);
    }
    if out.is_empty() {
        out.push("object missing from the cache (removed by gc or by hand)".into());
    }
    out
}
