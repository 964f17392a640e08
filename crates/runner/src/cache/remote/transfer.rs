//! Moving bytes between the local cache and the remote: blobs up (skipping those already there), blobs down
//! (hashed as they arrive, written under a temporary name), a few files at a time.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectStoreExt, PutPayload, WriteMultipart};
use saeflow_core::progress::Progress;
use tokio::io::AsyncReadExt;

use super::{explain, safe_relative, PartialIndex, Remote};
use crate::cache::{Cache, Key, Manifest, OutputFile};

/// Files above this size go up in parts of this size (S3's minimum part is 5 MiB).
const PART: usize = 16 << 20;
/// Files moved at once.
const CONCURRENCY: usize = 8;

/// Bytes moved by one push or pull.
#[derive(Debug, Default, Clone, Copy)]
pub struct Transfer {
    /// Bytes sent or received.
    pub bytes: u64,
    /// Files sent or received.
    pub files: u64,
    /// Files skipped because the other side had them.
    pub skipped: u64,
}

/// What a pull found.
pub enum Pulled {
    /// The remote has no object for the key.
    Missing,
    /// The object is now in the local cache, every file checked against its manifest.
    Done(Transfer),
    /// The remote object is damaged: the problems and the blobs at fault.
    Damaged {
        /// What is wrong.
        problems: Vec<String>,
        /// Hashes of blobs whose content is wrong.
        bad_blobs: Vec<String>,
    },
}

/// A remote manifest after its checks: the manifest and its bytes, or what is wrong with the object.
type CheckedManifest = Result<(Manifest, Vec<u8>), Vec<String>>;

/// A download that did not give the bytes asked for.
struct BadBlob(String);

impl Remote {
    /// Uploads one file as `cas/<blake3>` unless a blob of that size is there. Returns the bytes sent.
    async fn put_blob(
        &self,
        file: PathBuf,
        out: &OutputFile,
        progress: &Progress,
    ) -> anyhow::Result<u64> {
        let path = self.path(&format!("cas/{}", out.blake3));
        let shown = self.shown(&path);
        match self.store.head(&path).await {
            Ok(meta) if meta.size == out.size => {
                progress.inc(out.size);
                return Ok(0);
            }
            Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(explain(&shown, "looking up", e)),
        }
        let mut reader = tokio::fs::File::open(&file)
            .await
            .with_context(|| format!("cannot read {}", file.display()))?;
        if out.size as usize <= PART {
            let mut bytes = Vec::with_capacity(out.size as usize);
            reader.read_to_end(&mut bytes).await?;
            if bytes.len() as u64 != out.size {
                bail!("{} changed size while being pushed", file.display());
            }
            self.store
                .put(&path, PutPayload::from(bytes))
                .await
                .map_err(|e| explain(&shown, "uploading", e))?;
            progress.inc(out.size);
            return Ok(out.size);
        }
        let upload = self
            .store
            .put_multipart(&path)
            .await
            .map_err(|e| explain(&shown, "starting an upload", e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
        let mut sent = 0u64;
        let mut buf = vec![0u8; PART];
        let result: anyhow::Result<()> = async {
            loop {
                let n = reader.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                writer
                    .wait_for_capacity(4)
                    .await
                    .map_err(|e| explain(&shown, "uploading", e))?;
                writer.write(&buf[..n]);
                sent += n as u64;
                progress.inc(n as u64);
            }
            if sent != out.size {
                bail!("{} changed size while being pushed", file.display());
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                writer
                    .finish()
                    .await
                    .map_err(|e| explain(&shown, "finishing an upload", e))?;
                Ok(sent)
            }
            Err(e) => {
                // Abandoned parts are not an object; abort so the store frees them.
                let _ = writer.abort().await;
                Err(e)
            }
        }
    }

    /// Downloads `cas/<blake3>` to `dest` (or only reads it, with `None`), checking size and hash. `dest` is
    /// inside a fresh directory that becomes visible only once every file checks out, so it needs no
    /// temporary name of its own. A wrong blob is `Err(BadBlob)`; a failed request is an ordinary error.
    async fn get_blob(
        &self,
        out: &OutputFile,
        dest: Option<&Path>,
        progress: &Progress,
    ) -> anyhow::Result<Result<u64, BadBlob>> {
        use tokio::io::AsyncWriteExt;
        let path = self.path(&format!("cas/{}", out.blake3));
        let shown = self.shown(&path);
        let got = match self.store.get(&path).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => {
                return Ok(Err(BadBlob(format!("`{}`: its blob is missing", out.path))))
            }
            Err(e) => return Err(explain(&shown, "downloading", e)),
        };
        let mut file = match dest {
            Some(dest) => {
                if let Some(parent) = dest.parent() {
                    tokio::fs::create_dir_all(parent).await?;
                }
                let file = tokio::fs::File::create(dest)
                    .await
                    .with_context(|| format!("cannot create {}", dest.display()))?;
                Some(file)
            }
            None => None,
        };
        let mut hasher = blake3::Hasher::new();
        let mut received = 0u64;
        let mut stream = got.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| explain(&shown, "downloading", e))?;
            received += chunk.len() as u64;
            if received > out.size {
                break; // longer than the manifest says: no need to read the rest
            }
            hasher.update(&chunk);
            if let Some(file) = &mut file {
                file.write_all(&chunk).await?;
            }
            progress.inc(chunk.len() as u64);
        }
        if let Some(file) = file {
            file.sync_all().await?;
        }
        let hash = hasher.finalize().to_hex().to_string();
        if received != out.size || hash != out.blake3 {
            if let Some(dest) = dest {
                let _ = tokio::fs::remove_file(dest).await;
            }
            return Ok(Err(BadBlob(format!(
                "`{}` arrived with {received} bytes and blake3 {hash}; the manifest says {} bytes, {}",
                out.path, out.size, out.blake3
            ))));
        }
        Ok(Ok(received))
    }

    /// Pushes the local object `key` (already verified by the caller): its blobs, then its manifest, which
    /// makes it visible. Does nothing if the remote has it.
    pub fn push(&self, cache: &Cache, key: &Key, progress: &Progress) -> anyhow::Result<Transfer> {
        if self.has_object(key)? {
            return Ok(Transfer::default());
        }
        let manifest = cache.manifest(key)?;
        let dir = cache.object_dir(key);
        let mut transfer = self.put_files(&dir, &manifest.outputs, progress)?;
        let bytes = std::fs::read(dir.join(super::super::MANIFEST))?;
        self.put_manifest(key, &bytes)?;
        transfer.files += 1;
        Ok(transfer)
    }

    fn put_files(
        &self,
        dir: &Path,
        files: &[OutputFile],
        progress: &Progress,
    ) -> anyhow::Result<Transfer> {
        progress.set_total_bytes(files.iter().map(|f| f.size).sum());
        let sent: Vec<u64> = self.block_on(
            futures::stream::iter(files)
                .map(|out| self.put_blob(dir.join(&out.path), out, progress))
                .buffer_unordered(CONCURRENCY)
                .try_collect(),
        )?;
        Ok(Transfer {
            bytes: sent.iter().sum(),
            files: sent.iter().filter(|&&s| s > 0).count() as u64,
            skipped: sent.iter().filter(|&&s| s == 0).count() as u64,
        })
    }

    /// The manifest of `key` on the remote, checked before any of it is trusted: its hash, its key, and
    /// every file name a plain relative path. `Err` is the object's problems.
    pub(super) fn checked_manifest(&self, key: &Key) -> anyhow::Result<Option<CheckedManifest>> {
        let manifest_json = match self.manifest_bytes(key)? {
            None => return Ok(None),
            Some(Err(problem)) => return Ok(Some(Err(vec![problem]))),
            Some(Ok(json)) => json,
        };
        let manifest: Manifest = match serde_json::from_slice(&manifest_json) {
            Ok(m) => m,
            Err(e) => return Ok(Some(Err(vec![format!("its manifest does not parse: {e}")]))),
        };
        let mut problems = Vec::new();
        if manifest.key != key.0 {
            problems.push(format!("its manifest names key {}", manifest.key));
        }
        for out in &manifest.outputs {
            if !safe_relative(&out.path)
                || out.path == super::super::MANIFEST
                || out.path == super::super::MANIFEST_SUM
            {
                problems.push(format!(
                    "its manifest names the file `{}`, which may not be written",
                    out.path
                ));
            }
            if out.blake3.len() != 64 || !out.blake3.bytes().all(|b| b.is_ascii_hexdigit()) {
                problems.push(format!("`{}` has no valid blake3", out.path));
            }
        }
        Ok(Some(if problems.is_empty() {
            Ok((manifest, manifest_json))
        } else {
            Err(problems)
        }))
    }

    /// Pulls the object `key` into the local cache, checking every byte against the manifest before the
    /// object appears there. The caller holds the key's local lock.
    pub fn pull(&self, cache: &Cache, key: &Key, progress: &Progress) -> anyhow::Result<Pulled> {
        let (manifest, manifest_json) = match self.checked_manifest(key)? {
            None => return Ok(Pulled::Missing),
            Some(Err(problems)) => {
                return Ok(Pulled::Damaged {
                    problems,
                    bad_blobs: Vec::new(),
                })
            }
            Some(Ok(m)) => m,
        };
        let tmp = cache.new_tmp_dir(key)?;
        let result = self.get_files(Some(&tmp), &manifest.outputs, progress);
        let (transfer, bad) = match result {
            Ok(done) => done,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        if !bad.is_empty() {
            let _ = std::fs::remove_dir_all(&tmp);
            return Ok(Pulled::Damaged {
                problems: bad.iter().map(|(_, p)| p.clone()).collect(),
                bad_blobs: bad.into_iter().map(|(b, _)| b).collect(),
            });
        }
        cache.install(&tmp, key, &manifest_json)?;
        Ok(Pulled::Done(transfer))
    }

    /// Reads the remote object `key` and checks every blob against its manifest, keeping nothing: what
    /// `pull` would find, without a local cache. `Missing` if the remote lacks it.
    pub fn verify(&self, key: &Key, progress: &Progress) -> anyhow::Result<Pulled> {
        let manifest = match self.checked_manifest(key)? {
            None => return Ok(Pulled::Missing),
            Some(Err(problems)) => {
                return Ok(Pulled::Damaged {
                    problems,
                    bad_blobs: Vec::new(),
                })
            }
            Some(Ok((manifest, _))) => manifest,
        };
        let (transfer, bad) = self.get_files(None, &manifest.outputs, progress)?;
        Ok(if bad.is_empty() {
            Pulled::Done(transfer)
        } else {
            Pulled::Damaged {
                problems: bad.iter().map(|(_, p)| p.clone()).collect(),
                bad_blobs: bad.into_iter().map(|(b, _)| b).collect(),
            }
        })
    }

    /// Downloads `files` under `dir` (or, with `None`, only reads and checks them); returns what came and
    /// the blobs that were wrong.
    fn get_files(
        &self,
        dir: Option<&Path>,
        files: &[OutputFile],
        progress: &Progress,
    ) -> anyhow::Result<(Transfer, Vec<(String, String)>)> {
        progress.set_total_bytes(files.iter().map(|f| f.size).sum());
        let results: Vec<(String, Result<u64, BadBlob>)> = self.block_on(
            futures::stream::iter(files)
                .map(|out| async move {
                    let dest = dir.map(|d| d.join(&out.path));
                    let got = self.get_blob(out, dest.as_deref(), progress).await?;
                    anyhow::Ok((out.blake3.clone(), got))
                })
                .buffer_unordered(CONCURRENCY)
                .try_collect(),
        )?;
        let mut transfer = Transfer::default();
        let mut bad = Vec::new();
        for (blob, got) in results {
            match got {
                Ok(bytes) => {
                    transfer.bytes += bytes;
                    transfer.files += 1;
                }
                Err(BadBlob(problem)) => bad.push((blob, problem)),
            }
        }
        Ok((transfer, bad))
    }

    /// Sends the files of `key`'s partial directory that the remote lacks, then records the directory's
    /// contents (`partial/<key>`). `known` memoizes (path, size, mtime) → hash between calls, so each file
    /// is hashed and sent once.
    pub(crate) fn sync_partial(
        &self,
        key: &Key,
        dir: &Path,
        known: &mut std::collections::BTreeMap<(String, u64, i128), String>,
    ) -> anyhow::Result<Transfer> {
        let mut files = Vec::new();
        for rel in finished_partial_files(dir)? {
            let path = dir.join(&rel);
            let meta = match path.metadata() {
                Ok(meta) => meta,
                // Replaced while listed (a stage renaming its work into place): the next sync sends it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
            };
            let mtime = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos() as i128);
            let memo = (rel.clone(), meta.len(), mtime);
            let blake3 = match known.get(&memo) {
                Some(h) => h.clone(),
                None => {
                    let h = saeflow_core::fs::hash_file(&path, meta.len())?;
                    known.insert(memo, h.clone());
                    h
                }
            };
            files.push(OutputFile {
                path: rel,
                blake3,
                size: meta.len(),
            });
        }
        let transfer = self.put_files(dir, &files, &Progress::hidden())?;
        self.put_partial_index(key, &PartialIndex { files })?;
        Ok(transfer)
    }

    /// Brings `key`'s partial work from the remote into `dir`, which must be empty (a machine that has
    /// partial work of its own keeps it). Returns what came, or why nothing did.
    pub(crate) fn restore_partial(
        &self,
        key: &Key,
        dir: &Path,
    ) -> anyhow::Result<Result<Transfer, String>> {
        let index = match self.partial_index(key)? {
            None => return Ok(Err("none recorded".into())),
            Some(Err(problem)) => return Ok(Err(problem)),
            Some(Ok(index)) => index,
        };
        if index.files.iter().any(|f| !safe_relative(&f.path)) {
            return Ok(Err(
                "its index names a path outside the partial directory".into()
            ));
        }
        let staging: PathBuf = dir.with_extension("restoring");
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging)?;
        let (transfer, bad) =
            match self.get_files(Some(&staging), &index.files, &Progress::hidden()) {
                Ok(done) => done,
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&staging);
                    return Err(e);
                }
            };
        if let Some((_, problem)) = bad.first() {
            let _ = std::fs::remove_dir_all(&staging);
            return Ok(Err(problem.clone()));
        }
        // The stage finds the work only once all of it is there.
        std::fs::remove_dir(dir).with_context(|| format!("cannot replace {}", dir.display()))?;
        std::fs::rename(&staging, dir)?;
        Ok(Ok(transfer))
    }
}

/// Whether a name in a partial directory is work still being written: a stage writes a shard or a
/// checkpoint into `tmp-*` and renames it into place, and `saeflow_core::fs::write_atomic` writes
/// `.<name>.<pid>.<n>.tmp` first. A stage may be writing one while the mirror runs (capture writes shards
/// on a background thread), so the mirror sends only finished work.
fn in_progress(name: &str) -> bool {
    name.starts_with("tmp-") || (name.starts_with('.') && name.ends_with(".tmp"))
}

/// The files of a partial directory that are finished work (relative, `/`-separated, sorted), skipping
/// what is [`in_progress`] and what vanishes while it is listed.
fn finished_partial_files(dir: &Path) -> anyhow::Result<Vec<String>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> anyhow::Result<()> {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir != root => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            if name.to_str().is_some_and(in_progress) {
                continue;
            }
            let path = entry.path();
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => walk(root, &path, out)?,
                Ok(kind) if kind.is_file() => {
                    let rel = path.strip_prefix(root).expect("under root");
                    let rel = rel.to_str().with_context(|| {
                        format!(
                            "partial work `{}` has a name that is not UTF-8",
                            rel.display()
                        )
                    })?;
                    out.push(rel.replace(std::path::MAIN_SEPARATOR, "/"));
                }
                Ok(_) => {} // stages write no links or devices into their partial directory
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

/// Copies one key's partial directory to the remote whenever its stage reports finished work.
pub struct PartialMirror {
    remote: Arc<Remote>,
    key: Key,
    dir: PathBuf,
    /// (path, size, mtime) → blake3 of the files already sent.
    known: std::sync::Mutex<std::collections::BTreeMap<(String, u64, i128), String>>,
}

impl PartialMirror {
    /// A mirror of `dir`, the partial directory of `key`.
    pub fn new(remote: &Arc<Remote>, key: &Key, dir: &Path) -> Self {
        Self {
            remote: remote.clone(),
            key: key.clone(),
            dir: dir.to_path_buf(),
            known: Default::default(),
        }
    }

    /// Sends what changed and records the directory's state.
    pub fn sync(&self) -> anyhow::Result<()> {
        let mut known = self.known.lock().expect("not poisoned");
        self.remote
            .sync_partial(&self.key, &self.dir, &mut known)
            .with_context(|| format!("saving partial work to {}", self.remote.url()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mirror sends finished shards and checkpoints, never one still being written.
    #[test]
    fn only_finished_partial_work_is_listed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        for file in [
            "shard-00000/acts.parquet",
            "shard-00000/state.json",
            "tmp-shard-00001/acts.parquet",
            "checkpoints/step-10/state.json",
            "checkpoints/tmp-20/state.json",
            "checkpoints/.state.json.123.4.tmp",
            "notes.tmp",
        ] {
            std::fs::create_dir_all(p.join(file).parent().unwrap()).unwrap();
            std::fs::write(p.join(file), b"x").unwrap();
        }
        assert_eq!(
            finished_partial_files(p).unwrap(),
            [
                "checkpoints/step-10/state.json",
                "notes.tmp",
                "shard-00000/acts.parquet",
                "shard-00000/state.json",
            ]
        );
    }
}
