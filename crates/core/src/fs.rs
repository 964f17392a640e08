//! File helpers every layer uses: atomic writes, links into place, globs, content hashes, path resolution.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;

/// Above this size, hash with memory mapping and rayon (blake3's parallel tree hashing).
const PARALLEL_THRESHOLD: u64 = 1 << 20;

/// Makes temp file names unique within the process.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes a file atomically: temp file, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().context("path has no parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

/// Places a downloaded blob at `dest` (a hard link when the filesystem allows, else a copy).
pub fn link_or_copy(blob: &Path, dest: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dest.parent().context("destination has no parent")?)?;
    if std::fs::hard_link(blob, dest).is_err() {
        std::fs::copy(blob, dest)
            .with_context(|| format!("cannot copy into {}", dest.display()))?;
    }
    Ok(())
}

/// Whether a path contains glob metacharacters.
pub fn is_glob(path: &str) -> bool {
    path.contains(['*', '?', '['])
}

/// Sorted matches of a glob pattern (an absolute or working-directory-relative path); none is an error.
pub fn expand_glob(pattern: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let text = pattern.to_string_lossy();
    let mut matches: Vec<PathBuf> = glob::glob(&text)
        .with_context(|| format!("bad glob pattern `{text}`"))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("cannot expand `{text}`"))?;
    matches.retain(|m| m.is_file());
    matches.sort();
    if matches.is_empty() {
        anyhow::bail!("no file matches `{text}`");
    }
    Ok(matches)
}

/// blake3 of one file; large files use mmap + rayon.
pub fn hash_file(path: &Path, size: u64) -> anyhow::Result<String> {
    let mut hasher = blake3::Hasher::new();
    if size >= PARALLEL_THRESHOLD {
        hasher
            .update_mmap_rayon(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
    } else {
        hasher.update_reader(
            std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?,
        )?;
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// Expands `~` and resolves a relative path against `workdir`.
pub fn resolve_path(workdir: &Path, path: &str) -> PathBuf {
    let expanded = match path.strip_prefix("~/") {
        Some(rest) => std::env::var_os("HOME")
            .map_or_else(|| PathBuf::from(path), |h| PathBuf::from(h).join(rest)),
        None => PathBuf::from(path),
    };
    workdir.join(expanded)
}
