//! How a pipeline names a model and a device: `[models.NAME]` entries and `device = "..."`. The runner
//! carries these (and hashes the files they point at); [`crate::models`] turns them into loaded models.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where tensors live. Stages turn this into a candle `Device`; the runner only carries it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DeviceSpec {
    /// CUDA when built with it and a GPU is present, else CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device N.
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("invalid device `{s}`, expected auto, cpu, cuda or cuda:N")),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl JsonSchema for DeviceSpec {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "DeviceSpec".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^(auto|cpu|cuda|cuda:[0-9]+)$",
            "description": "auto | cpu | cuda | cuda:N"
        })
    }
}

/// Model families saeflow can load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// nanochat checkpoints (`model_*.pt`, `meta_*.json`, `tokenizer.pkl`).
    Nanochat,
    /// Llama-family models: `.gguf` files, or Hugging Face directories (as `huggingface`).
    Llama,
    /// Hugging Face directories (`config.json` + safetensors + `tokenizer.json`); the config's `model_type`
    /// picks the architecture: `llama`, `qwen2`, `gemma2` or `gpt2`.
    #[serde(rename = "huggingface")]
    HuggingFace,
}

/// `[models.NAME]`: a model that stages refer to by name.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Model family.
    pub kind: ModelKind,
    /// Local file or directory (`~` expands). Its content enters the action keys of stages using it. With
    /// `hub` as well, the local copy is used and `hub`/`revision` record which upstream model it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Hub repository id (`org/name`), downloaded when `path` is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<String>,
    /// Hub revision (commit or tag); pin it for reproducible keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Weights in memory: `f32` (default; GGUF dequantized at load), `bf16` or `f16` (the forward's matrix
    /// products in that dtype, norms and softmax in f32; on the CPU `bf16` is fast where it has AMX or
    /// AVX512-BF16, see README), or `quantized` (GGUF only, see README).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs_parse() {
        assert_eq!("cuda:2".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(2));
        assert!("gpu".parse::<DeviceSpec>().is_err());
    }
}
