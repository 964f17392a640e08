//! Test preconditions (see `crates/core/preconditions.rs`): the integration tests need `../shared`, and a few
//! need Graphviz, Chromium, a Slurm cluster's commands, moto's S3 server or the right to mount a tmpfs.
include!("crates/core/preconditions.rs");

fn main() {
    Preconditions::new()
        .shared()
        .tool("dot", &["dot"], "Debian: apt install graphviz")
        .tool("chromium", &["chromium"], "Debian: apt install chromium")
        .tool(
            "slurm",
            &["sinfo"],
            "scripts/slurm-local.sh start installs and starts one",
        )
        .tool(
            "moto",
            &["moto_server"],
            "python3 -m pip install 'moto[server]': the S3 server of tests/remote.rs",
        )
        .mount()
        .finish();
}
