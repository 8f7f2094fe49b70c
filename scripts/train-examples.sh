#!/usr/bin/env bash
# Trains the three example adapters that ship in adapters/ (legal, medical, chatbot) from data/
# with configs/train-{legal,medical,chatbot}.toml, prunes what serving does not need (the resume
# checkpoint, the copy in best/), then evaluates each on its test split against the base:
# held-out loss, exact and format match (the table goes into BENCHMARKS.md).
#
#   scripts/train-examples.sh [legal|medical|chatbot ...]     (default: all three)
#
# About 20 minutes per adapter on 2 cores. LORAPLEX=path/to/binary uses that binary instead of
# building target/release/loraplex.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${LORAPLEX:-}" ]; then
  cargo build --release --quiet
  LORAPLEX=target/release/loraplex
fi
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(legal medical chatbot)

for n in "${names[@]}"; do
  [ -f "configs/train-$n.toml" ] || { echo "no configs/train-$n.toml" >&2; exit 2; }
  printf '\n==> train %s (configs/train-%s.toml)\n' "$n" "$n"
  start=$(date +%s)
  # Checkpointing off: the same gradients, faster, and these short examples fit in ~3.5 GB.
  "$LORAPLEX" train --config "configs/train-$n.toml" --out "adapters/$n" --overwrite \
    --gradient-checkpointing false
  echo "trained $n in $(( $(date +%s) - start )) s"
  rm -rf "adapters/$n/checkpoint" "adapters/$n/.checkpoint.old" "adapters/$n/best"
done

for n in "${names[@]}"; do
  printf '\n==> eval %s on data/%s/test.jsonl\n' "$n" "$n"
  "$LORAPLEX" eval --adapter "adapters/$n" --data "data/$n/test.jsonl" \
    --format-regex-file "data/$n/format.regex"
done
