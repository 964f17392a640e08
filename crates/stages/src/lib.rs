//! saeflow-stages: the built-in stage kinds, one module per kind, each behind the runner's
//! [`Stage`](saeflow_runner::stage::Stage) trait, and [`builtin`], the registry that lists them.
//!
//! A kind turns its inputs (upstream objects, models, files) into files in its output directory using
//! `saeflow-core`; it knows nothing of scheduling, keys or locks. Kinds never use each other: what several
//! share is in [`shared`], and the documented layouts of their outputs, read back, in [`artifacts`].

#![deny(missing_docs)]

pub mod artifacts;
pub mod capture;
pub mod command;
pub mod dataset;
pub mod eval;
pub mod explain;
pub mod generate;
pub mod label;
pub mod sae;
pub mod shared;
pub mod steer;
pub mod train;

use saeflow_runner::stage::Registry;

/// Every built-in stage kind. A new kind is one line here.
pub fn builtin() -> Registry {
    let mut registry = Registry::empty();
    registry.register::<capture::Capture>();
    registry.register::<command::Command>();
    registry.register::<dataset::Dataset>();
    registry.register::<eval::Eval>();
    registry.register::<explain::Explain>();
    registry.register::<generate::Generate>();
    registry.register::<label::Label>();
    registry.register::<sae::SaeSource>();
    registry.register::<steer::Steer>();
    registry.register::<train::Train>();
    registry
}
