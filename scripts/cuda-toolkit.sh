#!/usr/bin/env bash
# Installs a CUDA 13.0 toolkit for *building* loraplex with `--features cuda` on a machine without
# a GPU or a system CUDA (CI, the developers' machines): NVIDIA's toolkit wheels from PyPI, pinned
# to 13.0 (the GPU machine's driver runs CUDA 13.0; newer PTX does not load there), arranged as a
# toolkit folder, plus a stub libcuda.so for linking (the real one is the GPU machine's driver).
#
#   scripts/cuda-toolkit.sh [DIR]        # default DIR: .cuda-toolkit (ignored by git)
#   source <(scripts/cuda-toolkit.sh --env [DIR])   # CUDA_ROOT, PATH, LIBRARY_PATH, ... for cargo
#
# Idempotent: a complete DIR is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."

env_only=0
if [ "${1:-}" = "--env" ]; then env_only=1; shift; fi
dir=$(realpath -m "${1:-.cuda-toolkit}")
root="$dir/root"

print_env() {
  cat <<ENV
export CUDA_ROOT="$root"
export CUDA_PATH="$root"
export PATH="$root/bin:\$PATH"
export LIBRARY_PATH="$root/lib64:$root/lib64/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$root/lib64\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export CUDA_COMPUTE_CAP=90
ENV
}
if [ $env_only = 1 ]; then print_env; exit 0; fi
if [ -f "$dir/.complete" ]; then echo "CUDA toolkit ready in $dir"; exit 0; fi

rm -rf "$dir"
python3 -m venv "$dir/venv"
"$dir/venv/bin/pip" install --quiet --disable-pip-version-check \
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
  nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
wheel=$(echo "$dir"/venv/lib/python3*/site-packages/nvidia/cu13)
[ -d "$wheel/bin" ] || { echo "cuda-toolkit: no toolkit found under $wheel" >&2; exit 1; }

mkdir -p "$root/lib64/stubs"
ln -s "$wheel/bin" "$wheel/include" "$wheel/nvvm" "$root/"
for f in "$wheel"/lib/*.so.*; do ln -s "$f" "$root/lib64/"; done
(
  cd "$root/lib64"
  for l in cublas cublasLt curand nvrtc cudart; do
    v=$(ls lib$l.so.* | sort | head -n 1)
    ln -s "$v" "lib$l.so"
  done
)
# The stub: one empty function per driver symbol cudarc declares, soname libcuda.so.1.
cargo fetch --quiet >/dev/null 2>&1 || true
sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs | sort | tail -n 1)
[ -f "$sys" ] || { echo "cuda-toolkit: cudarc 0.19 sources not found (cargo fetch first)" >&2; exit 1; }
grep -o 'pub unsafe fn cu[A-Za-z0-9_]*' "$sys" | sed 's/pub unsafe fn //' | sort -u \
  | sed 's/.*/void &(void){}/' > "$dir/stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib64/stubs/libcuda.so" "$dir/stub.c"
ln -sf libcuda.so "$root/lib64/stubs/libcuda.so.1"
touch "$dir/.complete"
echo "CUDA toolkit ready in $dir"
