//! Data formats and sources shared by stages: labelled rows, record readers, downloads, presets,
//! selection, and the deterministic Parquet writer.

pub mod activations;
pub mod download;
pub mod parquet;
pub mod presets;
pub mod records;
pub mod rows;
pub mod select;
