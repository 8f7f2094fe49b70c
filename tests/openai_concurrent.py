"""Concurrent requests over many adapters through the official `openai` client: each answer under
load must equal the same request sent alone.

usage: openai_concurrent.py BASE_URL BASE_MODEL ADAPTER[,ADAPTER...] [REQUESTS] [API_KEY]
Request i uses, in turn, each adapter, a weighted stack of the first two, and the base; greedy,
ignore_eos, 12 new tokens. Phase 1 sends them one at a time, phase 2 all at once from threads.
Prints one JSON line; exits non-zero when any answer differs or fails.
"""
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai

base_url, base_model, names = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
total = int(sys.argv[4]) if len(sys.argv) > 4 else 32
key = sys.argv[5] if len(sys.argv) > 5 else "unused"
client = openai.OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=600)

kinds = [("adapter", n) for n in names] + [("stack", None), ("base", None)]


def request(i):
    kind, name = kinds[i % len(kinds)]
    body = {"ignore_eos": True}
    model = base_model
    if kind == "adapter":
        model = name
    elif kind == "stack":
        body["adapters"] = [{"name": names[0], "weight": 0.7}, {"name": names[1 % len(names)], "weight": 0.5}]
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"item {i}: tell me more"}],
        max_tokens=12, temperature=0, extra_body=body)
    c = chat.choices[0]
    return {"i": i, "kind": kind, "model": model, "text": c.message.content,
            "tokens": chat.usage.completion_tokens}


alone = [request(i) for i in range(total)]
t0 = time.time()
with ThreadPoolExecutor(max_workers=total) as pool:
    together = list(pool.map(request, range(total)))
seconds = time.time() - t0
diff = [(a, b) for a, b in zip(alone, together) if a != b]
assert all(a["tokens"] == 12 for a in alone), alone
assert not diff, ("answers under load differ from alone", diff[:3])
print(json.dumps({"requests": total, "adapters": len(names),
                  "kinds": sorted({k for k, _ in kinds}), "equal": True,
                  "concurrent_seconds": round(seconds, 3)}))
