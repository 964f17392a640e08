//! The chat-completion client (`explain`'s judge calls) against a hostile or broken endpoint: a redirect is
//! not followed (the POST, with its API key, is not re-sent wherever a response points), and a response that
//! stalls mid-body hits the idle limit instead of hanging the stage.

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::http::Server;

#[test]
fn api_calls_neither_follow_redirects_nor_wait_forever_on_a_stalled_body() {
    // Its own test binary: the idle limit comes from the environment, set here before any call.
    // SAFETY: no other thread of this process reads or writes the environment at this point.
    unsafe { std::env::set_var("SAEFLOW_DOWNLOAD_IDLE_SECS", "1") };
    let requests = Arc::new(AtomicUsize::new(0));
    let seen = requests.clone();
    let server = Server::raw(move |path, _headers, stream| {
        seen.fetch_add(1, Ordering::SeqCst);
        let head = if path == "/redirect" {
            "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:9/steal\r\nContent-Length: 0\r\n\r\n"
                .to_string()
        } else {
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"choi"
                .to_string()
        };
        let _ = stream.write_all(head.as_bytes());
        let _ = stream.flush();
        std::thread::sleep(Duration::from_secs(30));
    });
    let key = [("Authorization".to_string(), "Bearer sk-secret".to_string())];
    let body = serde_json::json!({"model": "m"});

    let err =
        saeflow_core::data::download::post_json(&format!("{}/redirect", server.base), &key, &body)
            .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("HTTP 307") && msg.contains("do not follow redirects"),
        "{msg}"
    );
    assert_eq!(requests.load(Ordering::SeqCst), 1);

    let start = Instant::now();
    let err =
        saeflow_core::data::download::post_json(&format!("{}/stall", server.base), &key, &body)
            .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "took {:?}: {msg}",
        start.elapsed()
    );
    assert!(
        msg.contains("/stall") && msg.to_lowercase().contains("timeout"),
        "{msg}"
    );
}
