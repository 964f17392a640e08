//! Read leases: a running pipeline's claim on every key it may read or write, which `gc` honours.
//!
//! Key locks make *computing* a key exclusive; *reading* an object needs no exclusion between readers, only
//! protection from `gc` (refs name only the last writer of an instance, so an object a live run is about to
//! read may be unreferenced). A run therefore writes one lease file, `leases/<host>.<pid>.<token>.lease`,
//! listing its keys, before it looks any of them up, and the lock heartbeat keeps its mtime fresh.
//!
//! `gc` moves a doomed object aside first and reads the leases after; an object a live lease names goes
//! back. Either a reader's lease was in place before that read (the object stays), or the reader wrote it
//! later and its lookup, which follows the lease, finds no object: it then computes the key under the key's
//! lock, which `gc` holds until it is done, and finds the object restored or recomputes it.
//!
//! A lease is live while its owner runs (a process on this host), or while its mtime is younger than
//! [`stale_after`](super::lock::stale_after) by the reader's clock (a process on another node sharing the
//! cache; cluster clocks are assumed NTP-close, and `gc`'s grace period adds margin).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::lock::{held, stale_after, Owner};
use super::{Cache, Key};
use saeflow_core::fs::write_atomic;

/// Extension of lease files (temporaries of `write_atomic` have another and are never read as leases).
const EXTENSION: &str = "lease";

/// A live lease; its file is removed on drop.
#[derive(Debug)]
pub struct Lease {
    path: PathBuf,
}

impl Drop for Lease {
    fn drop(&mut self) {
        held().lock().expect("not poisoned").remove(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The owner and keys of a lease file, or `None` if it is not one.
fn read_lease(path: &Path) -> Option<(Owner, BTreeSet<String>)> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut lines = text.lines();
    let owner = Owner::parse(lines.next()?)?;
    let keys = lines
        .filter_map(|l| l.strip_prefix("key "))
        .map(str::to_string)
        .collect();
    Some((owner, keys))
}

impl Cache {
    fn leases_dir(&self) -> PathBuf {
        self.root.join("leases")
    }

    /// Takes a read lease on `keys` for as long as the returned value lives. Take it before looking any of
    /// the keys up.
    pub fn lease<'a>(&self, keys: impl IntoIterator<Item = &'a Key>) -> anyhow::Result<Lease> {
        let me = Owner::me();
        let mut text = me.record();
        for key in keys {
            text.push_str("key ");
            text.push_str(&key.0);
            text.push('\n');
        }
        let path = self.leases_dir().join(format!(
            "{}.{}.{}.{EXTENSION}",
            // A host name is a DNS label set, but a hostile one must not make a path: keep it tame.
            me.host
                .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_"),
            std::process::id(),
            me.token
        ));
        write_atomic(&path, text.as_bytes()).context("cannot take a read lease")?;
        held()
            .lock()
            .expect("not poisoned")
            .insert(path.clone(), ());
        Ok(Lease { path })
    }

    /// Keys named by live leases. With `remove_dead`, lease files of runs that are gone are deleted.
    pub(super) fn leased_keys(&self, remove_dead: bool) -> anyhow::Result<BTreeSet<String>> {
        let dir = self.leases_dir();
        let mut keys = BTreeSet::new();
        let entries =
            std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?;
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != EXTENSION) {
                continue;
            }
            let age = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| m.elapsed().ok());
            let live = match read_lease(&path) {
                Some((owner, leased)) => {
                    let live = !owner.is_dead_here()
                        && (owner.host == super::hostname()
                            || age.is_none_or(|a| a < stale_after()));
                    if live {
                        keys.extend(leased);
                    }
                    live
                }
                // Vanished meanwhile (its run ended), or not a lease saeflow wrote.
                None => false,
            };
            if !live && remove_dead && path.exists() {
                let _ = std::fs::remove_file(&path);
            }
        }
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_names_its_keys_until_dropped_and_a_dead_runs_lease_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let (a, b) = (Key("a".repeat(64)), Key("b".repeat(64)));
        let lease = cache.lease([&a, &b]).unwrap();
        let keys = cache.leased_keys(false).unwrap();
        assert_eq!(keys, BTreeSet::from([a.0.clone(), b.0.clone()]));
        drop(lease);
        assert!(cache.leased_keys(false).unwrap().is_empty());

        // A lease left by a process of this host that no longer runs (pid 2^22 + 1 exceeds pid_max's
        // default, so no process has it).
        let dead = cache.leases_dir().join(format!("x.1.t.{EXTENSION}"));
        let record =
            Owner::me()
                .record()
                .replacen(&format!("pid {}", std::process::id()), "pid 4194305", 1);
        std::fs::write(&dead, format!("{record}key {}\n", a.0)).unwrap();
        assert!(cache.leased_keys(false).unwrap().is_empty());
        assert!(dead.exists());
        cache.leased_keys(true).unwrap();
        assert!(!dead.exists(), "gc removes the leases of dead runs");

        // A lease of another host counts until its heartbeat stops for `stale_after`.
        let remote = cache.leases_dir().join(format!("node-17.9.t.{EXTENSION}"));
        std::fs::write(
            &remote,
            format!("host node-17 pid 9 start 1 token t\nkey {}\n", b.0),
        )
        .unwrap();
        assert_eq!(
            cache.leased_keys(true).unwrap(),
            BTreeSet::from([b.0.clone()])
        );
        let old = std::time::SystemTime::now() - stale_after() * 2;
        std::fs::File::options()
            .write(true)
            .open(&remote)
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert!(cache.leased_keys(true).unwrap().is_empty());
    }
}
