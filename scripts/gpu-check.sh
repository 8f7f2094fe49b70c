#!/usr/bin/env bash
# The GPU check, in two halves (the GPU machine has no Rust and no network):
#
#   scripts/gpu-check.sh build   # here, no GPU needed: builds loraplex and the GPU test binary
#                                # with --features cuda, packs them gzipped into gpu-pack/
#                                # (ignored by git) with the openai client's wheels
#   scripts/gpu-check.sh run     # on the GPU machine, in the repo root with gpu-pack/ carried:
#                                # every GPU check and the benchmark, a table printed last
#
# `run` writes its logs and the table under $OUT when set (the device tool's output folder).
# Environment for `run`: GPU_CHECK_BENCH_NEW (decode tokens per stream, default 128),
# GPU_CHECK_BENCH_STREAMS (default 1,64), GPU_CHECK_BENCH_LAYOUTS (default buffers,paged),
# GPU_CHECK_SKIP_BENCH=1 to skip the benchmarks (the 8B shape, its overhead floor on
# dummy:llama-3-8b-skeleton, NF4), GPU_CHECK_SKIP_NF4=1 to skip the NF4 one
# (the same model quantized with --quantize nf4: 1 and 64 streams, no adapter and distinct ones,
# paged KV).
set -uo pipefail
cd "$(dirname "$0")/.."
pack=gpu-pack
mode=${1:-}

build() {
  set -e
  scripts/cuda-toolkit.sh
  # shellcheck disable=SC1090
  source <(scripts/cuda-toolkit.sh --env)
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target-cuda}
  cargo build --release --features cuda --bin loraplex
  # The project's PTX is JIT-compiled on the GPU machine: assemble it here first (ptxas for
  # sm_90, the H200), so a kernel that does not assemble fails before any GPU time is spent.
  local ptx
  for ptx in "$CARGO_TARGET_DIR"/release/build/loraplex-*/out/*.ptx; do
    ptxas -arch=sm_90 "$ptx" -o /dev/null || { echo "gpu-check: ptxas rejects $ptx" >&2; exit 1; }
  done
  local tests
  tests=$(cargo test --release --features cuda --test gpu --no-run --message-format=json \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu":
        print(m["executable"])')
  [ -x "$tests" ] || { echo "gpu-check: no GPU test binary built" >&2; exit 1; }
  rm -rf "$pack"; mkdir -p "$pack/whl"
  gzip -9 -c "$CARGO_TARGET_DIR/release/loraplex" > "$pack/loraplex.gz"
  gzip -9 -c "$tests" > "$pack/gpu-tests.gz"
  # The official openai client and what it needs beyond the GPU machine's python (3.12).
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$pack/whl" \
    openai==3.57.0 pydantic pydantic-core annotated-types typing-inspection jiter distro sniffio
  du -sh "$pack" "$pack"/*
  echo "gpu-check: packed into $pack/ — carry it: run(command='bash scripts/gpu-check.sh run', carry=['$pack'])"
}

run() {
  local out=${OUT:-/tmp/gpu-check-out}
  mkdir -p "$out" /tmp/lp
  export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  gunzip -c "$pack/loraplex.gz" > /tmp/lp/loraplex && gunzip -c "$pack/gpu-tests.gz" > /tmp/lp/gpu-tests \
    && chmod +x /tmp/lp/loraplex /tmp/lp/gpu-tests || { echo "gpu-check: $pack/ missing: run 'build' first"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$pack"/whl/*.whl \
    && export PYTHONPATH=/tmp/site
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt" 2>&1 \
    || echo "no nvidia-smi" > "$out/gpu.txt"
  cat "$out/gpu.txt"
  local t0=$SECONDS status=0
  LORAPLEX_TEST_ROOT=$PWD LORAPLEX_BIN=/tmp/lp/loraplex LORAPLEX_PYTHON=$(command -v python3) \
    /tmp/lp/gpu-tests --test-threads 1 --nocapture > "$out/gpu-tests.log" 2>&1 || status=$?
  local tests_s=$((SECONDS - t0))
  grep -E "^test |test result" "$out/gpu-tests.log"
  [ $status = 0 ] || tail -n 60 "$out/gpu-tests.log"
  # bench_into NAME CMD...: runs one benchmark into $out/NAME.md (stderr NAME.err) and prints
  # "ok (N s)", or FAILED with the error's tail on stderr; "skipped" with GPU_CHECK_SKIP_BENCH=1.
  bench_into() {
    local name=$1 t0=$SECONDS
    shift
    if [ "${GPU_CHECK_SKIP_BENCH:-0}" = 1 ]; then echo skipped; return; fi
    if "$@" > "$out/$name.md" 2> "$out/$name.err"; then
      echo "ok ($((SECONDS - t0)) s)"
    else
      echo FAILED; tail -n 30 "$out/$name.err" >&2
    fi
  }
  local lp=/tmp/lp/loraplex streams=${GPU_CHECK_BENCH_STREAMS:-1,64} new=${GPU_CHECK_BENCH_NEW:-128}
  local bench_ok floor_ok unfused_ok events_ok nf4_ok=skipped
  bench_ok=$(bench_into bench "$lp" bench --model dummy:llama-3-8b --device cuda --dtype bf16 \
    --streams "$streams" --adapters none,shared,distinct --rank 16 --targets all-linear \
    --prompt-len 128 --new-tokens "$new" --kv-layouts "${GPU_CHECK_BENCH_LAYOUTS:-buffers,paged}" \
    --warmup-secs 5)
  # The overhead floor: the same 32 layers, head_dim and GQA with tiny widths (no weights to
  # speak of), so its ms per step is launches + host work; the 8B's minus it is the rest.
  floor_ok=$(bench_into bench-floor "$lp" bench --model dummy:llama-3-8b-skeleton --device cuda \
    --dtype bf16 --streams "$streams" --adapters none,distinct --rank 16 --targets all-linear \
    --prompt-len 128 --new-tokens 64 --kv-layouts paged --warmup-secs 1)
  # The same floor with the fused block ops off (LORAPLEX_FUSED=0): what fusing saves per step.
  unfused_ok=$(bench_into bench-floor-unfused env LORAPLEX_FUSED=0 "$lp" bench \
    --model dummy:llama-3-8b-skeleton --device cuda --dtype bf16 --streams "$streams" \
    --adapters none --prompt-len 128 --new-tokens 64 --kv-layouts paged --warmup-secs 1)
  # The same floor with cudarc's two CUDA events per allocation kept (LORAPLEX_CUDA_EVENTS=1;
  # loraplex turns them off): the host cost of those events per step.
  events_ok=$(bench_into bench-floor-events env LORAPLEX_CUDA_EVENTS=1 "$lp" bench \
    --model dummy:llama-3-8b-skeleton --device cuda --dtype bf16 --streams "$streams" \
    --adapters none --prompt-len 128 --new-tokens 64 --kv-layouts paged --warmup-secs 1)
  if [ "${GPU_CHECK_SKIP_NF4:-0}" != 1 ]; then
    nf4_ok=$(bench_into bench-nf4 "$lp" bench --model dummy:llama-3-8b --device cuda --dtype bf16 \
      --quantize nf4 --streams "$streams" --adapters none,distinct --rank 16 --targets all-linear \
      --prompt-len 128 --new-tokens "$new" --kv-layouts paged --warmup-secs 2)
  fi
  {
    echo "## GPU check ($(cat "$out/gpu.txt"))"
    echo
    echo "tests (exit $status, ${tests_s} s): $(grep -E '^test result' "$out/gpu-tests.log" | tail -n 1)"
    grep -h '^GPUCHECK' "$out/gpu-tests.log" | sed 's/^GPUCHECK /- /'
    grep -E '^test .*FAILED' "$out/gpu-tests.log" | sed 's/^/- /'
    echo
    echo "bench (Llama-3-8B shape, bf16, dummy weights): $bench_ok"
    cat "$out/bench.md" 2>/dev/null
    echo
    echo "bench, overhead floor (dummy:llama-3-8b-skeleton: the 8B's layers and heads, tiny widths): $floor_ok"
    cat "$out/bench-floor.md" 2>/dev/null
    echo
    echo "bench, the same floor with the fused block ops off (LORAPLEX_FUSED=0): $unfused_ok"
    cat "$out/bench-floor-unfused.md" 2>/dev/null
    echo
    echo "bench, the same floor with cudarc's per-allocation events kept (LORAPLEX_CUDA_EVENTS=1): $events_ok"
    cat "$out/bench-floor-events.md" 2>/dev/null
    echo
    echo "bench, NF4 base (--quantize nf4, same shape and dummy weights, paged KV): $nf4_ok"
    cat "$out/bench-nf4.md" 2>/dev/null
  } | tee "$out/table.md"
  return $status
}

case "$mode" in
  build) build ;;
  run) run ;;
  *) echo "usage: scripts/gpu-check.sh build|run" >&2; exit 2 ;;
esac
