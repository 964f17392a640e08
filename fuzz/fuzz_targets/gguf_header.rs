//! GGUF files: the header check, candle's header reader, every tensor it lists (read and dequantized),
//! and the tokenizer rebuilt from the metadata.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut cursor = std::io::Cursor::new(data);
    let Ok(content) = saeflow_core::models::llama::read_gguf(&mut cursor, "fuzz.gguf") else {
        return;
    };
    for name in content.tensor_infos.keys() {
        if let Ok(q) = content.tensor(&mut cursor, name, &candle_core::Device::Cpu) {
            let _ = q.dequantize(&candle_core::Device::Cpu);
        }
    }
    let _ = saeflow_core::models::llama::gguf_content_tokenizer(&content, "fuzz.gguf");
});
