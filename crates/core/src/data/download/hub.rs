//! The Hugging Face hub: tree listings read as hostile input (every path, content address, git oid and size
//! checked before it reaches the filesystem) and whole repositories fetched into the download area.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::checksum::{is_content_address, is_lower_hex, unsafe_repo_path};
use super::{fetch_expected, get_json, verify_reused, Expected};
use crate::cancel::Cancel;
use crate::progress::Progress;

/// One file of a Hugging Face dataset repository.
#[derive(Debug, Clone)]
pub struct HubFile {
    /// Path inside the repository (checked: relative, no `..`, see [`unsafe_repo_path`]).
    pub path: String,
    /// Download URL at the pinned revision.
    pub url: String,
    /// sha256 from the hub's LFS metadata, when the file is in LFS (checked: a content address).
    pub sha256: Option<String>,
    /// git blob oid (sha1) from the listing, for a file outside LFS.
    pub git_oid: Option<String>,
    /// Size in bytes the listing declares.
    pub size: Option<u64>,
}

impl HubFile {
    /// What the downloaded file must match.
    pub fn expected(&self) -> Expected {
        Expected {
            sha256: self.sha256.clone(),
            git_oid: self.git_oid.clone(),
            size: self.size,
        }
    }
}

/// Reads one `type = "file"` entry of a hub tree listing, refusing a path, content address, git oid or size
/// that is not what the hub would send (a hostile mirror would otherwise steer files outside the cache).
fn listed_file(
    repo: &str,
    revision: &str,
    path: &str,
    entry: &serde_json::Value,
    resolve: &str,
) -> anyhow::Result<HubFile> {
    let at = format!("hub repository {repo}@{revision}");
    let shown = path.escape_debug();
    if let Some(why) = unsafe_repo_path(path) {
        bail!("{at}: the listing has a file `path` `{shown}` that is not a plain relative path ({why}); refused");
    }
    let size_of = |v: &serde_json::Value, field: &str| -> anyhow::Result<Option<u64>> {
        match v {
            serde_json::Value::Null => Ok(None),
            v => v.as_u64().map(Some).with_context(|| {
                format!("{at}: file `{shown}`: `{field}` is {v}, not a size in bytes; refused")
            }),
        }
    };
    let lfs = &entry["lfs"];
    let (sha256, git_oid, size) = if lfs.is_null() {
        let oid = entry["oid"].as_str().with_context(|| {
            format!("{at}: file `{shown}` has no git `oid` in the listing, so it cannot be verified; refused")
        })?;
        if !is_lower_hex(oid, 40) {
            bail!(
                "{at}: file `{shown}`: `oid` `{}` is not a git blob oid (40 lowercase hex characters); refused",
                oid.escape_debug()
            );
        }
        (
            None,
            Some(oid.to_string()),
            size_of(&entry["size"], "size")?,
        )
    } else {
        let oid = lfs["oid"].as_str().unwrap_or_default();
        if !is_content_address(oid) {
            bail!(
                "{at}: file `{shown}`: `lfs.oid` `{}` is not a sha256 content address (64 lowercase hex characters); refused",
                lfs["oid"].to_string().escape_debug()
            );
        }
        (
            Some(oid.to_string()),
            None,
            size_of(&lfs["size"], "lfs.size")?,
        )
    };
    Ok(HubFile {
        path: path.to_string(),
        url: format!("{resolve}/resolve/{revision}/{path}"),
        sha256,
        git_oid,
        size,
    })
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
        .map(|(p, e)| listed_file(repo, revision, p, e, &resolve))
        .collect::<anyhow::Result<_>>()?;
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
    if repo.split('/').count() != 2 || unsafe_repo_path(repo).is_some() {
        bail!(
            "hub repository id must be `org/name`, got `{}`",
            repo.escape_debug()
        );
    }
    if unsafe_repo_path(revision).is_some() || revision.contains(char::is_whitespace) {
        bail!("bad hub revision `{}`", revision.escape_debug());
    }
    let (_, headers) = hub_endpoint();
    let root = dir
        .join("repos")
        .join(format!("{}@{revision}", repo.replace('/', "__")));
    for f in hub_files(kind, repo, revision, patterns)? {
        // hub_files refused unsafe paths already; checked again here because this is where one is joined on.
        if let Some(why) = unsafe_repo_path(&f.path) {
            bail!(
                "hub file path `{}` is not a plain relative path ({why})",
                f.path.escape_debug()
            );
        }
        let dest = root.join(&f.path);
        if dest.is_file() {
            // Usually a hard link of a verified blob, sharing its stamp.
            if verify_reused(&f.url, &dest, &f.expected(), dir).is_ok() {
                continue;
            }
            std::fs::remove_file(&dest)?;
        }
        progress.set_message(&format!("downloading {}", f.path));
        let blob = fetch_expected(&f.url, &f.expected(), dir, &headers, progress, cancel)?;
        crate::fs::link_or_copy(&blob, &dest)?;
    }
    Ok(root)
}
