//! `geometry_of_truth`: true/false statements of Marks & Tegmark (2023), 11 subsets; label 1/0 → true/false.
//! Truth labels, not deception labels: the "truth direction" control.
//!
//! Statements about one subject are paired (`pair_id`), across a subset and its negation: a city's
//! statements in `cities` and `neg_cities`, a Spanish word's in `sp_en_trans` and `neg_sp_en_trans`, a
//! number pair's in `larger_than` and `smaller_than`, a subject's in `counterfact_true_false`, a city
//! pair's in the conjunctions and disjunctions. Splits never separate a pair, so a probe is not tested on
//! a city it saw in training; within-pair AUROC compares true and false statements about one subject.
//! `companies_true_false` and `common_claim_true_false` name no subject and stay unpaired.

use std::path::Path;

use super::{file, str_field, Preset, Upstream, UpstreamFile};
use crate::data::records::read_csv;
use crate::data::records::Record;
use crate::data::rows::{assign_ids, stable_id, Row};

/// The `geometry_of_truth` preset.
pub struct GeometryOfTruth;

macro_rules! got_files {
    ($(($name:literal, $sha:literal)),* $(,)?) => {
        &[$(UpstreamFile { upstream: concat!("datasets/", $name, ".csv"), local: concat!($name, ".csv"), sha256: $sha }),*]
    };
}

const FILES: &[UpstreamFile] = got_files![
    (
        "cities",
        "f2560a0c1758c69935b50125111b574b71896bb75930dd87b1d8c973c1fa086e"
    ),
    (
        "neg_cities",
        "66c5c84de98ca15570138c205ab0e3907b57750083fac72a4eacafc3d9ebcea7"
    ),
    (
        "sp_en_trans",
        "9afa97c1b8af539a05f47655a80a5c7832c6fdb914885fd24cb4bcccbe2795b5"
    ),
    (
        "neg_sp_en_trans",
        "bec33e37047135b15cdd18c0cb0c66b65fb435ace08910cbcc220ce1ef610c96"
    ),
    (
        "larger_than",
        "406d6872e97910f3af5a031600d4932b5a567b8666e7545c8b446057471ad723"
    ),
    (
        "smaller_than",
        "ee6b7cf668d7e0fb3f49a84ca8d510cb7e484ae029ef86ed238362e26ef61a44"
    ),
    (
        "companies_true_false",
        "75a31139def9838dcaa4e2f1e5f3680f44f09f3c94553f9ad3b3a5a476124c8c"
    ),
    (
        "common_claim_true_false",
        "1889b4793c2ebd13c767eea8b65ebd4a5c2da700567677d512097b495a262576"
    ),
    (
        "counterfact_true_false",
        "5af51456d6dbd3a53d8e2ee6e4aadaca7eb02ff9136ad825866458e7283b5273"
    ),
    (
        "cities_cities_conj",
        "80e9987e8abcdd56ac8256d22b8ad6c2d6211e06a6c925c32cfcb0bc93d9d56d"
    ),
    (
        "cities_cities_disj",
        "5f4883382bb3f8664fa9b0a51cfadec507e130bf21c94f3d04776ca923646565"
    ),
];

impl Preset for GeometryOfTruth {
    fn name(&self) -> &'static str {
        "geometry_of_truth"
    }
    fn upstream(&self) -> Result<Upstream, &'static str> {
        Ok(Upstream {
            repository: "saprmarks/geometry-of-truth",
            commit: "5d1c630c44f7e50bda7ad86d601ccadf9abc5ddb",
            files: FILES,
        })
    }
    fn load(&self, dir: &Path) -> anyhow::Result<Vec<Row>> {
        let mut rows = Vec::new();
        for f in FILES {
            let subset = f.local.trim_end_matches(".csv");
            for r in read_csv(&file(dir, f.local)?)? {
                let raw = str_field(&r, "label")?;
                let label = match raw {
                    "1" => "true",
                    "0" => "false",
                    other => anyhow::bail!("{}: label `{other}` is neither 1 nor 0", r.location),
                };
                let statement = str_field(&r, "statement")?;
                let mut row = Row::text(self.name(), statement)
                    .labelled(Some(label), Some(raw))
                    .subset(subset);
                if let Some(subject) = subject(subset, &r, statement)? {
                    row.pair_id = Some(stable_id(&[self.name(), "subject", &subject]));
                }
                rows.push(row);
            }
        }
        assign_ids(&mut rows, |r| r.text.clone());
        Ok(rows)
    }
}

/// The subject a statement is about, as a pairing key shared by a subset and its negation (`None` for
/// subsets that name none).
fn subject(subset: &str, r: &Record, statement: &str) -> anyhow::Result<Option<String>> {
    let field = |name: &str| -> anyhow::Result<String> {
        match r.fields.get(name) {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(v) if !v.is_null() => Ok(v.to_string()),
            _ => anyhow::bail!("{}: no field `{name}` to pair by", r.location),
        }
    };
    Ok(Some(match subset {
        "cities" | "neg_cities" => format!("city:{}", field("city")?),
        "sp_en_trans" | "neg_sp_en_trans" => {
            // "The Spanish word 'con' means 'with'.": the word between the first pair of quotes.
            let word = statement.split('\'').nth(1).filter(|w| !w.is_empty());
            match word {
                Some(w) => format!("es:{w}"),
                None => anyhow::bail!("{}: no quoted Spanish word in `{statement}`", r.location),
            }
        }
        "larger_than" | "smaller_than" => {
            let (a, b) = (field("n1")?, field("n2")?);
            let (lo, hi) = if a.parse::<i64>().ok() <= b.parse::<i64>().ok() {
                (a, b)
            } else {
                (b, a)
            };
            format!("numbers:{lo}-{hi}")
        }
        "counterfact_true_false" => format!("subject:{}", field("subject")?),
        "cities_cities_conj" | "cities_cities_disj" => {
            format!("cities:{}|{}", field("city1")?, field("city2")?)
        }
        _ => return Ok(None),
    }))
}
