//! A real S3-compatible server on loopback for the remote-cache tests: moto's S3 (PyPI `moto[server]`, which
//! `.ci/run` installs) behind `scripts/s3-test-server.py`, which serializes requests (conditional writes are
//! atomic, as on S3) and injects faults on request. Tests using it carry
//! `#[cfg_attr(missing = "moto", ignore = "needs moto_server")]`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The secret access key the tests use (moto accepts any), to check that no message shows it.
pub const SECRET: &str = "not-a-real-secret-4f2a9c";

/// An AWS signature header of the right shape; moto does not check its value.
const UNCHECKED_SIGNATURE: &str =
    "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/s3/aws4_request, \
     SignedHeaders=host, Signature=0";

/// The bucket every test server has.
pub const BUCKET: &str = "saeflow-test";

/// A running server; killed on drop.
pub struct S3 {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

/// The Python that has moto: the one beside `moto_server` on PATH, else `python3`.
fn python() -> PathBuf {
    let beside = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .find(|d| d.join("moto_server").is_file())
            .map(|d| d.join("python3"))
    });
    beside
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("python3"))
}

impl S3 {
    /// Starts a server on a free port with an empty bucket [`BUCKET`].
    pub fn start() -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/s3-test-server.py");
        let mut child = Command::new(python())
            .arg(&script)
            .arg("0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the S3 test server starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("port ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the S3 test server said {line:?}"));
        let s3 = S3 { child, port };
        let (status, _) = s3.request("PUT", &format!("/{BUCKET}"), &[]);
        assert_eq!(status, 200, "creating the bucket");
        s3
    }

    /// The remote URL of `prefix` in the test bucket.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}")
    }

    /// Points a saeflow command at this server (credentials, endpoint, short timeouts and retries).
    pub fn env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .env("AWS_REGION", "us-east-1")
            .env(
                "AWS_ENDPOINT_URL",
                format!("http://127.0.0.1:{}", self.port),
            )
            .env("AWS_ALLOW_HTTP", "true")
            .env("SAEFLOW_REMOTE_TIMEOUT_SECS", "2")
            .env("SAEFLOW_REMOTE_RETRIES", "4")
            .env("SAEFLOW_LOCK_STALE_SECS", "6")
    }

    /// One plain HTTP/1.0 request; returns status and body. moto checks that requests are signed, not the
    /// signatures, so any well-formed `Authorization` header passes (no signing code in the tests).
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("server up");
        write!(
            stream,
            "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\n\
             Authorization: {UNCHECKED_SIGNATURE}\r\n\r\n",
            self.port,
            body.len()
        )
        .unwrap();
        stream.write_all(body).unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).unwrap();
        let split = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("an HTTP response");
        let head = String::from_utf8_lossy(&response[..split]).to_string();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, response[split + 4..].to_vec())
    }

    /// Object names under `prefix` in the bucket.
    pub fn list(&self, prefix: &str) -> Vec<String> {
        let mut names = Vec::new();
        let mut token = String::new();
        loop {
            let (status, body) = self.request(
                "GET",
                &format!("/{BUCKET}?list-type=2&prefix={prefix}{token}"),
                &[],
            );
            assert_eq!(status, 200);
            let xml = String::from_utf8_lossy(&body).to_string();
            for part in xml.split("<Key>").skip(1) {
                names.push(part.split("</Key>").next().unwrap().to_string());
            }
            match xml
                .split("<NextContinuationToken>")
                .nth(1)
                .and_then(|t| t.split('<').next())
            {
                Some(t) if xml.contains("<IsTruncated>true") => {
                    token = format!("&continuation-token={t}")
                }
                _ => return names,
            }
        }
    }

    /// An object's bytes, if it exists.
    pub fn get(&self, name: &str) -> Option<Vec<u8>> {
        let (status, body) = self.request("GET", &format!("/{BUCKET}/{name}"), &[]);
        (status == 200).then_some(body)
    }

    /// Replaces an object's bytes.
    pub fn put(&self, name: &str, bytes: &[u8]) {
        let (status, _) = self.request("PUT", &format!("/{BUCKET}/{name}"), bytes);
        assert_eq!(status, 200, "PUT {name}");
    }

    /// Switches faults on (see `scripts/s3-test-server.py`); `{}` switches them off. Returns the counters.
    pub fn faults(&self, json: &str) -> serde_json::Value {
        let (status, body) = self.request("POST", "/__faults", json.as_bytes());
        assert_eq!(status, 200);
        serde_json::from_slice(&body).unwrap()
    }

    /// Freezes the server (SIGSTOP): requests hang as if it were gone.
    pub fn freeze(&self) {
        signal(self.child.id(), "STOP");
    }

    /// Lets a frozen server go on (SIGCONT).
    pub fn thaw(&self) {
        signal(self.child.id(), "CONT");
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

impl Drop for S3 {
    fn drop(&mut self) {
        signal(self.child.id(), "CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
