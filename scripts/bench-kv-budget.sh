#!/usr/bin/env bash
# A/B of KV admission policies under one budget: starts `BIN serve` on the default model with
# `--kv-cache-bytes BUDGET`, drives it with 32 streams through `bench-serve --url` (two passes),
# then prints the server's preemption count. Run it with the old and the new binary in turn.
#
# usage: scripts/bench-kv-budget.sh BIN BUDGET_BYTES NEW_TOKENS [--stop-at-eos]
# e.g.   scripts/bench-kv-budget.sh target/release/loraplex 415825920 512 --stop-at-eos
set -euo pipefail
BIN=$1 BUDGET=$2 NEW_TOKENS=$3
shift 3
CLIENT=${CLIENT:-target/release/loraplex}
PORT=${PORT:-18181}
source "$(dirname "$0")/serve-in-background.sh"
serve_in_background "$BIN" "$PORT" --kv-cache-bytes "$BUDGET"
"$CLIENT" bench-serve --url "http://127.0.0.1:$PORT" --streams 32 --adapters 0 --passes 2 \
    --new-tokens "$NEW_TOKENS" "$@"
curl -s "http://127.0.0.1:$PORT/metrics" | grep -E '^loraplex_(preemptions_total|kv_blocks_total)' || true
