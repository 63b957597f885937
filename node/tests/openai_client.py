"""The official `openai` Python client against a kvmesh node, unchanged.

Usage: python3 openai_client.py BASE_URL   (e.g. http://127.0.0.1:8080/v1)
Exits non-zero with a message on the first mismatch.
"""
import sys

import openai

base = sys.argv[1]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=30)

models = [m.id for m in client.models.list()]
assert "kvmesh-sim" in models, models

r = client.chat.completions.create(
    model="kvmesh-sim", messages=[{"role": "user", "content": "Say hello"}], max_tokens=8
)
assert r.choices[0].message.role == "assistant"
assert r.choices[0].message.content, r
assert r.choices[0].finish_reason in ("length", "stop"), r.choices[0].finish_reason
assert r.usage.completion_tokens == 8 or r.choices[0].finish_reason == "stop", r.usage
assert r.usage.prompt_tokens > 0

stream = client.chat.completions.create(
    model="kvmesh-sim",
    messages=[{"role": "user", "content": "Say hello"}],
    max_tokens=8,
    stream=True,
    stream_options={"include_usage": True},
)
pieces, usage = [], None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
assert "".join(pieces) == r.choices[0].message.content, (pieces, r.choices[0].message.content)
assert usage is not None and usage.completion_tokens == r.usage.completion_tokens, usage
assert usage.prompt_tokens_details.cached_tokens >= 0

c = client.completions.create(model="kvmesh-sim", prompt="Once upon a time", max_tokens=5)
assert c.choices[0].text and c.usage.completion_tokens <= 5, c

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("unknown model accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404

try:
    client.chat.completions.create(model="kvmesh-sim", messages=[])
    raise AssertionError("empty messages accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and "messages" in str(e), e

print("openai client: all checks passed")
