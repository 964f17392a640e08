//! Action keys: blake3 over a canonical encoding of everything a stage's result depends on.
//!
//! The canonical encoding is compact JSON with object keys sorted (serde_json's map is a BTreeMap) and
//! floats printed by ryu's shortest round-trip form, so `1e-5` and `0.00001` (the same f64) encode alike,
//! while integers and floats stay distinct (`3` vs `3.0`). Non-finite floats are rejected since JSON has no
//! spelling for them, and `-0.0` is folded into `0.0`.

use serde_json::Value as Json;

use crate::cache::Key;

/// Brings a JSON value into canonical form; errors name the offending path.
pub fn canonicalize(value: &Json) -> Result<Json, String> {
    fn walk(v: &Json, path: &mut Vec<String>) -> Result<Json, String> {
        Ok(match v {
            Json::Number(n) if n.is_f64() => {
                let f = n.as_f64().expect("f64 number");
                if !f.is_finite() {
                    return Err(format!(
                        "`{}` is {f}; only finite numbers are allowed",
                        path.join(".")
                    ));
                }
                Json::from(if f == 0.0 { 0.0 } else { f })
            }
            Json::Array(items) => Json::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, x)| {
                        path.push(i.to_string());
                        let r = walk(x, path);
                        path.pop();
                        r
                    })
                    .collect::<Result<_, _>>()?,
            ),
            Json::Object(map) => Json::Object(
                map.iter()
                    .map(|(k, x)| {
                        path.push(k.clone());
                        let r = walk(x, path).map(|x| (k.clone(), x));
                        path.pop();
                        r
                    })
                    .collect::<Result<_, _>>()?,
            ),
            other => other.clone(),
        })
    }
    walk(value, &mut Vec::new())
}

/// The key of a canonical preimage.
pub fn key_of(preimage: &Json) -> Key {
    let bytes = serde_json::to_vec(preimage).expect("JSON values serialize");
    Key(blake3::hash(&bytes).to_hex().to_string())
}

/// Field-by-field differences between two preimages, as `path: old -> new` lines.
pub fn diff(old: &Json, new: &Json) -> Vec<String> {
    fn walk(path: &str, old: Option<&Json>, new: Option<&Json>, out: &mut Vec<String>) {
        match (old, new) {
            (Some(Json::Object(a)), Some(Json::Object(b))) => {
                let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                for k in keys {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(&p, a.get(k), b.get(k), out);
                }
            }
            (a, b) if a == b => {}
            (None, Some(b)) => out.push(format!("{path}: added ({b})")),
            (Some(a), None) => out.push(format!("{path}: removed (was {a})")),
            (Some(a), Some(b)) => out.push(format!("{path}: {a} -> {b}")),
            (None, None) => {}
        }
    }
    let mut out = Vec::new();
    walk("", Some(old), Some(new), &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn equal_floats_in_different_spellings_share_a_key() {
        let a: Json = serde_json::from_str(r#"{"lr": 1e-5, "k": 3}"#).unwrap();
        let b: Json = serde_json::from_str(r#"{"k": 3, "lr": 0.00001}"#).unwrap();
        assert_eq!(
            key_of(&canonicalize(&a).unwrap()),
            key_of(&canonicalize(&b).unwrap())
        );
    }

    #[test]
    fn integers_and_floats_differ() {
        assert_ne!(key_of(&json!({"k": 3})), key_of(&json!({"k": 3.0})));
    }

    #[test]
    fn negative_zero_folds_into_zero() {
        assert_eq!(
            key_of(&canonicalize(&json!({"x": -0.0})).unwrap()),
            key_of(&json!({"x": 0.0}))
        );
    }

    #[test]
    fn key_is_blake3_of_compact_sorted_json() {
        let expected = blake3::hash(br#"{"a":1,"b":[2.5,"x"]}"#)
            .to_hex()
            .to_string();
        assert_eq!(key_of(&json!({"b": [2.5, "x"], "a": 1})).0, expected);
    }

    #[test]
    fn diff_lists_changed_fields() {
        let d = diff(
            &json!({"params": {"k": 1, "a": 2}}),
            &json!({"params": {"k": 2, "a": 2}}),
        );
        assert_eq!(d, ["params.k: 1 -> 2"]);
    }
}
