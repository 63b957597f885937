"""The official `openai` and `anthropic` Python clients against two nodes of one mesh, unchanged.

Usage: python3 sdk_clients.py URL_A URL_B   (e.g. http://127.0.0.1:8080 http://127.0.0.1:8081)
A Responses conversation starts on node A and continues on node B (`previous_response_id`).
Exits non-zero with a message on the first mismatch.
"""
import sys

import anthropic
import openai

a, b = sys.argv[1], sys.argv[2]
MODEL = "kvmesh-sim"
oa = openai.OpenAI(base_url=f"{a}/v1", api_key="unused", max_retries=0, timeout=30)
ob = openai.OpenAI(base_url=f"{b}/v1", api_key="unused", max_retries=0, timeout=30)

# /v1/models, as vLLM lists it.
cards = {m.id: m for m in oa.models.list()}
assert MODEL in cards, cards
assert getattr(cards[MODEL], "max_model_len", None), cards[MODEL]

# Chat with tools, and a tool result in the history.
tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
r = oa.chat.completions.create(
    model=MODEL,
    messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ],
    tools=tools,
    max_tokens=6,
)
assert r.choices[0].message.role == "assistant" and r.usage.prompt_tokens > 0, r

# Streaming chat.
pieces = [c.choices[0].delta.content or "" for c in ob.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "Say hello"}], max_tokens=6, stream=True) if c.choices]
assert "".join(pieces), pieces

# Completions.
c = oa.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5)
assert c.choices[0].text, c

# Responses: created on A, continued and retrieved on B.
first = oa.responses.create(model=MODEL, instructions="Be brief.", input="Remember the number 7.", max_output_tokens=8)
assert first.id.startswith("resp_") and first.status in ("completed", "incomplete"), first
assert first.output_text, first
follow = ob.responses.create(model=MODEL, input="Which number?", previous_response_id=first.id, max_output_tokens=8)
assert follow.usage.input_tokens > first.usage.input_tokens, (first.usage, follow.usage)
got = ob.responses.retrieve(first.id)
assert got.id == first.id and got.output_text == first.output_text, got
kinds = [e.type for e in oa.responses.create(model=MODEL, input="Stream please", max_output_tokens=5, stream=True)]
assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete"), kinds
assert "response.output_text.delta" in kinds, kinds
try:
    ob.responses.retrieve("resp_" + "0" * 44)
    raise AssertionError("an unknown response was found")
except openai.NotFoundError as e:
    assert e.status_code == 404

# Embeddings.
e = ob.embeddings.create(model=MODEL, input=["first text", "second text"])
assert len(e.data) == 2 and len(e.data[0].embedding) > 0 and e.usage.prompt_tokens > 0, e

# Errors as the SDK expects them.
try:
    oa.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("unknown model accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404

# Anthropic's Messages API.
an = anthropic.Anthropic(base_url=a, api_key="unused", max_retries=0, timeout=30)
m = an.messages.create(model=MODEL, max_tokens=8, system="Be brief.",
                       messages=[{"role": "user", "content": "Hello"}])
assert m.role == "assistant" and m.content and m.content[0].type == "text" and m.content[0].text, m
assert m.usage.input_tokens > 0 and m.usage.output_tokens > 0, m.usage
assert m.stop_reason in ("end_turn", "max_tokens", "stop_sequence"), m.stop_reason
with an.messages.stream(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "Stream"}]) as s:
    text = "".join(s.text_stream)
    final = s.get_final_message()
assert text and final.content[0].text == text, (text, final)
tool = an.messages.create(
    model=MODEL, max_tokens=8,
    tools=[{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
    messages=[
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "cold"}]},
    ],
)
assert tool.content, tool
try:
    an.messages.create(model="no-such-model", max_tokens=4, messages=[{"role": "user", "content": "x"}])
    raise AssertionError("unknown model accepted")
except anthropic.NotFoundError as e:
    assert e.status_code == 404

print("openai and anthropic clients: all checks passed")
