//! Downloads into the cache's download area: resumable (HTTP Range), checksum-verified (sha256, or the git
//! blob oid for hub files outside LFS), retried on dropped connections, and with a clear message when the
//! machine is offline.
//!
//! Files land in `<downloads>/sha256/<hex>` when their checksum is known (so any stage or pipeline that needs
//! the same bytes shares one copy), else under a name derived from the URL. A file is verified *before* it is
//! renamed into place, so a name under `sha256/` is only ever given to bytes that hashed to it.
//!
//! Everything a server says is treated as hostile: content addresses and paths from a hub listing are checked
//! before they reach the filesystem, bodies are capped at the declared size, compressed responses are refused
//! (a gzip bomb), redirects may only lead to http(s), and every attempt has an idle and a total time limit:
//! `SAEFLOW_DOWNLOAD_IDLE_SECS` (default 60), `SAEFLOW_DOWNLOAD_TOTAL_SECS` (default 21600, all attempts of one
//! file together) and `SAEFLOW_DOWNLOAD_MAX_BYTES` (default 64 GiB, for a file whose size nobody declared).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::cancel::{Cancel, Cancelled};
use crate::progress::Progress;

mod checksum;
mod hub;

use checksum::is_lower_hex;
pub use checksum::{git_blob_oid, is_content_address, sha256_file, unsafe_repo_path};
pub use hub::{fetch_repo, hub_dataset_files, hub_endpoint, hub_files, HubFile, RepoKind};

/// How often a download is resumed after the connection drops before giving up.
const MAX_ATTEMPTS: usize = 5;
/// Redirects followed (by hand, so that each target's scheme is checked) before giving up.
const MAX_REDIRECTS: usize = 10;
/// Default for `SAEFLOW_DOWNLOAD_IDLE_SECS`: a stalled body must not hang a run (or its SIGTERM) forever.
const DEFAULT_IDLE_SECS: u64 = 60;
/// Default for `SAEFLOW_DOWNLOAD_TOTAL_SECS`: ample for tens of GB on a slow link, yet finite.
const DEFAULT_TOTAL_SECS: u64 = 6 * 3600;
/// Default for `SAEFLOW_DOWNLOAD_MAX_BYTES`: the cap for a file no listing gave a size for.
const DEFAULT_MAX_BYTES: u64 = 64 << 30;

/// The download limits in force (from the environment, else the defaults above).
struct Limits {
    idle: u64,
    total: u64,
    max_bytes: u64,
}

impl Limits {
    fn from_env() -> anyhow::Result<Self> {
        fn var(name: &str, default: u64) -> anyhow::Result<u64> {
            match std::env::var(name) {
                Err(_) => Ok(default),
                Ok(v) => match v.trim().parse::<u64>() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => bail!("{name} must be a positive whole number, got `{v}`"),
                },
            }
        }
        Ok(Limits {
            idle: var("SAEFLOW_DOWNLOAD_IDLE_SECS", DEFAULT_IDLE_SECS)?,
            total: var("SAEFLOW_DOWNLOAD_TOTAL_SECS", DEFAULT_TOTAL_SECS)?,
            max_bytes: var("SAEFLOW_DOWNLOAD_MAX_BYTES", DEFAULT_MAX_BYTES)?,
        })
    }
}

/// An agent that never follows redirects (downloads follow them by hand in [`send`]; API calls not at
/// all: a POST must not be re-sent, with its credentials, to wherever a response points), with an idle
/// limit on every read, and optionally a limit on the whole call (`total`) and on the wait for the
/// response head (`head`).
fn agent(idle: Duration, total: Option<Duration>, head: Option<Duration>) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(20)))
        .timeout_per_read(Some(idle))
        .timeout_global(total)
        .timeout_recv_response(head)
        .max_redirects(0)
        .http_status_as_error(false)
        .user_agent(concat!("saeflow/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

/// The agent for API calls: [`agent`] with the download idle limit, waiting `head` for the response head.
fn api_agent(head: Duration) -> ureq::Agent {
    let idle = Limits::from_env().map_or(DEFAULT_IDLE_SECS, |l| l.idle);
    agent(Duration::from_secs(idle), None, Some(head))
}

/// What a downloaded file must match before it is used.
#[derive(Debug, Clone, Default)]
pub struct Expected {
    /// sha256, hex (64 characters; upper case is accepted and lowered).
    pub sha256: Option<String>,
    /// git blob oid (40 lowercase hex characters), for hub files outside LFS.
    pub git_oid: Option<String>,
    /// Exact size in bytes; the body is cut off (and refused) as soon as it grows past it.
    pub size: Option<u64>,
}

/// Where a URL's content goes.
fn target(dir: &Path, url: &str, sha256: Option<&str>) -> PathBuf {
    match sha256 {
        Some(s) => dir.join("sha256").join(s),
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
        | ureq::Error::Timeout(ureq::Timeout::Connect | ureq::Timeout::Resolve) => {
            " (is this machine offline? point the source at a local copy with `path = ...`)"
        }
        _ => "",
    }
}

/// The ureq timeout behind an I/O error from a body reader, if that is what it is.
fn timeout_of(e: &std::io::Error) -> Option<ureq::Timeout> {
    match e.get_ref()?.downcast_ref::<ureq::Error>()? {
        ureq::Error::Timeout(t) => Some(*t),
        _ => None,
    }
}

fn scheme_of(url: &str) -> Option<String> {
    let (scheme, _) = url.split_once(':')?;
    let mut chars = scheme.chars();
    let plausible = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    plausible.then(|| scheme.to_ascii_lowercase())
}

fn is_http(url: &str) -> bool {
    matches!(scheme_of(url).as_deref(), Some("http" | "https"))
}

/// Resolves a `Location` header against the URL that sent it (absolute, scheme-relative, absolute-path or
/// relative-path references).
fn resolve_location(base: &str, location: &str) -> anyhow::Result<String> {
    if scheme_of(location).is_some() {
        return Ok(location.to_string());
    }
    let uri: ureq::http::Uri = base.parse().with_context(|| format!("bad URL {base}"))?;
    let scheme = uri.scheme_str().unwrap_or("http");
    if location.starts_with("//") {
        return Ok(format!("{scheme}:{location}"));
    }
    let origin = format!(
        "{scheme}://{}",
        uri.authority().map(|a| a.as_str()).unwrap_or("")
    );
    if location.starts_with('/') {
        return Ok(format!("{origin}{location}"));
    }
    let path = uri.path();
    let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
    Ok(format!("{origin}{dir}{location}"))
}

/// Sends a GET for `url`, following redirects by hand so that a redirect to `file://` (or anything but
/// http(s)) is refused by name. The outer error is such a refusal (final); the inner one a transport error
/// (worth a retry). `Authorization` is not sent after a redirect, as ureq's own policy would do.
fn send(
    agent: &ureq::Agent,
    url: &str,
    headers: &[(String, String)],
    extra: &[(&str, String)],
) -> anyhow::Result<Result<ureq::http::Response<ureq::Body>, ureq::Error>> {
    let mut current = url.to_string();
    for hop in 0..=MAX_REDIRECTS {
        let mut request = agent.get(&current);
        for (k, v) in headers {
            if hop == 0 || !k.eq_ignore_ascii_case("authorization") {
                request = request.header(k, v);
            }
        }
        for (k, v) in extra {
            request = request.header(*k, v);
        }
        let response = match request.call() {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        if !response.status().is_redirection() {
            return Ok(Ok(response));
        }
        let Some(location) = response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
        else {
            return Ok(Ok(response));
        };
        let next = resolve_location(&current, location)?;
        if !is_http(&next) {
            bail!(
                "refusing the redirect from {current} to `{}`: only http and https downloads are allowed",
                next.escape_debug()
            );
        }
        current = next;
    }
    bail!("cannot download {url}: more than {MAX_REDIRECTS} redirects")
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
    let expected = Expected {
        sha256: sha256.map(str::to_string),
        ..Expected::default()
    };
    fetch_expected(url, &expected, dir, headers, progress, cancel)
}

/// Downloads `url` into `dir` (or reuses a finished download) and checks it against `expected` before it
/// is used: sha256, git blob oid and size, whichever are given. A body that grows past the expected size
/// (or `SAEFLOW_DOWNLOAD_MAX_BYTES` when none is known), a compressed body, a redirect away from http(s),
/// no data for `SAEFLOW_DOWNLOAD_IDLE_SECS` (per attempt) and more than `SAEFLOW_DOWNLOAD_TOTAL_SECS` in
/// all are errors; nothing is published under the file's name unless it verified.
pub fn fetch_expected(
    url: &str,
    expected: &Expected,
    dir: &Path,
    headers: &[(String, String)],
    progress: &Progress,
    cancel: &Cancel,
) -> anyhow::Result<PathBuf> {
    let limits = Limits::from_env()?;
    if !is_http(url) {
        bail!("cannot download `{url}`: only http and https URLs can be downloaded");
    }
    // The content address is checked before it names a file: a hostile `../..` must never be joined on.
    let sha256 = match &expected.sha256 {
        Some(s) => {
            let lower = s.to_ascii_lowercase();
            if !is_content_address(&lower) {
                bail!(
                    "cannot download {url}: sha256 `{}` is not 64 hex characters",
                    s.escape_debug()
                );
            }
            Some(lower)
        }
        None => None,
    };
    if let Some(g) = &expected.git_oid {
        if !is_lower_hex(g, 40) {
            bail!(
                "cannot download {url}: git oid `{}` is not 40 lowercase hex characters",
                g.escape_debug()
            );
        }
    }
    let expected = Expected {
        sha256,
        ..expected.clone()
    };
    let dest = target(dir, url, expected.sha256.as_deref());
    if dest.is_file() {
        if verify_reused(url, &dest, &expected, dir).is_ok() {
            return Ok(dest);
        }
        std::fs::remove_file(&dest)
            .with_context(|| format!("cannot remove the stale download {}", dest.display()))?;
    }
    std::fs::create_dir_all(dest.parent().expect("has parent"))?;
    let part = dest.with_extension("part");
    let (cap, cap_source) = match expected.size {
        Some(n) => (n, "the size the listing declares"),
        None => (limits.max_bytes, "SAEFLOW_DOWNLOAD_MAX_BYTES"),
    };
    let idle = Duration::from_secs(limits.idle);
    let total = Duration::from_secs(limits.total);
    let total_error = || {
        anyhow::anyhow!(
            "cannot download {url}: not finished within {} s (SAEFLOW_DOWNLOAD_TOTAL_SECS)",
            limits.total
        )
    };
    let idle_error = || {
        format!(
            "no data for {} s from {url} (SAEFLOW_DOWNLOAD_IDLE_SECS)",
            limits.idle
        )
    };
    let started = Instant::now();
    let mut last_error = String::new();
    for attempt in 1..=MAX_ATTEMPTS {
        if cancel.is_cancelled() {
            return Err(Cancelled.into());
        }
        let left = total.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(total_error());
        }
        let agent = agent(idle, Some(left), None);
        let mut have = part.metadata().map(|m| m.len()).unwrap_or(0);
        if have > cap {
            std::fs::remove_file(&part)?;
            have = 0;
        }
        // identity: a compressed body could expand without limit before any check sees it.
        let mut extra = vec![("Accept-Encoding", "identity".to_string())];
        if have > 0 {
            extra.push(("Range", format!("bytes={have}-")));
        }
        let response = match send(&agent, url, headers, &extra)? {
            Ok(r) => r,
            Err(ureq::Error::Timeout(ureq::Timeout::Global)) => return Err(total_error()),
            Err(ureq::Error::Timeout(ureq::Timeout::PerRead)) => {
                last_error = idle_error();
                continue;
            }
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
                // Range past the end: the part file is already complete (or wrong; the checks will tell).
                return publish(url, &part, &dest, &expected, dir);
            }
            404 => bail!("cannot download {url}: not found (HTTP 404)"),
            401 | 403 => bail!("cannot download {url}: access denied (HTTP {status}); set a token if it is private"),
            s => {
                last_error = format!("HTTP {s}");
                continue;
            }
        };
        if let Some(enc) = response.headers().get("content-encoding") {
            let enc = enc.to_str().unwrap_or("?").trim();
            if !enc.eq_ignore_ascii_case("identity") {
                let _ = std::fs::remove_file(&part);
                bail!(
                    "cannot download {url}: the server sent a `Content-Encoding: {}` body although \
                     `identity` was asked for; refused (a compressed body can expand without limit)",
                    enc.escape_debug()
                );
            }
        }
        let total_len = response
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(|n| if append { n + have } else { n });
        if let Some(t) = total_len.filter(|&t| t > cap) {
            let _ = std::fs::remove_file(&part);
            bail!("cannot download {url}: the server announces {t} bytes, more than {cap} ({cap_source})");
        }
        if let Some(t) = total_len {
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
                    if written + n as u64 > cap {
                        // An endless (or just too long) body: stop at the first byte too many.
                        drop(file);
                        let _ = std::fs::remove_file(&part);
                        bail!(
                            "cannot download {url}: more than {cap} bytes arrived ({cap_source}); download discarded"
                        );
                    }
                    file.write_all(&buf[..n])?;
                    written += n as u64;
                    progress.set_position(written);
                }
                Err(e) => break Err(e),
            }
        };
        file.sync_all()?;
        match outcome {
            Ok(()) if total_len.is_none_or(|t| t == written) => {
                return publish(url, &part, &dest, &expected, dir);
            }
            Ok(()) => {
                last_error = format!(
                    "connection closed after {written} of {} bytes",
                    total_len.unwrap_or(0)
                )
            }
            Err(e) => match timeout_of(&e) {
                Some(ureq::Timeout::Global) => return Err(total_error()),
                Some(ureq::Timeout::PerRead) => last_error = idle_error(),
                _ => last_error = format!("connection lost after {written} bytes: {e}"),
            },
        }
        progress.set_message(&format!(
            "resuming download (attempt {}/{MAX_ATTEMPTS})",
            attempt + 1
        ));
    }
    bail!("cannot download {url}: {last_error}")
}

/// Verifies a finished part file and only then renames it to its (content-addressed) name, stamped as
/// verified.
fn publish(
    url: &str,
    part: &Path,
    dest: &Path,
    expected: &Expected,
    dir: &Path,
) -> anyhow::Result<PathBuf> {
    if let Err(e) = verify(url, part, expected, true) {
        let _ = std::fs::remove_file(part);
        return Err(e);
    }
    std::fs::rename(part, dest)?;
    if let Some((stamp, line)) = verified_stamp(dir, dest, expected) {
        // Best effort: without the stamp the next reuse hashes the file again.
        let _ = crate::fs::write_atomic(&stamp, line.as_bytes());
    }
    Ok(dest.to_path_buf())
}

/// Where the "verified" stamp of `path` lives under the download area `dir`, and what it must say for the
/// file to count as verified: size, mtime and the sha256 it was checked against. Stamps are named by device
/// and inode, so a hard link of a blob (a model file under `repos/`) shares the blob's stamp, and a file
/// changed in place (new mtime) or swapped (new inode) is hashed again. `None` without a sha256 to check.
fn verified_stamp(dir: &Path, path: &Path, expected: &Expected) -> Option<(PathBuf, String)> {
    use std::os::unix::fs::MetadataExt;
    let sha = expected.sha256.as_ref()?;
    let meta = std::fs::metadata(path).ok()?;
    let stamp = dir
        .join("verified")
        .join(format!("{}.{}", meta.dev(), meta.ino()));
    let mtime_ns = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
    Some((stamp, format!("{} {mtime_ns} {sha}\n", meta.len())))
}

/// Checks a file found already downloaded: size and git oid always (cheap); its sha256 unless a stamp
/// shows this very file verified against it (an older saeflow's cache, or one where a same-sized file was
/// put in place, is hashed once more), and stamps it after.
pub(super) fn verify_reused(
    url: &str,
    path: &Path,
    expected: &Expected,
    dir: &Path,
) -> anyhow::Result<()> {
    let stamp = verified_stamp(dir, path, expected);
    let fresh = stamp
        .as_ref()
        .is_some_and(|(file, line)| std::fs::read_to_string(file).is_ok_and(|s| &s == line));
    verify(url, path, expected, !fresh)?;
    if let (false, Some((file, line))) = (fresh, stamp) {
        let _ = crate::fs::write_atomic(&file, line.as_bytes());
    }
    Ok(())
}

/// Checks `path` against `expected`: size and git oid always, sha256 when `full` (see [`verify_reused`]
/// for when a file may skip it).
fn verify(url: &str, path: &Path, expected: &Expected, full: bool) -> anyhow::Result<()> {
    if let Some(size) = expected.size {
        let actual = std::fs::metadata(path)?.len();
        if actual != size {
            bail!(
                "size mismatch for {url}: expected {size} bytes, got {actual} (download discarded)"
            );
        }
    }
    if let Some(oid) = &expected.git_oid {
        let actual = git_blob_oid(path)?;
        if &actual != oid {
            bail!("checksum mismatch for {url}: expected git blob oid {oid}, got {actual} (download discarded)");
        }
    }
    if let (true, Some(sha)) = (full, &expected.sha256) {
        let actual = sha256_file(path)?;
        if &actual != sha {
            bail!("checksum mismatch for {url}: expected sha256 {sha}, got {actual} (download discarded)");
        }
    }
    Ok(())
}

/// Fetches a small JSON document (API responses).
pub fn get_json(url: &str, headers: &[(String, String)]) -> anyhow::Result<serde_json::Value> {
    let extra = [("Accept-Encoding", "identity".to_string())];
    let response = send(&api_agent(Duration::from_secs(60)), url, headers, &extra)?
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
    // A chat completion may think for minutes before the response head.
    let mut request = api_agent(Duration::from_secs(600))
        .post(url)
        .header("Content-Type", "application/json");
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
    if (300..400).contains(&status) {
        bail!("{url}: HTTP {status}: API calls do not follow redirects; set the final URL");
    }
    if status != 200 {
        bail!(
            "{url}: HTTP {status}: {}",
            text.chars().take(300).collect::<String>()
        );
    }
    serde_json::from_str(&text).with_context(|| format!("{url}: response is not JSON"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn download_git_blob_oid_matches_git() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("hello");
        std::fs::write(&p, "hello\n").unwrap();
        // `printf 'hello\n' | git hash-object --stdin`
        assert_eq!(
            git_blob_oid(&p).unwrap(),
            "ce013625030ba8dba906f756967f9e9ca394464a"
        );
    }

    #[test]
    fn download_content_addresses_and_listed_paths_are_checked() {
        assert!(is_content_address(&"ab".repeat(32)));
        for bad in [
            "../../x",
            "/etc/passwd",
            &"AB".repeat(32),
            &"a".repeat(63),
            "",
        ] {
            assert!(!is_content_address(bad), "{bad}");
        }
        assert_eq!(unsafe_repo_path("data/train.parquet"), None);
        for bad in [
            "", "/abs", "a/../b", "..", "./a", "a//b", "a/", "a\\b", "a\0b", "a\nb",
        ] {
            assert!(unsafe_repo_path(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn download_redirect_locations_resolve_and_schemes_are_checked() {
        let base = "https://hub.example/org/m/resolve/main/config.json";
        assert_eq!(
            resolve_location(base, "/api/x?y=1").unwrap(),
            "https://hub.example/api/x?y=1"
        );
        assert_eq!(
            resolve_location(base, "//cdn.example/b").unwrap(),
            "https://cdn.example/b"
        );
        assert_eq!(
            resolve_location(base, "other.json").unwrap(),
            "https://hub.example/org/m/resolve/main/other.json"
        );
        assert_eq!(
            resolve_location(base, "file:///etc/passwd").unwrap(),
            "file:///etc/passwd"
        );
        assert!(is_http("HTTPS://x") && is_http("http://x"));
        assert!(!is_http("file:///etc/passwd") && !is_http("ftp://x") && !is_http("/x"));
    }

    #[test]
    fn download_refuses_a_bad_sha256_before_touching_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let err = fetch(
            "http://127.0.0.1:9/x",
            Some("../../x"),
            &dir.path().join("downloads"),
            &[],
            &Progress::hidden(),
            &Cancel::new(),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("is not 64 hex characters"),
            "{err}"
        );
        assert!(!dir.path().join("downloads").exists());
        let err = fetch(
            "file:///etc/passwd",
            None,
            dir.path(),
            &[],
            &Progress::hidden(),
            &Cancel::new(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("only http and https"), "{err}");
    }
}
