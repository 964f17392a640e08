//! Downloads from a hostile (or broken) server, each written as the attack: a loopback "hub" whose tree
//! listing steers content addresses and paths outside the cache, a body that stalls, a gzip bomb, an endless
//! body, a config.json that does not match its git oid, a redirect to `file://`. Every refusal fails the
//! stage (exit 1, as every stage failure does), names the file or field, panics nowhere, publishes nothing
//! and leaves every file outside the cache as it was (a snapshot of the work directory, cache excluded).
mod common;

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::http::Server;
use common::{text, write};

const REV: &str = "0123456789abcdef0123456789abcdef01234567";

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A work directory with a sentinel folder beside the cache: files an attacker would like to read, link,
/// truncate or replace.
fn workdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("sentinel/victim.txt"), "precious\n");
    write(&dir.path().join("sentinel/deeper/keys"), "secret\n");
    dir
}

fn respond(stream: &mut TcpStream, head: &str, body: &[u8]) {
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
    let _ = stream.flush();
}

fn ok(stream: &mut TcpStream, body: &[u8]) {
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    respond(stream, &head, body);
}

/// A hub serving `listing` for dataset `org/evil` and `file` for every resolve URL.
fn hub(listing: serde_json::Value, file: Vec<u8>) -> Server {
    let listing = listing.to_string().into_bytes();
    Server::raw(move |path, _, stream| {
        if path.starts_with("/api/") {
            ok(stream, &listing);
        } else {
            ok(stream, &file);
        }
    })
}

/// Runs a one-stage dataset pipeline against `server` (as `HF_ENDPOINT`) with `env`, and checks the
/// refusal: exit 1, each fragment in the output, no panic, nothing published, nothing outside the cache
/// changed. Returns the output.
fn refused(
    dir: &Path,
    source: &str,
    server: &Server,
    env: &[(&str, &str)],
    fragments: &[&str],
) -> String {
    write(
        &dir.join("p.toml"),
        &format!(
            "[pipeline]\nname = \"d\"\n\n[stages.data]\nkind = \"dataset\"\nsources = [{source}]\n"
        ),
    );
    let before = common::snapshot(dir, &dir.join("cache"));
    let mut cmd = common::saeflow(dir);
    cmd.env("HF_ENDPOINT", &server.base).args(["run", "p.toml"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let t = common::assert_clean_failure(&cmd.output().unwrap(), dir, 1, fragments);
    assert_eq!(
        common::snapshot(dir, &dir.join("cache")),
        before,
        "nothing outside the cache may change:\n{t}"
    );
    // The download area holds only content addresses (a hostile oid never became a name there).
    if let Ok(d) = std::fs::read_dir(dir.join("cache/downloads/sha256")) {
        for e in d {
            let name = e.unwrap().file_name().to_string_lossy().to_string();
            // `<hex>.part` is resumable partial work, never used before it verifies.
            let hex = name.strip_suffix(".part").unwrap_or(&name);
            assert!(
                hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
                "{name}"
            );
        }
    }
    t
}

fn hub_source(files: &str) -> String {
    format!("{{ hub = \"org/evil\", revision = \"{REV}\", files = \"{files}\", text = \"t\" }}")
}

/// A dataset source downloading `x.jsonl` from `server`, pinned by a sha256 (that no body will match).
fn pinned_url_source(server: &Server) -> String {
    format!(
        "{{ url = \"{}/x.jsonl\", sha256 = \"{}\", text = \"t\" }}",
        server.base,
        "a".repeat(64)
    )
}

#[test]
fn a_hostile_listing_cannot_reach_outside_the_cache() {
    let body = b"{\"t\": \"a\"}\n".to_vec();
    let sha = sha256_hex(&body);
    let n = body.len();
    for (what, entry, fragments) in [
        (
            "an lfs.oid climbing out of downloads/sha256",
            serde_json::json!({"type": "file", "path": "x.jsonl", "lfs": {"oid": "../../../sentinel/victim.txt", "size": n}}),
            vec![
                "file `x.jsonl`",
                "`lfs.oid`",
                "../../../sentinel/victim.txt",
                "not a sha256 content address",
            ],
        ),
        (
            "an lfs.oid `../../x`",
            serde_json::json!({"type": "file", "path": "x.jsonl", "lfs": {"oid": "../../x", "size": n}}),
            vec!["`lfs.oid`", "../../x"],
        ),
        (
            "an absolute lfs.oid",
            serde_json::json!({"type": "file", "path": "x.jsonl", "lfs": {"oid": "/etc/passwd", "size": n}}),
            vec!["`lfs.oid`", "/etc/passwd"],
        ),
        (
            "an absolute path",
            serde_json::json!({"type": "file", "path": "/tmp/x.jsonl", "lfs": {"oid": sha, "size": n}}),
            vec!["`path` `/tmp/x.jsonl`", "it is absolute"],
        ),
        (
            "a path with ..",
            serde_json::json!({"type": "file", "path": "a/../../../sentinel/x.jsonl", "lfs": {"oid": sha, "size": n}}),
            vec!["`path` `a/../../../sentinel/x.jsonl`", "`..` component"],
        ),
        (
            "a path with a NUL",
            serde_json::json!({"type": "file", "path": "x\u{0}.jsonl", "lfs": {"oid": sha, "size": n}}),
            vec!["`path` `x\\0.jsonl`", "control character"],
        ),
        (
            "a file outside LFS without a git oid",
            serde_json::json!({"type": "file", "path": "x.jsonl", "size": n}),
            vec!["file `x.jsonl` has no git `oid`"],
        ),
    ] {
        let server = hub(serde_json::json!([entry]), body.clone());
        let dir = workdir();
        let t = refused(dir.path(), &hub_source("*.jsonl"), &server, &[], &fragments);
        assert!(
            t.contains("org/evil@"),
            "{what}: names the repository:\n{t}"
        );
        // Refused from the listing alone: no file was requested.
        let log = server.log.lock().unwrap().clone();
        assert_eq!(log.len(), 1, "{what}: {log:?}");
    }
}

/// The same listings reach `fetch_repo` (models), which joins listed paths onto the cache: refused before
/// anything is created, and nothing beside the download area changes.
#[test]
fn a_hostile_model_listing_creates_nothing_outside_the_cache() {
    use saeflow_core::data::download::{fetch_repo, RepoKind};
    let config = b"{\"n_head\": 4}\n".to_vec();
    let sha = sha256_hex(&config);
    let cases = [
        (
            serde_json::json!({"type": "file", "path": "../../sentinel/config.json", "lfs": {"oid": sha, "size": config.len()}}),
            "`..` component",
        ),
        (
            serde_json::json!({"type": "file", "path": "config.json", "lfs": {"oid": "../../sentinel/victim.txt", "size": config.len()}}),
            "`lfs.oid`",
        ),
        // A config.json outside LFS whose content does not match its git blob oid.
        (
            serde_json::json!({"type": "file", "path": "config.json", "oid": "0".repeat(40), "size": config.len()}),
            "expected git blob oid 0000000000000000000000000000000000000000",
        ),
    ];
    for (entry, fragment) in cases {
        let server = hub(serde_json::json!([entry]), config.clone());
        let dir = workdir();
        let before = common::snapshot(dir.path(), &dir.path().join("cache"));
        let downloads = dir.path().join("cache/downloads");
        // SAFETY of the global: every test in this binary passes HF_ENDPOINT to its child explicitly; this
        // one alone reads it in-process, one case at a time.
        std::env::set_var("HF_ENDPOINT", &server.base);
        let err = fetch_repo(
            RepoKind::Model,
            "org/evil",
            REV,
            &["*.json"],
            &downloads,
            &saeflow_core::progress::Progress::hidden(),
            &saeflow_core::cancel::Cancel::new(),
        )
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(fragment), "want `{fragment}` in {msg}");
        assert_eq!(
            common::snapshot(dir.path(), &dir.path().join("cache")),
            before,
            "{msg}"
        );
        assert!(
            !downloads
                .join("repos")
                .join("org__evil@".to_owned() + REV)
                .join("config.json")
                .exists(),
            "an unverified file was linked into the model folder"
        );
    }
}

#[test]
fn a_stalled_body_hits_the_idle_timeout() {
    let server = Server::raw(|_, _, stream| {
        let _ = stream.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n{\"t\"",
        );
        let _ = stream.flush();
        std::thread::sleep(Duration::from_secs(30));
    });
    let dir = workdir();
    let started = Instant::now();
    let source = pinned_url_source(&server);
    refused(
        dir.path(),
        &source,
        &server,
        &[("SAEFLOW_DOWNLOAD_IDLE_SECS", "1")],
        &[&format!("no data for 1 s from {}/x.jsonl", server.base)],
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_gzip_encoded_response_is_refused() {
    // 51 bytes of gzip that would inflate; the content is irrelevant: the encoding alone is refused.
    let server = Server::raw(|_, _, stream| {
        respond(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\nConnection: close\r\n\r\n",
            b"\x1f\x8b\x08\x00",
        );
    });
    let dir = workdir();
    let source = pinned_url_source(&server);
    refused(
        dir.path(),
        &source,
        &server,
        &[],
        &["Content-Encoding: gzip", "refused"],
    );
    let log = server.log.lock().unwrap().clone();
    assert_eq!(
        log,
        ["GET /x.jsonl accept-encoding=identity"],
        "asked for identity, once"
    );
}

fn endless(stream: &mut TcpStream) {
    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
    let chunk = vec![b'x'; 1 << 16];
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        if stream.write_all(&chunk).is_err() {
            return;
        }
    }
}

#[test]
fn an_endless_body_for_a_pinned_file_is_cut_off() {
    // Hub: the listing declares the size; the body never ends.
    let body = b"{\"t\": \"a\"}\n".to_vec();
    let listing = serde_json::json!([{"type": "file", "path": "x.jsonl", "lfs": {"oid": sha256_hex(&body), "size": body.len()}}])
        .to_string()
        .into_bytes();
    let server = Server::raw(move |path, _, stream| {
        if path.starts_with("/api/") {
            ok(stream, &listing);
        } else {
            endless(stream);
        }
    });
    let dir = workdir();
    let started = Instant::now();
    refused(
        dir.path(),
        &hub_source("*.jsonl"),
        &server,
        &[],
        &[&format!(
            "more than {} bytes arrived (the size the listing declares)",
            body.len()
        )],
    );
    assert!(started.elapsed() < Duration::from_secs(20));

    // A url source pinned by sha256 alone: capped by SAEFLOW_DOWNLOAD_MAX_BYTES.
    let server = Server::raw(|_, _, stream| endless(stream));
    let dir = workdir();
    let source = pinned_url_source(&server);
    refused(
        dir.path(),
        &source,
        &server,
        &[("SAEFLOW_DOWNLOAD_MAX_BYTES", "1000000")],
        &["more than 1000000 bytes arrived (SAEFLOW_DOWNLOAD_MAX_BYTES)"],
    );
}

#[test]
fn a_file_outside_lfs_must_match_its_git_oid() {
    let body = b"{\"t\": \"a\"}\n".to_vec();
    let server = hub(
        serde_json::json!([{"type": "file", "path": "x.jsonl", "oid": "0".repeat(40), "size": body.len()}]),
        body,
    );
    let dir = workdir();
    refused(
        dir.path(),
        &hub_source("*.jsonl"),
        &server,
        &[],
        &[
            "checksum mismatch",
            "expected git blob oid 0000000000000000000000000000000000000000",
            "download discarded",
        ],
    );
}

#[test]
fn a_redirect_to_file_is_refused_by_name() {
    let server = Server::raw(|_, _, stream| {
        respond(
            stream,
            "HTTP/1.1 302 Found\r\nLocation: file:///etc/passwd\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            b"",
        );
    });
    let dir = workdir();
    let source = pinned_url_source(&server);
    let t = refused(
        dir.path(),
        &source,
        &server,
        &[],
        &[
            "refusing the redirect",
            "`file:///etc/passwd`",
            "only http and https downloads are allowed",
        ],
    );
    assert!(!t.contains("offline"), "{t}");
}

/// The good path is unchanged: a verified file outside LFS (git oid) and one in LFS both download.
#[test]
fn honest_listings_still_download() {
    let body = b"{\"t\": \"a\"}\n{\"t\": \"b\"}\n".to_vec();
    let tmp = tempfile::tempdir().unwrap();
    let f = write(&tmp.path().join("x"), std::str::from_utf8(&body).unwrap());
    let oid = saeflow_core::data::download::git_blob_oid(&f).unwrap();
    let listing = serde_json::json!([
        {"type": "file", "path": "a/x.jsonl", "oid": oid, "size": body.len()},
        {"type": "file", "path": "b/y.jsonl", "lfs": {"oid": sha256_hex(&body), "size": body.len()}},
    ]);
    let server = hub(listing, body);
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("p.toml"),
        &format!(
            "[pipeline]\nname = \"d\"\n\n[stages.data]\nkind = \"dataset\"\nsources = [{}]\n",
            hub_source("*.jsonl")
        ),
    );
    let out = common::saeflow(dir.path())
        .env("HF_ENDPOINT", &server.base)
        .args(["run", "p.toml"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn a_same_sized_file_put_in_place_of_a_downloaded_blob_is_rehashed_and_replaced() {
    let body = b"{\"t\": \"honest a\"}\n{\"t\": \"honest b\"}\n".to_vec();
    let sha = sha256_hex(&body);
    let listing = serde_json::json!([
        {"type": "file", "path": "y.jsonl", "lfs": {"oid": sha, "size": body.len()}},
    ]);
    let server = hub(listing, body.clone());
    let dir = workdir();
    let d = dir.path();
    write(
        &d.join("p.toml"),
        &format!(
            "[pipeline]\nname = \"d\"\n\n[stages.data]\nkind = \"dataset\"\nsources = [{}]\n",
            hub_source("*.jsonl")
        ),
    );
    let run = || {
        let out = common::saeflow(d)
            .env("HF_ENDPOINT", &server.base)
            .args(["run", "p.toml"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let table = common::read_parquet(
            &common::object_of(&d.join("cache"), "d", "data").join("rows.parquet"),
        );
        let rows = format!("{:?}", table.column_by_name("text").unwrap());
        assert!(rows.contains("honest a"), "{rows}");
        (rows, server.log.lock().unwrap().len())
    };
    let (_, first_requests) = run();
    let blob = d.join("cache/downloads/sha256").join(&sha);
    let poison = body
        .iter()
        .map(|&b| if b == b'h' { b'H' } else { b })
        .collect::<Vec<u8>>();
    for older_saeflow in [false, true] {
        // Poisoned in place (same inode and size; the model folder's hard link sees it too), by a process
        // that also removed the stamps when it stands for a cache an older saeflow wrote.
        std::fs::write(&blob, &poison).unwrap();
        if older_saeflow {
            std::fs::remove_dir_all(d.join("cache/downloads/verified")).unwrap();
        }
        // The dataset is recomputed (its object removed), so the download area is consulted again.
        std::fs::remove_dir_all(d.join("cache/objects")).unwrap();
        std::fs::create_dir(d.join("cache/objects")).unwrap();
        let before = server.log.lock().unwrap().len();
        let (rows, after) = run();
        assert!(after > before, "the poisoned blob was fetched again");
        assert_eq!(std::fs::read(&blob).unwrap(), body);
        assert!(!rows.contains("Honest"), "poisoned rows were used: {rows}");
    }
    // An untouched blob is reused without a request (its stamp still matches).
    std::fs::remove_dir_all(d.join("cache/objects")).unwrap();
    std::fs::create_dir(d.join("cache/objects")).unwrap();
    let before = server.log.lock().unwrap().len();
    let (_, after) = run();
    assert_eq!(
        after - before,
        first_requests - 1,
        "only the listing is asked for again"
    );
}
