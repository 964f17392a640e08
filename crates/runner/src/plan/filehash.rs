//! Content hashes of external files, remembered by (path, size, mtime, inode) so that an unchanged
//! multi-GB checkpoint is hashed once, not on every run.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use saeflow_core::fs::{expand_glob, hash_file, is_glob};
use serde::{Deserialize, Serialize};

/// Files whose mtime is within this many nanoseconds of the time their hash was recorded could still have
/// been changed in the same timestamp tick without changing mtime ("racy git"), so their record is not trusted.
const RACY_WINDOW_NS: i128 = 2_000_000_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Stamp {
    size: u64,
    mtime_ns: i128,
    inode: u64,
    dev: u64,
    recorded_ns: i128,
    hash: String,
}

/// A persistent memo of file hashes (one JSON file in the cache).
pub struct FileHasher {
    path: PathBuf,
    memo: BTreeMap<PathBuf, Stamp>,
    dirty: bool,
}

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

impl FileHasher {
    /// Opens the memo at `path`; a missing or unreadable memo just starts empty.
    pub fn open(path: PathBuf) -> Self {
        let memo = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self {
            path,
            memo,
            dirty: false,
        }
    }

    /// blake3 of a file's content, or for a directory of its sorted (relative path, content hash) list.
    pub fn hash(&mut self, path: &Path) -> anyhow::Result<String> {
        let meta =
            std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        if meta.is_dir() {
            let mut hasher = blake3::Hasher::new();
            let mut entries = Vec::new();
            collect_files(path, path, &mut entries)?;
            entries.sort();
            for rel in entries {
                let h = self.hash(&path.join(&rel))?;
                hasher.update(rel.to_string_lossy().as_bytes());
                hasher.update(&[0]);
                hasher.update(h.as_bytes());
                hasher.update(&[0]);
            }
            return Ok(hasher.finalize().to_hex().to_string());
        }
        if !meta.is_file() {
            // Reading a FIFO would block until someone writes to it (forever, for `status`).
            anyhow::bail!(
                "{} is not a regular file (a FIFO, socket or device): dependencies are hashed by content, \
                 so they must be files or directories",
                path.display()
            );
        }
        let mtime_ns = meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128;
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        if let Some(s) = self.memo.get(&abs) {
            let same = s.size == meta.len()
                && s.mtime_ns == mtime_ns
                && s.inode == meta.ino()
                && s.dev == meta.dev();
            if same && s.recorded_ns - s.mtime_ns > RACY_WINDOW_NS {
                return Ok(s.hash.clone());
            }
        }
        let recorded_ns = now_ns();
        let hash = hash_file(path, meta.len())?;
        self.memo.insert(
            abs,
            Stamp {
                size: meta.len(),
                mtime_ns,
                inode: meta.ino(),
                dev: meta.dev(),
                recorded_ns,
                hash: hash.clone(),
            },
        );
        self.dirty = true;
        Ok(hash)
    }

    /// Like [`FileHasher::hash`] for a path relative to `workdir` that may be a glob (`data/*.jsonl`): the
    /// hash then covers every match (sorted), and no match is an error.
    pub fn hash_pattern(&mut self, workdir: &Path, pattern: &str) -> anyhow::Result<String> {
        let full = saeflow_core::fs::resolve_path(workdir, pattern);
        if !is_glob(pattern) {
            return self.hash(&full);
        }
        let matches = expand_glob(&full)?;
        let mut hasher = blake3::Hasher::new();
        for m in &matches {
            hasher.update(m.to_string_lossy().as_bytes());
            hasher.update(&[0]);
            hasher.update(self.hash(m)?.as_bytes());
            hasher.update(&[0]);
        }
        Ok(hasher.finalize().to_hex().to_string())
    }

    /// Writes the memo back (atomically) if anything was hashed.
    pub fn save(&mut self) -> anyhow::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let bytes = serde_json::to_vec(&self.memo)?;
        saeflow_core::fs::write_atomic(&self.path, &bytes)?;
        self.dirty = false;
        Ok(())
    }
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            collect_files(root, &path, out)?;
        } else {
            out.push(path.strip_prefix(root).expect("under root").to_path_buf());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_match_blake3_and_memo_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.bin");
        std::fs::write(&f, b"hello").unwrap();
        let memo = dir.path().join("memo.json");
        let mut h = FileHasher::open(memo.clone());
        assert_eq!(
            h.hash(&f).unwrap(),
            blake3::hash(b"hello").to_hex().to_string()
        );
        h.save().unwrap();
        let h2 = FileHasher::open(memo);
        assert_eq!(h2.memo.len(), 1);
    }

    #[test]
    fn a_changed_file_is_rehashed_even_within_the_same_second() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.txt");
        std::fs::write(&f, b"one").unwrap();
        let mut h = FileHasher::open(dir.path().join("memo.json"));
        let first = h.hash(&f).unwrap();
        // Same size, written immediately: mtime may not even change, the racy window must catch it.
        std::fs::write(&f, b"two").unwrap();
        assert_ne!(h.hash(&f).unwrap(), first);
    }

    #[test]
    fn directory_hash_changes_with_any_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("d");
        std::fs::create_dir_all(d.join("sub")).unwrap();
        std::fs::write(d.join("sub/x"), b"1").unwrap();
        let mut h = FileHasher::open(dir.path().join("memo.json"));
        let a = h.hash(&d).unwrap();
        std::fs::write(d.join("sub/x"), b"2").unwrap();
        assert_ne!(h.hash(&d).unwrap(), a);
    }
}
