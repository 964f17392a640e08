//! The remote cache tier against a real S3-compatible server on loopback (moto, `tests/common/s3.rs`): the
//! Colab notebook's commands on a fresh runtime reuse everything; killed stages resume from the remote's
//! partial work with the bytes of an uninterrupted run; machines sharing a remote compute each key once;
//! damage on the remote is caught and recomputed; `cache push|pull|verify` and `gc` work against the
//! remote; and faults (5xx, slow answers, a server gone mid-upload, expired or missing credentials, a denied
//! write, a missing bucket) end in a retry or a clear error, never in a published partial object.
mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::s3::S3;
use common::{lines, published_outputs, text, write};

/// saeflow in `dir`, its local cache at `dir/<cache>`, the remote `prefix` of `s3`.
fn saeflow(s3: &S3, dir: &Path, cache: &str, prefix: &str) -> Command {
    let mut c = common::saeflow(dir);
    c.env("SAEFLOW_CACHE", dir.join(cache))
        .env("SAEFLOW_CACHE_REMOTE", s3.url(prefix));
    s3.env(&mut c);
    c
}

fn run(s3: &S3, dir: &Path, cache: &str, prefix: &str, args: &[&str]) -> Output {
    saeflow(s3, dir, cache, prefix).args(args).output().unwrap()
}

fn run_ok(s3: &S3, dir: &Path, cache: &str, prefix: &str, args: &[&str]) -> String {
    let out = run(s3, dir, cache, prefix, args);
    let t = text(&out);
    assert!(out.status.success(), "saeflow {args:?} failed:\n{t}");
    assert!(!t.contains("panicked"), "{t}");
    t
}

/// Command stages that count their runs in `counts/` (outside the cache).
const COUNTED: &str = r#"
[pipeline]
name = "counted"

[stages.a]
kind = "command"
shell = "echo $$ >> counts/a; sleep 0.3; head -c 300000 /dev/urandom > {out}/a.bin; echo a > {out}/a"

[stages.b]
kind = "command"
inputs = { up = "a" }
shell = "echo $$ >> counts/b; sleep 0.3; cat {up}/a > {out}/b"

[stages.c]
kind = "command"
inputs = { up = "a" }
shell = "echo $$ >> counts/c; sleep 0.3; cat {up}/a {up}/a > {out}/c"

[stages.d]
kind = "command"
inputs = { b = "b", c = "c" }
shell = "echo $$ >> counts/d; cat {b}/b {c}/c > {out}/d"
"#;

fn counted(dir: &Path) {
    write(&dir.join("p.toml"), COUNTED);
    std::fs::create_dir_all(dir.join("counts")).unwrap();
}

fn runs_of(dir: &Path, stage: &str) -> usize {
    lines(&dir.join("counts").join(stage))
}

/// The remote manifest (JSON after the hash line) of the object an instance produced.
fn remote_manifest(s3: &S3, prefix: &str, instance: &str) -> (String, serde_json::Value) {
    for name in s3.list(&format!("{prefix}/objects/")) {
        let bytes = s3.get(&name).unwrap();
        let json = &bytes[bytes.iter().position(|&b| b == b'\n').unwrap() + 1..];
        let m: serde_json::Value = serde_json::from_slice(json).unwrap();
        if m["instance"] == instance {
            return (name, m);
        }
    }
    panic!("no object of {instance} on the remote");
}

/// The shell commands (`!` lines) of the Colab notebook's cells tagged `run`.
fn notebook_commands() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("notebooks/colab.ipynb");
    let notebook: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut commands = Vec::new();
    for cell in notebook["cells"].as_array().unwrap() {
        let tags = cell["metadata"]["tags"].as_array();
        if !tags.is_some_and(|t| t.iter().any(|t| t == "run")) {
            continue;
        }
        let source: String = cell["source"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_str().unwrap())
            .collect();
        commands.extend(
            source
                .lines()
                .filter_map(|l| l.strip_prefix('!'))
                .map(String::from),
        );
    }
    commands
}

/// Runs the notebook's commands as a fresh Colab runtime would after its settings cell: the cache is the
/// remote URL, the runtime's disk (`dir/<runtime>`) scratch, `saeflow/` the clone.
fn colab_runtime(s3: &S3, dir: &Path, runtime: &str, commands: &[String]) -> String {
    let bin = Path::new(env!("CARGO_BIN_EXE_saeflow")).parent().unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let mut printed = String::new();
    for command in commands {
        let mut c = Command::new("bash");
        c.args(["-c", command])
            .current_dir(dir)
            .env("PATH", &path)
            .env("SAEFLOW_CACHE", s3.url("colab"))
            .env("SAEFLOW_SCRATCH", dir.join(runtime))
            .env_remove("SAEFLOW_CACHE_REMOTE")
            .env_remove("SAEFLOW_LOG");
        s3.env(&mut c);
        let out = c.output().unwrap();
        let t = text(&out);
        assert!(
            out.status.success() && !t.contains("panicked"),
            "`{command}` failed:\n{t}"
        );
        printed += &t;
    }
    printed
}

#[test]
#[cfg_attr(missing = "moto", ignore = "needs moto_server")]
fn the_colab_notebook_on_a_fresh_runtime_computes_nothing_the_second_time() {
    let s3 = S3::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::os::unix::fs::symlink(env!("CARGO_MANIFEST_DIR"), d.join("saeflow")).unwrap();
    let commands = notebook_commands();
    assert!(
        commands.iter().any(|c| c.contains("saeflow run ")),
        "the notebook runs a pipeline: {commands:?}"
    );
    let first = colab_runtime(&s3, d, "runtime-1", &commands);
    assert!(first.contains("14 computed, 0 cached"), "{first}");
    // The runtime is recycled: its disk is gone, the notebook runs again on a new one.
    let second = colab_runtime(&s3, d, "runtime-2", &commands);
    assert!(
        second.contains("0 computed, 14 cached (14 pulled from the remote)"),
        "{second}"
    );
    assert_eq!(second.matches("(local + remote)").count(), 14, "{second}");
    assert_eq!(
        published_outputs(&d.join("runtime-1")),
        published_outputs(&d.join("runtime-2")),
        "the pulled objects are the computed ones, byte for byte"
    );
    let status: Vec<String> = commands
        .into_iter()
        .filter(|c| c.contains(" status "))
        .collect();
    let third = colab_runtime(&s3, d, "runtime-3", &status);
    assert_eq!(
        third.matches("(remote only: a run pulls it)").count(),
        14,
        "{third}"
    );
}

const RESUMABLE: &str = r#"
[pipeline]
name = "resume"

[models.nanochat]
kind = "nanochat"
path = "MODEL"

[stages.data]
kind = "dataset"
sources = [{ path = "CSV", text = "statement", label = "label" }]

[stages.acts]
kind = "capture"
input = "data"
model = "nanochat"
hooks = ["blocks.2.hook_resid_post"]
context = 64
shard_tokens = 1024

[stages.sae]
kind = "train"
input = "acts"
expansion = 4
k = 8
batch_size = 64
checkpoint_every = 10
"#;

/// Starts `cmd` and SIGKILLs it once the remote's partial work of some key lists `pieces` files whose path
/// contains `marker`; returns what the run printed until then.
fn kill_when_partial(s3: &S3, mut cmd: Command, log: &Path, marker: &str, pieces: usize) -> String {
    let file = std::fs::File::create(log).unwrap();
    let mut child = cmd
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        for name in s3.list("r/partial/") {
            let Some(bytes) = s3.get(&name) else { continue };
            if String::from_utf8_lossy(&bytes).matches(marker).count() >= pieces {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                return std::fs::read_to_string(log).unwrap();
            }
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run finished before {pieces} files of `{marker}` reached the remote:\n{}",
            std::fs::read_to_string(log).unwrap()
        );
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no partial work appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[cfg_attr(missing = "moto", ignore = "needs moto_server")]
fn killed_capture_and_training_resume_on_a_fresh_machine_from_the_remote_with_identical_bytes() {
    let s3 = S3::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let pipeline = RESUMABLE
        .replace(
            "MODEL",
            root.join("assets/quickstart/nanochat-d4").to_str().unwrap(),
        )
        .replace(
            "CSV",
            root.join("assets/quickstart/persona-deception.csv")
                .to_str()
                .unwrap(),
        );
    write(&d.join("p.toml"), &pipeline);
    // The reference: one uninterrupted run, no remote.
    let reference = common::saeflow(d)
        .env("SAEFLOW_CACHE", d.join("reference"))
        .args(["run", "p.toml"])
        .output()
        .unwrap();
    assert!(reference.status.success(), "{}", text(&reference));

    // Machine 1 is killed mid-capture (a finished shard is `shard-NNNNN/…/state.json` in the index).
    let mut m1 = saeflow(&s3, d, "m1", "r");
    m1.args(["run", "p.toml"]);
    kill_when_partial(&s3, m1, &d.join("m1.log"), "state.json", 3);
    std::fs::remove_dir_all(d.join("m1")).unwrap(); // the machine is gone
                                                    // Machine 2 resumes the capture from those shards, and is killed mid-training.
    let mut m2 = saeflow(&s3, d, "m2", "r");
    m2.args(["run", "p.toml"]);
    let log = kill_when_partial(&s3, m2, &d.join("m2.log"), "checkpoints/step-", 1);
    assert!(log.contains("resuming acts from the partial work"), "{log}");
    std::fs::remove_dir_all(d.join("m2")).unwrap();
    // Machine 3 resumes the training from the remote's checkpoint.
    let out = run_ok(&s3, d, "m3", "r", &["run", "p.toml"]);
    assert!(out.contains("resuming sae from the partial work"), "{out}");
    assert_eq!(
        published_outputs(&d.join("reference")),
        published_outputs(&d.join("m3")),
        "resumed across three machines = uninterrupted"
    );
    assert!(
        s3.list("r/partial/").is_empty(),
        "finished work leaves no partial index"
    );
}

#[test]
#[cfg_attr(missing = "moto", ignore = "needs moto_server")]
fn two_machines_sharing_a_remote_compute_each_key_once() {
    let s3 = S3::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    counted(d);
    let children: Vec<_> = ["m1", "m2"]
        .iter()
        .map(|cache| {
            saeflow(&s3, d, cache, "p")
                .args(["run", "-j", "2", "p.toml"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
    }
    for stage in ["a", "b", "c", "d"] {
        assert_eq!(runs_of(d, stage), 1, "stage {stage} ran more than once");
    }
    assert_eq!(
        published_outputs(&d.join("m1")),
        published_outputs(&d.join("m2")),
        "both machines hold the one result of each key"
    );
}

#[test]
#[cfg_attr(missing = "moto", ignore = "needs moto_server")]
fn a_flipped_byte_on_the_remote_is_caught_quarantined_and_recomputed() {
    let s3 = S3::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    counted(d);
    run_ok(&s3, d, "m1", "p", &["run", "p.toml"]);
    let (_, manifest) = remote_manifest(&s3, "p", "a");
    let blob = manifest["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["path"] == "a.bin")
        .unwrap()["blake3"]
        .as_str()
        .unwrap()
        .to_string();
    let mut bytes = s3.get(&format!("p/cas/{blob}")).unwrap();
    bytes[1000] ^= 0x40;
    s3.put(&format!("p/cas/{blob}"), &bytes);

    let out = run_ok(&s3, d, "m2", "p", &["run", "p.toml"]);
    assert!(out.contains("a: the remote's copy is damaged"), "{out}");
    assert!(out.contains("a.bin` arrived with"), "{out}");
    assert_eq!(runs_of(d, "a"), 2, "recomputed once");
    assert!(
        !s3.list("p/quarantine/").is_empty(),
        "moved aside, not deleted"
    );
    // b, c and d were computed from a's bytes before the flip: their keys stand, and they are pulled.
    assert_eq!(runs_of(d, "d"), 1);
    let again = run_ok(&s3, d, "m3", "p", &["run", "p.toml"]);
    assert!(again.contains("0 computed, 4 cached (4 pulled"), "{again}");
    let verify = common::saeflow(d)
        .env("SAEFLOW_CACHE", d.join("m3"))
        .args(["cache", "verify"])
        .output()
        .unwrap();
    assert!(
        text(&verify).contains("4 objects verified, 0 damaged"),
        "{}",
        text(&verify)
    );
}

#[test]
#[cfg_attr(missing = "moto", ignore = "needs moto_server")]
fn transient_errors_and_slow_answers_are_retried() {
    let s3 = S3::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    counted(d);
    s3.faults(r#"{"status": 503, "count": 3, "method": "PUT"}"#);
    let out = run_ok(&s3, d, "m1", "p", &["run", "p.toml"]);
    assert!(out.contains("4 computed"), "{out}");
    assert_eq!(s3.faults("{}")["injected"], 3);
    // Answers slower than the 2 s request limit time out and are sent again.
    s3.faults(r#"{"delay_ms": 4000, "count": 2, "method": "GET"}"#);
    let out = run_ok(&s3, d, "m2", "p", &["run", "p.toml"]);
    assert!(out.contains("0 computed, 4 cached (4 pulled"), "{out}");
    assert_eq!(s3.faults("{}")["injected"], 2);
    assert_eq!(s3.list("p/objects/").len(), 4);
}

#[test]
#[cfg_attr(missing = "moto", ignore = "needs moto_server")]
fn a_server_gone_mid_upload_fails_clearly_and_publishes_nothing() {
    let s3 = S3::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    counted(d);
    // The first PUT takes a's lock; the server freezes on the second, a blob of a's upload.
    s3.faults(r#"{"freeze_after": 1, "method": "PUT"}"#);
    let started = Instant::now();
    let out = run(&s3, d, "m1", "p", &["run", "p.toml"]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(!t.contains("panicked"), "{t}");
    assert!(t.contains("remote cache s3://saeflow-test/p/"), "{t}");
    assert!(
        t.contains("kept in the local cache, but not on the remote"),
        "{t}"
    );
    assert!(started.elapsed() < Duration::from_secs(120));
    s3.thaw();
    s3.faults("{}");
    assert!(s3.list("p/objects/").is_empty(), "no object published");
    // The next run pushes what the failed one kept, taking over the dead run's lock.
    let out = run_ok(&s3, d, "m1", "p", &["run", "p.toml"]);
    assert!(out.contains("pushed a to s3://saeflow-test/p"), "{out}");
    assert_eq!(runs_of(d, "a"), 1);
    assert_eq!(s3.list("p/objects/").len(), 4);
}

#[test]
#[cfg_attr(missing = "moto", ignore = "needs moto_server")]
fn expired_or_missing_credentials_a_denied_write_and_a_missing_bucket_are_clear_errors() {
    let s3 = S3::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    counted(d);

    s3.faults(r#"{"expired": true}"#);
    let out = run(&s3, d, "m1", "p", &["run", "p.toml"]);
    let t = text(&out);
    assert!(!out.status.success() && !t.contains("panicked"), "{t}");
    assert!(
        t.contains("the credentials have expired") && t.contains("s3://saeflow-test/p/"),
        "{t}"
    );
    assert!(
        !t.contains(common::s3::SECRET),
        "no secret in messages: {t}"
    );
    assert_eq!(runs_of(d, "a"), 0, "nothing computed");
    assert_eq!(std::fs::read_dir(d.join("m1/objects")).unwrap().count(), 0);
    s3.faults("{}");

    let out = saeflow(&s3, d, "m1", "p")
        .env_remove("AWS_ACCESS_KEY_ID")
        .args(["run", "p.toml"])
        .output()
        .unwrap();
    let t = text(&out);
    assert!(!out.status.success());
    assert!(
        t.contains("s3://saeflow-test/p: no credentials found in the environment"),
        "{t}"
    );
    assert!(t.contains("AWS_ACCESS_KEY_ID"), "{t}");

    let out = saeflow(&s3, d, "m1", "p")
        .env("SAEFLOW_CACHE_REMOTE", "s3://no-such-bucket/p")
        .args(["run", "p.toml"])
        .output()
        .unwrap();
    let t = text(&out);
    assert!(!out.status.success());
    assert!(
        t.contains("s3://no-such-bucket/p/") && t.contains("the bucket does not exist"),
        "{t}"
    );

    s3.faults(r#"{"status": 403, "code": "AccessDenied", "method": "PUT"}"#);
    let out = run(&s3, d, "m2", "p", &["run", "p.toml"]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains("access denied") && t.contains("s3://saeflow-test/p/"),
        "{t}"
    );
    s3.faults("{}");
    assert!(s3.list("p/objects/").is_empty(), "nothing published");
}

#[test]
#[cfg_attr(missing = "moto", ignore = "needs moto_server")]
fn cache_push_pull_verify_and_gc_work_on_the_remote() {
    let s3 = S3::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    counted(d);
    let local = |cache: &str, args: &[&str]| {
        let out = common::saeflow(d)
            .env("SAEFLOW_CACHE", d.join(cache))
            .args(args)
            .output()
            .unwrap();
        (out.status.success(), text(&out))
    };
    let (ok, t) = local("m1", &["run", "p.toml"]);
    assert!(ok && t.contains("4 computed"), "{t}");
    let (ok, t) = local("m1", &["gc", "--remote"]);
    assert!(
        !ok && t.contains("no remote cache: give --cache-remote URL"),
        "{t}"
    );
    assert!(
        s3.list("p/").is_empty(),
        "a run without a remote writes nothing there"
    );

    let t = run_ok(&s3, d, "m1", "p", &["cache", "push"]);
    assert!(
        t.contains("pushed 4 objects") && t.contains("4 refs written"),
        "{t}"
    );
    assert_eq!(s3.list("p/objects/").len(), 4);
    let t = run_ok(&s3, d, "m1", "p", &["cache", "push"]);
    assert!(
        t.contains("pushed 0 objects") && t.contains("the remote already had 4"),
        "{t}"
    );

    let t = run_ok(&s3, d, "m2", "p", &["cache", "pull"]);
    assert!(
        t.contains("pulled 4 objects") && t.contains("4 refs written"),
        "{t}"
    );
    assert_eq!(
        published_outputs(&d.join("m1")),
        published_outputs(&d.join("m2"))
    );
    let (ok, t) = local("m2", &["run", "p.toml"]);
    assert!(ok && t.contains("0 computed, 4 cached"), "{t}");
    let t = run_ok(&s3, d, "m2", "p", &["cache", "verify", "--remote"]);
    assert!(
        t.contains("4 objects verified on s3://saeflow-test/p, 0 damaged"),
        "{t}"
    );

    // d changes: its old object is superseded, and its old blob with it; one stray blob is never named.
    write(
        &d.join("p.toml"),
        &COUNTED.replace(
            "cat {b}/b {c}/c > {out}/d",
            "cat {c}/c {b}/b {b}/b > {out}/d",
        ),
    );
    let t = run_ok(&s3, d, "m1", "p", &["run", "p.toml"]);
    assert!(t.contains("1 computed, 3 cached"), "{t}");
    let stray = format!("p/cas/{}", "0".repeat(64));
    s3.put(&stray, b"stray");
    let t = run_ok(
        &s3,
        d,
        "m1",
        "p",
        &["gc", "--remote", "--grace", "0", "--dry-run"],
    );
    let removals: Vec<&str> = t
        .lines()
        .filter(|l| l.starts_with("would remove s3://"))
        .collect();
    assert_eq!(
        removals.len(),
        3,
        "the old d object, its blob, the stray blob:\n{t}"
    );
    assert!(
        t.contains(&format!("would remove s3://saeflow-test/{stray} (5 B)")),
        "{t}"
    );
    assert!(t.contains("kept 4 referenced objects"), "{t}");
    assert_eq!(s3.list("p/objects/").len(), 5, "a dry run deletes nothing");
    let t = run_ok(&s3, d, "m1", "p", &["gc", "--remote", "--grace", "0"]);
    assert!(t.contains("removed 3 entries"), "{t}");
    assert_eq!(s3.list("p/objects/").len(), 4);
    assert!(s3.get(&stray).is_none());
    let t = run_ok(&s3, d, "m3", "p", &["run", "p.toml"]);
    assert!(
        t.contains("0 computed, 4 cached (4 pulled"),
        "gc kept all that is reached: {t}"
    );

    // A flipped byte: verify names it and fails; --repair moves it aside; the next run recomputes.
    let (_, manifest) = remote_manifest(&s3, "p", "c");
    let outputs = manifest["outputs"].as_array().unwrap();
    let c = outputs.iter().find(|o| o["path"] == "c").unwrap();
    let blob = c["blake3"].as_str().unwrap().to_string();
    let mut bytes = s3.get(&format!("p/cas/{blob}")).unwrap();
    bytes[0] ^= 1;
    s3.put(&format!("p/cas/{blob}"), &bytes);
    let out = run(&s3, d, "m3", "p", &["cache", "verify", "--remote"]);
    let t = text(&out);
    assert!(
        !out.status.success() && t.contains("BAD s3://saeflow-test/p/objects/"),
        "{t}"
    );
    assert!(
        t.contains("`c` arrived with") && t.contains("1 damaged"),
        "{t}"
    );
    let t = run_ok(
        &s3,
        d,
        "m3",
        "p",
        &["cache", "verify", "--remote", "--repair"],
    );
    assert!(
        t.contains("moved to s3://saeflow-test/p/quarantine/"),
        "{t}"
    );
    assert_eq!(s3.list("p/objects/").len(), 3);
    let t = run_ok(&s3, d, "m4", "p", &["run", "p.toml"]);
    assert!(t.contains("1 computed, 3 cached (3 pulled"), "{t}");
    assert_eq!(runs_of(d, "c"), 2);
}

#[test]
#[cfg_attr(missing = "moto", ignore = "needs moto_server")]
fn a_hostile_remote_manifest_cannot_write_outside_the_cache() {
    let s3 = S3::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    counted(d);
    run_ok(&s3, d, "m1", "p", &["run", "p.toml"]);
    // A well-framed manifest (its hash is right) naming a path outside the object, and a blob for it.
    let (name, mut manifest) = remote_manifest(&s3, "p", "a");
    let evil = b"written by the bucket";
    let hash = blake3::hash(evil).to_hex().to_string();
    manifest["outputs"] = serde_json::json!([
        { "path": "../../../escaped", "blake3": hash, "size": evil.len() }
    ]);
    s3.put(&format!("p/cas/{hash}"), evil);
    let json = serde_json::to_vec(&manifest).unwrap();
    let mut framed = format!("{}\n", blake3::hash(&json).to_hex()).into_bytes();
    framed.extend_from_slice(&json);
    s3.put(&name, &framed);

    let out = run_ok(&s3, d, "m2", "p", &["run", "p.toml"]);
    assert!(out.contains("a: the remote's copy is damaged"), "{out}");
    assert!(
        out.contains("`../../../escaped`, which may not be written"),
        "{out}"
    );
    assert_eq!(runs_of(d, "a"), 2, "recomputed instead");
    let escaped: Vec<_> = common::files(d)
        .into_iter()
        .filter(|p| p.ends_with("escaped"))
        .collect();
    assert!(escaped.is_empty(), "{escaped:?}");
}
