//! The plan: stage instances (sweeps expanded) in a DAG, each with its action key.
//!
//! A sweep axis on stage `s` multiplies `s` and everything downstream of it; stages upstream of every axis
//! exist once and are shared. Each instance's key is computed from its kind, version, resolved parameters,
//! the keys of its inputs, the content hashes of external files it names, its models, and the seed.

pub mod filehash;
pub mod key;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use petgraph::graph::{DiGraph, NodeIndex};
use serde_json::{json, Value as Json};

use crate::cache::Key;
use crate::config::Pipeline;
use crate::stage::Registry;
pub use filehash::FileHasher;
use saeflow_core::fs::resolve_path;

/// One runnable stage instance.
#[derive(Debug, Clone)]
pub struct Instance {
    /// Display and ref name: the stage name, plus the sweep values it depends on, e.g. `sae[k=32]`.
    pub name: String,
    /// Stage name in the pipeline file.
    pub stage: String,
    /// Stage kind.
    pub kind: String,
    /// Resolved parameters.
    pub params: Json,
    /// Upstream instances by role.
    pub inputs: BTreeMap<String, NodeIndex>,
    /// Names of models used.
    pub models: Vec<String>,
    /// Everything the key is computed from.
    pub preimage: Json,
    /// The action key.
    pub key: Key,
}

/// All instances of a pipeline, as a DAG (edges point downstream), in a deterministic topological order.
#[derive(Debug)]
pub struct Plan {
    /// The validated pipeline.
    pub pipeline: Pipeline,
    /// Instances and data-flow edges.
    pub graph: DiGraph<Instance, ()>,
    /// Topological order (ties broken by stage order in the file, then sweep order).
    pub order: Vec<NodeIndex>,
}

/// Values assigned to the sweep axes an instance depends on, by axis index.
type Assignment = BTreeMap<usize, toml::Value>;

impl Plan {
    /// Expands sweeps and computes keys. External files are hashed through `hasher`.
    pub fn build(
        pipeline: Pipeline,
        registry: &Registry,
        hasher: &mut FileHasher,
    ) -> anyhow::Result<Self> {
        let stage_order = stage_topological_order(&pipeline);
        // Axes each stage depends on: its own plus its ancestors'.
        let mut relevant: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for name in &stage_order {
            let decl = &pipeline.stages[name];
            let mut axes: Vec<usize> = pipeline
                .axes
                .iter()
                .enumerate()
                .filter(|(_, a)| a.stage == *name)
                .map(|(i, _)| i)
                .collect();
            for r in &decl.references.inputs {
                axes.extend(relevant[r.target.as_str()].iter().copied());
            }
            axes.sort_unstable();
            axes.dedup();
            relevant.insert(name, axes);
        }

        let mut graph: DiGraph<Instance, ()> = DiGraph::new();
        let mut order = Vec::new();
        let mut index: BTreeMap<(String, Vec<(usize, String)>), NodeIndex> = BTreeMap::new();
        let mut file_hashes: BTreeMap<String, String> = BTreeMap::new();
        let mut model_hashes: BTreeMap<String, Json> = BTreeMap::new();

        for name in &stage_order {
            let decl = &pipeline.stages[name];
            let kind = registry.get(&decl.kind).expect("kinds were validated");
            for assignment in combinations(&pipeline, &relevant[name.as_str()]) {
                let mut table = decl.table.clone();
                for (axis, value) in &assignment {
                    if pipeline.axes[*axis].stage == *name {
                        crate::config::set_param(
                            &mut table,
                            &pipeline.axes[*axis].param,
                            value.clone(),
                        );
                    }
                }
                let params = kind
                    .resolve_value(toml::Value::Table(table))
                    .map_err(|m| anyhow::anyhow!("stage `{name}`: {m}"))?;
                let params = key::canonicalize(&params)
                    .map_err(|m| anyhow::anyhow!("stage `{name}`: {m}"))?;
                let refs = kind.references(&params);

                let mut inputs = BTreeMap::new();
                let mut input_keys = serde_json::Map::new();
                for r in &refs.inputs {
                    let upstream_assignment = restrict(&assignment, &relevant[r.target.as_str()]);
                    let node = index[&(r.target.clone(), assignment_id(&upstream_assignment))];
                    input_keys.insert(r.role.clone(), Json::String(graph[node].key.0.clone()));
                    inputs.insert(r.role.clone(), node);
                }
                let mut files = serde_json::Map::new();
                for r in &refs.files {
                    if !file_hashes.contains_key(&r.target) {
                        let h = hasher
                            .hash_pattern(&pipeline.workdir, &r.target)
                            .with_context(|| {
                                format!("stage `{name}`: dependency `{}`", r.target)
                            })?;
                        file_hashes.insert(r.target.clone(), h);
                    }
                    files.insert(
                        r.target.clone(),
                        Json::String(file_hashes[&r.target].clone()),
                    );
                }
                let mut models = serde_json::Map::new();
                for r in &refs.models {
                    if !model_hashes.contains_key(&r.target) {
                        model_hashes.insert(
                            r.target.clone(),
                            model_identity(&pipeline, &r.target, hasher)?,
                        );
                    }
                    models.insert(r.target.clone(), model_hashes[&r.target].clone());
                }
                let preimage = json!({
                    "kind": decl.kind,
                    "version": kind.version(),
                    "params": params,
                    "inputs": input_keys,
                    "files": files,
                    "models": models,
                    "seed": pipeline.header.seed,
                });
                let instance = Instance {
                    name: instance_name(&pipeline, name, &assignment),
                    stage: name.clone(),
                    kind: decl.kind.clone(),
                    params,
                    inputs: inputs.clone(),
                    models: refs.models.iter().map(|r| r.target.clone()).collect(),
                    key: key::key_of(&preimage),
                    preimage,
                };
                let node = graph.add_node(instance);
                for upstream in inputs.values() {
                    graph.update_edge(*upstream, node, ());
                }
                index.insert((name.clone(), assignment_id(&assignment)), node);
                order.push(node);
            }
        }
        hasher.save()?;
        Ok(Self {
            pipeline,
            graph,
            order,
        })
    }

    /// Instances with this stage or instance name; none is an error listing the stages.
    pub fn select_named(&self, name: &str) -> Result<Vec<NodeIndex>, String> {
        let nodes = self.select(name);
        if nodes.is_empty() {
            let names: Vec<&str> = self.pipeline.stages.keys().map(String::as_str).collect();
            return Err(format!(
                "no stage or instance named `{name}` (stages: {})",
                names.join(", ")
            ));
        }
        Ok(nodes)
    }

    /// Finds instances by stage name or exact instance name.
    pub fn select(&self, name: &str) -> Vec<NodeIndex> {
        self.order
            .iter()
            .copied()
            .filter(|&n| self.graph[n].name == name || self.graph[n].stage == name)
            .collect()
    }

    /// The instance at a node.
    pub fn instance(&self, node: NodeIndex) -> &Instance {
        &self.graph[node]
    }
}

/// What identifies a model for keys: its spec, plus the content hash of its local files.
fn model_identity(
    pipeline: &Pipeline,
    name: &str,
    hasher: &mut FileHasher,
) -> anyhow::Result<Json> {
    let spec = &pipeline.models[name];
    let mut id = serde_json::to_value(spec)?;
    if let Some(path) = &spec.path {
        let resolved = resolve_path(&pipeline.workdir, path);
        let hash = hasher
            .hash(&resolved)
            .with_context(|| format!("model `{name}` at `{path}`"))?;
        id["content"] = Json::String(hash);
        // The location is not part of the identity: the same weights elsewhere give the same results.
        id.as_object_mut().expect("object").remove("path");
    }
    Ok(id)
}

/// Stage names in dependency order; ties broken by name so the order is stable.
///
/// The order is by level (a stage with no inputs is level 0, any other one more than its deepest input),
/// then by name: the order of repeatedly taking every stage whose inputs are all taken, computed in one
/// pass instead of rescanning the remaining stages each round (quadratic on wide pipelines).
fn stage_topological_order(pipeline: &Pipeline) -> Vec<String> {
    let mut level: BTreeMap<&str, usize> = BTreeMap::new();
    let mut open: std::collections::BTreeSet<&str> = std::collections::BTreeSet::new();
    for start in pipeline.stages.keys() {
        // Iterative depth-first search: a long chain must not overflow the stack.
        let mut stack: Vec<(&str, bool)> = vec![(start.as_str(), false)];
        while let Some((name, expanded)) = stack.pop() {
            if level.contains_key(name) {
                continue;
            }
            let ups = pipeline.stages[name].upstream_stages();
            if expanded {
                let l = ups.iter().map(|u| level[u] + 1).max().unwrap_or(0);
                level.insert(name, l);
                open.remove(name);
            } else {
                stack.push((name, true));
                open.insert(name);
                for u in ups {
                    assert!(
                        !open.contains(u),
                        "cycles are rejected by config validation"
                    );
                    if !level.contains_key(u) {
                        stack.push((u, false));
                    }
                }
            }
        }
    }
    let mut order: Vec<(usize, &str)> = level.into_iter().map(|(n, l)| (l, n)).collect();
    order.sort_unstable();
    order.into_iter().map(|(_, n)| n.to_string()).collect()
}

fn combinations(pipeline: &Pipeline, axes: &[usize]) -> Vec<Assignment> {
    let mut out = vec![Assignment::new()];
    for &axis in axes {
        out = out
            .into_iter()
            .flat_map(|a| {
                pipeline.axes[axis].values.iter().map(move |v| {
                    let mut a = a.clone();
                    a.insert(axis, v.clone());
                    a
                })
            })
            .collect();
    }
    out
}

fn restrict(assignment: &Assignment, axes: &[usize]) -> Assignment {
    assignment
        .iter()
        .filter(|(a, _)| axes.contains(a))
        .map(|(a, v)| (*a, v.clone()))
        .collect()
}

fn assignment_id(assignment: &Assignment) -> Vec<(usize, String)> {
    assignment
        .iter()
        .map(|(a, v)| (*a, v.to_string()))
        .collect()
}

fn instance_name(pipeline: &Pipeline, stage: &str, assignment: &Assignment) -> String {
    if assignment.is_empty() {
        return stage.to_string();
    }
    let parts: Vec<String> = assignment
        .iter()
        .map(|(axis, value)| {
            let a = &pipeline.axes[*axis];
            let label = if a.stage == stage {
                a.param.clone()
            } else {
                a.name()
            };
            format!("{label}={}", shown_value(value))
        })
        .collect();
    bounded_name(format!("{stage}[{}]", parts.join(",")))
}

/// A swept value as shown in an instance name. Plain strings are shown bare (`act=relu`), as they always
/// were, so existing refs keep their names; a string that would read as another value or make the name
/// ambiguous is quoted like JSON: `"1"` (not `1`, the integer), `""`, `"a,b"`, and control characters
/// escaped (`"a\nb"`), so distinct values give distinct names and no newline or NUL reaches a file name.
fn shown_value(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) if !string_needs_quotes(s) => s.clone(),
        toml::Value::String(s) => Json::String(s.clone()).to_string(),
        // Arrays and tables show TOML's inline form, whose strings are quoted; escape anything left.
        v => v
            .to_string()
            .chars()
            .flat_map(char::escape_default)
            .collect(),
    }
}

/// Whether a string value shown bare could be taken for another value or split the name.
fn string_needs_quotes(s: &str) -> bool {
    s.is_empty()
        || s.trim() != s
        || s.chars()
            .any(|c| c.is_control() || matches!(c, '"' | ',' | '=' | '[' | ']' | '{' | '}'))
        // `1`, `1.5`, `true`, `1979-05-27`, `inf`: anything TOML reads as a non-string.
        || s.parse::<toml::Value>().is_ok()
        || format!("x = {s}").parse::<toml::Table>().is_ok()
}

/// Longest instance name kept as is, in bytes. Instance names become ref file names (`<name>.json`, with
/// `%` and `/` escaped to three bytes each), which must stay under the usual 255-byte limit.
const MAX_INSTANCE_FILE_BYTES: usize = 200;

/// Keeps an instance name within [`MAX_INSTANCE_FILE_BYTES`] once escaped for a file name. A longer one
/// (long swept strings, e.g. prompts) becomes a readable prefix plus a hash of the whole name. Refusing
/// instead would forbid sweeping over long strings, which is legitimate; the hash keeps distinct values
/// distinct and the name stable from run to run, so refs still find their instance.
fn bounded_name(name: String) -> String {
    let file_bytes = |s: &str| s.len() + 2 * s.matches(['%', '/']).count();
    if file_bytes(&name) <= MAX_INSTANCE_FILE_BYTES {
        return name;
    }
    let hash = blake3::hash(name.as_bytes()).to_hex();
    let mut prefix = String::new();
    for c in name.chars() {
        let mut buf = [0u8; 4];
        if file_bytes(&prefix) + file_bytes(c.encode_utf8(&mut buf)) > 120 {
            break;
        }
        prefix.push(c);
    }
    format!("{prefix}…#{}]", &hash.as_str()[..16])
}

/// Loads a pipeline and builds its plan in one step.
pub fn load(
    path: &Path,
    overrides: &[crate::config::Override],
    registry: &Registry,
    hasher: &mut FileHasher,
) -> Result<Plan, crate::Error> {
    let pipeline = crate::config::load(path, overrides, registry)?;
    Plan::build(pipeline, registry, hasher).map_err(crate::Error::Plan)
}
