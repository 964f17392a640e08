//! `saeflow dag`: draws the plan as plain text, Graphviz dot or Mermaid.

use saeflow_runner::plan::Plan;
use saeflow_runner::stage::Registry;
use saeflow_runner::Error;

use super::shared::{load_plan, name_width, open_cache, CacheArgs, PipelineArgs};

/// Arguments of `saeflow dag`.
#[derive(clap::Args)]
pub struct DagArgs {
    /// The pipeline file and its overrides.
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// Output format.
    #[arg(long, value_enum, default_value = "ascii")]
    format: DagFormat,
}

/// Prints the pipeline's plan in the chosen format.
pub fn dag(cache_args: &CacheArgs, args: DagArgs, registry: &Registry) -> Result<(), Error> {
    let cache = open_cache(cache_args)?;
    let plan = load_plan(&args.pipeline, registry, &cache)?;
    print!("{}", render(&plan, args.format));
    Ok(())
}

/// Output formats of `saeflow dag`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DagFormat {
    /// One line per instance with its inputs.
    Ascii,
    /// Graphviz dot.
    Dot,
    /// Mermaid flowchart.
    Mermaid,
}

/// Renders the plan in `format`.
fn render(plan: &Plan, format: DagFormat) -> String {
    let mut out = String::new();
    let id = |n: petgraph::graph::NodeIndex| format!("n{}", n.index());
    match format {
        DagFormat::Ascii => {
            let width = name_width(plan);
            for &n in &plan.order {
                let inst = plan.instance(n);
                let inputs: Vec<String> = inst
                    .inputs
                    .iter()
                    .map(|(role, &u)| format!("{}={}", role, plan.instance(u).name))
                    .collect();
                let arrow = if inputs.is_empty() {
                    String::new()
                } else {
                    format!(" <- {}", inputs.join(", "))
                };
                out.push_str(&format!(
                    "{:width$}  {:8} {}{arrow}\n",
                    inst.name,
                    inst.kind,
                    inst.key.short()
                ));
            }
        }
        DagFormat::Dot => {
            out.push_str(
                "digraph pipeline {\n  rankdir=LR;\n  node [shape=box, fontname=\"Helvetica\"];\n",
            );
            out.push_str(&format!(
                "  label=\"{}\";\n",
                dot_escape(&plan.pipeline.header.name)
            ));
            for &n in &plan.order {
                let inst = plan.instance(n);
                out.push_str(&format!(
                    "  {} [label=\"{}\\n{}\"];\n",
                    id(n),
                    dot_escape(&inst.name),
                    dot_escape(&inst.kind)
                ));
            }
            for &n in &plan.order {
                for (role, &u) in &plan.instance(n).inputs {
                    out.push_str(&format!(
                        "  {} -> {} [label=\"{}\"];\n",
                        id(u),
                        id(n),
                        dot_escape(role)
                    ));
                }
            }
            out.push_str("}\n");
        }
        DagFormat::Mermaid => {
            out.push_str("flowchart LR\n");
            for &n in &plan.order {
                let inst = plan.instance(n);
                out.push_str(&format!(
                    "  {}[\"{}<br/><i>{}</i>\"]\n",
                    id(n),
                    mermaid_escape(&inst.name),
                    inst.kind
                ));
            }
            for &n in &plan.order {
                for (role, &u) in &plan.instance(n).inputs {
                    out.push_str(&format!(
                        "  {} -->|{}| {}\n",
                        id(u),
                        mermaid_escape(role),
                        id(n)
                    ));
                }
            }
        }
    }
    out
}

/// Escapes a string for a double-quoted Graphviz label.
fn dot_escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Replaces the characters Mermaid reads as syntax inside labels with its entity codes.
fn mermaid_escape(s: &str) -> String {
    s.replace('"', "#quot;")
        .replace('|', "#124;")
        .replace('<', "#lt;")
        .replace('>', "#gt;")
}
