//! Garbage collection: what no ref reaches, no live run leases or computes, and no one touched within the
//! grace period goes; resumable partial work stays unless asked for.
//!
//! Like `git gc`'s prune expiry, the grace period protects what is new without any protocol (a run of an
//! older saeflow, a user's notebook reading an object it just found); leases (see `lease.rs`) protect what
//! live runs will read however old it is; key locks protect what they compute. Partial work of a killed run
//! is what its next run resumes from, so it is removed only with [`GcOptions::partial`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use super::{dir_size, Cache, Key, KeyLock, RefRecord, MANIFEST};

/// What `gc` may remove.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// List only; remove nothing.
    pub dry_run: bool,
    /// Keep anything written (objects: published) more recently than this.
    pub grace: Duration,
    /// Also remove the partial work of unfinished runs (lost for resuming).
    pub partial: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        Self {
            dry_run: false,
            grace: Duration::from_secs(3600),
            partial: false,
        }
    }
}

/// What `gc` removed (or would remove) and what it kept, by reason.
#[derive(Debug, Default)]
pub struct GcReport {
    /// Paths removed, with their sizes.
    pub removed: Vec<(PathBuf, u64)>,
    /// Objects kept because a ref reaches them.
    pub kept: usize,
    /// Unreferenced keys kept because a live run leases or computes them.
    pub in_use: usize,
    /// Unreferenced entries kept because they are younger than the grace period.
    pub recent: usize,
    /// Partial work of unfinished runs, kept for resuming (without [`GcOptions::partial`]), with sizes.
    pub partial_kept: Vec<(PathBuf, u64)>,
}

/// An unreferenced key's removable entries.
#[derive(Default)]
struct Doomed {
    object: bool,
    partial: bool,
    log: bool,
}

impl Cache {
    /// Every key any ref points at.
    fn referenced_keys(&self) -> anyhow::Result<BTreeSet<String>> {
        let mut keys = BTreeSet::new();
        for (_, path) in self.ref_files()? {
            let record: RefRecord =
                serde_json::from_slice(&std::fs::read(&path)?).with_context(|| {
                    format!(
                        "corrupt ref {}; refusing to collect garbage",
                        path.display()
                    )
                })?;
            keys.insert(record.key);
        }
        Ok(keys)
    }

    /// Entry names under `sub` (`.log` stripped, so each is a key).
    fn keys_under(&self, sub: &str) -> anyhow::Result<Vec<String>> {
        let dir = self.root.join(sub);
        let mut names = Vec::new();
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?
        {
            let name = entry?.file_name().to_string_lossy().into_owned();
            names.push(name.trim_end_matches(".log").to_string());
        }
        Ok(names)
    }

    /// Removes objects, partial work (with `options.partial`), logs and temporaries that no ref reaches, no
    /// live run leases or holds the lock of, and that are older than the grace period.
    pub fn gc(&self, options: &GcOptions) -> anyhow::Result<GcReport> {
        let reachable = self.referenced_keys()?;
        let mut report = GcReport::default();
        let young = |path: &std::path::Path| {
            std::fs::symlink_metadata(path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| m.elapsed().ok())
                .is_none_or(|age| age < options.grace)
        };

        // What could go, by key.
        let mut doomed: BTreeMap<String, Doomed> = BTreeMap::new();
        for key in self.keys_under("objects")? {
            if reachable.contains(&key) {
                report.kept += 1;
            } else if young(&self.object_dir(&Key(key.clone())).join(MANIFEST)) {
                report.recent += 1;
            } else {
                doomed.entry(key).or_default().object = true;
            }
        }
        let mut partial_kept = BTreeSet::new();
        for key in self.keys_under("partial")? {
            let path = self.root.join("partial").join(&key);
            if reachable.contains(&key) || self.has_object(&Key(key.clone())) {
                // A leftover of a run that published (it removes its partial work right after); harmless.
                doomed.entry(key).or_default().partial = !reachable.contains(&key) && !young(&path);
            } else if !options.partial {
                report.partial_kept.push((path.clone(), dir_size(&path)));
                partial_kept.insert(key);
            } else if young(&path) {
                report.recent += 1;
                partial_kept.insert(key);
            } else {
                doomed.entry(key).or_default().partial = true;
            }
        }
        for key in self.keys_under("logs")? {
            let object_stays =
                self.has_object(&Key(key.clone())) && !doomed.get(&key).is_some_and(|d| d.object);
            if reachable.contains(&key) || object_stays || partial_kept.contains(&key) {
                continue;
            }
            if young(&self.log_path(&Key(key.clone()))) {
                report.recent += 1;
            } else {
                doomed.entry(key).or_default().log = true;
            }
        }
        doomed.retain(|_, d| d.object || d.partial || d.log);

        // Held while deleting, so no run starts computing a key whose leftovers we are removing; a key whose
        // lock is held belongs to a live run.
        let mut held: BTreeMap<String, KeyLock> = BTreeMap::new();
        for key in doomed.keys() {
            if let Some(lock) = self.try_lock_now(&Key(key.clone()))? {
                held.insert(key.clone(), lock);
            }
        }
        let before = doomed.len();
        doomed.retain(|key, _| held.contains_key(key));
        report.in_use += before - doomed.len();

        // Objects are moved aside before the leases are read (see `lease.rs` for why this order is safe).
        let aside = |key: &str| {
            self.root
                .join("tmp")
                .join(format!("{key}.gc.{}", std::process::id()))
        };
        let mut moved = Vec::new();
        if !options.dry_run {
            for (key, d) in &doomed {
                if d.object {
                    let from = self.object_dir(&Key(key.clone()));
                    std::fs::rename(&from, aside(key)).with_context(|| {
                        format!("cannot move {} aside for removal", from.display())
                    })?;
                    moved.push(key.clone());
                }
            }
        }
        let leased = self.leased_keys(!options.dry_run)?;
        for key in &moved {
            if leased.contains(key) {
                let to = self.object_dir(&Key(key.clone()));
                std::fs::rename(aside(key), &to).with_context(|| {
                    format!("cannot put back {}, which a live run leases", to.display())
                })?;
            }
        }
        let before = doomed.len();
        doomed.retain(|key, _| !leased.contains(key));
        report.in_use += before - doomed.len();

        let mut remove = |path: PathBuf, shown: PathBuf| -> anyhow::Result<()> {
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                return Ok(());
            };
            let size = dir_size(&path);
            if !options.dry_run {
                if meta.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                }
                .with_context(|| format!("cannot remove {}", path.display()))?;
            }
            report.removed.push((shown, size));
            Ok(())
        };
        for (key, d) in &doomed {
            let k = Key(key.clone());
            if d.object {
                let from = if options.dry_run {
                    self.object_dir(&k)
                } else {
                    aside(key)
                };
                remove(from, self.object_dir(&k))?;
            }
            if d.partial {
                let path = self.root.join("partial").join(key);
                remove(path.clone(), path)?;
            }
            if d.log {
                remove(self.log_path(&k), self.log_path(&k))?;
            }
        }
        for entry in std::fs::read_dir(self.root.join("quarantine"))? {
            let path = entry?.path();
            remove(path.clone(), path)?;
        }
        // A temp dir `<key>.<pid>.<n>` is garbage when no one holds its key's lock (its writer died); the
        // lock, not the pid, decides, because the writer may run on another node sharing the cache.
        for entry in std::fs::read_dir(self.root.join("tmp"))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let key = name.split('.').next().unwrap_or_default().to_string();
            if let std::collections::btree_map::Entry::Vacant(slot) = held.entry(key) {
                match self.try_lock_now(&Key(slot.key().clone()))? {
                    Some(l) => {
                        slot.insert(l);
                    }
                    None => continue,
                }
            }
            remove(entry.path(), entry.path())?;
        }
        drop(held);
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::manifest;
    use super::*;

    fn publish(cache: &Cache, key: &str) {
        let tmp = cache.new_tmp_dir(&Key(key.into())).unwrap();
        std::fs::write(tmp.join("f"), vec![0u8; 100]).unwrap();
        cache.publish(&tmp, manifest(key)).unwrap();
    }

    fn now() -> GcOptions {
        GcOptions {
            grace: Duration::ZERO,
            ..GcOptions::default()
        }
    }

    #[test]
    fn gc_keeps_referenced_objects_and_drops_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        publish(&cache, "keep");
        publish(&cache, "drop");
        cache
            .write_ref(
                "p",
                &RefRecord {
                    instance: "a/b".into(),
                    key: "keep".into(),
                    preimage: serde_json::Value::Null,
                },
            )
            .unwrap();
        // Within the grace period nothing goes.
        let report = cache.gc(&GcOptions::default()).unwrap();
        assert_eq!((report.removed.len(), report.recent), (0, 1));
        let dry = cache
            .gc(&GcOptions {
                dry_run: true,
                ..now()
            })
            .unwrap();
        assert!(dir.path().join("objects/drop").exists());
        assert_eq!(dry.removed.len(), 1);
        let report = cache.gc(&now()).unwrap();
        assert_eq!(report.kept, 1);
        assert!(report.removed[0].1 >= 100);
        assert_eq!(report.removed[0].0, dir.path().join("objects/drop"));
        assert!(cache.has_object(&Key("keep".into())));
        assert!(!dir.path().join("objects/drop").exists());
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        assert_eq!(cache.read_ref("p", "a/b").unwrap().key, "keep");
    }

    #[test]
    fn gc_keeps_leased_objects_and_partial_work_unless_asked() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        publish(&cache, "read-by-a-live-run");
        std::fs::write(
            cache
                .partial_dir(&Key("unfinished".into()))
                .unwrap()
                .join("step1"),
            b"1",
        )
        .unwrap();
        let lease = cache.lease([&Key("read-by-a-live-run".into())]).unwrap();
        let report = cache.gc(&now()).unwrap();
        assert_eq!(report.in_use, 1);
        assert_eq!(report.partial_kept.len(), 1);
        assert!(report.removed.is_empty(), "{:?}", report.removed);
        assert!(cache
            .verify_object(&Key("read-by-a-live-run".into()))
            .is_empty());
        assert!(dir.path().join("partial/unfinished/step1").exists());
        drop(lease);
        let report = cache
            .gc(&GcOptions {
                partial: true,
                ..now()
            })
            .unwrap();
        assert_eq!(report.removed.len(), 2, "{:?}", report.removed);
        assert!(!dir.path().join("partial/unfinished").exists());
        assert!(!cache.has_object(&Key("read-by-a-live-run".into())));
    }
}
