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
fn stage_topological_order(pipeline: &Pipeline) -> Vec<String> {
    let mut remaining: BTreeMap<&str, Vec<&str>> = pipeline
        .stages
        .iter()
        .map(|(n, d)| (n.as_str(), d.upstream_stages()))
        .collect();
    let mut order = Vec::new();
    while !remaining.is_empty() {
        let ready: Vec<&str> = remaining
            .iter()
            .filter(|(_, ups)| ups.is_empty())
            .map(|(n, _)| *n)
            .collect();
        assert!(
            !ready.is_empty(),
            "cycles are rejected by config validation"
        );
        for n in ready {
            remaining.remove(n);
            remaining
                .values_mut()
                .for_each(|ups| ups.retain(|u| *u != n));
            order.push(n.to_string());
        }
    }
    order
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
            let shown = match value {
                toml::Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            format!("{label}={shown}")
        })
        .collect();
    format!("{stage}[{}]", parts.join(","))
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
