"""Drives a running loraplex server with the official `openai` Python client.

usage: openai_client.py BASE_URL BASE_MODEL ADAPTER [API_KEY]
Checks chat (plain and streamed), completions, models.list(), against the base and the adapter.
Prints one JSON line with what it saw; exits non-zero on any failed check.
"""
import json
import sys

import openai

base_url, base_model, adapter = sys.argv[1:4]
key = sys.argv[4] if len(sys.argv) > 4 else "unused"
client = openai.OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0)
seen = {}

models = [m.id for m in client.models.list().data]
assert base_model in models and adapter in models, models
seen["models"] = models

for model in (base_model, adapter):
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
    choice = chat.choices[0]
    assert choice.finish_reason in ("stop", "length"), choice.finish_reason
    assert chat.usage.completion_tokens >= 1 and chat.usage.prompt_tokens > 0
    assert len(choice.logprobs.content) == chat.usage.completion_tokens
    assert len(choice.logprobs.content[0].top_logprobs) == 3
    text = choice.message.content
    # The same chat again reuses the cached keys and values of all but the last prompt token
    # (the prefix cache) and answers the same.
    again = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12, temperature=0)
    assert again.choices[0].message.content == text, (again, text)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached == again.usage.prompt_tokens - 1, again.usage

    pieces, finish, usage = [], None, None
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    assert "".join(pieces) == text, ("stream differs", pieces, text)
    assert finish == choice.finish_reason
    assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens

    comp = client.completions.create(model=model, prompt="The capital of France is", max_tokens=5,
                                     temperature=0, logprobs=2, echo=True)
    assert comp.choices[0].text.startswith("The capital of France is")
    # echo + logprobs: the prompt's tokens are scored too (the first has no score), then the
    # generated ones.
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == comp.usage.prompt_tokens + comp.usage.completion_tokens, lp
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None, lp
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:]), lp
    # max_tokens=0 with echo scores the prompt alone (lm-eval's loglikelihood requests).
    score = client.completions.create(model=model, prompt="The capital of France is", max_tokens=0,
                                      echo=True, logprobs=1)
    assert score.choices[0].text == "The capital of France is", score
    assert score.usage.completion_tokens == 0, score
    n = comp.usage.prompt_tokens
    got = score.choices[0].logprobs.token_logprobs
    assert len(got) == n and got[0] is None, score
    assert all(abs(a - b) < 1e-4 for a, b in zip(got[1:], lp.token_logprobs[1:n])), (got, lp)
    ids = client.completions.create(model=model, prompt=[1, 2, 3], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 3
    seen[model] = {"chat": text, "completion": comp.choices[0].text}

try:
    client.chat.completions.create(model="no-such-adapter", messages=[{"role": "user", "content": "x"}])
    raise SystemExit("unknown model was accepted")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body
print(json.dumps(seen))
