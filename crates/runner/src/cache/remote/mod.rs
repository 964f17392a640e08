//! The remote tier: an object store (`s3://`, `gs://`, `az://`, `file://`) behind the local cache, so a
//! cache outlives the machine (a recycled Colab runtime, a preempted VM) and machines share results.
//!
//! Layout under the remote's URL (a bucket and an optional prefix):
//! - `cas/<blake3>`: file contents by hash. Objects and partial work name their files' hashes, so a file
//!   is uploaded once (a capture's finished shards, already pushed as partial work, are not sent again)
//!   and a blob is never half of two things.
//! - `objects/<key>`: an object's manifest, `<blake3 of the manifest>\n<manifest.json bytes>`, created
//!   with a conditional write only after every blob it names is stored: one atomic write makes an object
//!   visible, so a reader never sees a partial one. The first line makes any read a check.
//! - `partial/<key>`: the same framing around a list of the files of an unfinished run's partial
//!   directory (capture shards, training checkpoints), replaced whenever the stage reports a finished piece
//! - `locks/<key>.lock`: one computation per key across machines (`lock.rs`)
//! - `refs/<pipeline>/<instance>.json`: the last successful key of an instance, as in the local cache
//! - `quarantine/`: manifests and blobs found damaged, moved aside so the key is recomputed
//!
//! Credentials come from the usual environment (AWS_*, GOOGLE_APPLICATION_CREDENTIALS or application default
//! credentials, AZURE_*) and are never written anywhere: keys, manifests and logs hold only the URL, and
//! the URL is shown without user info or query. Transient errors (5xx, timeouts, dropped connections) are
//! retried with exponential backoff by `object_store`'s retry layer; what is left is an error naming the
//! URL and saying what to do.

mod gc;
mod lock;
mod sync;
mod transfer;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

pub use lock::RemoteLock;
pub use sync::SyncReport;
pub use transfer::{PartialMirror, Pulled, Transfer};

use super::{Key, OutputFile};

/// An object store holding a remote cache.
#[derive(Debug)]
pub struct Remote {
    store: Arc<dyn ObjectStore>,
    prefix: ObjPath,
    /// The URL as the user wrote it, without user info or query (for messages).
    url: String,
    /// For `file://` remotes: the directory (locks there are the local cache's lock files).
    local_root: Option<std::path::PathBuf>,
    runtime: tokio::runtime::Runtime,
}

/// `SAEFLOW_REMOTE_TIMEOUT_SECS` (default 60): one request's time limit before it is retried.
fn request_timeout() -> String {
    let secs = std::env::var("SAEFLOW_REMOTE_TIMEOUT_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(60.0);
    format!("{}ms", (secs * 1000.0) as u64)
}

/// Retries: exponential backoff from 100 ms to 5 s, for at most `SAEFLOW_REMOTE_RETRIES` (default 8)
/// attempts within two minutes.
fn retry_config() -> object_store::RetryConfig {
    let retries = std::env::var("SAEFLOW_REMOTE_RETRIES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            base: 2.0,
        },
        max_retries: retries,
        retry_timeout: Duration::from_secs(120),
    }
}

/// The URL without user info, query or fragment, for messages.
fn display_url(url: &url::Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.set_query(None);
    shown.set_fragment(None);
    shown.to_string().trim_end_matches('/').to_string()
}

/// Refuses a remote whose credentials cannot come from the environment, before any request: otherwise the
/// cloud SDKs fall back on an instance-metadata service, which on a laptop hangs until a timeout.
/// `env` looks a variable up (the process environment outside tests).
fn check_credentials(
    scheme: &str,
    url: &str,
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<()> {
    let env_set = |name: &str| env(name).is_some_and(|v| !v.is_empty());
    let found = match scheme {
        "s3" | "s3a" => {
            (env_set("AWS_ACCESS_KEY_ID") && env_set("AWS_SECRET_ACCESS_KEY"))
                || env_set("AWS_WEB_IDENTITY_TOKEN_FILE")
                || env_set("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
                || env_set("AWS_CONTAINER_CREDENTIALS_FULL_URI")
                || env_set("AWS_METADATA_ENDPOINT")
                || env("AWS_SKIP_SIGNATURE").is_some_and(|v| v == "true")
        }
        "gs" => {
            env_set("GOOGLE_APPLICATION_CREDENTIALS")
                || env_set("GOOGLE_SERVICE_ACCOUNT")
                || env_set("GOOGLE_SERVICE_ACCOUNT_PATH")
                || env_set("GOOGLE_SERVICE_ACCOUNT_KEY")
                || env("HOME").is_some_and(|home| {
                    Path::new(&home)
                        .join(".config/gcloud/application_default_credentials.json")
                        .is_file()
                })
        }
        _ => {
            env_set("AZURE_STORAGE_ACCOUNT_KEY")
                || env_set("AZURE_STORAGE_ACCESS_KEY")
                || env_set("AZURE_STORAGE_SAS_KEY")
                || env_set("AZURE_STORAGE_SAS_TOKEN")
                || env_set("AZURE_STORAGE_TOKEN")
                || env_set("AZURE_CLIENT_SECRET")
                || env_set("AZURE_FEDERATED_TOKEN_FILE")
                || env("AZURE_STORAGE_USE_EMULATOR").is_some_and(|v| v == "true")
        }
    };
    if found {
        return Ok(());
    }
    let how = match scheme {
        "s3" | "s3a" => {
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary \
             credentials), or AWS_WEB_IDENTITY_TOKEN_FILE; on an EC2 instance with a role set \
             AWS_METADATA_ENDPOINT=http://169.254.169.254; for S3-compatible servers also AWS_ENDPOINT_URL"
        }
        "gs" => {
            "run `gcloud auth application-default login` (on Colab: `google.colab.auth.authenticate_user()` \
             then the same), or set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file"
        }
        _ => {
            "set AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY, or AZURE_STORAGE_SAS_TOKEN, or \
             AZURE_CLIENT_ID/AZURE_CLIENT_SECRET/AZURE_TENANT_ID"
        }
    };
    bail!("remote cache {url}: no credentials found in the environment: {how}")
}

/// Names the remote in an error and says what to do where the store's answer allows.
pub(crate) fn explain(url: &str, what: &str, e: object_store::Error) -> anyhow::Error {
    let text = e.to_string();
    let hint = if text.contains("NoSuchBucket")
        || text.contains("ContainerNotFound")
        || text.contains("bucket does not exist")
    {
        "the bucket does not exist: create it, or fix the URL"
    } else if text.contains("ExpiredToken") || text.contains("expired") {
        "the credentials have expired: refresh them (e.g. a new AWS_SESSION_TOKEN) and run again; finished work is kept"
    } else if text.contains("InvalidAccessKeyId")
        || text.contains("SignatureDoesNotMatch")
        || text.contains("AuthenticationFailed")
    {
        "the credentials were rejected: check the access key and secret"
    } else if text.contains("AccessDenied")
        || text.contains("403")
        || text.contains("AuthorizationFailure")
    {
        "access denied: the credentials may not do this here (a read-only key cannot push)"
    } else if matches!(e, object_store::Error::NotFound { .. }) {
        "not found"
    } else {
        "after retries"
    };
    anyhow::anyhow!("remote cache {url}: {what} failed ({hint}): {text}")
}

/// Frames a JSON document with its own blake3, so a read of it is a check.
fn frame(json: &[u8]) -> Vec<u8> {
    let mut out = blake3::hash(json).to_hex().as_bytes().to_vec();
    out.push(b'\n');
    out.extend_from_slice(json);
    out
}

/// The JSON inside a framed document, if its hash matches.
fn unframe(bytes: &[u8]) -> Option<&[u8]> {
    let newline = bytes.iter().position(|&b| b == b'\n')?;
    let (sum, json) = (&bytes[..newline], &bytes[newline + 1..]);
    (sum == blake3::hash(json).to_hex().as_bytes()).then_some(json)
}

/// `partial/<key>`: the files of an unfinished run's partial directory.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct PartialIndex {
    pub(crate) files: Vec<OutputFile>,
}

/// Whether a path read from a remote document may be written under a local directory: relative, plain
/// components only (no `..`, no root, no empty or `.` parts), so a hostile manifest cannot reach outside it.
pub(crate) fn safe_relative(path: &str) -> bool {
    !path.is_empty()
        && path.len() < 4096
        && !path.contains('\\')
        && !path.contains('\0')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

impl Remote {
    /// Connects to the remote cache at `url` (`s3://bucket/prefix`, `gs://…`, `az://container/prefix`,
    /// `file:///dir`). Checks that credentials can be found, not that they work: the first request does.
    pub fn open(url_text: &str) -> anyhow::Result<Self> {
        use object_store::aws::AmazonS3Builder;
        use object_store::azure::MicrosoftAzureBuilder;
        use object_store::gcp::GoogleCloudStorageBuilder;
        // ring serves rustls (object_store's HTTPS) as it does ureq; installing twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let url = url::Url::parse(url_text)
            .with_context(|| format!("remote cache `{url_text}` is not a URL (s3://bucket/prefix, gs://…, az://…, file:///dir)"))?;
        let shown = display_url(&url);
        let scheme = url.scheme();
        let timeout = request_timeout();
        let (store, prefix, local_root): (Arc<dyn ObjectStore>, ObjPath, _) = match scheme {
            "file" => {
                let dir = url
                    .to_file_path()
                    .map_err(|()| anyhow::anyhow!("remote cache {shown}: not a local path"))?;
                std::fs::create_dir_all(&dir).with_context(|| {
                    format!("remote cache {shown}: cannot create {}", dir.display())
                })?;
                let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| explain(&shown, "opening", e))?;
                (Arc::new(store), ObjPath::default(), Some(dir))
            }
            "s3" | "s3a" | "gs" | "az" | "azure" | "abfs" | "abfss" => {
                check_credentials(scheme, &shown, |name| std::env::var(name).ok())?;
                let prefix = ObjPath::parse(url.path().trim_matches('/'))
                    .with_context(|| format!("remote cache {shown}: bad path"))?;
                let store: Arc<dyn ObjectStore> = match scheme {
                    "s3" | "s3a" => Arc::new(
                        AmazonS3Builder::from_env()
                            .with_url(url.as_str())
                            .with_config("timeout".parse()?, &timeout)
                            .with_config("connect_timeout".parse()?, "10s")
                            .with_retry(retry_config())
                            .build()
                            .map_err(|e| explain(&shown, "configuring", e))?,
                    ),
                    "gs" => Arc::new(
                        GoogleCloudStorageBuilder::from_env()
                            .with_url(url.as_str())
                            .with_config("timeout".parse()?, &timeout)
                            .with_retry(retry_config())
                            .build()
                            .map_err(|e| explain(&shown, "configuring", e))?,
                    ),
                    _ => Arc::new(
                        MicrosoftAzureBuilder::from_env()
                            .with_url(url.as_str())
                            .with_config("timeout".parse()?, &timeout)
                            .with_retry(retry_config())
                            .build()
                            .map_err(|e| explain(&shown, "configuring", e))?,
                    ),
                };
                (store, prefix, None)
            }
            other => bail!(
                "remote cache {shown}: unsupported scheme `{other}` (s3://, gs://, az://, file://)"
            ),
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("saeflow-remote")
            .enable_all()
            .build()
            .context("cannot start the remote cache's I/O runtime")?;
        Ok(Self {
            store,
            prefix,
            url: shown,
            local_root,
            runtime,
        })
    }

    /// The remote's URL (without credentials).
    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, rel: &str) -> ObjPath {
        let mut path = self.prefix.clone();
        for part in rel.split('/') {
            path = path.clone().join(part);
        }
        path
    }

    fn shown(&self, path: &ObjPath) -> String {
        let rel = path
            .as_ref()
            .strip_prefix(self.prefix.as_ref())
            .unwrap_or(path.as_ref());
        format!("{}/{}", self.url, rel.trim_start_matches('/'))
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    /// Reads a small document; `None` if absent.
    fn read(&self, rel: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let path = self.path(rel);
        self.block_on(async {
            match self.store.get(&path).await {
                Ok(got) => got
                    .bytes()
                    .await
                    .map(|b| Some(b.to_vec()))
                    .map_err(|e| explain(&self.shown(&path), "reading", e)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(explain(&self.shown(&path), "reading", e)),
            }
        })
    }

    /// Writes a small document (replacing it). `create`: only if absent; returns whether it was written.
    fn write(&self, rel: &str, bytes: Vec<u8>, create: bool) -> anyhow::Result<bool> {
        let path = self.path(rel);
        let mode = if create {
            PutMode::Create
        } else {
            PutMode::Overwrite
        };
        self.block_on(async {
            match self
                .store
                .put_opts(&path, PutPayload::from(bytes), PutOptions::from(mode))
                .await
            {
                Ok(_) => Ok(true),
                Err(object_store::Error::AlreadyExists { .. })
                | Err(object_store::Error::Precondition { .. })
                    if create =>
                {
                    Ok(false)
                }
                Err(e) => Err(explain(&self.shown(&path), "writing", e)),
            }
        })
    }

    fn delete(&self, rel: &str) -> anyhow::Result<()> {
        let path = self.path(rel);
        self.block_on(async {
            match self.store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(explain(&self.shown(&path), "deleting", e)),
            }
        })
    }

    /// Every document under `dir`, at any depth: its name relative to `dir`, size and modification time.
    fn list(&self, dir: &str) -> anyhow::Result<Vec<(String, u64, std::time::SystemTime)>> {
        use futures::TryStreamExt;
        let path = self.path(dir);
        self.block_on(async {
            let metas: Vec<object_store::ObjectMeta> = self
                .store
                .list(Some(&path))
                .try_collect()
                .await
                .map_err(|e| explain(&self.shown(&path), "listing", e))?;
            let base = format!("{}/", path.as_ref());
            Ok(metas
                .into_iter()
                .filter_map(|m| {
                    let rel = m.location.as_ref().strip_prefix(&base)?.to_string();
                    Some((rel, m.size, std::time::SystemTime::from(m.last_modified)))
                })
                .collect())
        })
    }

    /// An object's manifest bytes, checked against their hash: `Ok(None)` if the remote lacks the object,
    /// `Err` with the problem if the manifest is damaged.
    pub fn manifest_bytes(&self, key: &Key) -> anyhow::Result<Option<Result<Vec<u8>, String>>> {
        let Some(framed) = self.read(&format!("objects/{}", key.0))? else {
            return Ok(None);
        };
        Ok(Some(match unframe(&framed) {
            Some(json) => Ok(json.to_vec()),
            None => Err("its manifest does not match its hash".to_string()),
        }))
    }

    /// Whether the remote has an object for `key` (one HEAD request).
    pub fn has_object(&self, key: &Key) -> anyhow::Result<bool> {
        let path = self.path(&format!("objects/{}", key.0));
        self.block_on(async {
            match self.store.head(&path).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(explain(&self.shown(&path), "looking up", e)),
            }
        })
    }

    /// Makes an object visible: its manifest, written once (a second writer finds it there and keeps it).
    pub(crate) fn put_manifest(&self, key: &Key, manifest_json: &[u8]) -> anyhow::Result<()> {
        self.write(&format!("objects/{}", key.0), frame(manifest_json), true)?;
        Ok(())
    }

    /// Moves a damaged object's manifest (and the damaged blobs named) to `quarantine/`, so the key counts
    /// as not computed here and the next run recomputes it. The caller holds the key's remote lock.
    pub fn quarantine(&self, key: &Key, bad_blobs: &[String]) -> anyhow::Result<()> {
        let stamp = super::now_ms();
        let moves = std::iter::once((
            format!("objects/{}", key.0),
            format!("quarantine/objects/{}.{stamp}", key.0),
        ))
        .chain(
            bad_blobs
                .iter()
                .map(|b| (format!("cas/{b}"), format!("quarantine/cas/{b}.{stamp}"))),
        );
        for (from, to) in moves {
            let (from, to) = (self.path(&from), self.path(&to));
            self.block_on(async {
                match self.store.rename(&from, &to).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(explain(&self.shown(&from), "moving to quarantine", e)),
                }
            })?;
        }
        Ok(())
    }

    /// Keys of every object on the remote.
    pub fn object_keys(&self) -> anyhow::Result<Vec<Key>> {
        let mut keys: Vec<Key> = self
            .list("objects")?
            .into_iter()
            .filter(|(name, _, _)| !name.contains('/'))
            .map(|(name, _, _)| Key(name))
            .collect();
        keys.sort();
        Ok(keys)
    }

    /// The partial work recorded for `key`, if any (`Err` text if its index is damaged).
    pub(crate) fn partial_index(
        &self,
        key: &Key,
    ) -> anyhow::Result<Option<Result<PartialIndex, String>>> {
        let Some(framed) = self.read(&format!("partial/{}", key.0))? else {
            return Ok(None);
        };
        Ok(Some(
            unframe(&framed)
                .and_then(|json| serde_json::from_slice(json).ok())
                .ok_or_else(|| "its index does not match its hash".to_string()),
        ))
    }

    /// Records the partial work of `key` (replacing the previous record).
    pub(crate) fn put_partial_index(&self, key: &Key, index: &PartialIndex) -> anyhow::Result<()> {
        self.write(
            &format!("partial/{}", key.0),
            frame(&serde_json::to_vec(index)?),
            false,
        )?;
        Ok(())
    }

    /// Forgets the partial work of `key` (its blobs go with `gc`).
    pub(crate) fn drop_partial(&self, key: &Key) -> anyhow::Result<()> {
        self.delete(&format!("partial/{}", key.0))
    }

    /// Keys with partial work on the remote.
    pub fn partial_keys(&self) -> anyhow::Result<Vec<Key>> {
        Ok(self
            .list("partial")?
            .into_iter()
            .map(|(name, _, _)| Key(name))
            .collect())
    }

    /// Records an instance's last successful key on the remote (`refs/<pipeline>/<instance>.json`).
    pub fn write_ref(
        &self,
        pipeline: &str,
        instance_file: &str,
        bytes: Vec<u8>,
    ) -> anyhow::Result<()> {
        self.write(&format!("refs/{pipeline}/{instance_file}"), bytes, false)?;
        Ok(())
    }

    /// Every ref on the remote: (pipeline/instance file, bytes).
    pub fn refs(&self) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
        let mut out = BTreeMap::new();
        for (name, _, _) in self.list("refs")? {
            if let Some(bytes) = self.read(&format!("refs/{name}"))? {
                out.insert(name, bytes);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_catches_any_changed_byte() {
        let framed = frame(br#"{"a":1}"#);
        assert_eq!(unframe(&framed), Some(&br#"{"a":1}"#[..]));
        for i in 0..framed.len() {
            let mut bad = framed.clone();
            bad[i] ^= 1;
            assert_eq!(unframe(&bad), None, "byte {i}");
        }
        assert_eq!(unframe(b"no newline"), None);
    }

    #[test]
    fn only_plain_relative_paths_are_safe() {
        for ok in [
            "a",
            "a/b.parquet",
            "shard-00001/state.json",
            "..a/b..",
            "a/.hidden",
        ] {
            assert!(safe_relative(ok), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "a/.",
            "a\\..\\b",
            "a\0",
        ] {
            assert!(!safe_relative(bad), "{bad:?}");
        }
    }

    #[test]
    fn messages_never_show_user_info_or_query() {
        let url = url::Url::parse("s3://user:secret@bucket/prefix/?X-Amz-Signature=abc").unwrap();
        let shown = display_url(&url);
        assert_eq!(shown, "s3://bucket/prefix");
    }

    #[test]
    fn a_remote_without_credentials_is_refused_before_any_request() {
        let none = |_: &str| None;
        let e = check_credentials("s3", "s3://b/p", none)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("s3://b/p") && e.contains("AWS_ACCESS_KEY_ID"),
            "{e}"
        );
        let e = check_credentials("gs", "gs://b/p", none)
            .unwrap_err()
            .to_string();
        assert!(e.contains("GOOGLE_APPLICATION_CREDENTIALS"), "{e}");
        let e = check_credentials("az", "az://c/p", none)
            .unwrap_err()
            .to_string();
        assert!(e.contains("AZURE_STORAGE_ACCOUNT_KEY"), "{e}");
        // A key id alone is not enough; with its secret it is.
        let id_only = |n: &str| (n == "AWS_ACCESS_KEY_ID").then(|| "x".to_string());
        assert!(check_credentials("s3", "s3://b/p", id_only).is_err());
        let both = |n: &str| n.starts_with("AWS_").then(|| "x".to_string());
        assert!(check_credentials("s3", "s3://b/p", both).is_ok());
        // An empty variable counts as unset.
        let empty = |n: &str| n.starts_with("AWS_").then(String::new);
        assert!(check_credentials("s3", "s3://b/p", empty).is_err());
    }
}
