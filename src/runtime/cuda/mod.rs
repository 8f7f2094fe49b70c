//! The project's own CUDA kernels (built with the `cuda` feature): PTX compiled from
//! `kernels/*.cu` by `build.rs`, and the Rust code that launches them on candle's CUDA storages.

pub mod decode_attention;
pub mod lora_rows;
