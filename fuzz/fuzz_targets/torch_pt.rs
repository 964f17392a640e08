//! torch.save zip checkpoints from bytes: zip directory, data.pkl, storages, shapes and strides.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = saeflow_core::models::torch_pt::read_checkpoint_from(
        std::io::Cursor::new(data),
        "fuzz.pt",
        &candle_core::Device::Cpu,
    );
});
