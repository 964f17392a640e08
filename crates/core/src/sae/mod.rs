//! Sparse autoencoders: architectures, training steps and optimiser, and the on-disk formats.

pub mod adam;
pub mod dense;
pub mod edit;
pub mod format;
pub mod metrics;
pub mod npz;
pub mod select;
pub mod step;
pub mod trainer;
