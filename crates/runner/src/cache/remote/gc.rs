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

use super::{Key, Remote};
use crate::cache::{GcOptions, RefRecord};

/// What a remote `gc` removed (or would remove) and what it kept, by reason.
#[derive(Debug, Default)]
pub struct RemoteGcReport {
    /// Paths under the remote's URL removed, with their sizes.
    pub removed: Vec<(String, u64)>,
    /// Objects kept because a ref reaches them.
    pub kept: usize,
    /// Unreferenced keys kept because their lock is held.
    pub in_use: usize,
    /// Unreferenced entries kept because they are younger than the grace period.
    pub recent: usize,
    /// Partial work of unfinished runs, kept for resuming (without [`GcOptions::partial`]), with sizes of
    /// the blobs it names.
    pub partial_kept: Vec<(String, u64)>,
}

impl Remote {
    /// Removes what no remote ref reaches, no run holds the lock of, and no one wrote within the grace
    /// period; then every blob nothing left names.
    pub fn gc(&self, options: &GcOptions) -> anyhow::Result<RemoteGcReport> {
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
        let mut report = RemoteGcReport::default();
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
                report.partial_kept.push((format!("partial/{name}"), bytes));
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
            report.removed.push((path, size));
        }
        Ok(report)
    }
}
