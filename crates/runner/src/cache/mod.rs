//! The content-addressed cache: objects, partial work, locks, refs, garbage collection and verification.
//!
//! Layout under the cache root:
//! - `objects/<key>/`: published outputs plus `manifest.json`; appear atomically (rename) or not at all
//! - `tmp/<key>.<pid>.<n>/`: outputs being written
//! - `partial/<key>/`: resumable work of an unfinished run of `<key>`
//! - `locks/<key>.lock`: one per key, held while computing it
//! - `leases/<host>.<pid>.<token>.lease`: the keys a live run may read, which `gc` keeps (`lease.rs`)
//! - `logs/<key>.log`: the last run's log of a stage
//! - `refs/<pipeline>/<instance>.json`: key (and key preimage) of the last successful run
//! - `quarantine/<key>.<ms>/`: objects found damaged, moved aside so their key is recomputed
//!
//! The cache never interprets outputs: it hashes bytes. Every object carries `manifest.blake3`, the hash of
//! its manifest, so reading a manifest checks it; consumers re-hash their inputs before a stage reads them
//! (`verify_for_read`), like Bazel re-checking action inputs, so a flipped byte is never computed upon.

mod gc;
mod lease;
mod lock;
pub mod remote;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

pub use gc::{GcOptions, GcReport};
pub use lease::Lease;
pub use lock::{hostname, KeyLock};
pub use remote::{Pulled, Remote, SyncReport};

use saeflow_core::cancel::Cancel;
use saeflow_core::fs::write_atomic;

/// A 256-bit action key, shown as 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(pub String);

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Key {
    /// First 12 hex digits, for display.
    pub fn short(&self) -> &str {
        // Keys are hex, but one read from a damaged ref may not be: cut on a character boundary.
        let end = self
            .0
            .char_indices()
            .nth(12)
            .map_or(self.0.len(), |(i, _)| i);
        &self.0[..end]
    }
}

/// Name of the manifest file inside every object.
pub const MANIFEST: &str = "manifest.json";

/// Name of the file holding the blake3 of `manifest.json` (hex), inside every object.
pub const MANIFEST_SUM: &str = "manifest.blake3";

/// One output file as recorded in a manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputFile {
    /// Path relative to the object directory, `/`-separated.
    pub path: String,
    /// blake3 of the content, hex.
    pub blake3: String,
    /// Size in bytes.
    pub size: u64,
}

/// `manifest.json`: what an object is and how it was made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// The object's action key.
    pub key: String,
    /// Stage kind that produced it.
    pub kind: String,
    /// Stage implementation version.
    pub version: u32,
    /// Instance that produced it first (objects are shared by identical instances).
    pub instance: String,
    /// Resolved parameters.
    pub params: Json,
    /// Input keys by role.
    pub inputs: BTreeMap<String, String>,
    /// Output files with hashes and sizes (the manifest itself excluded).
    pub outputs: Vec<OutputFile>,
    /// Start time, Unix milliseconds.
    pub started_unix_ms: u64,
    /// End time, Unix milliseconds.
    pub finished_unix_ms: u64,
    /// Summary numbers reported by the stage.
    pub metrics: serde_json::Map<String, Json>,
    /// saeflow version that wrote it.
    pub saeflow_version: String,
}

/// `refs/<pipeline>/<instance>.json`: the last successful run of an instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RefRecord {
    /// Instance name.
    pub instance: String,
    /// Key of the run.
    pub key: String,
    /// The key's preimage, for `explain`.
    pub preimage: Json,
}

/// A cache rooted at a directory, with an optional remote tier behind it (`remote/`).
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
    /// Objects this process has fully re-hashed already (objects are immutable once published).
    verified: Arc<Mutex<BTreeSet<String>>>,
    remote: Option<Arc<Remote>>,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Lists files under `dir` (recursively) as sorted `/`-separated relative paths. Only regular files with
/// UTF-8 names may be there: a symbolic link (which could point outside the cache, or change after it was
/// hashed), a FIFO (whose reader would hang) or a device is refused by name, as is a name a manifest could
/// not spell.
pub(crate) fn list_files(dir: &Path) -> anyhow::Result<Vec<String>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> anyhow::Result<()> {
        for entry in
            std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?
        {
            let entry = entry?;
            let path = entry.path();
            let rel = path.strip_prefix(root).expect("under root");
            let Some(rel) = rel.to_str() else {
                bail!(
                    "output `{}` has a name that is not UTF-8; name outputs in UTF-8",
                    rel.display()
                );
            };
            let kind = entry.file_type()?;
            if kind.is_dir() {
                walk(root, &path, out)?;
            } else if kind.is_file() {
                out.push(rel.replace(std::path::MAIN_SEPARATOR, "/"));
            } else if kind.is_symlink() {
                let target = std::fs::read_link(&path).unwrap_or_default();
                bail!(
                    "output `{rel}` is a symbolic link (to `{}`): outputs must be regular files, so the cache \
                     holds the bytes it hashed; copy the file instead (`cp -L`)",
                    target.display()
                );
            } else {
                bail!("output `{rel}` is not a regular file (a FIFO, socket or device): outputs must be regular files");
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

fn dir_size(path: &Path) -> u64 {
    if path.is_file() {
        return path.metadata().map_or(0, |m| m.len());
    }
    list_files(path)
        .unwrap_or_default()
        .iter()
        .map(|f| path.join(f).metadata().map_or(0, |m| m.len()))
        .sum()
}

fn sync_tree(dir: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            sync_tree(&entry.path())?;
        } else {
            File::open(entry.path())?.sync_all()?;
        }
    }
    File::open(dir)?.sync_all()?;
    Ok(())
}

fn escape_instance(name: &str) -> String {
    name.replace('%', "%25").replace('/', "%2F")
}

impl Cache {
    /// Opens (creating if needed) a cache at `root`.
    pub fn open(root: &Path) -> anyhow::Result<Self> {
        for sub in [
            "objects",
            "tmp",
            "partial",
            "locks",
            "leases",
            "logs",
            "refs",
            "quarantine",
        ] {
            std::fs::create_dir_all(root.join(sub)).with_context(|| {
                format!("cannot create cache directory {}", root.join(sub).display())
            })?;
        }
        Ok(Self {
            root: root.to_path_buf(),
            verified: Default::default(),
            remote: None,
        })
    }

    /// Puts `remote` behind this cache: lookups that miss here try it, results computed here go to it.
    pub fn set_remote(&mut self, remote: Remote) {
        self.remote = Some(Arc::new(remote));
    }

    /// The remote tier, if any.
    pub fn remote(&self) -> Option<&Arc<Remote>> {
        self.remote.as_ref()
    }

    /// The cache root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory of a published object.
    pub fn object_dir(&self, key: &Key) -> PathBuf {
        self.root.join("objects").join(&key.0)
    }

    /// Whether a published object exists for `key`.
    pub fn has_object(&self, key: &Key) -> bool {
        self.object_dir(key).join(MANIFEST).is_file()
    }

    /// Partial-work directory for `key` (created on demand).
    pub fn partial_dir(&self, key: &Key) -> anyhow::Result<PathBuf> {
        let dir = self.root.join("partial").join(&key.0);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(dir)
    }

    /// Log file of the latest run of `key`.
    pub fn log_path(&self, key: &Key) -> PathBuf {
        self.root.join("logs").join(format!("{}.log", key.0))
    }

    /// The file hash memo.
    pub fn filehash_memo(&self) -> PathBuf {
        self.root.join("filehashes.json")
    }

    fn lock_path(&self, key: &Key) -> PathBuf {
        self.root.join("locks").join(format!("{}.lock", key.0))
    }

    /// Takes the lock for `key` if no one holds it (or its holder is dead).
    fn try_lock_now(&self, key: &Key) -> anyhow::Result<Option<KeyLock>> {
        lock::try_lock(
            &self.lock_path(key),
            &mut lock::Observed::default(),
            lock::stale_after(),
        )
    }

    /// Takes the lock for `key`, waiting while another process holds it. `on_wait` is called once with the
    /// holder's description when waiting starts. Returns `Ok(None)` if cancelled while waiting.
    pub fn lock(
        &self,
        key: &Key,
        cancel: &Cancel,
        on_wait: impl FnOnce(&str),
    ) -> anyhow::Result<Option<KeyLock>> {
        let path = self.lock_path(key);
        let mut on_wait = Some(on_wait);
        let mut observed = lock::Observed::default();
        let stale_after = lock::stale_after();
        loop {
            if let Some(lock) = lock::try_lock(&path, &mut observed, stale_after)? {
                return Ok(Some(lock));
            }
            if let Some(f) = on_wait.take() {
                f(&lock::holder(&path));
            }
            if cancel.is_cancelled() {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A fresh temporary directory for writing `key`'s outputs.
    pub fn new_tmp_dir(&self, key: &Key) -> anyhow::Result<PathBuf> {
        let dir = self.root.join("tmp").join(format!(
            "{}.{}.{}",
            key.0,
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(dir)
    }

    /// Publishes `tmp` as the object for `manifest.key`: hashes outputs, writes the manifest, fsyncs and
    /// renames into place, then drops the key's partial work. The caller must hold the key's lock.
    pub fn publish(&self, tmp: &Path, mut manifest: Manifest) -> anyhow::Result<()> {
        let key = Key(manifest.key.clone());
        let mut outputs = Vec::new();
        for rel in list_files(tmp)? {
            if rel == MANIFEST || rel == MANIFEST_SUM {
                bail!("a stage may not write its own `{rel}`");
            }
            let path = tmp.join(&rel);
            let size = path.metadata()?.len();
            outputs.push(OutputFile {
                blake3: saeflow_core::fs::hash_file(&path, size)?,
                path: rel,
                size,
            });
        }
        manifest.outputs = outputs;
        let bytes = serde_json::to_vec_pretty(&manifest)?;
        self.install(tmp, &key, &bytes)?;
        let partial = self.root.join("partial").join(&key.0);
        if partial.exists() {
            std::fs::remove_dir_all(&partial)
                .with_context(|| format!("cannot remove {}", partial.display()))?;
        }
        Ok(())
    }

    /// Makes `tmp`, whose files `manifest_json` lists with their hashes (checked by the caller), the object
    /// for `key`: writes the manifest, fsyncs and renames into place. The caller holds the key's lock.
    pub(crate) fn install(
        &self,
        tmp: &Path,
        key: &Key,
        manifest_json: &[u8],
    ) -> anyhow::Result<()> {
        File::create(tmp.join(MANIFEST))?.write_all(manifest_json)?;
        File::create(tmp.join(MANIFEST_SUM))?
            .write_all(blake3::hash(manifest_json).to_hex().as_bytes())?;
        sync_tree(tmp).context("cannot fsync outputs")?;
        let target = self.object_dir(key);
        if target.exists() {
            // Computed meanwhile by a process that ignored the lock protocol; keep the first.
            std::fs::remove_dir_all(tmp)?;
        } else if let Err(e) = std::fs::rename(tmp, &target) {
            // Lost a race with a process that took over our lock after a stall: its object stands.
            if !target.join(MANIFEST).is_file() {
                return Err(e).with_context(|| format!("cannot publish {}", target.display()));
            }
            std::fs::remove_dir_all(tmp)?;
        } else {
            File::open(self.root.join("objects"))?.sync_all()?;
            // Every file was just hashed (by `publish`, or as it arrived from a remote).
            self.verified
                .lock()
                .expect("not poisoned")
                .insert(key.0.clone());
        }
        Ok(())
    }

    /// Reads an object's manifest, checking it against `manifest.blake3` (objects written before that file
    /// existed have none and are read unchecked).
    pub fn manifest(&self, key: &Key) -> anyhow::Result<Manifest> {
        let path = self.object_dir(key).join(MANIFEST);
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        if let Ok(sum) = std::fs::read_to_string(self.object_dir(key).join(MANIFEST_SUM)) {
            if sum.trim() != blake3::hash(&bytes).to_hex().as_str() {
                bail!(
                    "corrupt manifest {}: its blake3 differs from {MANIFEST_SUM}",
                    path.display()
                );
            }
        }
        serde_json::from_slice(&bytes)
            .with_context(|| format!("corrupt manifest {}", path.display()))
    }

    /// Cheap integrity check of an object (manifest parses, every output exists with its recorded size).
    pub fn check_sizes(&self, key: &Key) -> anyhow::Result<()> {
        let manifest = self.manifest(key)?;
        let dir = self.object_dir(key);
        for out in &manifest.outputs {
            let len = dir.join(&out.path).metadata().map(|m| m.len()).ok();
            if len != Some(out.size) {
                bail!(
                    "object {} is damaged: `{}` should have {} bytes, has {:?}",
                    key.short(),
                    out.path,
                    out.size,
                    len
                );
            }
        }
        Ok(())
    }

    /// Re-hashes an object's files against its manifest; returns the problems found.
    pub fn verify_object(&self, key: &Key) -> Vec<String> {
        let manifest = match self.manifest(key) {
            Ok(m) => m,
            Err(e) => return vec![format!("{e:#}")],
        };
        let mut problems = Vec::new();
        if manifest.key != key.0 {
            problems.push(format!(
                "manifest names key {} but lives under {}",
                manifest.key, key.0
            ));
        }
        let dir = self.object_dir(key);
        let listed: BTreeSet<&str> = manifest.outputs.iter().map(|o| o.path.as_str()).collect();
        match list_files(&dir) {
            Ok(files) => {
                for rel in files {
                    if rel != MANIFEST && rel != MANIFEST_SUM && !listed.contains(rel.as_str()) {
                        problems.push(format!("`{rel}` is not in the manifest"));
                    }
                }
            }
            Err(e) => problems.push(format!("{e:#}")),
        }
        for out in &manifest.outputs {
            let path = dir.join(&out.path);
            match path.metadata() {
                Err(_) => problems.push(format!("`{}` is missing", out.path)),
                Ok(m) if m.len() != out.size => problems.push(format!(
                    "`{}` has {} bytes, manifest says {}",
                    out.path,
                    m.len(),
                    out.size
                )),
                Ok(m) => match saeflow_core::fs::hash_file(&path, m.len()) {
                    Ok(h) if h == out.blake3 => {}
                    Ok(h) => problems.push(format!(
                        "`{}` has blake3 {h}, manifest says {}",
                        out.path, out.blake3
                    )),
                    Err(e) => problems.push(format!("`{}`: {e:#}", out.path)),
                },
            }
        }
        problems
    }

    /// Checks an object before a stage reads it: the full `verify_object` the first time this process reads
    /// it, the cheap size check after that (published objects never change, so one hash per run suffices).
    pub fn verify_for_read(&self, key: &Key) -> Vec<String> {
        if self.verified.lock().expect("not poisoned").contains(&key.0) {
            return match self.check_sizes(key) {
                Ok(()) => Vec::new(),
                Err(e) => vec![format!("{e:#}")],
            };
        }
        let problems = self.verify_object(key);
        if problems.is_empty() {
            self.verified
                .lock()
                .expect("not poisoned")
                .insert(key.0.clone());
        }
        problems
    }

    /// Moves a damaged object aside (to `quarantine/`), so its key counts as not computed and the next
    /// run that needs it recomputes it. Waits for the key's lock, so no one is computing or collecting it.
    pub fn quarantine(&self, key: &Key) -> anyhow::Result<Option<PathBuf>> {
        let _lock = self.lock(key, &Cancel::default(), |_| {})?;
        let from = self.object_dir(key);
        if !from.exists() {
            return Ok(None); // moved aside by another run meanwhile
        }
        let to = self
            .root
            .join("quarantine")
            .join(format!("{}.{}", key.0, now_ms()));
        std::fs::rename(&from, &to).with_context(|| {
            format!(
                "cannot move damaged object {} to {}",
                from.display(),
                to.display()
            )
        })?;
        File::open(self.root.join("objects"))?.sync_all()?;
        self.verified.lock().expect("not poisoned").remove(&key.0);
        Ok(Some(to))
    }

    /// Keys of all published objects.
    pub fn object_keys(&self) -> anyhow::Result<Vec<Key>> {
        let mut keys = Vec::new();
        for entry in std::fs::read_dir(self.root.join("objects"))? {
            keys.push(Key(entry?.file_name().to_string_lossy().into_owned()));
        }
        keys.sort();
        Ok(keys)
    }

    fn ref_path(&self, pipeline: &str, instance: &str) -> PathBuf {
        self.root
            .join("refs")
            .join(pipeline)
            .join(format!("{}.json", escape_instance(instance)))
    }

    /// The last successful run of an instance, if any.
    pub fn read_ref(&self, pipeline: &str, instance: &str) -> Option<RefRecord> {
        let bytes = std::fs::read(self.ref_path(pipeline, instance)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Every ref file: (`<pipeline>/<instance>.json`, its path), sorted.
    pub(crate) fn ref_files(&self) -> anyhow::Result<Vec<(String, PathBuf)>> {
        let mut refs = Vec::new();
        for pipeline in std::fs::read_dir(self.root.join("refs"))? {
            let pipeline = pipeline?;
            if !pipeline.file_type()?.is_dir() {
                continue;
            }
            let dir = pipeline.file_name().to_string_lossy().into_owned();
            for entry in std::fs::read_dir(pipeline.path())? {
                let path = entry?.path();
                if path.extension().is_some_and(|e| e == "json") {
                    let name = path
                        .file_name()
                        .expect("listed")
                        .to_string_lossy()
                        .into_owned();
                    refs.push((format!("{dir}/{name}"), path));
                }
            }
        }
        refs.sort();
        Ok(refs)
    }

    /// Records a successful run (atomic replace; the last writer wins, which is the newest result), on the
    /// remote too if there is one (its `gc` keeps what refs name).
    pub fn write_ref(&self, pipeline: &str, record: &RefRecord) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec_pretty(record)?;
        write_atomic(&self.ref_path(pipeline, &record.instance), &bytes)?;
        if let Some(remote) = &self.remote {
            let file = format!("{}.json", escape_instance(&record.instance));
            remote.write_ref(pipeline, &file, bytes)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn manifest(key: &str) -> Manifest {
        Manifest {
            key: key.into(),
            kind: "test".into(),
            version: 1,
            instance: "a".into(),
            params: Json::Null,
            inputs: BTreeMap::new(),
            outputs: vec![],
            started_unix_ms: 0,
            finished_unix_ms: 0,
            metrics: Default::default(),
            saeflow_version: "test".into(),
        }
    }

    #[test]
    fn publish_is_atomic_and_verify_catches_a_flipped_byte() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let key = Key("k1".into());
        let tmp = cache.new_tmp_dir(&key).unwrap();
        std::fs::write(tmp.join("out.txt"), b"hello").unwrap();
        std::fs::create_dir(tmp.join("sub")).unwrap();
        std::fs::write(tmp.join("sub/x"), b"x").unwrap();
        cache.partial_dir(&key).unwrap();
        cache.publish(&tmp, manifest("k1")).unwrap();
        assert!(cache.has_object(&key));
        assert!(!tmp.exists());
        assert!(!dir.path().join("partial/k1").exists());
        let m = cache.manifest(&key).unwrap();
        assert_eq!(m.outputs.len(), 2);
        assert_eq!(
            m.outputs[0].blake3,
            blake3::hash(b"hello").to_hex().to_string()
        );
        assert!(cache.verify_object(&key).is_empty());
        std::fs::write(cache.object_dir(&key).join("out.txt"), b"hellO").unwrap();
        let problems = cache.verify_object(&key);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("out.txt"));
    }
}
