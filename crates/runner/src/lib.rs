//! saeflow-runner: pipelines of stages with a content-addressed cache. It knows stage kinds only through
//! the [`stage`] API and nothing of models or SAEs.
//!
//! Data flows one way: [`config`] parses and validates a pipeline file, [`plan`] expands sweeps into a DAG
//! of stage instances with action keys, [`exec`] runs what is not cached (locally or on Slurm), and
//! [`cache`] stores results atomically. Modules, lowest first (a module uses only those before it):
//! [`stage`], [`config`], [`cache`], [`plan`], [`exec`]. See `ARCHITECTURE.md`.

#![deny(missing_docs)]

pub mod cache;
pub mod config;
pub mod exec;
pub mod plan;
pub mod stage;

/// Errors at the top level, each with its exit code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad pipeline file or `-S` override (exit 2).
    #[error("{0}")]
    Config(#[from] config::ConfigError),
    /// The pipeline is valid but cannot be planned, e.g. a dependency file is missing (exit 2).
    #[error("{0:#}")]
    Plan(anyhow::Error),
    /// Bad command-line usage (exit 2).
    #[error("{0}")]
    Usage(String),
    /// One or more stages failed (exit 1).
    #[error("{0}")]
    Failed(String),
    /// The run was interrupted (exit 130).
    #[error(
        "interrupted; finished stages are cached and partial work is kept, run again to resume"
    )]
    Interrupted,
    /// Anything else, e.g. an unwritable cache (exit 1).
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

impl Error {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) | Error::Plan(_) | Error::Usage(_) => 2,
            Error::Failed(_) | Error::Other(_) => 1,
            Error::Interrupted => 130,
        }
    }
}
