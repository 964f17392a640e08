//! Data formats shared by stages.

pub mod parquet;
