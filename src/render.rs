//! Drawing the plan: plain text, Graphviz dot, Mermaid.

use saeflow_runner::plan::Plan;

/// Output formats of `saeflow dag`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DagFormat {
    /// One line per instance with its inputs.
    Ascii,
    /// Graphviz dot.
    Dot,
    /// Mermaid flowchart.
    Mermaid,
}

/// Renders the plan in `format`.
pub fn render(plan: &Plan, format: DagFormat) -> String {
    let mut out = String::new();
    let id = |n: petgraph::graph::NodeIndex| format!("n{}", n.index());
    match format {
        DagFormat::Ascii => {
            let width = plan
                .order
                .iter()
                .map(|&n| plan.instance(n).name.len())
                .max()
                .unwrap_or(0);
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

fn dot_escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn mermaid_escape(s: &str) -> String {
    s.replace('"', "#quot;")
        .replace('|', "#124;")
        .replace('<', "#lt;")
        .replace('>', "#gt;")
}
