//! `saeflow bench`: the benchmarks' arguments; the measuring is `crate::bench`'s.

use std::path::PathBuf;

use clap::Subcommand;
use saeflow_core::kernels::gemm::Precision;
use saeflow_core::models::spec::DeviceSpec;
use saeflow_core::models::WeightFormat;
use saeflow_runner::Error;

/// The encoder product's precision, as `bench train --encoder` spells it (the `train` stage's
/// `encoder_precision`).
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum EncoderPrecision {
    /// bf16 where it outruns f32 (AMX, or AVX512-BF16 on AMD), else int16 where that does (AVX2 without
    /// AVX-512), else f32 (the stage's default).
    Auto,
    /// f32 throughout.
    F32,
    /// Latents ranked by a bf16 product.
    Bf16,
    /// Latents ranked by a product of per-row scaled 16-bit integers.
    Int16,
}

impl From<EncoderPrecision> for Precision {
    fn from(p: EncoderPrecision) -> Self {
        match p {
            EncoderPrecision::Auto if Precision::bf16_faster() => Self::Bf16,
            EncoderPrecision::Auto if Precision::int16_faster() => Self::Int16,
            EncoderPrecision::Auto | EncoderPrecision::F32 => Self::F32,
            EncoderPrecision::Bf16 => Self::Bf16,
            EncoderPrecision::Int16 => Self::Int16,
        }
    }
}

/// Subcommands of `saeflow bench`.
#[derive(Subcommand)]
pub enum BenchCommand {
    /// Forward passes over random token batches: tokens/s and peak memory.
    Forward {
        /// Model path (as for `saeflow model`).
        path: PathBuf,
        /// Sequences per batch.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Tokens per sequence.
        #[arg(long, default_value_t = 128)]
        seq: usize,
        /// Stop after this block (capturing its hook_resid_post); default: full depth with logits.
        #[arg(long)]
        layer: Option<usize>,
        /// Timed passes (after one warm-up pass).
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
        /// Weights: f32 (default), bf16 or f16 (matrix products in that dtype, norms and softmax f32; on the CPU bf16 uses AMX / AVX512-BF16), or quantized (GGUF only).
        #[arg(long, default_value = "f32")]
        dtype: WeightFormat,
    },
    /// The model's linear layers alone (SmolLM2-135M's shapes): GFLOP/s per shape of candle's matmul and of each GEMM kernel this CPU has.
    Gemm {
        /// Rows (tokens) per product.
        #[arg(long, default_value_t = 1024)]
        tokens: usize,
        /// Timed products per shape (the best is reported).
        #[arg(long, default_value_t = 10)]
        iters: usize,
        /// Only these shapes (repeat the flag for several); all by default.
        #[arg(long = "shape", value_parser = clap::builder::PossibleValuesParser::new(
            crate::bench::SMOLLM2_LINEARS.map(|(name, ..)| name)
        ))]
        shapes: Vec<String>,
    },
    /// TopK SAE training steps on random inputs: tokens/s, ms/step, GFLOP/s.
    Train {
        /// Input width.
        #[arg(long, default_value_t = 576)]
        d_in: usize,
        /// d_sae / d_in.
        #[arg(long, default_value_t = 8)]
        expansion: usize,
        /// Active latents.
        #[arg(long, default_value_t = 32)]
        k: usize,
        /// Tokens per step.
        #[arg(long, default_value_t = 4096)]
        batch: usize,
        /// Timed steps (after 3 warm-up steps).
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Encoder product that ranks the latents: auto, f32 or bf16 (the sparse CPU engine).
        #[arg(long, default_value = "auto")]
        encoder: EncoderPrecision,
        /// Where to train: `cpu` (the sparse CPU engine), or `cuda`, `cuda:N` or `cpu-dense` for the
        /// device-resident engine (on a GPU, or on the CPU device).
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Activation reader: tokens/s and GB/s in store order and shuffled, from a capture directory or a
    /// synthetic store of the given shape.
    Reader {
        /// A capture's object directory (default: write a synthetic store into a temporary directory).
        #[arg(long)]
        store: Option<PathBuf>,
        /// Hook to read (default: the store's first).
        #[arg(long)]
        hook: Option<String>,
        /// Synthetic store: vector width.
        #[arg(long, default_value_t = 576)]
        d_model: usize,
        /// Synthetic store: rows.
        #[arg(long, default_value_t = 1 << 18)]
        rows: usize,
        /// Synthetic store: f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Rows per batch.
        #[arg(long, default_value_t = 4096)]
        batch: usize,
        /// Timed passes over the store per mode.
        #[arg(long, default_value_t = 3)]
        passes: usize,
    },
}

/// Runs one benchmark; it prints its own results.
pub fn bench(command: BenchCommand) -> Result<(), Error> {
    match command {
        BenchCommand::Forward {
            path,
            batch,
            seq,
            layer,
            iters,
            device,
            dtype,
        } => crate::bench::forward(&path, batch, seq, layer, iters, device, dtype),
        BenchCommand::Gemm {
            tokens,
            iters,
            shapes,
        } => crate::bench::gemm(tokens, iters, &shapes),
        BenchCommand::Train {
            d_in,
            expansion,
            k,
            batch,
            steps,
            encoder,
            device,
        } => match device.as_str() {
            "cpu" => crate::bench::train(d_in, expansion, k, batch, steps, encoder.into()),
            "cpu-dense" => crate::bench::train_on_device(
                d_in,
                expansion,
                k,
                batch,
                steps,
                saeflow_core::models::spec::DeviceSpec::Cpu,
            ),
            other => crate::bench::train_on_device(
                d_in,
                expansion,
                k,
                batch,
                steps,
                other
                    .parse()
                    .map_err(|e: String| anyhow::anyhow!("--device: {e}"))?,
            ),
        },
        BenchCommand::Reader {
            store,
            hook,
            d_model,
            rows,
            dtype,
            batch,
            passes,
        } => crate::bench::reader(
            store.as_deref(),
            hook.as_deref(),
            d_model,
            rows,
            &dtype,
            batch,
            passes,
        ),
    }
    .map_err(Error::Other)
}
