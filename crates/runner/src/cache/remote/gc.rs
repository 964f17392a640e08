//! Garbage collection on a remote: the local cache's rules (`cache/gc.rs`), with blobs swept by mark and
//! sweep.
//!
//! An object stays if a remote ref reaches it, if it was published within the grace period, or if its key's
//! lock file is there (a run, on any machine, computes or re-checks it). Partial work stays unless asked
//! for. A blob stays if any remaining manifest or partial index names it, or if it is younger than the
//! grace period: a push uploads blobs before the manifest that names them, so a young unnamed blob may be
//! half of an object about to appear.
//!
//! An object store has no lock a reader takes, so a run on another machine may start pulling an
//! unreferenced object just as it goes. That run then finds the object missing or damaged and recomputes
//! it: pulls check every byte, so a race costs time, never correctness; the grace period makes it rare.

use std::collections::BTreeSet;

use std::path::PathBuf;

use super::{Key, Remote};
use crate::cache::{GcOptions, GcReport, RefRecord};

impl Remote {
    /// Removes what no remote ref reaches, no run holds the lock of, and no one wrote within the grace
    /// period; then every blob nothing left names.
    /// Paths in the report are relative to the remote's URL; `in_use` counts keys whose lock is there.
    pub fn gc(&self, options: &GcOptions) -> anyhow::Result<GcReport> {
        let mut reachable = BTreeSet::new();
        for (name, bytes) in self.refs()? {
            let record: RefRecord = serde_json::from_slice(&bytes).map_err(|e| {
                anyhow::anyhow!(
                    "corrupt ref {}/refs/{name} ({e}); refusing to collect garbage",
                    self.url
                )
            })?;
            reachable.insert(record.key);
        }
        let locked: BTreeSet<String> = self
            .list("locks")?
            .into_iter()
            .filter_map(|(name, _, _)| name.strip_suffix(".lock").map(str::to_string))
            .collect();
        let young = |modified: std::time::SystemTime| {
            modified.elapsed().map_or(true, |age| age < options.grace)
        };
        let mut report = GcReport::default();
        let mut doomed = Vec::new();
        let mut named = BTreeSet::new();
        let mark = |key: &Key, named: &mut BTreeSet<String>| -> anyhow::Result<()> {
            if let Some(Ok((manifest, _))) = self.checked_manifest(key)? {
                named.extend(manifest.outputs.into_iter().map(|o| o.blake3));
            }
            Ok(())
        };

        for (name, size, modified) in self.list("objects")? {
            if name.contains('/') {
                continue;
            }
            let key = Key(name.clone());
            if reachable.contains(&name) {
                report.kept += 1;
            } else if locked.contains(&name) {
                report.in_use += 1;
            } else if young(modified) {
                report.recent += 1;
            } else {
                doomed.push((format!("objects/{name}"), size));
                continue;
            }
            mark(&key, &mut named)?;
        }

        let doomed_objects: BTreeSet<String> = doomed
            .iter()
            .filter_map(|(p, _)| p.strip_prefix("objects/").map(str::to_string))
            .collect();
        for (name, size, modified) in self.list("partial")? {
            let key = Key(name.clone());
            // Partial work of a key that is published is a leftover of the run that published it.
            let published = !doomed_objects.contains(&name) && self.has_object(&key)?;
            let unwanted = options.partial && !locked.contains(&name) && !young(modified);
            if published || unwanted {
                doomed.push((format!("partial/{name}"), size));
                continue;
            }
            let files = match self.partial_index(&key)? {
                Some(Ok(index)) => index.files,
                _ => Vec::new(),
            };
            if !options.partial {
                let bytes = files.iter().map(|f| f.size).sum();
                report
                    .partial_kept
                    .push((PathBuf::from(format!("partial/{name}")), bytes));
            } else if locked.contains(&name) {
                report.in_use += 1;
            } else {
                report.recent += 1;
            }
            named.extend(files.into_iter().map(|f| f.blake3));
        }

        for (name, size, modified) in self.list("cas")? {
            if named.contains(&name) {
                continue;
            }
            if young(modified) {
                report.recent += 1;
            } else {
                doomed.push((format!("cas/{name}"), size));
            }
        }
        for (name, size, _) in self.list("quarantine")? {
            doomed.push((format!("quarantine/{name}"), size));
        }

        // Manifests first: an object disappears before any blob it names does.
        for (path, size) in doomed {
            if !options.dry_run {
                self.delete(&path)?;
            }
            report.removed.push((PathBuf::from(path), size));
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use saeflow_core::progress::Progress;

    use crate::cache::tests::manifest;
    use crate::cache::{Cache, GcOptions, Key, RefRecord, Remote};

    /// Publishes `files` as object `key` in `cache` and pushes it.
    fn object(cache: &Cache, key: &str, files: &[(&str, &[u8])]) {
        let tmp = cache.new_tmp_dir(&Key(key.into())).unwrap();
        for (name, bytes) in files {
            std::fs::write(tmp.join(name), bytes).unwrap();
        }
        cache.publish(&tmp, manifest(key)).unwrap();
        let remote = cache.remote().unwrap();
        remote
            .push(cache, &Key(key.into()), &Progress::hidden())
            .unwrap();
    }

    fn shown(path: &std::path::Path) -> String {
        path.to_string_lossy().into_owned()
    }

    fn blob(bytes: &[u8]) -> String {
        format!("cas/{}", blake3::hash(bytes).to_hex())
    }

    #[test]
    fn remote_gc_keeps_what_refs_locks_and_partial_work_name_and_sweeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let bucket = dir.path().join("bucket");
        std::fs::create_dir(&bucket).unwrap();
        let mut cache = Cache::open(&dir.path().join("local")).unwrap();
        let url = format!("file://{}", bucket.display());
        cache.set_remote(Remote::open(&url).unwrap());
        let remote = cache.remote().unwrap().clone();

        object(&cache, "kept", &[("a", b"shared"), ("b", b"only kept")]);
        object(&cache, "old", &[("a", b"shared"), ("b", b"only old")]);
        object(&cache, "locked", &[("c", b"only locked")]);
        let record = RefRecord {
            instance: "s".into(),
            key: "kept".into(),
            preimage: serde_json::Value::Null,
        };
        cache.write_ref("p", &record).unwrap();
        std::fs::create_dir_all(bucket.join("locks")).unwrap();
        std::fs::write(bucket.join("locks/locked.lock"), "someone").unwrap();
        // An unfinished run's partial work, and a blob nothing names.
        let partial = cache.partial_dir(&Key("unfinished".into())).unwrap();
        std::fs::write(partial.join("shard-0"), b"a shard").unwrap();
        remote
            .sync_partial(&Key("unfinished".into()), &partial, &mut BTreeMap::new())
            .unwrap();
        std::fs::write(bucket.join(blob(b"stray")), b"stray").unwrap();

        let grace = |secs| GcOptions {
            dry_run: false,
            grace: Duration::from_secs(secs),
            partial: false,
        };
        let report = remote.gc(&grace(3600)).unwrap();
        assert!(report.removed.is_empty(), "all young: {:?}", report.removed);

        let report = remote.gc(&grace(0)).unwrap();
        let mut removed: Vec<String> = report.removed.iter().map(|(p, _)| shown(p)).collect();
        assert_eq!(removed[0], "objects/old", "the manifest goes first");
        removed.sort();
        let mut expected = vec!["objects/old".to_string(), blob(b"only old"), blob(b"stray")];
        expected.sort();
        assert_eq!(
            removed, expected,
            "the unreferenced object and the blobs nothing names"
        );
        assert_eq!((report.kept, report.in_use), (1, 1));
        assert_eq!(report.partial_kept, [("partial/unfinished".into(), 7)]);
        for kept in [b"shared" as &[u8], b"only kept", b"only locked", b"a shard"] {
            assert!(bucket.join(blob(kept)).is_file());
        }
        assert!(!bucket.join("objects/old").exists() && bucket.join("objects/kept").is_file());

        let report = remote
            .gc(&GcOptions {
                partial: true,
                ..grace(0)
            })
            .unwrap();
        let removed: Vec<String> = report.removed.iter().map(|(p, _)| shown(p)).collect();
        assert_eq!(
            removed,
            ["partial/unfinished".to_string(), blob(b"a shard")]
        );
    }
}
