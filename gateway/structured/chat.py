"""OpenAI chat messages -> prompt token ids, with the model's own chat template.

When the template itself handles tools in the `<tool_call>` form that ToolCallParser reads, it gets them
through `tools=`. Otherwise (SmolLM2-135M's template knows only role and content) the fallback:
- the tool definitions and the call format go into the system message (see TOOLS_PROMPT),
- an assistant's tool_calls become `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` lines,
- `tool` results become a user turn of `<tool_response>{"name", "tool_call_id", "content"}</tool_response>`,
- a message's `name` prefixes its content as `name: ...`.
Nothing in a message is dropped without a word: unsupported shapes raise EngineError(param="messages").
"""

from __future__ import annotations

import json
from typing import Any

from ..engines.base import EngineError
from .tools import CLOSE, OPEN, check_tools

ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
TOOLS_PROMPT = (
    "You can call functions. These are available, as JSON schemas:\n{tools}\n"
    "To call a function, reply with nothing but one such tag per call, back to back:\n"
    + OPEN + '{{"name": "<function name>", "arguments": {{<arguments as a JSON object>}}}}' + CLOSE + "\n"
    "The results come back in <tool_response> tags. If no function fits, answer in plain text."
)


def _text(content: Any, where: str) -> str:
    """A message's content (string, null, or text parts) as one string."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if hasattr(part, "model_dump"):
                part = part.model_dump(exclude_none=True)
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text") \
                    and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, dict) and part.get("type") == "refusal" and isinstance(part.get("refusal"), str):
                parts.append(part["refusal"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise EngineError(f"{where}.content[{j}]: content parts of type {kind!r} are not supported "
                                  "by this model (text only).", param="messages")
        return "".join(parts)
    raise EngineError(f"{where}.content must be a string or an array of text parts.", param="messages")


def _arguments(raw: Any) -> Any:
    """OpenAI sends arguments as a JSON string; templates want the object. Unparseable text stays text."""
    if isinstance(raw, str):
        try:
            return json.loads(raw) if raw.strip() else {}
        except ValueError:
            return raw
    return {} if raw is None else raw


def _calls(msg: dict, where: str) -> list[dict]:
    calls = msg.get("tool_calls") or []
    if msg.get("function_call"):  # the legacy single-call field
        calls = [*calls, {"id": "", "type": "function", "function": msg["function_call"]}]
    out = []
    for k, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise EngineError(f"{where}.tool_calls[{k}] needs function.name.", param="messages")
        out.append({"id": call.get("id") or "", "name": fn["name"], "arguments": _arguments(fn.get("arguments"))})
    return out


def normalize(messages: Any) -> list[dict]:
    """Checked plain dicts: role, content (str), name, tool_calls [{id, name, arguments}], tool_call_id."""
    if not isinstance(messages, list) or not messages:
        raise EngineError("messages must be a non-empty array.", param="messages")
    out = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if hasattr(msg, "model_dump"):
            msg = msg.model_dump(exclude_none=True)
        if not isinstance(msg, dict) or msg.get("role") not in ROLES:
            raise EngineError(f"{where}.role must be one of {sorted(ROLES)}.", param="messages")
        role = msg["role"]
        m = {"role": role, "content": _text(msg.get("content"), where)}
        if msg.get("name") is not None:
            if not isinstance(msg["name"], str):
                raise EngineError(f"{where}.name must be a string.", param="messages")
            m["name"] = msg["name"]
        if role == "assistant":
            m["tool_calls"] = _calls(msg, where)
        elif msg.get("tool_calls"):
            raise EngineError(f"{where}: only assistant messages carry tool_calls.", param="messages")
        if role == "tool":
            if not isinstance(msg.get("tool_call_id"), str):
                raise EngineError(f"{where}: a tool message needs tool_call_id.", param="messages")
            m["tool_call_id"] = msg["tool_call_id"]
        if role == "function":  # legacy: a function result, named by `name`
            m.update(role="tool", tool_call_id="")
        out.append(m)
    return out


def template_handles_tools(tokenizer) -> bool:
    """The template renders `tools` itself, and in the <tool_call> form the parser reads."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default")
    return isinstance(template, str) and "tools" in template and OPEN in template


def _native(msgs: list[dict]) -> list[dict]:
    """HF's conventions for templates with tool support."""
    out = []
    for m in msgs:
        n = {"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
        if m.get("name"):
            n["name"] = m["name"]
        if m.get("tool_calls"):
            n["tool_calls"] = [{"id": c["id"], "type": "function",
                                "function": {"name": c["name"], "arguments": c["arguments"]}} for c in m["tool_calls"]]
        if m["role"] == "tool":
            n["tool_call_id"] = m["tool_call_id"]
        out.append(n)
    return out


def _fallback(msgs: list[dict], tools: list[dict]) -> list[dict]:
    """Plain role/content messages that any chat template renders."""
    names = {}  # tool_call_id -> function name, from earlier assistant turns
    system, turns = [], []
    for m in msgs:
        role, text = m["role"], m["content"]
        if m.get("name") and role != "tool":
            text = f"{m['name']}: {text}"
        if role in ("system", "developer"):
            if not turns:
                system.append(text)
                continue
            role = "system"
        if role == "assistant":
            calls = []
            for c in m["tool_calls"]:
                names[c["id"]] = c["name"]
                calls.append(OPEN + json.dumps({"name": c["name"], "arguments": c["arguments"]}) + CLOSE)
            text = "\n".join(x for x in (text, "".join(calls)) if x)
        if role == "tool":
            name = m.get("name") or names.get(m["tool_call_id"])
            text = "<tool_response>" + json.dumps(
                {"name": name, "tool_call_id": m["tool_call_id"], "content": text}) + "</tool_response>"
            if turns and turns[-1].get("tool"):  # results of one turn's calls go in one user message
                turns[-1]["content"] += "\n" + text
                continue
            turns.append({"role": "user", "content": text, "tool": True})
            continue
        turns.append({"role": role, "content": text})
    if tools:
        system.append(TOOLS_PROMPT.format(tools="\n".join(json.dumps(t) for t in tools)))
    head = [{"role": "system", "content": "\n\n".join(system)}] if system else []
    return head + [{"role": t["role"], "content": t["content"]} for t in turns]


def render_chat(tokenizer, messages: Any, tools: Any = None) -> list[int]:
    """Prompt ids for an OpenAI chat request, ending with the assistant's generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise EngineError("This model has no chat template; use /v1/completions.", param="messages")
    msgs = normalize(messages)
    tool_list = check_tools(tools)
    if template_handles_tools(tokenizer):
        conv, kw = _native(msgs), ({"tools": tool_list} if tool_list else {})
    else:
        conv, kw = _fallback(msgs, tool_list), {}
    try:
        ids = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, **kw)
    except Exception as exc:  # a template may raise on message shapes it does not accept
        raise EngineError(f"The chat template rejected the messages: {exc}", param="messages") from exc
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)
