//! `saeflow report`: a self-contained page with every section of a finished pipeline, listing what is not
//! computed yet, and clean in headless Chromium (no console messages; a screenshot renders).
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::{nanochat_chain, ok, write};

const EXTRA: &str = r#"
[stages.eval]
kind = "eval"
sae = "sae"
input = "acts"
model = "nc"
ce_tokens = 500

[stages.steer]
kind = "steer"
sae = "sae"
model = "nc"
labels = "labels"
select = "top:true"
diffmean = "true"
input = "data"
prompt_count = 2
max_new_tokens = 4
strengths = [-2.0, 0.0, 2.0]
"#;

/// The `<section id=…>` of the page, up to the next section.
fn section<'a>(page: &'a str, id: &str) -> &'a str {
    let start = page
        .find(&format!("<section id=\"{id}\">"))
        .unwrap_or_else(|| panic!("no section {id}"));
    let end = page[start..].find("</section>").unwrap() + start;
    &page[start..end]
}

/// Console lines Chromium logs while loading `page`.
fn chromium_console(page: &Path, screenshot: &Path) -> Vec<String> {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1100,2400",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--screenshot={}", screenshot.display()))
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("chromium runs");
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.contains(":CONSOLE"))
        .map(str::to_string)
        .collect()
}

/// The chain run to the end, its report written before `steer` ran (`early/`) and after (`report/`);
/// made once for the tests of this file.
fn finished() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("report");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        write(
            &dir.join("p.toml"),
            &nanochat_chain(&dir, "rp", "alpha = 0.5\nmin_effect = 0.0", EXTRA),
        );
        ok(&dir, &["run", "p.toml", "eval", "labels"]);
        let out = ok(&dir, &["report", "p.toml", "-o", "early"]);
        assert!(out.contains("1 not computed yet"), "{out}");
        ok(&dir, &["run", "p.toml"]);
        ok(&dir, &["report", "p.toml"]);
        dir
    })
}

#[test]
fn report_shows_every_section_and_what_is_not_computed_yet() {
    let dir = finished();
    // Progressive: before steer runs, the page lists it as missing.
    let page = std::fs::read_to_string(dir.join("early/index.html")).unwrap();
    assert!(section(&page, "steering").contains("No finished `steer` stage"));
    assert!(page.contains("not computed yet: <span class=\"missing\">steer</span>"));

    let page = std::fs::read_to_string(dir.join("report/index.html")).unwrap();
    // Self-contained: nothing to fetch, nothing to run.
    for outside in ["<script", "src=", "href=", "http://", "https://"] {
        assert!(!page.contains(outside), "{outside}");
    }
    for id in ["data", "training", "evaluation", "labels", "steering"] {
        let s = section(&page, id);
        assert!(!s.contains("No finished"), "{id}");
        // Every chart has marks in it.
        for chart in s.split("<svg").skip(1) {
            assert!(
                chart.contains("<rect")
                    || chart.contains("<circle")
                    || chart.contains("<path d=\"M"),
                "{id}: empty chart"
            );
        }
        assert!(s.contains("<svg"), "{id} has a chart");
    }
    // Every method on one unit with an interval, baselines beside them.
    let labels = section(&page, "labels");
    for method in [
        "best_feature",
        "diffmean",
        "logistic",
        "lexical",
        "source_only",
        "shuffled_diffmean",
    ] {
        assert!(labels.contains(&format!("<td>{method}</td>")), "{method}");
    }
    assert!(labels.contains("AUROC [95% interval]"));
    // Contexts are decoded text with the token marked, not token ids.
    assert!(labels.contains("<mark>"), "contexts shown");
    assert!(
        !labels.contains("<mark>["),
        "decoded with the model's tokenizer"
    );
    assert!(section(&page, "steering").contains("diffmean:true"));
    assert!(section(&page, "explanations").contains("No finished `explain` stage"));

    // Values read from the cache's JSON are data: a tampered (shared) cache cannot put markup on the page.
    let cache = dir.join("cache");
    let evil = "<script>alert(1)</script>";
    for (stage, file, fields) in [
        ("sae", "train.json", &["d_sae", "steps", "tokens", "k"][..]),
        ("labels", "label.json", &[][..]),
    ] {
        let path = common::object_of(&cache, "rp", stage).join(file);
        let mut json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        for f in fields {
            json[f] = evil.into();
        }
        if let Some(per) = json["per_class"].as_object_mut() {
            for c in per.values_mut() {
                c["labelled_features"] = evil.into();
            }
        }
        std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
    }
    ok(dir, &["report", "p.toml", "-o", "tampered"]);
    let tampered = std::fs::read_to_string(dir.join("tampered/index.html")).unwrap();
    assert!(
        !tampered.contains("<script"),
        "cache JSON reached the page as markup"
    );
    assert!(section(&tampered, "training").contains("<td>–</td>"));
}

#[test]
#[cfg_attr(missing = "chromium", ignore = "needs chromium")]
fn the_page_renders_in_headless_chromium_without_console_messages() {
    let dir = finished();
    // No console output at all (the page has no scripts), and it renders.
    let shot = dir.join("shot.png");
    let console = chromium_console(&dir.join("report/index.html"), &shot);
    assert!(console.is_empty(), "{console:?}");
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 20_000,
        "a real screenshot"
    );
    // The check itself sees console errors.
    let bad = dir.join("bad.html");
    std::fs::write(
        &bad,
        "<html><body><script>console.error('boom')</script></body></html>",
    )
    .unwrap();
    let console = chromium_console(&bad, &dir.join("bad.png"));
    assert!(console.iter().any(|l| l.contains("boom")), "{console:?}");
}
