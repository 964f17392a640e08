//! safetensors files as saeflow reads SAEs and Hugging Face weights: candle's loader (header JSON, dtypes,
//! offsets, shapes) into tensors, then converted to f32 as `llama::load_hf_dir` does.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(tensors) = candle_core::safetensors::load_buffer(data, &candle_core::Device::Cpu) else {
        return;
    };
    for t in tensors.values() {
        let _ = t.to_dtype(candle_core::DType::F32);
    }
});
