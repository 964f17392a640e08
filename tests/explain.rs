//! The `explain` stage against a loopback OpenAI-compatible server started by the test: the prompts, the key
//! handling, detection scoring, unusable replies and HTTP errors.
mod common;

use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, UInt32Type};
use common::http::Server;
use common::{files, nanochat_chain, object_of, read_parquet, saeflow, text, write};
use serde_json::{json, Value};

const KEY: &str = "sekrit-123";

fn pipeline(dir: &Path, base_url: &str, llm: &str) {
    let explain = format!(
        r#"
[stages.explain]
kind = "explain"
labels = "labels"
model = "nc"
base_url = "{base_url}/v1"
llm = "{llm}"
api_key_env = "SAEFLOW_TEST_KEY"
features = 3
"#
    );
    write(
        &dir.join("p.toml"),
        &nanochat_chain(dir, "ex", "alpha = 0.5\nmin_effect = 0.0", &explain),
    );
}

fn run_with_key(dir: &Path) -> std::process::Output {
    saeflow(dir)
        .env("SAEFLOW_TEST_KEY", KEY)
        .args(["run", "p.toml"])
        .output()
        .unwrap()
}

/// A fake chat endpoint: explanation requests get a fixed phrase, detection requests an array of ones (or,
/// in mode 1, prose; in mode 2 every request is refused with 401). Every request body is kept.
fn server(mode: Arc<AtomicU8>, bodies: Arc<Mutex<Vec<(String, Value)>>>) -> Server {
    Server::with_handler(move |r| {
        let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        let auth = r.headers.get("authorization").cloned().unwrap_or_default();
        bodies.lock().unwrap().push((auth, body.clone()));
        if mode.load(Ordering::SeqCst) == 2 {
            return (401, r#"{"error": {"message": "Incorrect API key"}}"#.into());
        }
        let system = body["messages"][0]["content"].as_str().unwrap_or("");
        let user = body["messages"][1]["content"].as_str().unwrap_or("");
        let reply = if system.contains("Describe in one short phrase") {
            "statements about places\n".to_string()
        } else if mode.load(Ordering::SeqCst) == 1 {
            "I think most of them do.".to_string()
        } else {
            let n = user
                .lines()
                .filter(|l| {
                    l.split_once(". ")
                        .is_some_and(|(i, _)| i.parse::<u32>().is_ok())
                })
                .count();
            serde_json::to_string(&vec![1; n]).unwrap()
        };
        (
            200,
            json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]})
                .to_string(),
        )
    })
}

#[test]
fn explains_and_scores_features_through_a_chat_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mode = Arc::new(AtomicU8::new(0));
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let srv = server(mode.clone(), bodies.clone());
    pipeline(dir.path(), &srv.base, "judge-1");
    let out = run_with_key(dir.path());
    assert!(out.status.success(), "{}", text(&out));
    let cache = dir.path().join("cache");
    let object = object_of(&cache, "ex", "explain");
    let b = read_parquet(&object.join("explanations.parquet"));
    assert_eq!(b.num_rows(), 3, "three labelled features explained");
    let explanation = b.column_by_name("explanation").unwrap().as_string::<i32>();
    let f64s = |name: &str| {
        b.column_by_name(name)
            .unwrap()
            .as_primitive::<Float64Type>()
            .values()
            .to_vec()
    };
    let u32s = |name: &str| {
        b.column_by_name(name)
            .unwrap()
            .as_primitive::<UInt32Type>()
            .values()
            .to_vec()
    };
    let (pos, neg) = (u32s("positives"), u32s("negatives"));
    // Saying "fires" to every excerpt: recall 1, specificity 0, accuracy = the share of positives.
    for i in 0..3 {
        assert_eq!(explanation.value(i), "statements about places");
        assert_eq!(f64s("recall")[i], 1.0);
        assert_eq!(f64s("balanced_accuracy")[i], 0.5);
        let share = pos[i] as f64 / (pos[i] + neg[i]) as f64;
        assert!((f64s("accuracy")[i] - share).abs() < 1e-12);
        assert!(pos[i] > 0 && neg[i] > 0);
    }
    // Largest validation effect first (chosen on validation, reported on test).
    let effect: Vec<f64> = f64s("val_auroc").iter().map(|a| (a - 0.5).abs()).collect();
    assert!(
        effect[0] >= effect[1] && effect[1] >= effect[2],
        "{effect:?}"
    );

    let seen = bodies.lock().unwrap().clone();
    assert_eq!(
        seen.len(),
        6,
        "an explanation and a detection request per feature"
    );
    assert_eq!(
        srv.log.lock().unwrap()[0],
        "POST /v1/chat/completions",
        "the OpenAI path under base_url"
    );
    for (i, (auth, body)) in seen.iter().enumerate() {
        assert_eq!(auth, &format!("Bearer {KEY}"));
        assert_eq!(body["model"], "judge-1");
        assert_eq!(body["temperature"], 0.0);
        let user = body["messages"][1]["content"].as_str().unwrap();
        // Explanations see the marked token; detection excerpts carry no marks.
        assert_eq!(user.contains("<<"), i % 2 == 0, "{user}");
        if i % 2 == 1 {
            assert!(
                user.starts_with("Explanation: statements about places"),
                "{user}"
            );
        }
    }
    let transcript = std::fs::read_to_string(object.join("transcript.jsonl")).unwrap();
    assert_eq!(transcript.lines().count(), 6);
    // The key is nowhere in the cache: not in outputs, manifests, logs or keys.
    for f in files(&cache) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !bytes.windows(KEY.len()).any(|w| w == KEY.as_bytes()),
            "{} holds the API key",
            f.display()
        );
    }

    // An unusable detection reply: the explanation is kept, unscored, with the reason.
    mode.store(1, Ordering::SeqCst);
    pipeline(dir.path(), &srv.base, "judge-2");
    let out = run_with_key(dir.path());
    assert!(out.status.success(), "{}", text(&out));
    let b = read_parquet(&object_of(&cache, "ex", "explain").join("explanations.parquet"));
    let scored = b.column_by_name("scored").unwrap().as_boolean();
    let error = b.column_by_name("error").unwrap().as_string::<i32>();
    assert!(!scored.value(0));
    assert_eq!(error.value(0), "no JSON array in the reply");
    assert!(b.column_by_name("accuracy").unwrap().is_null(0));

    // A refused key fails the stage, saying which URL and which variable.
    mode.store(2, Ordering::SeqCst);
    pipeline(dir.path(), &srv.base, "judge-3");
    let out = run_with_key(dir.path());
    let message = text(&out);
    assert!(!out.status.success(), "{message}");
    assert!(
        message.contains("/v1/chat/completions: HTTP 401")
            && message.contains("is $SAEFLOW_TEST_KEY set to a valid key?"),
        "{message}"
    );
}
