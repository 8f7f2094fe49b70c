"""vLLM's metrics protocol on /metrics, read with the official Prometheus client's text parser
while two adapters run and a third waits (the server has max_batch_size 2).

usage: vllm_metrics.py URL ADAPTER_A ADAPTER_B ADAPTER_C; prints a JSON summary.
"""
import json
import sys
import threading
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

url, adapters = sys.argv[1], sys.argv[2:5]


def stream(model, tokens, out):
    body = json.dumps({"model": model, "prompt": "Once upon a time", "max_tokens": tokens,
                       "temperature": 0, "ignore_eos": True, "stream": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    n = 0
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:
            if line.startswith(b"data: {"):
                n += 1
    out[model] = n


def scrape():
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def gauge(families, name):
    f = families[name]
    assert f.type == "gauge", (name, f.type)
    assert len(f.samples) == 1, (name, f.samples)
    return f.samples[0]


done = {}
threads = []
for i, a in enumerate(adapters):
    # The first two are admitted at once; the third waits for a slot.
    t = threading.Thread(target=stream, args=(a, 120, done))
    t.start()
    threads.append(t)
    time.sleep(0.3 if i == 0 else 0.1)

seen = None
deadline = time.time() + 60
while time.time() < deadline:
    fams = scrape()
    running = gauge(fams, "vllm:num_requests_running").value
    waiting = gauge(fams, "vllm:num_requests_waiting").value
    if running == 2 and waiting == 1:
        seen = fams
        break
    time.sleep(0.05)
assert seen is not None, "never saw two running and one waiting"

# The label names and formats the Inference Extension parses.
info = gauge(seen, "vllm:lora_requests_info")
labels = info.labels
run = labels["running_lora_adapters"].split(",")
wait = labels["waiting_lora_adapters"].split(",")
assert " " not in labels["running_lora_adapters"], labels
assert sorted(run) == sorted(adapters[:2]), labels
assert wait == [adapters[2]], labels
assert labels["max_lora"] == "2", labels
assert abs(info.value - time.time()) < 30, info.value
usage = gauge(seen, "vllm:kv_cache_usage_perc").value
old_name = gauge(seen, "vllm:gpu_cache_usage_perc").value
assert 0.0 < usage <= 1.0 and usage == old_name, (usage, old_name)

for t in threads:
    t.join()
assert all(done.get(a, 0) >= 120 for a in adapters), done

# Idle again: nothing running or waiting, no adapters listed. The scheduler publishes its gauges
# after the step that sent the last token, a moment after the client read it: wait for that.
deadline = time.time() + 10
while True:
    fams = scrape()
    if gauge(fams, "vllm:num_requests_running").value == 0 or time.time() > deadline:
        break
    time.sleep(0.02)
assert gauge(fams, "vllm:num_requests_running").value == 0
assert gauge(fams, "vllm:num_requests_waiting").value == 0
idle = gauge(fams, "vllm:lora_requests_info").labels
assert idle["running_lora_adapters"] == "" and idle["waiting_lora_adapters"] == "", idle
print(json.dumps({"labels": labels, "kv_cache_usage_perc": usage, "tokens": done}))
