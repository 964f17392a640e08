//! nanochat's tokenizer.pkl (a pickled tiktoken Encoding) into a BPE, then a round trip of short text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use saeflow_core::models::Tokenizer;

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = Tokenizer::from_tiktoken_pickle_bytes(data, "fuzz.pkl") {
        let _ = t.vocab_size();
        let _ = t.decode(&[0, 1, 2]);
    }
});
