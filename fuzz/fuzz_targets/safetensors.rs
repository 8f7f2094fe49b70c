//! An adapter's `adapter_model.safetensors` (header and tensors) loaded and validated against the
//! tiny test model: any bytes give an adapter or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use loraplex::lora::LoraAdapter;
use loraplex::model::LlamaConfig;
use std::path::PathBuf;
use std::sync::OnceLock;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");

fn setup() -> &'static (PathBuf, LlamaConfig) {
    static S: OnceLock<(PathBuf, LlamaConfig)> = OnceLock::new();
    S.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("loraplex-fuzz-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(
            format!("{ROOT}/tiny-adapters/attn-r4/adapter_config.json"),
            dir.join("adapter_config.json"),
        )
        .unwrap();
        let base =
            LlamaConfig::from_hf_file(&PathBuf::from(format!("{ROOT}/tiny-llama/config.json")))
                .unwrap();
        (dir, base)
    })
}

fuzz_target!(|data: &[u8]| {
    let (dir, base) = setup();
    std::fs::write(dir.join("adapter_model.safetensors"), data).unwrap();
    let _ = LoraAdapter::load("fuzz", dir, base);
});
