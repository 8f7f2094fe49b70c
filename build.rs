//! Build script: with the `cuda` feature on, compiles the project's own CUDA kernels
//! (`src/runtime/cuda/kernels/*.cu`, `src/quant/cuda/*.cu`) to PTX in `$OUT_DIR/<name>.ptx` with
//! nvcc, for `include_str!` in the launch code. Without the feature it does nothing, so the default build
//! (and CI) needs no CUDA toolkit.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Folders of `.cu` files (their stems must differ: they share `$OUT_DIR`).
const KERNEL_DIRS: [&str; 2] = ["src/runtime/cuda/kernels", "src/quant/cuda"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for dir in KERNEL_DIRS {
        println!("cargo:rerun-if-changed={dir}");
    }
    println!("cargo:rerun-if-env-changed=CUDA_ROOT");
    println!("cargo:rerun-if-env-changed=CUDA_PATH");
    println!("cargo:rerun-if-env-changed=NVCC_FLAGS");

    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = find_nvcc();
    let mut sources: Vec<PathBuf> = Vec::new();
    for dir in KERNEL_DIRS {
        sources.extend(
            std::fs::read_dir(dir)
                .unwrap_or_else(|e| panic!("cannot read {dir}: {e}"))
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|ext| ext == "cu")),
        );
    }
    sources.sort();
    for src in &sources {
        println!("cargo:rerun-if-changed={}", src.display());
        compile_ptx(&nvcc, src, &out_dir);
    }
}

/// nvcc from `$CUDA_ROOT/bin`, `$CUDA_PATH/bin`, else the first one on `PATH`.
fn find_nvcc() -> PathBuf {
    for var in ["CUDA_ROOT", "CUDA_PATH"] {
        if let Some(root) = std::env::var_os(var) {
            let nvcc = Path::new(&root).join("bin").join("nvcc");
            if nvcc.is_file() {
                return nvcc;
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let nvcc = dir.join("nvcc");
            if nvcc.is_file() {
                return nvcc;
            }
        }
    }
    panic!(
        "the `cuda` feature needs nvcc (a CUDA toolkit), found neither in $CUDA_ROOT/bin, \
         $CUDA_PATH/bin nor on PATH. Install one with `scripts/cuda-toolkit.sh`, then \
         `source <(scripts/cuda-toolkit.sh --env)` before cargo."
    );
}

/// `nvcc --ptx -arch=compute_90 -O3 src -o $OUT_DIR/<stem>.ptx` (plus any `NVCC_FLAGS`).
fn compile_ptx(nvcc: &Path, src: &Path, out_dir: &Path) {
    let stem = src
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_else(|| panic!("kernel file name is not UTF-8: {}", src.display()));
    let ptx = out_dir.join(format!("{stem}.ptx"));
    let mut cmd = Command::new(nvcc);
    cmd.args(["--ptx", "-arch=compute_90", "-O3", "-std=c++17"])
        .arg(src)
        .arg("-o")
        .arg(&ptx);
    if let Ok(flags) = std::env::var("NVCC_FLAGS") {
        cmd.args(flags.split_whitespace());
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
    if !status.success() {
        panic!("nvcc failed ({status}) on {}", src.display());
    }
}
