//! saeflow-core: the library layer of saeflow, usable on its own (no pipeline files, cache or runner).
//!
//! Load a language model ([`models`]), capture and read its activations ([`data::activations`]), train an SAE
//! ([`sae::trainer`]), open SAELens / sparsify / OpenAI SAEs ([`sae::format`]), and measure features
//! ([`stats`]). Everything below is plain functions over paths, tensors and a candle `Device`; the runner
//! (`saeflow-runner`) and the stage kinds (`saeflow-stages`) sit on top. See `ARCHITECTURE.md`.
//!
//! Modules, lowest first (a module uses only those before it): [`huge_pages`], [`cancel`], [`progress`], [`fs`],
//! [`kernels`], [`stats`], [`data`], [`models`], [`sae`].

#![deny(missing_docs)]

pub mod cancel;
pub mod data;
pub mod fs;
pub mod huge_pages;
pub mod kernels;
pub mod models;
pub mod progress;
pub mod sae;
pub mod stats;
