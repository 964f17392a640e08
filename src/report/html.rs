//! `saeflow report`: one self-contained HTML page (inline CSS and SVG, no scripts, nothing fetched) from a
//! pipeline's cached outputs. Progressive: every finished instance is shown, every missing one is listed.
//!
//! The report reads artifacts by their documented layouts (`schemas/*.md`), one section per stage kind.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, UInt32Type, UInt64Type};
use arrow_array::{Array, RecordBatch};

use super::svg::{bars, escape, lines, scatter, short};
use saeflow_core::models::Tokenizer;
use saeflow_stages::artifacts::LabelSummary;

/// A finished instance.
pub struct Entry {
    /// Instance name (`sae[k=8]`).
    pub name: String,
    /// Stage kind.
    pub kind: String,
    /// Its cache object.
    pub dir: PathBuf,
}

/// Tokenizers by model name, for decoding contexts (absent: token ids are shown).
pub type Tokenizers = BTreeMap<String, Tokenizer>;

fn json(path: &Path) -> anyhow::Result<serde_json::Value> {
    serde_json::from_slice(
        &std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?,
    )
    .with_context(|| format!("{}: invalid JSON", path.display()))
}

/// Column values of a table as f64 (nulls as NaN), strings or u64, by name.
struct Table(Vec<RecordBatch>);

impl Table {
    fn open(path: &Path) -> anyhow::Result<Self> {
        Ok(Table(saeflow_core::data::parquet::read_batches(path)?))
    }
    fn column(&self, name: &str) -> anyhow::Result<Vec<&dyn Array>> {
        self.0
            .iter()
            .map(|b| {
                b.column_by_name(name)
                    .map(|c| c.as_ref())
                    .with_context(|| format!("no `{name}` column"))
            })
            .collect()
    }
    fn f64s(&self, name: &str) -> anyhow::Result<Vec<f64>> {
        Ok(self
            .column(name)?
            .into_iter()
            .flat_map(|c| {
                let c = c.as_primitive::<Float64Type>();
                (0..c.len()).map(move |i| if c.is_null(i) { f64::NAN } else { c.value(i) })
            })
            .collect())
    }
    fn strings(&self, name: &str) -> anyhow::Result<Vec<String>> {
        Ok(self
            .column(name)?
            .into_iter()
            .flat_map(|c| {
                let c = c.as_string::<i32>();
                (0..c.len()).map(move |i| {
                    if c.is_null(i) {
                        String::new()
                    } else {
                        c.value(i).to_string()
                    }
                })
            })
            .collect())
    }
    fn u64s(&self, name: &str) -> anyhow::Result<Vec<u64>> {
        Ok(self
            .column(name)?
            .into_iter()
            .flat_map(|c| c.as_primitive::<UInt64Type>().values().to_vec())
            .collect())
    }
    fn u32s(&self, name: &str) -> anyhow::Result<Vec<u32>> {
        Ok(self
            .column(name)?
            .into_iter()
            .flat_map(|c| c.as_primitive::<UInt32Type>().values().to_vec())
            .collect())
    }
}

/// An HTML table.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = String::from("<table><tr>");
    for h in headers {
        let _ = write!(s, "<th>{}</th>", escape(h));
    }
    s += "</tr>";
    for r in rows {
        s += "<tr>";
        for c in r {
            let _ = write!(s, "<td>{c}</td>");
        }
        s += "</tr>";
    }
    s + "</table>"
}

/// A count from a JSON file of the cache: digits, or "–" for anything else (a JSON value is data, and a
/// string in it must never reach the page as markup).
fn count(v: &serde_json::Value) -> String {
    v.as_u64().map_or("–".into(), |n| n.to_string())
}

fn num(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else {
        short(v)
    }
}

const STYLE: &str = "body{font:14px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}\
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}h3{font-size:1.05em}\
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ddd;padding:.25em .5em;text-align:left;vertical-align:top}\
th{background:#f4f4f4}.charts{display:flex;flex-wrap:wrap;gap:1em}.chart{background:#fff;border:1px solid #eee}\
.ct{font-size:13px;font-weight:600}.tk{font-size:10px;fill:#555}.al{font-size:11px;fill:#333}.lg{font-size:11px}\
mark{background:#ffd54f;font-weight:600}.ctx{font-family:ui-monospace,monospace;font-size:12px;white-space:pre-wrap}\
.missing{color:#888}.note{color:#555}";

/// The whole page.
pub fn render(
    pipeline: &str,
    entries: &[Entry],
    missing: &[String],
    tokenizers: &Tokenizers,
) -> anyhow::Result<String> {
    let of = |kind: &str| {
        entries
            .iter()
            .filter(|e| e.kind == kind)
            .collect::<Vec<_>>()
    };
    let mut body = String::new();
    let _ = write!(
        body,
        "<h1>saeflow report: {}</h1><p class=\"note\">{} finished instances{}. Generated by saeflow {} from the \
         cache; rerun <code>saeflow report</code> as stages finish.</p>",
        escape(pipeline),
        entries.len(),
        if missing.is_empty() {
            String::new()
        } else {
            format!(
                ", not computed yet: <span class=\"missing\">{}</span>",
                escape(&missing.join(", "))
            )
        },
        env!("CARGO_PKG_VERSION")
    );
    let sections: [(&str, &str, &str); 7] = [
        ("data", "Datasets", "dataset"),
        ("answers", "The model's own answers", "generate"),
        ("training", "SAE training", "train"),
        ("evaluation", "Evaluation", "eval"),
        ("labels", "Labelled features", "label"),
        ("steering", "Steering", "steer"),
        ("explanations", "Explanations", "explain"),
    ];
    let imported = of("sae");
    if !imported.is_empty() {
        let _ = write!(
            body,
            "<section id=\"imported\"><h2>Imported SAEs</h2>{}</section>",
            imported_saes(&imported)?
        );
    }
    for (id, title, kind) in sections {
        let found = of(kind);
        let _ = write!(body, "<section id=\"{id}\"><h2>{title}</h2>");
        if found.is_empty() {
            let _ = write!(body, "<p class=\"missing\">No finished `{kind}` stage.</p>");
        }
        let html = match kind {
            "dataset" => found
                .iter()
                .map(|e| dataset(e))
                .collect::<anyhow::Result<Vec<_>>>()?,
            "generate" => found
                .iter()
                .map(|e| answers(e))
                .collect::<anyhow::Result<Vec<_>>>()?,
            "train" => vec![training(&found)?],
            "eval" => vec![evaluation(&found)?],
            "label" => found
                .iter()
                .map(|e| labels(e, entries, tokenizers))
                .collect::<anyhow::Result<Vec<_>>>()?,
            "steer" => found
                .iter()
                .map(|e| steering(e))
                .collect::<anyhow::Result<Vec<_>>>()?,
            _ => found
                .iter()
                .map(|e| explanations(e))
                .collect::<anyhow::Result<Vec<_>>>()?,
        };
        if !found.is_empty() {
            body += &html.concat();
        }
        body += "</section>";
    }
    Ok(format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" \
         content=\"width=device-width,initial-scale=1\"><title>saeflow: {}</title><style>{STYLE}</style></head>\
         <body>{body}</body></html>\n",
        escape(pipeline)
    ))
}

fn dataset(e: &Entry) -> anyhow::Result<String> {
    let t = Table::open(&e.dir.join("rows.parquet"))?;
    let (labels, splits) = (t.strings("label")?, t.strings("split")?);
    let mut counts: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for (l, s) in labels.iter().zip(&splits) {
        let l = if l.is_empty() { "(none)" } else { l };
        *counts
            .entry(l.to_string())
            .or_default()
            .entry(s.clone())
            .or_default() += 1;
    }
    let split_names: Vec<String> = {
        let mut v: Vec<String> = splits.clone();
        v.sort();
        v.dedup();
        v
    };
    let rows: Vec<Vec<String>> = counts
        .iter()
        .map(|(l, per)| {
            std::iter::once(escape(l))
                .chain(
                    split_names
                        .iter()
                        .map(|s| per.get(s).copied().unwrap_or(0).to_string()),
                )
                .chain(std::iter::once(per.values().sum::<u64>().to_string()))
                .collect()
        })
        .collect();
    let mut headers = vec!["label"];
    headers.extend(split_names.iter().map(String::as_str));
    headers.push("total");
    let chart = bars(
        &format!("{}: rows per label", e.name),
        "rows",
        &counts
            .iter()
            .map(|(l, per)| (l.clone(), per.values().sum::<u64>() as f64))
            .collect::<Vec<_>>(),
    );
    Ok(format!(
        "<h3>{} ({} rows)</h3>{}<div class=\"charts\">{chart}</div>",
        escape(&e.name),
        labels.len(),
        table(&headers, &rows)
    ))
}

/// SAEs brought in by `sae` stages: where each came from and what it reads (`source.json`).
/// A `generate` stage: the knowledge filter, each instruction's grades and compliance (with intervals), and
/// the first answers of each instruction.
fn answers(e: &Entry) -> anyhow::Result<String> {
    let s = json(&e.dir.join("summary.json"))?;
    let rate =
        |v: &serde_json::Value| match (v["rate"].as_f64(), v["low"].as_f64(), v["high"].as_f64()) {
            (Some(r), Some(l), Some(h)) => format!("{} [{}, {}]", num(r), num(l), num(h)),
            _ => "–".into(),
        };
    let mut html = format!(
        "<h3>{}</h3><p>{} questions, {} answers, {} kept, {} with a grading problem (unparsable, empty, failed \
         or not generated: counted, never labelled).",
        escape(&e.name),
        count(&s["questions"]),
        count(&s["answers"]),
        count(&s["kept"]),
        count(&s["problems"])
    );
    let known = &s["knowledge_filter"];
    if known.is_object() {
        let _ = write!(
            html,
            " Knowledge filter: {} of {} questions answered correctly under every truth-wanting instruction \
             (rate {}, 95% interval over questions).",
            count(&known["passed"]),
            count(&known["of"]),
            rate(&known["known"])
        );
    }
    html += "</p>";
    let mut rows = Vec::new();
    if let Some(instructions) = s["instructions"].as_object() {
        for (name, i) in instructions {
            let listed = |v: &serde_json::Value| {
                v.as_object().map_or(String::new(), |m| {
                    m.iter()
                        .map(|(k, n)| format!("{} {}", escape(k), count(n)))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
            };
            rows.push(vec![
                escape(name),
                escape(i["wants"].as_str().unwrap_or("")),
                listed(&i["grades"]),
                format!("{} of {}", rate(&i["complied"]), count(&i["complied_of"])),
                listed(&i["kept_labels"]),
            ]);
        }
    }
    html += &table(
        &[
            "instruction",
            "wants",
            "grades",
            "complied [95% interval] (known questions, with the filter)",
            "labels kept",
        ],
        &rows,
    );
    let t = Table::open(&e.dir.join("generations.parquet"))?;
    let (instruction, question, completion, grade, label) = (
        t.strings("instruction")?,
        t.strings("question")?,
        t.strings("completion")?,
        t.strings("grade")?,
        t.strings("label")?,
    );
    let mut shown: BTreeMap<&str, usize> = BTreeMap::new();
    let mut samples = Vec::new();
    for i in 0..instruction.len() {
        let n = shown.entry(instruction[i].as_str()).or_default();
        if *n < 3 {
            *n += 1;
            samples.push(vec![
                escape(&instruction[i]),
                escape(&question[i]),
                format!("<span class=\"ctx\">{}</span>", escape(&completion[i])),
                escape(&grade[i]),
                escape(&label[i]),
            ]);
        }
    }
    html += &table(
        &["instruction", "question", "answer", "grade", "label"],
        &samples,
    );
    Ok(html)
}

fn imported_saes(entries: &[&Entry]) -> anyhow::Result<String> {
    let mut rows = Vec::new();
    for e in entries {
        let s = json(&e.dir.join("source.json"))?;
        let text = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
        let origin = match s["hub"].as_str() {
            Some(hub) => format!("{hub}@{} {}", text(&s["revision"]), text(&s["subfolder"])),
            None => text(&s["path"]),
        };
        rows.push(vec![
            escape(&e.name),
            escape(origin.trim()),
            escape(&text(&s["architecture"])),
            count(&s["d_in"]),
            count(&s["d_sae"]),
            escape(&text(&s["hook"])),
        ]);
    }
    Ok(table(
        &["stage", "source", "architecture", "d_in", "d_sae", "hook"],
        &rows,
    ))
}

fn training(entries: &[&Entry]) -> anyhow::Result<String> {
    if entries.is_empty() {
        return Ok(String::new());
    }
    let (mut fvu, mut val, mut rows) = (Vec::new(), Vec::new(), Vec::new());
    for e in entries {
        let log = Table::open(&e.dir.join("train_log.parquet"))?;
        let steps: Vec<f64> = log.u64s("step")?.into_iter().map(|s| s as f64).collect();
        let (f, v) = (log.f64s("fvu")?, log.f64s("val_fvu")?);
        fvu.push((e.name.clone(), steps.iter().copied().zip(f).collect()));
        val.push((
            e.name.clone(),
            steps
                .iter()
                .copied()
                .zip(v)
                .filter(|p| p.1.is_finite())
                .collect(),
        ));
        let info = json(&e.dir.join("train.json"))?;
        let last = &info["final"];
        rows.push(vec![
            escape(&e.name),
            count(&info["d_sae"]),
            count(&info["k"]),
            count(&info["steps"]),
            count(&info["tokens"]),
            num(last["fvu"].as_f64().unwrap_or(f64::NAN)),
            num(last["val_fvu"].as_f64().unwrap_or(f64::NAN)),
            num(last["l0"].as_f64().unwrap_or(f64::NAN)),
            num(info["dead_fraction"].as_f64().unwrap_or(f64::NAN)),
        ]);
    }
    Ok(format!(
        "{}<div class=\"charts\">{}{}</div>",
        table(
            &[
                "SAE",
                "latents",
                "k",
                "steps",
                "tokens",
                "final FVU",
                "val FVU",
                "L0",
                "dead"
            ],
            &rows
        ),
        lines("training FVU", "step", "FVU", &fvu),
        lines("validation FVU", "step", "FVU", &val)
    ))
}

fn evaluation(entries: &[&Entry]) -> anyhow::Result<String> {
    if entries.is_empty() {
        return Ok(String::new());
    }
    let (mut fvu, mut ce, mut rows, mut hist) = (Vec::new(), Vec::new(), Vec::new(), String::new());
    for e in entries {
        let r = json(&e.dir.join("eval.json"))?;
        let get = |g: &str, k: &str| r[g][k].as_f64().unwrap_or(f64::NAN);
        let l0 = get("sparsity", "l0");
        fvu.push((e.name.clone(), l0, get("reconstruction_quality", "fvu")));
        ce.push((
            e.name.clone(),
            l0,
            get("model_performance_preservation", "ce_loss_score"),
        ));
        rows.push(vec![
            escape(&e.name),
            num(l0),
            num(get("reconstruction_quality", "fvu")),
            num(get("reconstruction_quality", "cossim")),
            num(get("sparsity", "dead_fraction")),
            num(get("sparsity", "dense_1pct_fraction")),
            num(get("model_performance_preservation", "ce_loss_without_sae")),
            num(get("model_performance_preservation", "ce_loss_with_sae")),
            num(get("model_performance_preservation", "ce_loss_score")),
            num(get("model_behavior_preservation", "kl_div_with_sae")),
        ]);
        let edges = r["density_histogram"]["log10_edges"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let counts = r["density_histogram"]["counts"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut b: Vec<(String, f64)> = vec![(
            "dead".into(),
            r["density_histogram"]["dead"].as_f64().unwrap_or(0.0),
        )];
        b.extend(counts.iter().zip(&edges).map(|(c, e)| {
            (
                format!("{}", e.as_f64().unwrap_or(0.0)),
                c.as_f64().unwrap_or(0.0),
            )
        }));
        hist += &bars(
            &format!("{}: log10 feature density", e.name),
            "features",
            &b,
        );
    }
    Ok(format!(
        "{}<div class=\"charts\">{}{}{hist}</div>",
        table(
            &[
                "SAE",
                "L0",
                "FVU",
                "cos",
                "dead",
                "dense >1%",
                "CE clean",
                "CE with SAE",
                "CE recovered",
                "KL"
            ],
            &rows
        ),
        scatter("FVU vs L0", "L0", "FVU", &fvu),
        scatter("CE loss recovered vs L0", "L0", "CE recovered", &ce)
    ))
}

/// The capture a label stage read and its model's tokenizer, found through the manifests.
fn tokenizer_of<'a>(
    e: &Entry,
    entries: &[Entry],
    tokenizers: &'a Tokenizers,
) -> Option<&'a Tokenizer> {
    let manifest = json(&e.dir.join("manifest.json")).ok()?;
    let capture_key = manifest["inputs"]["input"].as_str()?;
    let capture = entries.iter().find(|x| x.dir.ends_with(capture_key))?;
    let info = json(&capture.dir.join("capture.json")).ok()?;
    tokenizers.get(info["model"].as_str()?)
}

fn context_html(tokens: &[u32], marked: usize, tokenizer: Option<&Tokenizer>) -> String {
    let text = |ids: &[u32]| match tokenizer {
        Some(t) => t.decode(ids).unwrap_or_else(|_| format!("{ids:?}")),
        None => ids.iter().map(|i| format!("[{i}]")).collect::<String>(),
    };
    let m = marked.min(tokens.len().saturating_sub(1));
    format!(
        "{}<mark>{}</mark>{}",
        escape(&text(&tokens[..m])),
        escape(&text(&tokens[m..(m + 1).min(tokens.len())])),
        escape(&text(&tokens[(m + 1).min(tokens.len())..]))
    )
}

fn labels(e: &Entry, entries: &[Entry], tokenizers: &Tokenizers) -> anyhow::Result<String> {
    let label = LabelSummary::read(&e.dir, &e.name)?;
    let summary = &label.json;
    let unit = summary["unit"].as_str().unwrap_or("doc_mean").to_string();
    let mut rows = Vec::new();
    let mut chart = Vec::new();
    if let Some(per) = summary["per_class"].as_object() {
        for (class, c) in per {
            let f = |k: &str| c[k].as_f64().unwrap_or(f64::NAN);
            rows.push(vec![
                escape(class),
                count(&c["labelled_features"]),
                count(&c["best_feature"]),
                num(f("best_feature_val_auroc")),
                num(f("best_feature_test_auroc")),
            ]);
            if let Some(methods) = c["documents"].as_object() {
                for (method, m) in methods {
                    chart.push((
                        format!("{class} {method}"),
                        m["auroc"].as_f64().unwrap_or(f64::NAN),
                    ));
                }
            }
        }
    }
    let auroc_chart = bars("held-out AUROC, every method on one unit", "AUROC", &chart);
    // Top labelled features per class with their top contexts.
    let features = Table::open(&e.dir.join("features.parquet"))?;
    let (feature, class, labelled) = (
        features.u32s("feature")?,
        features.strings("class")?,
        features.column("labelled")?,
    );
    let labelled: Vec<bool> = labelled
        .into_iter()
        .flat_map(|c| {
            let c = c.as_boolean();
            (0..c.len()).map(move |i| c.value(i))
        })
        .collect();
    let auroc = features.f64s(&label.test_auroc_column)?;
    // Ranked on validation, shown with the test AUROC: the page never picks by the number it reports.
    let val = features.f64s(&label.val_auroc_column)?;
    let mut best: BTreeMap<&str, Vec<(f64, f64, u32)>> = BTreeMap::new();
    for i in 0..feature.len() {
        if labelled[i] {
            best.entry(class[i].as_str())
                .or_default()
                .push((val[i], auroc[i], feature[i]));
        }
    }
    let contexts = Table::open(&e.dir.join("contexts.parquet"))?;
    let (cf, cc, ck) = (
        contexts.u32s("feature")?,
        contexts.strings("class")?,
        contexts.strings("kind")?,
    );
    let (ca, cm) = (contexts.f64s("activation")?, contexts.u32s("marked")?);
    let ct: Vec<Vec<u32>> = contexts
        .column("token_ids")?
        .into_iter()
        .flat_map(|c| {
            let c = c.as_list::<i32>();
            (0..c.len())
                .map(|i| c.value(i).as_primitive::<UInt32Type>().values().to_vec())
                .collect::<Vec<_>>()
        })
        .collect();
    let tokenizer = tokenizer_of(e, entries, tokenizers);
    let mut pages = String::new();
    for (c, mut list) in best {
        list.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.2.cmp(&b.2)));
        for (v, a, f) in list.into_iter().take(3) {
            let _ = write!(
                pages,
                "<h3>feature {f} · {} · AUROC ({}) {} on test, {} on validation (chosen by)</h3>",
                escape(c),
                escape(&unit),
                num(a),
                num(v)
            );
            let shown: Vec<Vec<String>> = (0..cf.len())
                .filter(|&i| cf[i] == f && cc[i] == c && ck[i] == "top")
                .take(5)
                .map(|i| {
                    vec![
                        num(ca[i]),
                        format!(
                            "<span class=\"ctx\">{}</span>",
                            context_html(&ct[i], cm[i] as usize, tokenizer)
                        ),
                    ]
                })
                .collect();
            pages += &table(&["activation", "top context (the token marked)"], &shown);
        }
    }
    let documents = document_table(e)?;
    Ok(format!(
        "<h3>{}</h3><p class=\"note\">Labels need q &lt; α on the fit split; the numbers are held out (test split).</p>{}\
         {documents}<div class=\"charts\">{auroc_chart}</div>{pages}",
        escape(&e.name),
        table(
            &["class", "labelled features", "best feature", &format!("its validation AUROC ({unit}, chosen by)"), "its test AUROC"],
            &rows
        )
    ))
}

/// Every method per document (pooled test documents) with its 95% interval and within-pair AUROC, from
/// `evaluation.parquet`; empty for label objects without one.
fn document_table(e: &Entry) -> anyhow::Result<String> {
    let path = e.dir.join("evaluation.parquet");
    if !path.is_file() {
        return Ok(String::new());
    }
    let t = Table::open(&path)?;
    let (class, method, scope) = (
        t.strings("class")?,
        t.strings("method")?,
        t.strings("scope")?,
    );
    let (auroc, low, high, pair) = (
        t.f64s("auroc")?,
        t.f64s("auroc_low")?,
        t.f64s("auroc_high")?,
        t.f64s("within_pair_auroc")?,
    );
    let (n_pos, n_neg) = (t.u64s("n_pos")?, t.u64s("n_neg")?);
    let recall = t.f64s("recall_at_1pct_fpr").ok();
    let unit = json(&e.dir.join("label.json"))
        .ok()
        .and_then(|j| {
            Some(format!(
                "{} over {} positions",
                j["pool"].as_str()?,
                j["positions"].as_str()?
            ))
        })
        .unwrap_or_else(|| "documents".into());
    let rows: Vec<Vec<String>> = (0..class.len())
        .filter(|&i| scope[i] == "pooled")
        .map(|i| {
            vec![
                escape(&class[i]),
                escape(&method[i]),
                format!("{} [{}, {}]", num(auroc[i]), num(low[i]), num(high[i])),
                num(pair[i]),
                recall.as_ref().map_or("–".into(), |r| num(r[i])),
                format!("{} / {}", n_pos[i], n_neg[i]),
            ]
        })
        .collect();
    Ok(format!(
        "<p class=\"note\">One unit for every method ({}), test split, 95% bootstrap intervals with \
         documents and pairs drawn together; per-source rows in evaluation.parquet.</p>{}",
        escape(&unit),
        table(
            &["class", "method", "AUROC [95% interval]", "within pairs", "recall at 1% FPR (control)", "test units (class / rest)"],
            &rows
        )
    ))
}

fn steering(e: &Entry) -> anyhow::Result<String> {
    let t = Table::open(&e.dir.join("effects.parquet"))?;
    let (target, strength) = (t.strings("target")?, t.f64s("strength")?);
    let (probe, kl) = (t.f64s("probe_probability")?, t.f64s("kl_neutral")?);
    // Intervals (steer VERSION 4 on); older objects have none.
    let interval = |name: &str| -> Option<(Vec<f64>, Vec<f64>)> {
        Some((
            t.f64s(&format!("{name}_low")).ok()?,
            t.f64s(&format!("{name}_high")).ok()?,
        ))
    };
    let with = |v: &[f64], i: usize, band: &Option<(Vec<f64>, Vec<f64>)>| match band {
        Some((low, high)) => format!("{} [{}, {}]", num(v[i]), num(low[i]), num(high[i])),
        None => num(v[i]),
    };
    let (probe_band, kl_band) = (interval("probe_probability"), interval("kl_neutral"));
    let effect_rows: Vec<Vec<String>> = (0..target.len())
        .map(|i| {
            vec![
                escape(&target[i]),
                num(strength[i]),
                with(&probe, i, &probe_band),
                with(&kl, i, &kl_band),
            ]
        })
        .collect();
    let mut names: Vec<String> = target.clone();
    names.dedup();
    let series = |values: &[f64]| -> Vec<(String, Vec<(f64, f64)>)> {
        names
            .iter()
            .filter(|n| n.as_str() != "none")
            .map(|n| {
                (
                    n.clone(),
                    (0..target.len())
                        .filter(|&i| &target[i] == n)
                        .map(|i| (strength[i], values[i]))
                        .collect(),
                )
            })
            .collect()
    };
    let g = Table::open(&e.dir.join("generations.parquet"))?;
    let (gt, gs, gp, gx) = (
        g.strings("target")?,
        g.f64s("strength")?,
        g.u32s("prompt_index")?,
        g.strings("text")?,
    );
    let prompts = g.strings("prompt")?;
    let mut rows = Vec::new();
    for i in (0..gt.len()).filter(|&i| gp[i] == 0) {
        rows.push(vec![
            escape(&gt[i]),
            num(gs[i]),
            format!("<span class=\"ctx\">{}</span>", escape(&gx[i])),
        ]);
    }
    // Effect against side effect: each target's probe probability over its KL on neutral text.
    let tradeoff: Vec<(String, Vec<(f64, f64)>)> = series(&probe)
        .into_iter()
        .zip(series(&kl))
        .map(|((name, p), (_, k))| {
            let mut points: Vec<(f64, f64)> = k.iter().zip(&p).map(|(k, p)| (k.1, p.1)).collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            (name, points)
        })
        .collect();
    Ok(format!(
        "<h3>{}</h3><div class=\"charts\">{}{}{}</div>{}<p>Prompt 0: <span class=\"ctx\">{}</span></p>{}",
        escape(&e.name),
        lines("probe probability of the generations", "strength", "probe p", &series(&probe)),
        lines("KL on neutral text", "strength", "KL (nats)", &series(&kl)),
        lines("effect against side effect", "KL on neutral text", "probe p", &tradeoff),
        table(
            &["target", "strength", "probe p [95% interval over prompts]", "KL [95% interval over texts]"],
            &effect_rows
        ),
        escape(prompts.first().map(String::as_str).unwrap_or("")),
        table(&["target", "strength", "generation"], &rows)
    ))
}

fn explanations(e: &Entry) -> anyhow::Result<String> {
    let t = Table::open(&e.dir.join("explanations.parquet"))?;
    let (f, c, x, b) = (
        t.u32s("feature")?,
        t.strings("class")?,
        t.strings("explanation")?,
        t.f64s("balanced_accuracy")?,
    );
    let rows: Vec<Vec<String>> = (0..f.len())
        .map(|i| vec![f[i].to_string(), escape(&c[i]), escape(&x[i]), num(b[i])])
        .collect();
    Ok(format!(
        "<h3>{}</h3>{}",
        escape(&e.name),
        table(
            &[
                "feature",
                "class",
                "explanation",
                "detection balanced accuracy"
            ],
            &rows
        )
    ))
}
