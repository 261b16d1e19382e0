"""The HTTP side of structured output: response_format and tools -> one ConstraintFactory, and the
tool-call parser, from gateway.structured."""

from __future__ import annotations

from typing import Any

from .. import errors, structured


async def constraint(engine: Any, response_format: Any, tools: list[dict] | None, tool_choice: Any,
                     parallel_tool_calls: bool | None) -> Any:
    """A factory making one Constraint per choice, or None when the reply is free text."""
    wants_format = response_format is not None and response_format.type != "text"
    wants_tools = bool(tools) and tool_choice != "none"
    if not (wants_format or wants_tools):
        return None
    if wants_format and wants_tools:
        raise errors.bad_request("Use either response_format or tools in one request, not both.",
                                 param="response_format", code="unsupported_parameter")
    if wants_format:
        return await structured.compile_response_format(engine, response_format.as_dict())
    return await structured.compile_tools(engine, tools, tool_choice, parallel_tool_calls)


def parser() -> Any:
    return structured.ToolCallParser()
