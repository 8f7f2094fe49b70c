#!/usr/bin/env bash
# A real soak of `loraplex serve` on the tiny model: tests/soak.rs with longer settings.
#   scripts/soak.sh [SECONDS] [CLIENTS] [ADAPTERS] [CACHED]
# Defaults: 1800 s, 64 clients, 200 adapters, a cache of 20. Every answer must equal the same
# request answered alone; the server's RSS (from /proc) must stay bounded and not grow.
set -euo pipefail
cd "$(dirname "$0")/.."
export LORAPLEX_SOAK_SECS="${1:-1800}"
export LORAPLEX_SOAK_CLIENTS="${2:-64}"
export LORAPLEX_SOAK_ADAPTERS="${3:-200}"
export LORAPLEX_SOAK_CACHED="${4:-20}"
exec cargo test --release --test soak -- --nocapture
