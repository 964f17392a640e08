//! The non-executing pickle reader, with the allow-lists of torch checkpoints and of tiktoken pickles.
#![no_main]

use libfuzzer_sys::fuzz_target;
use saeflow_core::models::{pickle, torch_pt};

fuzz_target!(|data: &[u8]| {
    let _ = pickle::parse(data, torch_pt::ALLOWED);
    let _ = pickle::parse(data, &["tiktoken.core.Encoding"]);
});
