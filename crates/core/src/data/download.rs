//! Downloads into the cache's download area: resumable (HTTP Range), checksum-verified (sha256), retried on
//! dropped connections, and with a clear message when the machine is offline.
//!
//! Files land in `<downloads>/sha256/<hex>` when their checksum is known (so any stage or pipeline that needs
//! the same bytes shares one copy), else under a name derived from the URL.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};

use crate::cancel::{Cancel, Cancelled};
use crate::progress::Progress;

/// How often a download is resumed after the connection drops before giving up.
const MAX_ATTEMPTS: usize = 5;

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(20)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .http_status_as_error(false)
        .user_agent(concat!("saeflow/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where a URL's content goes.
fn target(dir: &Path, url: &str, sha256: Option<&str>) -> PathBuf {
    match sha256 {
        Some(s) => dir.join("sha256").join(s.to_ascii_lowercase()),
        None => dir
            .join("url")
            .join(crate::data::rows::stable_id(&[url]).to_string()),
    }
}

fn offline_hint(e: &ureq::Error) -> &'static str {
    match e {
        ureq::Error::Io(_)
        | ureq::Error::HostNotFound
        | ureq::Error::ConnectionFailed
        | ureq::Error::Timeout(_) => {
            " (is this machine offline? point the source at a local copy with `path = ...`)"
        }
        _ => "",
    }
}

/// Downloads `url` into `dir` (or reuses a finished download), verifying `sha256` when given.
/// `headers` are sent with every request (e.g. an Authorization token).
pub fn fetch(
    url: &str,
    sha256: Option<&str>,
    dir: &Path,
    headers: &[(String, String)],
    progress: &Progress,
    cancel: &Cancel,
) -> anyhow::Result<PathBuf> {
    let dest = target(dir, url, sha256);
    if dest.is_file() {
        return Ok(dest);
    }
    std::fs::create_dir_all(dest.parent().expect("has parent"))?;
    let part = dest.with_extension("part");
    let agent = agent();
    let mut last_error = String::new();
    for attempt in 1..=MAX_ATTEMPTS {
        if cancel.is_cancelled() {
            return Err(Cancelled.into());
        }
        let have = part.metadata().map(|m| m.len()).unwrap_or(0);
        let mut request = agent.get(url);
        for (k, v) in headers {
            request = request.header(k, v);
        }
        if have > 0 {
            request = request.header("Range", format!("bytes={have}-"));
        }
        let response = match request.call() {
            Ok(r) => r,
            Err(e) => {
                last_error = format!("{e}{}", offline_hint(&e));
                if matches!(e, ureq::Error::HostNotFound | ureq::Error::ConnectionFailed) {
                    break; // no server: retrying will not help
                }
                continue;
            }
        };
        let status = response.status().as_u16();
        let append = match status {
            206 => true,
            200 => false, // the server ignored the range: start over
            416 if have > 0 => {
                // Range past the end: the part file is already complete (or wrong; the checksum will tell).
                std::fs::rename(&part, &dest)?;
                return verify(url, &dest, sha256);
            }
            404 => bail!("cannot download {url}: not found (HTTP 404)"),
            401 | 403 => bail!("cannot download {url}: access denied (HTTP {status}); set a token if it is private"),
            s => {
                last_error = format!("HTTP {s}");
                continue;
            }
        };
        let total = response
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(|n| if append { n + have } else { n });
        if let Some(t) = total {
            progress.set_total(t);
        }
        let mut file = if append {
            OpenOptions::new().append(true).open(&part)?
        } else {
            File::create(&part).with_context(|| format!("cannot create {}", part.display()))?
        };
        let mut written = if append { have } else { 0 };
        progress.set_position(written);
        let mut reader = response.into_body().into_reader();
        let mut buf = vec![0u8; 1 << 16];
        let outcome: std::io::Result<()> = loop {
            if cancel.is_cancelled() {
                file.sync_all()?;
                return Err(Cancelled.into());
            }
            match reader.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    file.write_all(&buf[..n])?;
                    written += n as u64;
                    progress.set_position(written);
                }
                Err(e) => break Err(e),
            }
        };
        file.sync_all()?;
        match outcome {
            Ok(()) if total.is_none_or(|t| t == written) => {
                std::fs::rename(&part, &dest)?;
                return verify(url, &dest, sha256);
            }
            Ok(()) => {
                last_error = format!(
                    "connection closed after {written} of {} bytes",
                    total.unwrap_or(0)
                )
            }
            Err(e) => last_error = format!("connection lost after {written} bytes: {e}"),
        }
        progress.set_message(&format!(
            "resuming download (attempt {}/{MAX_ATTEMPTS})",
            attempt + 1
        ));
    }
    bail!("cannot download {url}: {last_error}")
}

fn verify(url: &str, path: &Path, sha256: Option<&str>) -> anyhow::Result<PathBuf> {
    if let Some(expected) = sha256 {
        let actual = sha256_file(path)?;
        if !actual.eq_ignore_ascii_case(expected) {
            let _ = std::fs::remove_file(path);
            bail!("checksum mismatch for {url}: expected sha256 {expected}, got {actual} (download discarded)");
        }
    }
    Ok(path.to_path_buf())
}

/// Fetches a small JSON document (API responses).
pub fn get_json(url: &str, headers: &[(String, String)]) -> anyhow::Result<serde_json::Value> {
    let mut request = agent().get(url);
    for (k, v) in headers {
        request = request.header(k, v);
    }
    let response = request
        .call()
        .map_err(|e| anyhow::anyhow!("cannot reach {url}: {e}{}", offline_hint(&e)))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .read_to_string()
        .with_context(|| format!("reading {url}"))?;
    if status != 200 {
        bail!(
            "{url}: HTTP {status}: {}",
            body.chars().take(300).collect::<String>()
        );
    }
    serde_json::from_str(&body).with_context(|| format!("{url}: response is not JSON"))
}

/// Posts a JSON body and returns the JSON response (chat-completion APIs). A non-200 status is an error
/// quoting the start of the response body.
pub fn post_json(
    url: &str,
    headers: &[(String, String)],
    body: &serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let mut request = agent().post(url).header("Content-Type", "application/json");
    for (k, v) in headers {
        request = request.header(k, v);
    }
    let response = request
        .send(serde_json::to_vec(body)?.as_slice())
        .map_err(|e| anyhow::anyhow!("cannot reach {url}: {e}"))?;
    let status = response.status().as_u16();
    let text = response
        .into_body()
        .read_to_string()
        .with_context(|| format!("reading the response of {url}"))?;
    if status != 200 {
        bail!(
            "{url}: HTTP {status}: {}",
            text.chars().take(300).collect::<String>()
        );
    }
    serde_json::from_str(&text).with_context(|| format!("{url}: response is not JSON"))
}

/// One file of a Hugging Face dataset repository.
#[derive(Debug, Clone)]
pub struct HubFile {
    /// Path inside the repository.
    pub path: String,
    /// Download URL at the pinned revision.
    pub url: String,
    /// sha256 from the hub's LFS metadata, when the file is in LFS.
    pub sha256: Option<String>,
}

/// The hub endpoint (`HF_ENDPOINT`, as huggingface_hub reads it) and auth headers (`HF_TOKEN`).
pub fn hub_endpoint() -> (String, Vec<(String, String)>) {
    let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
    let headers = std::env::var("HF_TOKEN")
        .map(|t| vec![("Authorization".into(), format!("Bearer {t}"))])
        .unwrap_or_default();
    (endpoint.trim_end_matches('/').to_string(), headers)
}

/// Kinds of Hugging Face repositories (their API and download paths differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    /// `/api/datasets/...`, `/datasets/<repo>/resolve/...`.
    Dataset,
    /// `/api/models/...`, `/<repo>/resolve/...`.
    Model,
}

/// Lists the files of dataset `repo` at `revision` whose paths match `pattern` (a glob), via the hub's
/// tree API, sorted by path.
pub fn hub_dataset_files(
    repo: &str,
    revision: &str,
    pattern: &str,
) -> anyhow::Result<Vec<HubFile>> {
    hub_files(RepoKind::Dataset, repo, revision, &[pattern])
}

/// Lists the files of a hub repository at `revision` matching any of `patterns` (globs), sorted by path.
pub fn hub_files(
    kind: RepoKind,
    repo: &str,
    revision: &str,
    patterns: &[&str],
) -> anyhow::Result<Vec<HubFile>> {
    let (endpoint, headers) = hub_endpoint();
    let globs = patterns
        .iter()
        .map(|p| glob::Pattern::new(p).with_context(|| format!("bad file pattern `{p}`")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (api, resolve) = match kind {
        RepoKind::Dataset => (
            format!("{endpoint}/api/datasets/{repo}"),
            format!("{endpoint}/datasets/{repo}"),
        ),
        RepoKind::Model => (
            format!("{endpoint}/api/models/{repo}"),
            format!("{endpoint}/{repo}"),
        ),
    };
    let url = format!("{api}/tree/{revision}?recursive=true");
    let listing = get_json(&url, &headers)?;
    let entries = listing
        .as_array()
        .with_context(|| format!("{url}: expected a JSON array of files"))?;
    let mut files: Vec<HubFile> = entries
        .iter()
        .filter(|e| e["type"] == "file")
        .filter_map(|e| e["path"].as_str().map(|p| (p, e)))
        .filter(|(p, _)| globs.iter().any(|g| g.matches(p)))
        .map(|(p, e)| HubFile {
            path: p.to_string(),
            url: format!("{resolve}/resolve/{revision}/{p}"),
            sha256: e["lfs"]["oid"].as_str().map(str::to_string),
        })
        .collect();
    files.sort_by(|a, b| a.path.cmp(&b.path));
    if files.is_empty() {
        bail!(
            "hub repository {repo}@{revision} has no files matching {}",
            patterns.join(", ")
        );
    }
    Ok(files)
}

/// Downloads the matching files of a hub repository into `<dir>/repos/<repo>@<revision>/` (each file
/// fetched once into the shared download area, then linked under its repository path) and returns that
/// directory.
pub fn fetch_repo(
    kind: RepoKind,
    repo: &str,
    revision: &str,
    patterns: &[&str],
    dir: &Path,
    progress: &Progress,
    cancel: &Cancel,
) -> anyhow::Result<PathBuf> {
    if repo.split('/').count() != 2 || repo.contains("..") {
        bail!("hub repository id must be `org/name`, got `{repo}`");
    }
    if revision.is_empty() || revision.contains("..") || revision.contains(char::is_whitespace) {
        bail!("bad hub revision `{revision}`");
    }
    let (_, headers) = hub_endpoint();
    let root = dir
        .join("repos")
        .join(format!("{}@{revision}", repo.replace('/', "__")));
    for f in hub_files(kind, repo, revision, patterns)? {
        if f.path.split('/').any(|c| c == ".." || c.is_empty()) {
            bail!("hub file path `{}` is not a plain relative path", f.path);
        }
        let dest = root.join(&f.path);
        if dest.is_file() {
            continue;
        }
        progress.set_message(&format!("downloading {}", f.path));
        let blob = fetch(&f.url, f.sha256.as_deref(), dir, &headers, progress, cancel)?;
        crate::fs::link_or_copy(&blob, &dest)?;
    }
    Ok(root)
}
