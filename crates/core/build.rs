//! Test preconditions (see `preconditions.rs`): saeflow-core's own tests need only `../shared`.
include!("preconditions.rs");

fn main() {
    Preconditions::new().shared().finish();
}
