"""Generated text to OpenAI message parts, incrementally: reasoning, content and tool calls.

`OutputParser.feed(text)` takes the next piece of decoded text and returns what became final:
reasoning text (inside `<think>...</think>`, when the reply starts in a think block), content text,
and completed tool calls. Text that may still turn into a marker (a `</think>` or `<tool_call>` cut
between pieces) or that belongs to an unfinished tool call is held back; `finish()` releases the
rest. Feeding the whole text at once gives the same parts as feeding it in any pieces, so a streamed
reply equals the non-streamed one.

Tool calls use Nemotron 3's published format (the Qwen3-coder XML style):
`<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call>`.
Parameter values are JSON when the tool's schema gives the parameter a non-string type and the value
parses, text otherwise. A block that does not parse (or names no known tool, when tools are given)
stays in the content as text.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from nemojax.chat import THINK_END, THINK_START, TOOL_CALL_END, TOOL_CALL_START

_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>\s*(.*?)\s*</function>\s*", re.S)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.S)


@dataclasses.dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = dataclasses.field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclasses.dataclass
class Parts:
    """What one `feed` / `finish` made final."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


class OutputParser:
    """`thinking`: the reply starts inside a think block. `tools`: the request's tools (None: no parsing).

    Newlines next to the markers are layout, not text: those after `<think>`, `</think>` and a tool
    call and those before `</think>` and a tool call are dropped (held back until what follows shows
    which they are), the same way whatever the pieces.
    """

    def __init__(self, thinking: bool, tools: Sequence[Mapping[str, Any]] | None) -> None:
        self.mode = "start"
        self.thinking = thinking
        self.tools = {_tool_name(t): t for t in tools} if tools else None
        self.strip_leading = False
        self.buffer = ""

    def feed(self, text: str) -> Parts:
        self.buffer += text
        return self._drain(final=False)

    def finish(self) -> Parts:
        return self._drain(final=True)

    def _drain(self, final: bool) -> Parts:
        parts = Parts()
        while self.buffer:
            if self.strip_leading:
                self.buffer = self.buffer.lstrip("\n")
                if not self.buffer:
                    break
                self.strip_leading = False
            if self.mode == "start":
                if THINK_START.startswith(self.buffer.lstrip("\n")) and not final:
                    break  # may still become `<think>`
                stripped = self.buffer.lstrip("\n")
                if stripped.startswith(THINK_START):
                    self.buffer, self.mode = stripped[len(THINK_START):], "reasoning"
                else:
                    self.mode = "reasoning" if self.thinking else "content"
                self.strip_leading = self.mode == "reasoning"
            elif self.mode == "reasoning":
                at = self.buffer.find(THINK_END)
                if at >= 0:
                    parts.reasoning += self.buffer[:at].rstrip("\n")
                    self.buffer, self.mode, self.strip_leading = self.buffer[at + len(THINK_END):], "content", True
                    continue
                parts.reasoning += self._release(THINK_END, final)
                break
            elif self.tools is None:
                parts.content += self.buffer
                self.buffer = ""
            else:
                start = self.buffer.find(TOOL_CALL_START)
                if start < 0:
                    parts.content += self._release(TOOL_CALL_START, final)
                    break
                end = self.buffer.find(TOOL_CALL_END, start)
                if end < 0 and not final:
                    break
                block = self.buffer[start:] if end < 0 else self.buffer[start:end + len(TOOL_CALL_END)]
                call = None if end < 0 else self._parse(block[len(TOOL_CALL_START):-len(TOOL_CALL_END)])
                if call is None:
                    parts.content += self.buffer[:start] + block
                else:
                    parts.content += self.buffer[:start].rstrip("\n")
                    parts.tool_calls.append(call)
                    self.strip_leading = True
                self.buffer = self.buffer[start + len(block):]
        return parts

    def _release(self, marker: str, final: bool) -> str:
        """The buffer's text except an end that may still begin `marker` or be newlines before it."""
        keep = 0
        if not final:
            keep = _partial_suffix(self.buffer, marker)
            keep += len(self.buffer[:len(self.buffer) - keep]) - len(self.buffer[:len(self.buffer) - keep].rstrip("\n"))
        text, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
        return text

    def _parse(self, inner: str) -> ToolCall | None:
        match = _FUNCTION.fullmatch(inner)
        if match is None:
            return None
        name, body = match.group(1).strip(), match.group(2)
        if name not in self.tools or _PARAMETER.sub("", body).strip():
            return None
        schema = _properties(self.tools[name])
        arguments = {key.strip(): _value(value, schema.get(key.strip())) for key, value in _PARAMETER.findall(body)}
        return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _tool_name(tool: Mapping[str, Any]) -> str:
    return tool.get("function", tool)["name"]


def _properties(tool: Mapping[str, Any] | None) -> dict[str, Any]:
    if tool is None:
        return {}
    parameters = tool.get("function", tool).get("parameters") or {}
    properties = parameters.get("properties") if isinstance(parameters, Mapping) else None
    return dict(properties) if isinstance(properties, Mapping) else {}


def _value(text: str, schema: Any) -> Any:
    """A parameter value: text for string parameters (or no schema type), else JSON when it parses."""
    kind = schema.get("type") if isinstance(schema, Mapping) else None
    if kind in (None, "string") or (isinstance(kind, list) and "string" in kind):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text
