//! Placeholder being replaced by the real adapter.

use std::path::Path;

use super::{Preset, Upstream};
use crate::data::rows::Row;

/// The `agentic_misalignment` preset.
pub struct AgenticMisalignment;

impl Preset for AgenticMisalignment {
    fn name(&self) -> &'static str {
        "agentic_misalignment"
    }
    fn upstream(&self) -> Result<Upstream, &'static str> {
        Err("not written yet")
    }
    fn load(&self, _dir: &Path) -> anyhow::Result<Vec<Row>> {
        anyhow::bail!("the agentic_misalignment preset is not written yet")
    }
}
