//! Pipeline files: any text must load or fail with a located error, never panic.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use saeflow_runner::stage::Registry;

fuzz_target!(|data: &[u8]| {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    let registry = REGISTRY.get_or_init(saeflow_stages::builtin);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A workdir that does not exist: nothing relative to it can be read, written or hashed.
    let workdir = Path::new("/nonexistent/saeflow-fuzz");
    if let Err(e) = saeflow_runner::config::load_str(text, Path::new("fuzz.toml"), &[], registry, workdir) {
        let _ = e.to_string(); // rendering the caret snippet must not panic either
    }
});
