#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (fuzz/corpus/<target>/), from hand-made valid
examples of each input: request bodies, engine SSE streams, QUIC heads, KV-event frames, ZMTP
streams, gossiped values, audit chains. Rerun after changing it: `python3 fuzz/seeds.py`. The
corpora hold only these seeds; scripts/fuzz.sh fuzzes copies of them (`--grow` adds to them)."""

import base64
import hashlib
import json
import os
import shutil
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")

# The order of policy::endpoint::Endpoint::ALL.
ENDPOINTS = [
    "chat", "completions", "responses", "response_retrieve", "response_cancel", "messages",
    "messages_count_tokens", "embeddings", "pooling", "classify", "score", "score_v1", "rerank",
    "rerank_v1", "rerank_v2", "tokenize", "detokenize", "transcriptions", "translations",
]


def j(v):
    return json.dumps(v, separators=(",", ":")).encode()


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def request():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    bodies = {
        "chat": [
            {"model": "m", "messages": msgs},
            {"model": "m", "messages": msgs, "stream": True, "stream_options": {"include_usage": True},
             "max_completion_tokens": 16, "min_tokens": 2, "n": 2, "stop": ["\n"], "seed": 7,
             "temperature": 0.5, "top_p": 0.9, "cache_salt": "s", "priority": 3,
             "kv_transfer_params": {"remote_host": "h"}, "request_id": "r",
             "chat_template_kwargs": {"chat_template": "{{x}}", "enable_thinking": False},
             "reasoning_effort": "low"},
            {"model": "m", "messages": [{"role": "user", "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "2"}],
             "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
             "add_generation_prompt": False, "continue_final_message": True, "documents": [{"text": "d"}]},
        ],
        "completions": [
            {"model": "m", "prompt": "once upon", "max_tokens": 8, "echo": True, "stream": True},
            {"model": "m", "prompt": [1, 2, 3], "ignore_eos": True},
            {"model": "m", "prompt": [[1, 2], [3]], "suffix": "end"},
            {"model": "m", "prompt": ["a", "b"]},
            {"model": "m", "prompt_embeds": "AAAA"},
        ],
        "responses": [
            {"model": "m", "input": "hi", "instructions": "be brief", "max_output_tokens": 5},
            {"model": "m", "previous_response_id": "resp_abc123", "input": [
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
                {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c", "output": "1"},
                {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "hmm"}]}],
             "tools": [{"type": "function", "name": "f", "parameters": {}}], "stream": True},
        ],
        "messages": [
            {"model": "m", "max_tokens": 10, "system": "sys", "messages": [{"role": "user", "content": "hi"}]},
            {"model": "m", "max_tokens": 10, "system": [{"type": "text", "text": "s"}], "messages": [
                {"role": "user", "content": [{"type": "text", "text": "a"},
                                             {"type": "image", "source": {"type": "base64", "data": "AA"}}]},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}},
                                                  {"type": "thinking", "thinking": "x"}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "1"}]}],
             "tools": [{"name": "f", "input_schema": {"type": "object"}}], "stream": True},
        ],
        "messages_count_tokens": [{"model": "m", "messages": [{"role": "user", "content": "hi"}]}],
        "embeddings": [{"model": "m", "input": ["a", "b"]}, {"model": "m", "input": [1, 2]}],
        "pooling": [{"model": "m", "messages": msgs}, {"model": "m", "input": "x"}],
        "classify": [{"model": "m", "input": "x"}],
        "score": [{"model": "m", "text_1": "q", "text_2": ["a", "b"]}],
        "rerank": [{"model": "m", "query": "q", "documents": ["a", "b"], "top_n": 1}],
        "tokenize": [{"model": "m", "prompt": "hi"}, {"model": "m", "messages": msgs, "tools": []}],
        "detokenize": [{"model": "m", "tokens": [1, 2, 3]}],
        "response_retrieve": [{}],
        "transcriptions": [{"model": "m", "stream": True}],
    }
    for ep, items in bodies.items():
        for i, b in enumerate(items):
            sel = ENDPOINTS.index(ep)
            write("request", f"{ep}-{i}", bytes([sel]) + j(b))
    # No model: a default model is filled in where the endpoint may omit it (selector's top bit).
    write("request", "embeddings-default-model", bytes([0x80 | ENDPOINTS.index("embeddings")]) + j({"input": "x"}))


def sse():
    def chunk(choices, **extra):
        return b"data: " + j({"id": "c", "object": "chat.completion.chunk", "model": "m", "choices": choices, **extra}) + b"\n\n"

    def delta(content=None, idx=0, finish=None, **d):
        if content is not None:
            d["content"] = content
        return {"index": idx, "delta": d, "finish_reason": finish}

    chat = (chunk([delta("", role="assistant")]) + chunk([delta("the sec")]) + chunk([delta("ret is out")])
            + chunk([delta(reasoning_content="thinking about secrets")])
            + chunk([delta(tool_calls=[{"index": 0, "id": "t", "function": {"name": "f", "arguments": "{\"k\":"}}])])
            + chunk([delta(tool_calls=[{"index": 0, "function": {"arguments": "\"v\"}"}}])])
            + chunk([delta("done", finish="stop")])
            + chunk([], usage={"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8})
            + b"data: [DONE]\n\n")
    completions = (b"data: " + j({"object": "text_completion", "choices": [{"index": 0, "text": "se"}]}) + b"\n\n"
                   + b"data: " + j({"choices": [{"index": 1, "text": "cret"}, {"index": 0, "text": "cret", "finish_reason": "length"}]}) + b"\n\n"
                   + b"data: [DONE]\n\n")
    odd = (b": keep-alive\n\n" + b"event: message\nid: 1\ndata: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\n"
           + b"data: {\"choices\":[{\"index\":0,\"delta\":\ndata: {\"content\":\"b\"}}]}\n\n"
           + b"data: {\"error\":{\"message\":\"engine failed\"}}\n\n" + b"data: not json\n\n" + b"data: {\"choices\":[]}")
    email = chunk([delta("mail me at a@b.co")]) + chunk([delta("m now", finish="stop")]) + b"data: [DONE]\n\n"
    # flags: bit 0 completions, bits 1-2 window, bits 3-4 rules (0 none, 1 deny, 2 deny and redact).
    for name, flags, stream in [("chat-none", 0x00, chat), ("chat-deny", 0x08, chat), ("chat-redact", 0x12, chat),
                                ("completions-deny", 0x09, completions), ("odd-none", 0x00, odd),
                                ("odd-deny", 0x0e, odd), ("email-redact", 0x10, email)]:
        for cut in (1, 7, 255):
            write("sse", f"{name}-{cut}", bytes([flags, cut]) + stream)


def quic_head():
    def frame(head, body=b""):
        h = j(head)
        return struct.pack(">I", len(h)) + h + body

    keys = b"".join(struct.pack("<Q", k) for k in (1, 2, 0xFFFFFFFFFFFFFFFF))
    digest = {"tokens": 48, "block_size": 16, "keys": base64.b64encode(keys).decode().rstrip("=")}
    heads = {
        "engine": {"path": "/v1/chat/completions", "request_id": "r1", "origin": "n0", "engine": "e1", "stream": True},
        "any": {"path": "/v1/completions", "request_id": "r2", "origin": "n0", "engine": "", "stream": False,
                "prompt": digest, "tenant": "t", "traceparent": "00-aa-bb-01", "priority": "critical",
                "weight": 2, "budget_ms": 500, "prompt_tokens": 48, "content_type": "multipart/form-data; boundary=x"},
        "relay": {"path": "/v1/responses", "request_id": "r3", "origin": "n1", "engine": "", "stream": True, "relay": True},
        "place": {"path": "/v1/chat/completions", "request_id": "r4", "origin": "n2", "engine": "", "stream": False,
                  "place": {"model": "m"}, "prompt": digest},
        "response": {"status": 200, "content_type": "text/event-stream", "served_by": "n1/e1", "retryable": False},
        "response-retry": {"status": 429, "content_type": "application/json", "served_by": "n1/e1",
                           "retryable": True, "retry_after_s": 2},
        "placement-engine": {"send_to": "engine", "node": "n3", "addr": "127.0.0.1:7000", "engine": "e2", "route": "prefix"},
        "placement-relay": {"send_to": "relay"},
    }
    for name, h in heads.items():
        write("quic_head", name, frame(h, b"{\"model\":\"m\"}"))


def mp(v):
    """A msgpack encoder for the seeds (ints, floats, strings, bytes, lists, None)."""
    if v is None:
        return b"\xc0"
    if isinstance(v, bool):
        return b"\xc3" if v else b"\xc2"
    if isinstance(v, int):
        if 0 <= v < 128:
            return bytes([v])
        if v >= 0:
            return b"\xcf" + struct.pack(">Q", v)
        return b"\xd3" + struct.pack(">q", v)
    if isinstance(v, float):
        return b"\xcb" + struct.pack(">d", v)
    if isinstance(v, str):
        b = v.encode()
        return (bytes([0xA0 | len(b)]) if len(b) < 32 else b"\xd9" + bytes([len(b)])) + b
    if isinstance(v, bytes):
        return b"\xc4" + bytes([len(v)]) + v
    if isinstance(v, list):
        return (bytes([0x90 | len(v)]) if len(v) < 16 else b"\xdc" + struct.pack(">H", len(v))) + b"".join(mp(x) for x in v)
    raise TypeError(v)


def kv_events():
    h = b"\xaa" * 24 + struct.pack(">Q", 1)
    stored = ["BlockStored", [h, 2], None, list(range(16)), 16, None, "GPU", "lora", [["lora", "salt-1"]], 1, "full_attention", 0]
    chained = ["BlockStored", [3], 2, [1, 2, 3, 4], 4]
    offloaded = ["BlockStored", [5], None, [], 0, None, "CPU"]
    removed = ["BlockRemoved", [h, 7], "GPU", 0]
    batches = {
        "stored": [1.5, [stored, chained], 0],
        "mixed": [1700000000.25, [offloaded, removed, ["AllBlocksCleared"], ["SomethingNew", 1]]],
        "int-time": [17, [], -1],
    }
    for name, b in batches.items():
        write("kv_events", f"payload-{name}", b"\x01" + mp(b))
    write("kv_events", "seq", b"\x00" + struct.pack(">Q", 42))


def zmtp():
    greeting = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x01" + b"NULL" + b"\x00" * 16 + b"\x00" + b"\x00" * 31
    assert len(greeting) == 64

    def frame(flags, body):
        if len(body) > 255:
            return bytes([flags | 2]) + struct.pack(">Q", len(body)) + body
        return bytes([flags, len(body)]) + body

    ready = frame(4, b"\x05READY\x0bSocket-Type\x00\x00\x00\x03PUB")
    message = frame(1, b"kv-events") + frame(1, struct.pack(">Q", 9)) + frame(0, mp([1.0, [["AllBlocksCleared"]]]))
    write("zmtp", "message", greeting + ready + message)
    write("zmtp", "long-frame", greeting + ready + frame(0, b"x" * 300))
    write("zmtp", "many-frames", greeting + b"".join(frame(1, b"p") for _ in range(18)) + frame(0, b""))
    write("zmtp", "huge-announced", greeting + b"\x02" + struct.pack(">Q", 1 << 61))


def gossip():
    load = {"engines": [{"name": "e1", "models": ["m", "m-lora"], "healthy": True, "role": "both", "running": 2,
                         "waiting": 1, "kv_usage": 0.25, "tokens_per_s": 120.5, "block_size": 16,
                         "cards": [{"id": "m", "root": "/w/m"}, {"id": "m-lora", "root": "/w/l", "parent": "m"}],
                         "max_model_len": 4096,
                         "ttft_fit": {"first_step_ms": 12.0, "per_waiting_ms": 40.0,
                                      "per_uncached_token_ms": 0.048, "per_running_ms": 0.5}},
                        {"name": "e2", "models": [], "healthy": False, "role": "prefill", "running": 0,
                         "waiting": 0, "kv_usage": 0.0, "tokens_per_s": 0.0, "block_size": None}], "held": 3}
    values = [
        ("node", 0, {"role": "worker", "models": ["m"], "http_addr": "127.0.0.1:8000", "quic_addr": "127.0.0.1:7000"}),
        ("load", 1, load),
        ("usage", 2, {"tenants": {"acme": {"r": 3, "t": 400, "reset": 1500}, "b": {"r": 0, "t": 0, "reset": 0}}}),
        ("kv", 3, {"format": "bloom-v1", "version": 7, "stride": 8}),
        ("cell", 4, {"name": "eu", "engines": 4, "load": 3.5}),
        ("cellm", 5, [{"name": "n1", "addr": "127.0.0.1:7001"}]),
    ]
    for name, sel, v in values:
        write("gossip", name, bytes([sel]) + j(v))
    words = [0] * 20
    for i in range(0, 20, 3):
        words[i] = (1 << (i % 64)) | 0x8000000000000001
    shard = j({"v": 1, "b": base64.b64encode(b"".join(struct.pack("<Q", w) for w in words)).decode()})
    write("gossip", "shard", bytes([6]) + shard)


def audit():
    genesis = "0" * 64

    def seal(body, prev):
        body = body.replace("PREV", prev)
        h = hashlib.sha256(body.encode()).hexdigest()
        return body[:-1] + ',"hash":"' + h + '"}', h

    req = '{"seq":%d,"prev":"PREV","type":"request","request_id":"r%d","status":200}'
    gap = '{"seq":%d,"prev":"PREV","type":"gap","dropped":%d,"time_ms":1}'
    # Sealed by the target (flags bit 0).
    write("audit", "sealed", b"\x01" + "\n".join([req % (0, 0), req % (1, 1), gap % (2, 5), req % (3, 3)]).encode() + b"\n")
    write("audit", "sealed-files", b"\x01" + "\n".join([req % (0, 0), "---", req % (1, 1), "---", gap % (2, 2)]).encode() + b"\n")
    write("audit", "sealed-mid-chain", b"\x01" + "\n".join([req % (5, 5), req % (6, 6)]).encode() + b"\n{\"torn")
    # The numbers' limits (verify once overflowed on them).
    write("audit", "sealed-limits", b"\x01" + "\n".join([gap % (2**64 - 1, 2**64 - 1), gap % (0, 2**64 - 1)]).encode() + b"\n")
    # Already sealed, as the node writes them.
    lines, prev = [], genesis
    for i in range(3):
        line, prev = seal(req % (i, i), prev)
        lines.append(line)
    write("audit", "chain", b"\x00" + "\n".join(lines).encode() + b"\n")
    write("audit", "not-utf8", b"\x00" + lines[0].encode() + b"\n\xff\xfe\n")


def gossip_wire():
    """chitchat 0.11 messages (gossip::wire): a SYN, a SYN-ACK and an ACK with node sections in
    raw blocks (the fuzzer finds compressed ones through the zstd magic in its dictionary)."""
    def s(v):
        b = v.encode()
        return struct.pack("<H", len(b)) + b

    def cid(name, gen, port):
        return s(name) + struct.pack("<Q", gen) + bytes([4, 127, 0, 0, 1]) + struct.pack("<H", port)

    def digest(members):
        out = struct.pack("<H", len(members))
        for m in members:
            out += m + struct.pack("<QQQ", 5, 0, 3)
        return out

    def section(node, values, from_version=0):
        ops = b"\x00" + node + struct.pack("<QQ", 0, from_version)
        for i, (k, v) in enumerate(values):
            ops += b"\x01" + s(k) + s(v) + struct.pack("<Q", from_version + i + 1) + b"\x00"
        return ops

    def delta(ops):
        return b"\x02" + struct.pack("<H", len(ops)) + ops + b"\x00"

    head = struct.pack("<H", 45139) + b"\x00"
    a, b = cid("a", 1, 7001), cid("b", 2, 7002)
    values = [("cert", "sig.idx.chain"), ("v", "sig.idx.2"), ("node", 'sig.idx.{"role":"worker"}')]
    write("gossip_wire", "syn", head + b"\x00" + digest([a, b]) + s("cluster"))
    write("gossip_wire", "synack", head + b"\x01" + digest([a]) + delta(section(b, values)))
    write("gossip_wire", "ack", head + b"\x02" + delta(section(a, values[:1]) + section(b, values[1:], 1)))
    write("gossip_wire", "bad-cluster", head + b"\x03")


if __name__ == "__main__":
    for t in ("request", "sse", "quic_head", "kv_events", "zmtp", "gossip", "gossip_wire", "audit"):
        shutil.rmtree(os.path.join(ROOT, t), ignore_errors=True)
    request()
    sse()
    quic_head()
    kv_events()
    zmtp()
    gossip()
    gossip_wire()
    audit()
