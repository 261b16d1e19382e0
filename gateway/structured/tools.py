"""Tool calling: definitions checked, `tool_choice` turned into a grammar, and model text turned into tool calls.

Calls are written as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the Hermes/Qwen form, which
the fallback prompt in chat.py teaches to models whose template has no tool support), back to back.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from ..engines.base import EngineError
from .grammar import JSON_OPTIONS, ConstraintFactory, close_objects, compile_grammar

OPEN, CLOSE = "<tool_call>", "</tool_call>"
NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
EMPTY_PARAMS = {"type": "object", "properties": {}}


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def check_tools(tools: Any) -> list[dict]:
    """The request's tools as plain dicts, each {"type": "function", "function": {name, parameters, ...}}."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise EngineError("tools must be an array.", param="tools")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        if hasattr(tool, "model_dump"):
            tool = tool.model_dump(exclude_none=True)
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise EngineError(f"tools[{i}]: only tools of type 'function' are supported.", param=f"tools[{i}]")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not NAME_RE.match(fn["name"]):
            raise EngineError(f"tools[{i}].function.name must match ^[a-zA-Z0-9_-]{{1,64}}$.",
                              param=f"tools[{i}].function.name")
        if fn["name"] in seen:
            raise EngineError(f"tools[{i}]: duplicate function name {fn['name']!r}.", param=f"tools[{i}]")
        seen.add(fn["name"])
        params = fn.get("parameters", EMPTY_PARAMS)
        if params is None:
            params = EMPTY_PARAMS
        if not isinstance(params, dict):
            raise EngineError(f"tools[{i}].function.parameters must be a JSON schema object.",
                              param=f"tools[{i}].function.parameters")
        out.append({"type": "function", "function": {**fn, "parameters": params}})
    return out


def chosen_tools(tools: list[dict], tool_choice: Any) -> tuple[str, list[dict]]:
    """(mode, tools the reply may call): mode is none | auto | required."""
    if hasattr(tool_choice, "model_dump"):
        tool_choice = tool_choice.model_dump(exclude_none=True)
    if tool_choice is None:
        return ("auto" if tools else "none"), tools
    if tool_choice in ("none", "auto", "required"):
        if tool_choice != "none" and not tools:
            raise EngineError(f"tool_choice {tool_choice!r} needs at least one tool in 'tools'.", param="tool_choice")
        return tool_choice, tools
    if isinstance(tool_choice, dict) and tool_choice.get("type", "function") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        match = [t for t in tools if t["function"]["name"] == name]
        if not match:
            raise EngineError(f"tool_choice names function {name!r}, which is not in 'tools'.",
                              param="tool_choice", code="invalid_tool_choice")
        return "required", match
    raise EngineError("tool_choice must be 'none', 'auto', 'required' or "
                      "{'type': 'function', 'function': {'name': ...}}.", param="tool_choice")


def _call_schema(tool: dict) -> dict:
    fn = tool["function"]
    return {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
            "properties": {"name": {"const": fn["name"]}, "arguments": close_objects(fn["parameters"])}}


def tools_grammar(tools: list[dict], mode: str, parallel: bool) -> str:
    """Lark for llguidance: `auto` is free text (never containing <tool_call>) or calls; else calls only."""
    strict = all(t["function"].get("strict") for t in tools)
    schema = {"anyOf": [_call_schema(t) for t in tools],
              "x-guidance": {**JSON_OPTIONS, "lenient": not strict}}
    lines = [
        "start: TEXT | calls" if mode == "auto" else "start: calls",
        "calls: call+" if parallel else "calls: call",
        f'call: "{OPEN}" %json {json.dumps(schema)} "{CLOSE}"',
    ]
    if mode == "auto":
        lines.append(r"TEXT: /(.|\n)*/ & ~/(.|\n)*<tool_call>(.|\n)*/")
    return "\n".join(lines) + "\n"


async def compile_tools(engine, tools: Any, tool_choice: Any = None,
                        parallel_tool_calls: bool | None = True) -> ConstraintFactory | None:
    """A constraint for the reply, or None when it is free (no tools, or tool_choice 'none').

    Raises EngineError for bad tool definitions, a tool_choice naming a missing tool, or a bad schema."""
    mode, allowed = chosen_tools(check_tools(tools), tool_choice)
    if mode == "none":
        return None
    named = isinstance(tool_choice, dict) or hasattr(tool_choice, "model_dump")
    # A named function is called once, as vLLM does; otherwise parallel_tool_calls decides.
    grammar = tools_grammar(allowed, mode, parallel_tool_calls is not False and not named)
    return await compile_grammar(engine, grammar, "tools")


class ToolCallParser:
    """Streaming: model text in, OpenAI deltas out (content, or tool_calls with index/id/name/arguments).

    Whitespace-only text next to calls is layout and dropped; everything else is content. An unknown
    shape inside <tool_call> tags is given back as content rather than dropped."""

    _HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)')

    def __init__(self) -> None:
        self._buf = ""  # text not yet turned into deltas
        self._in_call = False
        self._call: dict | None = None  # the open call, once its name is known
        self._sent_args = 0  # chars of the open call's arguments already sent
        self._ws = ""  # trailing whitespace held back
        self.content: list[str] = []
        self.tool_calls: list[dict] = []

    def feed(self, text: str) -> list[dict]:
        self._buf += text
        out: list[dict] = []
        while self._step_call(out) if self._in_call else self._step_text(out):
            pass
        return out

    def flush(self) -> list[dict]:
        """Deltas held back until the end of the reply: a partial tag, trailing whitespace, an unfinished call."""
        out: list[dict] = []
        if self._in_call:
            if self._call is not None:  # cut short (max_tokens): send what there is
                t = self._buf.rstrip()
                k = next((k for k in range(min(len(CLOSE) - 1, len(t)), 0, -1) if CLOSE.startswith(t[-k:])), 0)
                t = t[: len(t) - k].rstrip()
                if t.endswith("}") and not _is_json(t) and _is_json(t[:-1]):
                    t = t[:-1].rstrip()  # that brace closed the call, not the arguments
                self._send_args(out, t)
            else:
                self._emit(out, self._ws + OPEN + self._buf)
        else:
            self._content(out, self._buf)
            if self._ws and not self.tool_calls:
                self._emit(out, self._ws)
        self._buf, self._ws, self._in_call, self._call = "", "", False, None
        return out

    def finish(self) -> tuple[str | None, list[dict]]:
        """(content, tool_calls) for the whole reply; content is None when empty."""
        self.flush()
        return ("".join(self.content) or None), self.tool_calls

    # -- internals --

    def _emit(self, out: list[dict], text: str) -> None:
        if text:
            self.content.append(text)
            out.append({"content": text})

    def _content(self, out: list[dict], text: str) -> None:
        stripped = text.rstrip()
        if not stripped:
            self._ws += text
            return
        self._emit(out, self._ws + stripped)
        self._ws = text[len(stripped):]

    def _step_text(self, out: list[dict]) -> bool:
        i = self._buf.find(OPEN)
        if i >= 0:
            self._content(out, self._buf[:i])
            self._ws = ""  # whitespace right before a call is layout
            self._buf = self._buf[i + len(OPEN):]
            self._in_call, self._call, self._sent_args = True, None, 0
            return True
        keep = next((k for k in range(min(len(OPEN) - 1, len(self._buf)), 0, -1)
                     if OPEN.startswith(self._buf[-k:])), 0)  # may be the start of "<tool_call>"
        self._content(out, self._buf[: len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep:]
        return False

    def _open_call(self, out: list[dict], name: str) -> None:
        self._call = {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": ""}}
        self.tool_calls.append(self._call)
        self._sent_args = 0
        out.append({"tool_calls": [{"index": len(self.tool_calls) - 1, "id": self._call["id"],
                                    "type": "function", "function": {"name": name, "arguments": ""}}]})

    def _send_args(self, out: list[dict], args: str) -> None:
        assert self._call is not None
        frag = args[self._sent_args:]
        if frag:
            self._call["function"]["arguments"] += frag
            self._sent_args = len(args)
            out.append({"tool_calls": [{"index": len(self.tool_calls) - 1, "function": {"arguments": frag}}]})

    def _close_at(self) -> int:
        """Index of the "</tool_call>" that ends the call: the first after complete JSON (one inside a
        string value does not count), or -1."""
        start = 0
        while (end := self._buf.find(CLOSE, start)) >= 0:
            body = self._buf[:end].rstrip()
            if self._call is not None:
                if body.endswith("}") and _is_json(body[:-1]):
                    return end
            elif _is_json(body):
                return end
            start = end + 1
        return -1

    def _step_call(self, out: list[dict]) -> bool:
        if self._call is None and (m := self._HEAD.match(self._buf)):
            try:
                name = json.loads(f'"{m.group(1)}"')
            except ValueError:
                name = m.group(1)
            self._open_call(out, name)
            self._buf = self._buf[m.end():]
        end = self._close_at()
        if end < 0:
            if self._call is not None:
                # Hold back a tail that may yet be "}</tool_call>"; the rest is surely argument text.
                t = self._buf
                k = next((k for k in range(min(len(CLOSE) - 1, len(t)), 0, -1) if CLOSE.startswith(t[-k:])), 0)
                t = t[: len(t) - k].rstrip()
                self._send_args(out, t[:-1].rstrip() if t.endswith("}") else t)
            return False
        body, self._buf = self._buf[:end], self._buf[end + len(CLOSE):]
        self._in_call = False
        if self._call is not None:
            self._send_args(out, body.rstrip()[:-1].rstrip())
            self._call = None
            return True
        try:  # not in the expected key order: the whole body at once, or given back as text
            obj = json.loads(body)
            name, args = obj["name"], obj.get("arguments", obj.get("parameters", {}))
            if not isinstance(name, str):
                raise TypeError(name)
        except (ValueError, KeyError, TypeError):
            self._emit(out, OPEN + body + CLOSE)
            return True
        self._open_call(out, name)
        self._send_args(out, args if isinstance(args, str) else json.dumps(args))
        self._call = None
        return True
