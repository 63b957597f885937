#!/usr/bin/env python3
"""The reference side of kvmesh's chat-template parity suite (policy/tests/template_parity.rs).

For every template and case in a cases file, renders the request the way a vLLM server does:
the request's messages and tools are validated with pydantic on OpenAI's own types (`openai`
package), rebuilt into vLLM's conversation (vllm/entrypoints/chat_utils.py:
_parse_chat_message_content and _postprocess_messages; the content format detected from the
template as vllm/renderers/hf.py does), and rendered by Hugging Face transformers'
`render_jinja_template` (what `apply_chat_template` calls) with the tokenizer's special tokens and
the request's chat_template_kwargs. The text is then encoded with the `tokenizers` library
without special tokens, as vLLM encodes a rendered chat prompt.

Prints one JSON object per line: {"template", "case", "text", "ids"} or {"template", "case",
"error"}. Usage: chat-template-reference.py CASES_JSON TEMPLATES_DIR TOKENIZER_JSON
"""

import json
import sys
from pathlib import Path
from typing import Any, Literal, Optional, Union

import jinja2.nodes
import pydantic
from openai.types.chat import ChatCompletionMessageParam as OpenAIMessageParam
from tokenizers import Tokenizer
from transformers.utils import chat_template_utils as hf
from typing_extensions import Required, TypedDict


class CustomMessageParam(TypedDict, total=False):
    """vLLM's CustomChatCompletionMessageParam: custom roles and its extra fields."""

    role: Required[str]
    content: Union[str, list[dict[str, Any]]]
    name: str
    tool_call_id: Optional[str]
    tool_calls: Optional[list[dict[str, Any]]]
    reasoning: Optional[str]
    tools: Optional[list[dict[str, Any]]]
    task: Optional[str]


MESSAGES = pydantic.TypeAdapter(list[Union[OpenAIMessageParam, CustomMessageParam]])


class FunctionDefinition(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None


class ToolParam(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")
    type: Literal["function"] = "function"
    function: FunctionDefinition


TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal", "thinking": "thinking"}


def content_format(template: str) -> str:
    """vLLM's detection: "openai" when a loop runs over a message's content, else "string"."""
    ast = hf._compile_jinja_template(template).environment.parse(template)

    def var(node, name):
        return isinstance(node, jinja2.nodes.Name) and node.ctx == "load" and node.name == name

    def elems(node, name, key=None):
        if isinstance(node, (jinja2.nodes.Filter, jinja2.nodes.Test)):
            return node.node is not None and elems(node.node, name, key)
        if isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Slice):
            return elems(node.node, name, key)
        if key is None:
            return var(node, name)
        if isinstance(node, jinja2.nodes.Getitem):
            return var(node.node, name) and isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == key
        if isinstance(node, jinja2.nodes.Getattr):
            return var(node.node, name) and node.attr == key
        return False

    names = ["messages"]
    queue = ["messages"]
    while queue:
        current = queue.pop(0)
        for assign in ast.find_all(jinja2.nodes.Assign):
            if elems(assign.node, current):
                if not isinstance(assign.target, jinja2.nodes.Name):
                    return "string"  # vLLM asserts a plain name here; its handler then says "string"
                names.append(assign.target.name)
                if assign.target.name != current:
                    queue.append(assign.target.name)
    items = [
        loop.target.name
        for loop in ast.find_all(jinja2.nodes.For)
        if any(elems(loop.iter, n) for n in names) and isinstance(loop.target, jinja2.nodes.Name)
    ]
    for loop in ast.find_all(jinja2.nodes.For):
        if any(elems(loop.iter, m, "content") for m in items):
            return "openai"
    return "string"


def conversation(messages: list[dict], fmt: str) -> list[dict]:
    out = []
    for message in messages:
        role = message["role"]
        content = message.get("content")
        if content is None:
            parts = []
        elif isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        else:
            parts = content
        texts = []
        for part in parts:
            if isinstance(part, str):
                texts.append({"type": "text", "text": part})
            elif part.get("type") in TEXT_PARTS and part.get(TEXT_PARTS[part["type"]]) is not None:
                texts.append({"type": "text", "text": part[TEXT_PARTS[part["type"]]]})
        msg = {"role": role, "content": texts if fmt == "openai" else "\n".join(t["text"] for t in texts)}
        if role == "assistant":
            if message.get("tool_calls") is not None:
                msg["tool_calls"] = list(message["tool_calls"])
            reasoning = message.get("reasoning")
            if reasoning is None:
                reasoning = message.get("reasoning_content")
            if reasoning is not None:
                msg["reasoning"] = reasoning
                msg["reasoning_content"] = reasoning
        elif role == "tool":
            if "tool_call_id" in message:
                msg["tool_call_id"] = message["tool_call_id"]
            if isinstance(msg["content"], list) and all(i.get("type") == "text" for i in msg["content"]):
                msg["content"] = "\n".join(i.get("text", "") for i in msg["content"])
        if isinstance(message.get("name"), str):
            msg["name"] = message["name"]
        if isinstance(message.get("task"), str):
            msg["task"] = message["task"]
        if role == "developer":
            msg["tools"] = message.get("tools")
        out.append(msg)
    for msg in out:
        if msg["role"] == "assistant" and isinstance(msg.get("tool_calls"), list):
            if not msg["tool_calls"]:
                msg.pop("tool_calls")
                continue
            for item in msg["tool_calls"]:
                args = item["function"].get("arguments")
                if isinstance(args, str):
                    try:
                        item["function"]["arguments"] = json.loads(args)
                    except json.JSONDecodeError:
                        item["function"]["arguments"] = {}
                elif not isinstance(args, (dict, list)):
                    item["function"]["arguments"] = {}
    return out


def plain(value: Any) -> Any:
    """Validated data as plain dicts and lists: pydantic hands OpenAI's `Iterable` fields (content
    parts, tool calls) back as lazy iterators, which vLLM consumes as lists."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return [plain(v) for v in value]


def render(request: dict, template: str, special: dict) -> str:
    messages = plain(MESSAGES.validate_python(request["messages"]))
    tools = request.get("tools")
    tool_dicts = None if tools is None else [ToolParam.model_validate(t).model_dump() for t in tools]
    kwargs = dict(special)
    kwargs.update(request.get("chat_template_kwargs") or {})
    if request.get("reasoning_effort") is not None:
        kwargs.setdefault("reasoning_effort", request["reasoning_effort"])
    # What apply_chat_template does before rendering: drop keys whose value is None.
    conv = hf._normalize_chat_messages(conversation(messages, content_format(template)))
    rendered, _ = hf.render_jinja_template(
        conversations=[conv],
        tools=tool_dicts,
        documents=request.get("documents"),
        chat_template=template,
        continue_final_message=bool(request.get("continue_final_message", False)),
        add_generation_prompt=bool(request.get("add_generation_prompt", True)),
        **kwargs,
    )
    return rendered[0]


def main() -> None:
    cases_path, templates_dir, tokenizer_path = sys.argv[1:4]
    spec = json.loads(Path(cases_path).read_text(encoding="utf-8"))
    tokenizer = Tokenizer.from_file(tokenizer_path)
    for name, special in sorted(spec["templates"].items()):
        template = (Path(templates_dir) / name).read_text(encoding="utf-8")
        for case in spec["cases"]:
            request = dict(case["request"])
            if request.get("tools") == "$tools":
                request["tools"] = spec["tools"]
            row = {"template": name, "case": case["name"]}
            try:
                text = render(request, template, special)
                row["text"] = text
                row["ids"] = tokenizer.encode(text, add_special_tokens=False).ids
            except Exception as e:  # the template raised, or the request was refused: an outcome too
                row["error"] = f"{type(e).__name__}: {e}"
            print(json.dumps(row, ensure_ascii=False))


if __name__ == "__main__":
    main()
