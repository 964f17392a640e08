//! Test preconditions (see `preconditions.rs`): saeflow-core's own tests need `../shared`, and with the
//! `cuda` feature its GPU tests need a GPU.
include!("preconditions.rs");

fn main() {
    Preconditions::new().shared().gpu().finish();
}
