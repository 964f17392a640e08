//! One computation per key across machines: `locks/<key>.lock` on the remote, created with a conditional
//! write (create-if-absent), so of two machines asking at once exactly one gets it.
//!
//! The rules are the local locks' (`cache/lock.rs`), with the store's compare-and-swap in place of `O_EXCL`
//! and rename: the holder rewrites the lock every [`heartbeat_interval`] with its beat count, each rewrite
//! conditional on the version it last wrote (a failed condition means it was taken over; the holder stops
//! beating and its publish still keeps the first object). A waiter takes the lock over when its owner is a
//! dead process on the waiter's own host (at once) or when the lock's version has not changed for
//! [`stale_after`] by the waiter's clock; the takeover is itself a write conditional on the version the
//! waiter saw, so of two waiters only one succeeds. `file://` remotes are directories, and use the local
//! lock files there.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

use super::{explain, Remote};
use crate::cache::lock::{self as local_lock, heartbeat_interval, stale_after, KeyLock, Owner};
use crate::cache::Key;
use saeflow_core::cancel::Cancel;

/// A held remote lock; released on drop.
pub struct RemoteLock {
    inner: Inner,
}

enum Inner {
    /// A `file://` remote: a local lock file in its directory.
    File(#[allow(dead_code)] KeyLock),
    Store {
        remote: Arc<Remote>,
        key: Key,
        token: String,
        stop: Arc<AtomicBool>,
        beat: Option<std::thread::JoinHandle<()>>,
    },
}

impl std::fmt::Debug for RemoteLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RemoteLock")
    }
}

impl Drop for RemoteLock {
    fn drop(&mut self) {
        if let Inner::Store {
            remote,
            key,
            token,
            stop,
            beat,
        } = &mut self.inner
        {
            stop.store(true, Ordering::Relaxed);
            if let Some(beat) = beat.take() {
                beat.thread().unpark();
                let _ = beat.join();
            }
            // Remove it only while it is still ours (not taken over after a stall).
            if let Ok(Some((owner, _))) = remote.read_lock(key) {
                if owner.token == *token {
                    let _ = remote.delete(&lock_name(key));
                }
            }
        }
    }
}

fn lock_name(key: &Key) -> String {
    format!("locks/{}.lock", key.0)
}

/// What a waiter last saw of a lock held by someone else: its version and since when (waiter's clock).
#[derive(Default)]
struct Seen {
    version: Option<(Option<String>, Option<String>)>,
    since: Option<Instant>,
}

impl Remote {
    /// The lock's owner and version (etag, store version), if it exists.
    fn read_lock(&self, key: &Key) -> anyhow::Result<Option<(Owner, UpdateVersion)>> {
        let path = self.path(&lock_name(key));
        self.block_on(async {
            match self.store.get(&path).await {
                Ok(got) => {
                    let version = UpdateVersion {
                        e_tag: got.meta.e_tag.clone(),
                        version: got.meta.version.clone(),
                    };
                    let bytes = got
                        .bytes()
                        .await
                        .map_err(|e| explain(&self.shown(&path), "reading a lock", e))?;
                    let owner = Owner::parse(&String::from_utf8_lossy(&bytes))
                        .unwrap_or_else(Owner::unknown);
                    Ok(Some((owner, version)))
                }
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(explain(&self.shown(&path), "reading a lock", e)),
            }
        })
    }

    /// Writes the lock record: create-if-absent, or replace exactly `over`. `Ok(None)` if the condition
    /// failed (someone else holds or took it); else the new version.
    fn put_lock(
        &self,
        key: &Key,
        record: String,
        over: Option<UpdateVersion>,
    ) -> anyhow::Result<Option<UpdateVersion>> {
        let path = self.path(&lock_name(key));
        let updating = over.is_some();
        let mode = match over {
            None => PutMode::Create,
            Some(v) => PutMode::Update(v),
        };
        self.block_on(async {
            match self
                .store
                .put_opts(
                    &path,
                    PutPayload::from(record.into_bytes()),
                    PutOptions::from(mode),
                )
                .await
            {
                Ok(put) => Ok(Some(UpdateVersion {
                    e_tag: put.e_tag,
                    version: put.version,
                })),
                Err(object_store::Error::AlreadyExists { .. })
                | Err(object_store::Error::Precondition { .. }) => Ok(None),
                // Replacing a lock that was deleted meanwhile: lost the race. Anything else not found
                // (creating a lock, a missing bucket) is an error, or the caller would poll forever.
                Err(e @ object_store::Error::NotFound { .. })
                    if !updating || e.to_string().contains("NoSuchBucket") =>
                {
                    Err(explain(&self.shown(&path), "taking a lock", e))
                }
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(explain(&self.shown(&path), "taking a lock", e)),
            }
        })
    }

    /// Takes `key`'s remote lock, waiting while another machine holds it; `on_wait` gets the holder once
    /// when waiting starts, and `done_elsewhere` is polled while waiting (the object may appear meanwhile:
    /// then `Ok(None)` without the lock). `Ok(None)` also when cancelled.
    pub fn lock(
        self: &Arc<Self>,
        key: &Key,
        cancel: &Cancel,
        on_wait: impl FnOnce(&str),
        done_elsewhere: impl Fn() -> bool,
    ) -> anyhow::Result<Option<RemoteLock>> {
        if let Some(root) = &self.local_root {
            // A directory: its own lock files, O_EXCL and all.
            let path = root.join("locks").join(format!("{}.lock", key.0));
            std::fs::create_dir_all(path.parent().expect("has a parent"))?;
            let mut observed = local_lock::Observed::default();
            let mut on_wait = Some(on_wait);
            loop {
                if let Some(lock) = local_lock::try_lock(&path, &mut observed, stale_after())? {
                    return Ok(Some(RemoteLock {
                        inner: Inner::File(lock),
                    }));
                }
                if let Some(f) = on_wait.take() {
                    f(&local_lock::holder(&path));
                }
                if cancel.is_cancelled() || done_elsewhere() {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let me = Owner::me();
        let mut seen = Seen::default();
        let mut on_wait = Some(on_wait);
        loop {
            let taken = match self.read_lock(key)? {
                None => self.put_lock(key, beat_record(&me, 0), None)?,
                Some((owner, version)) => {
                    let seen_version = (version.e_tag.clone(), version.version.clone());
                    if seen.version.as_ref() != Some(&seen_version) {
                        seen.version = Some(seen_version);
                        seen.since = Some(Instant::now());
                    }
                    let stale = owner.is_dead_here()
                        || seen.since.is_some_and(|t| t.elapsed() >= stale_after());
                    if stale {
                        self.put_lock(key, beat_record(&me, 0), Some(version))?
                    } else {
                        if let Some(f) = on_wait.take() {
                            f(&format!(
                                "{} (remote lock on {})",
                                owner.describe(),
                                self.url
                            ));
                        }
                        None
                    }
                }
            };
            if let Some(version) = taken {
                return Ok(Some(self.start_beating(key, me, version)));
            }
            if cancel.is_cancelled() || done_elsewhere() {
                return Ok(None);
            }
            std::thread::sleep(poll_interval());
        }
    }

    fn start_beating(self: &Arc<Self>, key: &Key, me: Owner, first: UpdateVersion) -> RemoteLock {
        let stop = Arc::new(AtomicBool::new(false));
        let beat = {
            let (remote, key, me, stop) = (self.clone(), key.clone(), me.clone(), stop.clone());
            std::thread::Builder::new()
                .name("saeflow-remote-lock".into())
                .spawn(move || {
                    let mut version = first;
                    let mut count = 0u64;
                    loop {
                        std::thread::park_timeout(heartbeat_interval());
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        count += 1;
                        match remote.put_lock(&key, beat_record(&me, count), Some(version.clone()))
                        {
                            Ok(Some(next)) => version = next,
                            // Taken over (we stalled past the stale limit): stop claiming it.
                            Ok(None) => return,
                            // A failed beat is retried at the next one; waiters allow several.
                            Err(_) => {}
                        }
                    }
                })
                .ok()
        };
        RemoteLock {
            inner: Inner::Store {
                remote: self.clone(),
                key: key.clone(),
                token: me.token,
                stop,
                beat,
            },
        }
    }
}

/// The owner record with a beat count, so every heartbeat changes the lock's content (and so its etag).
fn beat_record(me: &Owner, count: u64) -> String {
    format!("{}beat {count}\n", me.record())
}

/// How often a waiter looks at a remote lock (and whether the object appeared): a request per second.
fn poll_interval() -> Duration {
    (heartbeat_interval() / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
}
