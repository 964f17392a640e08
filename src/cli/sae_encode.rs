//! `saeflow sae-encode`: runs a saved SAE over stored activations and writes what it saw and produced, for
//! comparison with other implementations.

use std::path::PathBuf;

use saeflow_runner::Error;

/// Arguments of `saeflow sae-encode`.
#[derive(clap::Args)]
pub struct SaeEncodeArgs {
    /// The SAE directory.
    sae: PathBuf,
    /// A capture's object directory.
    #[arg(long)]
    capture: PathBuf,
    /// Hook to read (default: the SAE's `metadata.hook_name`).
    #[arg(long)]
    hook: Option<String>,
    /// Rows, from the start of the store.
    #[arg(long, default_value_t = 256)]
    rows: usize,
    /// Output file.
    #[arg(long)]
    out: PathBuf,
}

/// Runs the command; any failure is a plain error (exit code 1), never a usage error.
pub fn sae_encode(args: SaeEncodeArgs) -> Result<(), Error> {
    encode_to_file(&args).map_err(Error::Other)
}

/// Encodes and decodes the first rows of the capture and writes them (`x`), the latent activations (`acts`)
/// and the reconstructions (`recon`) to the output file as safetensors.
fn encode_to_file(args: &SaeEncodeArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    use saeflow_core::data::activations::{ActivationStore, ReadOptions};
    let device = candle_core::Device::Cpu;
    let sae = saeflow_core::sae::format::Sae::load(&args.sae, &device)?;
    let hook = match &args.hook {
        Some(h) => h.to_string(),
        None => sae.cfg["metadata"]["hook_name"]
            .as_str()
            .context("the SAE's cfg.json names no hook; pass --hook")?
            .to_string(),
    };
    let store = ActivationStore::open(&args.capture, &hook)?;
    let options = ReadOptions {
        batch_size: args.rows,
        ..ReadOptions::default()
    };
    let x = store
        .batches(&options, &device)?
        .next()
        .context("the capture is empty")??
        .acts;
    let acts = sae.encode(&x)?;
    let recon = sae.decode(&acts)?;
    let tensors = std::collections::HashMap::from([
        ("x".to_string(), x),
        ("acts".to_string(), acts),
        ("recon".to_string(), recon),
    ]);
    candle_core::safetensors::save(&tensors, &args.out)?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
