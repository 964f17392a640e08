//! Checksums and the shapes of what a server may name: sha256 and git blob oids of files, content addresses
//! (64 lowercase hex), and repository paths that stay inside the folder they are joined onto.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use anyhow::Context;
use sha2::{Digest, Sha256};

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut h = Sha256::new();
    hash_file(path, |b| h.update(b))?;
    Ok(hex(&h.finalize()))
}

/// The git blob oid of a file (sha1 of `blob <len>\0` followed by the content), as the hub lists for files
/// outside LFS.
pub fn git_blob_oid(path: &Path) -> anyhow::Result<String> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("cannot open {}", path.display()))?
        .len();
    // SHA-1 only because git names blobs by it; ring is already in the build (through rustls).
    let mut h = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    h.update(format!("blob {len}\0").as_bytes());
    hash_file(path, |b| h.update(b))?;
    Ok(hex(h.finish().as_ref()))
}

fn hash_file(path: &Path, mut update: impl FnMut(&[u8])) -> anyhow::Result<()> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        update(&buf[..n]);
    }
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Whether `s` is a content address: exactly 64 lowercase hex characters (a sha256). Only such a string may
/// become a file name in the download area.
pub fn is_content_address(s: &str) -> bool {
    is_lower_hex(s, 64)
}

/// Why `path` (a file path from a hub listing) may not be joined onto a local directory, if it may not:
/// it must be relative, `/`-separated, without empty, `.` or `..` components, backslashes or control
/// characters (NUL included).
pub fn unsafe_repo_path(path: &str) -> Option<&'static str> {
    if path.is_empty() {
        Some("it is empty")
    } else if path.chars().any(char::is_control) {
        Some("it contains a control character (NUL, newline, ...)")
    } else if path.contains('\\') {
        Some("it contains a backslash")
    } else if path.starts_with('/') {
        Some("it is absolute")
    } else if path.split('/').any(|c| c == ".." || c == ".") {
        Some("it has a `.` or `..` component")
    } else if path.split('/').any(str::is_empty) {
        Some("it has an empty component")
    } else {
        None
    }
}
