#!/usr/bin/env bash
# A burst of N chat requests (default 16) that share one ~450-token system prompt, all sent at
# once to `BIN serve` on the default model (max_tokens 1, greedy): prints the burst's wall time,
# the requests' latency p50 / max (≈ TTFT) and the mean prompt tokens the prefix cache supplied.
# Run it with two binaries in turn to compare them.
#
# usage: scripts/bench-prefix-burst.sh BIN [N [SERVE ARGS...]]   (e.g. --kv-layout paged)
set -euo pipefail
BIN=$1 N=${2:-16}
shift $(( $# < 2 ? $# : 2 ))
PORT=${PORT:-18182}
source "$(dirname "$0")/serve-in-background.sh"
serve_in_background "$BIN" "$PORT" "$@"
python3 - "http://127.0.0.1:$PORT" "$N" <<'EOF'
import json, sys, threading, time, urllib.request
url, n = sys.argv[1], int(sys.argv[2])
model = json.load(urllib.request.urlopen(url + "/v1/models"))["data"][0]["id"]
system = " ".join(f"Rule {i}: answer politely, cite the policy section, and keep it short."
                  for i in range(25))
out = {}
def one(i):
    body = {"model": model, "max_tokens": 1, "temperature": 0,
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": f"Question {i}: what is rule {i}?"}]}
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    t = time.time()
    usage = json.load(urllib.request.urlopen(req))["usage"]
    out[i] = (time.time() - t, usage["prompt_tokens"],
              (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
t0 = time.time()
threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
for t in threads:
    t.start()
for t in threads:
    t.join()
lat = sorted(v[0] for v in out.values())
print(json.dumps({"requests": len(out), "wall_s": round(time.time() - t0, 2),
                  "p50_s": round(lat[len(lat) // 2], 2), "max_s": round(lat[-1], 2),
                  "prompt_tokens": out[0][1],
                  "cached_tokens_mean": round(sum(v[2] for v in out.values()) / n, 1)}))
EOF
