//! One exclusive lock per action key, so concurrent runs — on one machine or on many nodes sharing the cache
//! over NFS — never compute the same key twice.
//!
//! `flock` is not trusted on shared filesystems, so a lock is a file created with `O_CREAT | O_EXCL` (atomic
//! on NFSv3+ and every local filesystem) holding its owner's record: host, pid, the pid's start time and a
//! random token. While held, a heartbeat thread touches the file's mtime every [`heartbeat_interval`]. A lock
//! is stale when its owner is on this host and that process is gone (kill -9: taken over at once), or when its
//! mtime has not moved for [`stale_after`] as measured by the waiter's own clock (a dead or partitioned node;
//! immune to clock skew between nodes, since only changes are compared). Taking over a stale lock happens
//! under a second exclusive file, `<key>.lock.steal`, so two waiters never both remove a lock and one of them
//! a fresh one.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;

/// How long a lock's mtime may stand still before waiters on other hosts take it over
/// (`SAEFLOW_LOCK_STALE_SECS`, default 60).
pub fn stale_after() -> Duration {
    std::env::var("SAEFLOW_LOCK_STALE_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .map_or(Duration::from_secs(60), Duration::from_secs_f64)
}

/// How often a holder touches its locks: a sixth of [`stale_after`], so a few missed beats are tolerated.
pub fn heartbeat_interval() -> Duration {
    stale_after() / 6
}

/// A held lock; released (its file removed) on drop.
#[derive(Debug)]
pub struct KeyLock {
    /// The lock file.
    pub path: PathBuf,
    token: String,
}

impl Drop for KeyLock {
    fn drop(&mut self) {
        held().lock().expect("not poisoned").remove(&self.path);
        // Remove the file only if it is still ours (it was not taken over after a stall).
        if read_owner(&self.path).is_some_and(|o| o.token == self.token) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// This machine's host name, for lock owner records.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    if ok {
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "unknown".into()
    }
}

/// A process's start time in clock ticks since boot (`/proc/<pid>/stat` field 22), which tells a live
/// owner from an unrelated process that reused its pid.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; fields after it follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The owner record of a lock (or lease) file.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Owner {
    pub(super) host: String,
    pid: u32,
    start: u64,
    pub(super) token: String,
}

impl Owner {
    pub(super) fn me() -> Self {
        let pid = std::process::id();
        Self {
            host: hostname(),
            pid,
            start: start_time(pid).unwrap_or(0),
            token: format!(
                "{:016x}",
                rand::random::<u64>() ^ u64::from(pid).rotate_left(32)
            ),
        }
    }

    pub(super) fn record(&self) -> String {
        format!(
            "host {} pid {} start {} token {}\n",
            self.host, self.pid, self.start, self.token
        )
    }

    pub(super) fn parse(text: &str) -> Option<Self> {
        let fields: BTreeMap<&str, &str> = text
            .split_whitespace()
            .collect::<Vec<_>>()
            .chunks(2)
            .filter_map(|c| Some((*c.first()?, *c.get(1)?)))
            .collect();
        Some(Self {
            host: fields.get("host")?.to_string(),
            pid: fields.get("pid")?.parse().ok()?,
            start: fields.get("start")?.parse().ok()?,
            token: fields.get("token")?.to_string(),
        })
    }

    /// "pid N on HOST", for messages.
    pub(super) fn describe(&self) -> String {
        format!("pid {} on {}", self.pid, self.host)
    }

    /// An owner whose record could not be read.
    pub(super) fn unknown() -> Self {
        Self {
            host: "?".into(),
            pid: 0,
            start: 0,
            token: "?".into(),
        }
    }

    /// Whether the owner is a process on this host that no longer runs.
    pub(super) fn is_dead_here(&self) -> bool {
        if self.host != hostname() {
            return false;
        }
        match start_time(self.pid) {
            Some(start) => start != self.start,
            // Without /proc, fall back on whether the pid exists at all.
            // SAFETY: signal 0 only checks for existence.
            None => unsafe { libc::kill(self.pid as i32, 0) != 0 },
        }
    }
}

fn read_owner(path: &Path) -> Option<Owner> {
    let mut s = String::new();
    File::open(path).ok()?.read_to_string(&mut s).ok()?;
    Owner::parse(&s)
}

/// Locks (and leases) this process holds, touched by the heartbeat thread.
pub(super) fn held() -> &'static Mutex<BTreeMap<PathBuf, ()>> {
    static HELD: OnceLock<Mutex<BTreeMap<PathBuf, ()>>> = OnceLock::new();
    HELD.get_or_init(|| {
        std::thread::spawn(|| loop {
            std::thread::sleep(heartbeat_interval());
            beat();
        });
        Mutex::new(BTreeMap::new())
    })
}

/// Touches the mtime of every lock this process holds: the heartbeat waiters on other hosts watch.
fn beat() {
    let paths: Vec<PathBuf> = held()
        .lock()
        .expect("not poisoned")
        .keys()
        .cloned()
        .collect();
    for path in paths {
        if let Ok(f) = OpenOptions::new().write(true).open(&path) {
            let _ = f.set_modified(SystemTime::now());
        }
    }
}

/// Creates `path` exclusively with `content`; `Ok(false)` if it exists.
fn create_exclusive(path: &Path, content: &str) -> anyhow::Result<bool> {
    match OpenOptions::new().write(true).create_new(true).open(path) {
        Ok(mut f) => {
            f.write_all(content.as_bytes())
                .and_then(|()| f.sync_all())
                .with_context(|| format!("cannot write lock file {}", path.display()))?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot create lock file {}", path.display())),
    }
}

/// What a waiter has seen of a lock held by someone else: its owner and mtime, and when (by the waiter's
/// clock) that mtime was first seen.
#[derive(Debug, Default)]
pub struct Observed {
    seen: Option<(Option<Owner>, Option<SystemTime>, Instant)>,
}

impl Observed {
    /// Records the lock's current state; returns whether it is stale.
    fn stale(&mut self, path: &Path, stale_after: Duration) -> bool {
        let owner = read_owner(path);
        if owner.as_ref().is_some_and(Owner::is_dead_here) {
            return true;
        }
        let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        match &self.seen {
            Some((o, m, since)) if *o == owner && *m == mtime => since.elapsed() >= stale_after,
            _ => {
                self.seen = Some((owner, mtime, Instant::now()));
                false
            }
        }
    }
}

/// Tries to take the lock at `path` without waiting. `Ok(None)` means another process holds it (then
/// `observed` remembers what was seen, so repeated calls can tell a stalled holder from a live one).
pub fn try_lock(
    path: &Path,
    observed: &mut Observed,
    stale_after: Duration,
) -> anyhow::Result<Option<KeyLock>> {
    let me = Owner::me();
    for _ in 0..2 {
        if create_exclusive(path, &me.record())? {
            held()
                .lock()
                .expect("not poisoned")
                .insert(path.to_path_buf(), ());
            return Ok(Some(KeyLock {
                path: path.to_path_buf(),
                token: me.token,
            }));
        }
        if !observed.stale(path, stale_after) || !take_over(path, observed)? {
            return Ok(None);
        }
    }
    Ok(None)
}

/// Removes a stale lock file under the steal lock, if it still is the one observed. Returns whether the
/// lock file is gone.
fn take_over(path: &Path, observed: &Observed) -> anyhow::Result<bool> {
    let steal = path.with_extension("lock.steal");
    if !create_exclusive(&steal, &Owner::me().record())? {
        // A stealer that died mid-steal leaves this file; it is only ever held for a moment.
        let old = std::fs::metadata(&steal)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(10));
        if old {
            let _ = std::fs::remove_file(&steal);
        }
        return Ok(false);
    }
    let owner = read_owner(path);
    let expected = observed.seen.as_ref().and_then(|(o, _, _)| o.clone());
    let still_stale =
        owner.is_none() || owner == expected || owner.as_ref().is_some_and(Owner::is_dead_here);
    if still_stale {
        let _ = std::fs::remove_file(path);
    }
    let _ = std::fs::remove_file(&steal);
    Ok(still_stale)
}

/// Who holds a lock, as recorded in its file (best effort, for messages).
pub fn holder(path: &Path) -> String {
    match read_owner(path) {
        Some(o) => o.describe(),
        None => "another process".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(3600);

    #[test]
    fn second_lock_fails_until_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.lock");
        let first = try_lock(&p, &mut Observed::default(), LONG)
            .unwrap()
            .expect("free lock");
        assert!(try_lock(&p, &mut Observed::default(), LONG)
            .unwrap()
            .is_none());
        assert_eq!(
            holder(&p),
            format!("pid {} on {}", std::process::id(), hostname())
        );
        drop(first);
        assert!(!p.exists(), "released locks leave no file");
        assert!(try_lock(&p, &mut Observed::default(), LONG)
            .unwrap()
            .is_some());
    }

    #[test]
    fn the_heartbeat_moves_held_locks_mtime_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.lock");
        let lock = try_lock(&p, &mut Observed::default(), LONG)
            .unwrap()
            .unwrap();
        let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1);
        let set_old = || {
            File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(old)
                .unwrap()
        };
        set_old();
        beat();
        let beaten = std::fs::metadata(&p).unwrap().modified().unwrap();
        assert!(
            beaten.elapsed().unwrap() < Duration::from_secs(60),
            "{beaten:?}"
        );
        drop(lock);
        // A released lock is no longer beaten, even if a file of that name comes back.
        std::fs::write(&p, "someone else's").unwrap();
        set_old();
        beat();
        assert_eq!(std::fs::metadata(&p).unwrap().modified().unwrap(), old);
    }

    #[test]
    fn a_dead_local_owner_is_taken_over_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.lock");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let dead = Owner {
            host: hostname(),
            pid,
            start: 1,
            token: "dead".into(),
        };
        std::fs::write(&p, dead.record()).unwrap();
        let lock = try_lock(&p, &mut Observed::default(), LONG).unwrap();
        assert!(lock.is_some(), "a dead process's lock must not block");
        assert!(!std::fs::read_to_string(&p).unwrap().contains("token dead"));
    }

    #[test]
    fn a_remote_owner_is_taken_over_only_after_its_heartbeat_stops() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.lock");
        let remote = Owner {
            host: "node-elsewhere".into(),
            pid: 1,
            start: 1,
            token: "remote".into(),
        };
        std::fs::write(&p, remote.record()).unwrap();
        let stale = Duration::from_millis(300);
        let mut seen = Observed::default();
        // Beating: the mtime moves every 100 ms, so the lock stays held for well past `stale`.
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        for i in 1..=8u64 {
            assert!(
                try_lock(&p, &mut seen, stale).unwrap().is_none(),
                "beat {i}"
            );
            std::thread::sleep(Duration::from_millis(100));
            f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(i))
                .unwrap();
        }
        // Silent: taken over once `stale` has passed without a beat.
        assert!(try_lock(&p, &mut seen, stale).unwrap().is_none());
        std::thread::sleep(stale + Duration::from_millis(50));
        assert!(try_lock(&p, &mut seen, stale).unwrap().is_some());
    }

    #[test]
    fn racing_takeovers_of_a_stale_lock_leave_one_holder() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.lock");
        for round in 0..20 {
            let remote = Owner {
                host: "node-elsewhere".into(),
                pid: 1,
                start: 1,
                token: format!("r{round}"),
            };
            std::fs::write(&p, remote.record()).unwrap();
            let barrier = std::sync::Barrier::new(4);
            let winners: Vec<KeyLock> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..4)
                    .map(|_| {
                        s.spawn(|| {
                            let mut seen = Observed::default();
                            assert!(try_lock(&p, &mut seen, Duration::ZERO).unwrap().is_none());
                            barrier.wait();
                            try_lock(&p, &mut seen, Duration::ZERO).unwrap()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .filter_map(|h| h.join().unwrap())
                    .collect()
            });
            assert!(
                winners.len() <= 1,
                "round {round}: {} holders",
                winners.len()
            );
        }
    }
}
