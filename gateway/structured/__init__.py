"""Structured output and tool calling: grammar constraints (llguidance), chat rendering, tool-call parsing.

The engine thread uses Constraint; routes use compile_response_format / compile_tools (off the event loop,
cached), render_chat (through LLMEngine.chat_prompt) and ToolCallParser. See docs/structured.md.
"""

from .chat import render_chat, template_handles_tools
from .grammar import Constraint, ConstraintFactory, allocate_bitmask, compile_response_format
from .tools import ToolCallParser, check_tools, chosen_tools, compile_tools

__all__ = [
    "Constraint", "ConstraintFactory", "ToolCallParser", "allocate_bitmask", "check_tools", "chosen_tools",
    "compile_response_format", "compile_tools", "render_chat", "template_handles_tools",
]
