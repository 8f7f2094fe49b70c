//! PEFT `adapter_config.json` parsing: any bytes give a config or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use loraplex::lora::PeftLoraConfig;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        if let Ok(c) = PeftLoraConfig::from_json(&v) {
            for m in [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ] {
                let _ = c.rank_for(m);
                let _ = c.scaling_for(m);
            }
        }
    }
});
