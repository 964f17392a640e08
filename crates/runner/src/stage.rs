//! The stage API: the [`Stage`] trait a stage kind implements, its object-safe twin [`StageKind`], the
//! [`StageContext`] a running stage gets, and the [`Registry`] of kinds a pipeline may use.
//!
//! A stage knows its parameters, what it references (upstream stages, models, external files) and how to
//! turn its inputs into files in an output directory. It knows nothing of scheduling, keys or caching; the
//! runner knows stage kinds only through this API.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use schemars::{JsonSchema, Schema};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value as Json;

use saeflow_core::cancel::Cancel;
use saeflow_core::models::spec::{DeviceSpec, ModelSpec};
use saeflow_core::progress::Progress;

/// One segment of a key path inside a stage's table, used to point errors at the right place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySeg {
    /// A table key.
    Key(String),
    /// An array index.
    Index(usize),
}

/// Shorthand for a key path of plain keys.
pub fn key_path(keys: &[&str]) -> Vec<KeySeg> {
    keys.iter().map(|k| KeySeg::Key(k.to_string())).collect()
}

/// A name a stage refers to, and where in its table the reference is written.
#[derive(Debug, Clone)]
pub struct Reference {
    /// For inputs the role the upstream artifact plays (e.g. `sae`); for models and files, unused.
    pub role: String,
    /// Stage name, model name or file path.
    pub target: String,
    /// Where the reference is written in the stage's table.
    pub at: Vec<KeySeg>,
}

/// Everything outside a stage's own parameters that its result depends on.
#[derive(Debug, Clone, Default)]
pub struct References {
    /// Upstream stages whose artifacts this stage reads.
    pub inputs: Vec<Reference>,
    /// Models (from `[models.*]`) this stage loads.
    pub models: Vec<Reference>,
    /// External files or directories whose content enters the action key.
    pub files: Vec<Reference>,
}

/// A parameter that deserialized but makes no sense; `at` names the offending key.
#[derive(Debug, Clone)]
pub struct ParamError {
    /// Where in the stage's table the problem is.
    pub at: Vec<KeySeg>,
    /// What is wrong.
    pub message: String,
}

/// How a stage reports finished partial work, which the runner mirrors to a remote cache if there is one.
/// The stage calls [`saved`](Self::saved) when everything in its partial directory is consistent (right
/// after a shard or checkpoint is renamed into place); the copy is taken then, whole.
#[derive(Clone, Default)]
pub struct PartialSync(Option<Arc<dyn Fn() -> anyhow::Result<()> + Send + Sync>>);

impl PartialSync {
    /// A sync that runs `f`.
    pub fn new(f: impl Fn() -> anyhow::Result<()> + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(f)))
    }

    /// The partial directory holds a consistent state worth keeping: copy it (no-op without a remote).
    pub fn saved(&self) -> anyhow::Result<()> {
        match &self.0 {
            Some(f) => f(),
            None => Ok(()),
        }
    }
}

impl std::fmt::Debug for PartialSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "PartialSync(remote)"
        } else {
            "PartialSync(none)"
        })
    }
}

/// What a running stage gets from the runner.
pub struct StageContext {
    /// Instance name, e.g. `sae[k=32]`, for messages.
    pub instance: String,
    /// Upstream artifact directories by role.
    pub inputs: BTreeMap<String, PathBuf>,
    /// Models this stage referenced, with paths resolved.
    pub models: BTreeMap<String, ModelSpec>,
    /// Content identity of each referenced model (a key over its spec and file hashes, not its location).
    pub model_keys: BTreeMap<String, String>,
    /// Fresh, empty directory the stage writes its outputs into.
    pub out_dir: PathBuf,
    /// Directory that survives an interrupted run of the same key, for resumable work.
    pub partial_dir: PathBuf,
    /// Call [`PartialSync::saved`] after each finished piece of work written into `partial_dir` (a shard, a
    /// checkpoint): with a remote cache the runner copies the directory there, so another machine resumes.
    pub partial_sync: PartialSync,
    /// Where to write the stage's log (kept beside the cache object).
    pub log_path: PathBuf,
    /// Shared, content-addressed download area of the cache (see `data::download`).
    pub downloads_dir: PathBuf,
    /// Directory relative paths in the pipeline are resolved against.
    pub workdir: PathBuf,
    /// Device requested by the pipeline.
    pub device: DeviceSpec,
    /// Pipeline seed.
    pub seed: u64,
    /// Progress reporting for this stage.
    pub progress: Progress,
    /// Set when the user asks the run to stop.
    pub cancel: Cancel,
    /// Summary numbers recorded in the manifest (loss, row counts, ...).
    pub metrics: serde_json::Map<String, Json>,
}

impl StageContext {
    /// Appends a line to the stage's log and shows it above the progress display.
    pub fn log(&self, msg: &str) {
        log_line(&self.log_path, &self.progress, msg)
    }
}

/// [`StageContext::log`] for code that holds the log path and progress without the context.
pub fn log_line(log_path: &std::path::Path, progress: &Progress, msg: &str) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
    {
        let _ = writeln!(f, "{msg}");
    }
    progress.println(msg);
}

/// A stage kind. Implement this, register the type (`saeflow_stages::builtin()` for a built-in kind), and
/// the pipeline format, the schema and the runner pick it up.
pub trait Stage: Send + Sync + 'static {
    /// Parameters as written under `[stages.NAME]` (besides `kind`); use `deny_unknown_fields`.
    type Params: DeserializeOwned + Serialize + JsonSchema;
    /// The `kind = "..."` value.
    const KIND: &'static str;
    /// Implementation version: bump when outputs for the same inputs change, so caches are invalidated.
    const VERSION: u32;
    /// One line for `--help`-style listings and the schema.
    const ABOUT: &'static str;

    /// What this instance reads besides its parameters.
    fn references(_params: &Self::Params) -> References {
        References::default()
    }
    /// Checks beyond what the type system expresses.
    fn validate(_params: &Self::Params) -> Result<(), ParamError> {
        Ok(())
    }
    /// Produces the outputs in `ctx.out_dir`.
    fn run(params: &Self::Params, ctx: &mut StageContext) -> anyhow::Result<()>;

    /// Parameters in which instances may differ and still run together as one group (one
    /// [`Stage::run_group`] call): the runner groups ready instances of this kind whose inputs, models and
    /// every other parameter are equal. Empty (the default): instances never group.
    const GROUPABLE: &'static [&'static str] = &[];

    /// Runs a group of instances at once (e.g. one pass over shared data feeding every member); returns one
    /// result per member, in order. Each member still has its own context and output directory. The default
    /// runs them one after the other.
    fn run_group(params: &[Self::Params], ctxs: &mut [StageContext]) -> Vec<anyhow::Result<()>> {
        params
            .iter()
            .zip(ctxs.iter_mut())
            .map(|(p, ctx)| Self::run(p, ctx))
            .collect()
    }
}

/// Object-safe view of a [`Stage`], working on resolved JSON parameters.
pub trait StageKind: Send + Sync {
    /// The `kind` name.
    fn kind(&self) -> &'static str;
    /// Implementation version.
    fn version(&self) -> u32;
    /// One-line description.
    fn about(&self) -> &'static str;
    /// JSON schema of the parameters (draft 2020-12).
    fn schema(&self) -> Schema;
    /// Deserializes a stage table (located, for errors) into resolved parameters with defaults filled in.
    fn resolve(&self, de: toml::de::ValueDeserializer<'_>) -> Result<Json, toml::de::Error>;
    /// Same as [`StageKind::resolve`] for a value without source positions (overrides, sweeps).
    fn resolve_value(&self, value: toml::Value) -> Result<Json, String>;
    /// References of resolved parameters.
    fn references(&self, params: &Json) -> References;
    /// Semantic checks of resolved parameters.
    fn validate(&self, params: &Json) -> Result<(), ParamError>;
    /// Runs the stage.
    fn run(&self, params: &Json, ctx: &mut StageContext) -> anyhow::Result<()>;
    /// See [`Stage::GROUPABLE`].
    fn groupable(&self) -> &'static [&'static str];
    /// See [`Stage::run_group`]; `params` and `ctxs` have the same length.
    fn run_group(&self, params: &[&Json], ctxs: &mut [StageContext]) -> Vec<anyhow::Result<()>>;
}

struct Erased<S>(std::marker::PhantomData<S>);

fn typed<S: Stage>(params: &Json) -> S::Params {
    // Resolved parameters were produced by serializing `S::Params`, so this cannot fail.
    serde_json::from_value(params.clone()).expect("resolved parameters round-trip")
}

impl<S: Stage> StageKind for Erased<S> {
    fn kind(&self) -> &'static str {
        S::KIND
    }
    fn version(&self) -> u32 {
        S::VERSION
    }
    fn about(&self) -> &'static str {
        S::ABOUT
    }
    fn schema(&self) -> Schema {
        schemars::generate::SchemaSettings::draft2020_12()
            .into_generator()
            .into_root_schema_for::<S::Params>()
    }
    fn resolve(&self, de: toml::de::ValueDeserializer<'_>) -> Result<Json, toml::de::Error> {
        let params: S::Params = serde::Deserialize::deserialize(de)?;
        Ok(serde_json::to_value(&params).expect("parameters serialize to JSON"))
    }
    fn resolve_value(&self, value: toml::Value) -> Result<Json, String> {
        let params: S::Params = value
            .try_into()
            .map_err(|e: toml::de::Error| e.message().to_string())?;
        Ok(serde_json::to_value(&params).expect("parameters serialize to JSON"))
    }
    fn references(&self, params: &Json) -> References {
        S::references(&typed::<S>(params))
    }
    fn validate(&self, params: &Json) -> Result<(), ParamError> {
        S::validate(&typed::<S>(params))
    }
    fn run(&self, params: &Json, ctx: &mut StageContext) -> anyhow::Result<()> {
        S::run(&typed::<S>(params), ctx)
    }
    fn groupable(&self) -> &'static [&'static str] {
        S::GROUPABLE
    }
    fn run_group(&self, params: &[&Json], ctxs: &mut [StageContext]) -> Vec<anyhow::Result<()>> {
        let params: Vec<S::Params> = params.iter().map(|p| typed::<S>(p)).collect();
        S::run_group(&params, ctxs)
    }
}

/// The stage kinds a pipeline may use.
#[derive(Clone)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Arc<dyn StageKind>>,
}

impl Registry {
    /// An empty registry; `saeflow_stages::builtin()` fills one with the built-in kinds.
    pub fn empty() -> Self {
        Self {
            kinds: BTreeMap::new(),
        }
    }

    /// Adds a stage kind.
    pub fn register<S: Stage>(&mut self) {
        self.kinds
            .insert(S::KIND, Arc::new(Erased::<S>(std::marker::PhantomData)));
    }

    /// Looks a kind up by name.
    pub fn get(&self, kind: &str) -> Option<&Arc<dyn StageKind>> {
        self.kinds.get(kind)
    }

    /// Names of all kinds, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        self.kinds.keys().copied().collect()
    }

    /// All kinds, sorted by name.
    pub fn kinds(&self) -> impl Iterator<Item = &Arc<dyn StageKind>> {
        self.kinds.values()
    }
}
