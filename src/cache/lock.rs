//! One exclusive lock per action key, so concurrent runs never compute the same key twice.
//!
//! Locks are `flock(2)` on `locks/<key>.lock`: the kernel releases them when the holder dies (kill -9
//! included), so a dead process's lock is taken over without any staleness heuristics. The holder writes its
//! pid and host into the file so waiters can say whom they wait for. (Shared filesystems without reliable
//! flock need heartbeat lock files instead; that belongs to the cluster executor.)

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// A held lock; released on drop.
#[derive(Debug)]
pub struct KeyLock {
    _file: File,
    /// The lock file.
    pub path: PathBuf,
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

/// Tries to take the lock at `path` without waiting. `Ok(None)` means another process holds it.
pub fn try_lock(path: &Path) -> anyhow::Result<Option<KeyLock>> {
    loop {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("cannot open lock file {}", path.display()))?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Ok(None);
            }
            return Err(err).with_context(|| format!("cannot lock {}", path.display()));
        }
        // The file may have been unlinked (by gc) between open and flock; then our lock guards nothing.
        let same = match std::fs::metadata(path) {
            Ok(m) => m.ino() == file.metadata()?.ino(),
            Err(_) => false,
        };
        if !same {
            continue;
        }
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        writeln!(file, "pid {} host {}", std::process::id(), hostname())?;
        return Ok(Some(KeyLock {
            _file: file,
            path: path.to_path_buf(),
        }));
    }
}

/// Who holds a lock, as recorded in its file (best effort, for messages).
pub fn holder(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    let s = s.trim();
    if s.is_empty() {
        "another process".into()
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_fails_until_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.lock");
        let first = try_lock(&p).unwrap().expect("free lock");
        assert!(try_lock(&p).unwrap().is_none());
        assert!(holder(&p).contains(&format!("pid {}", std::process::id())));
        drop(first);
        assert!(try_lock(&p).unwrap().is_some());
    }
}
