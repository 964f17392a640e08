//! `saeflow schema`: writes the JSON Schema of pipeline files, for editors.

use std::path::{Path, PathBuf};

use saeflow_runner::stage::Registry;
use saeflow_runner::Error;

/// Arguments of `saeflow schema`.
#[derive(clap::Args)]
pub struct SchemaArgs {
    /// Output file (`-` for stdout).
    #[arg(short, long, default_value = "schemas/pipeline.schema.json")]
    output: PathBuf,
}

/// Writes the schema of pipelines with the registry's stage kinds to the output file, or to stdout.
pub fn schema(args: SchemaArgs, registry: &Registry) -> Result<(), Error> {
    let schema = saeflow_runner::config::pipeline_schema(registry);
    let text = serde_json::to_string_pretty(&schema).expect("JSON") + "\n";
    if args.output == Path::new("-") {
        print!("{text}");
    } else {
        saeflow_core::fs::write_atomic(&args.output, text.as_bytes())?;
        eprintln!("wrote {}", args.output.display());
    }
    Ok(())
}
