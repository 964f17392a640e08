//! Test preconditions (see `preconditions.rs`): saeflow-core's own tests need `../shared`, a C++20
//! compiler to run the CUDA kernels under emulation, and with the `cuda` feature its GPU tests need a GPU.
include!("preconditions.rs");

fn main() {
    Preconditions::new()
        .shared()
        .tool("cxx", &["g++"], "apt-get install g++")
        .gpu()
        .finish();
}
