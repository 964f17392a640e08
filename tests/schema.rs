//! The committed JSON Schema is current, accepts every shipped pipeline and rejects unknown keys
//! (checked with an independent validator, the `jsonschema` crate).

use std::path::Path;

use serde_json::Value as Json;

fn committed() -> Json {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/pipeline.schema.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn toml_to_json(text: &str) -> Json {
    serde_json::to_value(toml::from_str::<toml::Value>(text).unwrap()).unwrap()
}

#[test]
fn committed_schema_is_up_to_date() {
    let generated = saeflow_runner::config::pipeline_schema(&saeflow_stages::builtin());
    assert!(
        generated == committed(),
        "schemas/pipeline.schema.json is stale: run `cargo run -- schema` and commit the result"
    );
}

#[test]
fn every_shipped_pipeline_validates_and_unknown_keys_are_rejected() {
    let validator = jsonschema::draft202012::new(&committed()).expect("schema compiles");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let doc = toml_to_json(&std::fs::read_to_string(&path).unwrap());
            let errors: Vec<String> = validator.iter_errors(&doc).map(|e| e.to_string()).collect();
            assert!(errors.is_empty(), "{}: {errors:?}", path.display());
            checked += 1;
        }
    }
    assert!(checked >= 1);

    let base = "[pipeline]\nname = \"x\"\n[stages.a]\nkind = \"command\"\ncmd = [\"true\"]\n";
    assert!(validator.is_valid(&toml_to_json(base)));
    for bad in [
        format!("{base}typo = 1\n"), // unknown stage parameter
        base.replace("name = \"x\"", "name = \"x\"\nseeds = 1"), // unknown pipeline key
        base.replace("\"command\"", "\"comand\""), // unknown stage kind
        format!("{base}[bogus]\nx = 1\n"), // unknown top-level table
        base.replace("cmd = [\"true\"]", "cmd = \"true\""), // wrong type
    ] {
        assert!(
            !validator.is_valid(&toml_to_json(&bad)),
            "schema accepted:\n{bad}"
        );
    }
}

#[test]
#[cfg(unix)]
fn a_closed_stdout_ends_a_printing_command_without_a_panic() {
    // `saeflow schema -o - | head -c 10`: the schema (~87 KB) outgrows the pipe's buffer, so the writes
    // after the reader left hit a closed pipe. `println!` used to panic there (exit 101 and a backtrace).
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_saeflow"))
        .args(["schema", "-o", "-"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut head = [0u8; 10];
    child.stdout.take().unwrap().read_exact(&mut head).unwrap();
    // (The stdout handle is dropped here: the pipe's only reader closes.)
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
        "{:?}: {stderr}",
        out.status
    );
}
