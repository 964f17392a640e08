//! Whole-cache transfers for `saeflow cache push` and `saeflow cache pull`: every object one side has and
//! the other lacks, with the refs that keep them from `gc`.
//!
//! Runs already push what they compute and pull what they read; these commands are for the rest: seeding a
//! new bucket from a laptop's cache, or filling a machine's cache before going offline.

use std::sync::Arc;

use saeflow_core::progress::Progress;

use super::{safe_relative, Pulled, Remote, Transfer};
use crate::cache::{Cache, Key, RefRecord};

/// What a whole-cache push or pull did.
#[derive(Debug, Default)]
pub struct SyncReport {
    /// Objects copied, and their bytes.
    pub copied: Vec<(Key, Transfer)>,
    /// Objects the other side already had.
    pub already: usize,
    /// Refs copied.
    pub refs: usize,
    /// Objects left where they were, with why (damaged, or a run holds their key).
    pub skipped: Vec<(Key, String)>,
}

impl Cache {
    /// The remote this cache has behind it, or an error saying how to name one.
    pub fn require_remote(&self) -> anyhow::Result<Arc<Remote>> {
        self.remote().cloned().ok_or_else(|| {
            anyhow::anyhow!(
                "no remote cache: give --cache-remote URL (or SAEFLOW_CACHE_REMOTE), or --cache URL"
            )
        })
    }

    /// Pushes every sound local object the remote lacks, then every local ref. `progress` makes the bar of
    /// one object.
    pub fn push_all(&self, progress: impl Fn(&Key) -> Progress) -> anyhow::Result<SyncReport> {
        let remote = self.require_remote()?;
        let mut report = SyncReport::default();
        for key in self.object_keys()? {
            if remote.has_object(&key)? {
                report.already += 1;
                continue;
            }
            let problems = self.verify_object(&key);
            if let Some(problem) = problems.first() {
                report.skipped.push((
                    key,
                    format!(
                        "damaged here ({problem}); `saeflow cache verify --repair` moves it aside"
                    ),
                ));
                continue;
            }
            let bar = progress(&key);
            let transfer = remote.push(self, &key, &bar)?;
            bar.finish();
            report.copied.push((key, transfer));
        }
        for (name, path) in self.ref_files()? {
            let (pipeline, file) = name.split_once('/').expect("built as pipeline/file");
            remote.write_ref(pipeline, file, std::fs::read(&path)?)?;
            report.refs += 1;
        }
        Ok(report)
    }

    /// Pulls every object a remote ref reaches that this cache lacks, checked byte for byte, and writes
    /// the refs this cache lacks (so local `gc` keeps what was pulled).
    pub fn pull_all(&self, progress: impl Fn(&Key) -> Progress) -> anyhow::Result<SyncReport> {
        let remote = self.require_remote()?;
        let mut report = SyncReport::default();
        let mut seen = std::collections::BTreeSet::new();
        for (name, bytes) in remote.refs()? {
            // A ref's name and content come from the remote: only a plain `<pipeline>/<instance>.json`
            // may become a local file, and only a well-formed record counts.
            let parts: Vec<&str> = name.split('/').collect();
            let record: Option<RefRecord> = serde_json::from_slice(&bytes).ok();
            let (Some(record), true) = (
                record,
                safe_relative(&name) && parts.len() == 2 && name.ends_with(".json"),
            ) else {
                report.skipped.push((
                    Key(name.clone()),
                    format!("the remote ref refs/{name} is malformed"),
                ));
                continue;
            };
            let key = Key(record.key.clone());
            if !seen.insert(key.0.clone()) {
                // Another instance's ref named the same key: already handled.
            } else if !self.has_object(&key) {
                match self.try_lock_now(&key)? {
                    None => report
                        .skipped
                        .push((key.clone(), "a run here holds its key".into())),
                    Some(_lock) => {
                        let bar = progress(&key);
                        let pulled = remote.pull(self, &key, &bar)?;
                        bar.finish();
                        match pulled {
                            Pulled::Done(transfer) => report.copied.push((key.clone(), transfer)),
                            Pulled::Missing => report.skipped.push((
                                key.clone(),
                                format!("refs/{name} names it, but the remote lacks it"),
                            )),
                            Pulled::Damaged { problems, .. } => report.skipped.push((
                                key.clone(),
                                format!("damaged on the remote: {}", problems.join("; ")),
                            )),
                        }
                    }
                }
            } else {
                report.already += 1;
            }
            let local = self.root.join("refs").join(parts[0]).join(parts[1]);
            if self.has_object(&key) && !local.exists() {
                std::fs::create_dir_all(local.parent().expect("has a parent"))?;
                saeflow_core::fs::write_atomic(&local, &bytes)?;
                report.refs += 1;
            }
        }
        Ok(report)
    }
}
