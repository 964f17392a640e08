//! Stage outputs read back through their documented layouts (`schemas/*.md`), for later stages and the
//! report: a consumer reads an artifact here, never through the code of the stage that wrote it.

use std::path::Path;

use anyhow::Context;

/// A label stage's `label.json`, with the `features.parquet` column holding the held-out AUROC of its unit.
pub struct LabelSummary {
    /// The whole `label.json`.
    pub json: serde_json::Value,
    /// `test_auroc` for token units, `test_auroc_<unit>` for pooled ones.
    pub test_auroc_column: String,
    /// The same on the validation split (`val_auroc…`): what features are ranked by, so that a test AUROC
    /// reported for a chosen feature is not the reason it was chosen.
    pub val_auroc_column: String,
}

impl LabelSummary {
    /// Reads `label.json` of the label object in `dir`; `stage` names it in errors.
    pub fn read(dir: &Path, stage: &str) -> anyhow::Result<Self> {
        let bytes = std::fs::read(dir.join("label.json"))
            .with_context(|| format!("`{stage}` is not a label stage (no label.json)"))?;
        let json: serde_json::Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("`{stage}`: label.json is not JSON"))?;
        let test_auroc_column = test_auroc_column(&json)
            .with_context(|| format!("`{stage}`: label.json names no unit"))?;
        let val_auroc_column = test_auroc_column.replacen("test_", "val_", 1);
        Ok(Self {
            json,
            test_auroc_column,
            val_auroc_column,
        })
    }
}

/// The `features.parquet` column holding the held-out AUROC of a label stage's `unit`, from its
/// `label.json` (`None` when it names no unit).
pub fn test_auroc_column(summary: &serde_json::Value) -> Option<String> {
    Some(match summary["unit"].as_str()? {
        "token" => "test_auroc".to_string(),
        unit => format!("test_auroc_{unit}"),
    })
}
