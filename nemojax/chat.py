"""The built-in Nemotron ChatML template: render conversations for generation and for training.

`<|im_start|>role\\n...<|im_end|>\\n` blocks, a system block always first, and thinking handled the
Nemotron 3 way: the generation prompt opens a `<think>` block (thinking on) or an empty one (off);
assistant turns before the last user message keep only their answer (thinking collapsed to
`<think></think>`). Tools follow the published template's Qwen3-coder XML style: the tool list (one
JSON object per line inside `<tools>...</tools>`) and the call format go into the system block; an
assistant's `tool_calls` are rendered as `<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n
</parameter>\\n</function>\\n</tool_call>` after its answer; consecutive `tool` messages come back in
one user turn, each wrapped in `<tool_response>...</tool_response>`. `render_segments` marks which
pieces a fine-tuning loss is trained on, so a tokenizer that encodes piece by piece gets an exact
loss mask. `nemojax.chat_template` chooses between this and a checkpoint's own Jinja template.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from nemojax.errors import ConfigError, DataError

UNK = "<unk>"
BOS = "<s>"
EOS = "</s>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_START = "<think>"
THINK_END = "</think>"

ROLES = ("system", "user", "assistant", "tool")
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_START, TOOL_RESPONSE_END = "<tool_response>", "</tool_response>"
TOOLS_INSTRUCTIONS = (
    "If you choose to call a function ONLY reply in the following format with NO suffix:\n\n"
    "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
    "<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n"
    "</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n"
    "- Function calls MUST follow the specified format: an inner <function=...></function> block must be nested "
    "within <tool_call></tool_call> XML tags\n- Required parameters MUST be specified\n"
    "- You may provide optional reasoning for your function call in natural language BEFORE the function call, "
    "but NOT after\n- If there is no function call available, answer the question like normal with your current "
    "knowledge and do not tell the user about function calls\n</IMPORTANT>")
REASONING_MODES = ("on", "off", "medium", "low")
EFFORT_SUFFIX = {"medium": "\n\n{reasoning effort: efficient}", "low": "\n\n{reasoning effort: low}"}

GENERATION_PROMPT_THINKING = f"{IM_START}assistant\n{THINK_START}\n"
GENERATION_PROMPT_NO_THINKING = f"{IM_START}assistant\n{THINK_START}{THINK_END}"

Message = Mapping[str, Any]


def validate_messages(messages: Sequence[Message]) -> None:
    """Raise DataError naming the first message without a known role or a string content (an assistant
    message with `tool_calls` may have none), or with malformed tool calls."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise DataError(f"messages must be a list of {{'role', 'content'}} objects, got {type(messages).__name__}")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise DataError(f"message {index} must be an object with 'role' and 'content', got {message!r}")
        calls = message.get("tool_calls")
        if "role" not in message or ("content" not in message and not calls):
            raise DataError(f"message {index} needs both 'role' and 'content', got keys {sorted(message)}")
        if message["role"] not in ROLES:
            raise DataError(f"message {index} has unknown role {message['role']!r}; expected one of {ROLES}")
        content = message.get("content")
        if not isinstance(content, str) and not (content is None and calls):
            raise DataError(f"message {index} content must be a string, got {type(content).__name__}")
        reasoning = message.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise DataError(f"message {index} reasoning_content must be a string, got {type(reasoning).__name__}")
        if calls is not None:
            if message["role"] != "assistant" or not isinstance(calls, Sequence) or isinstance(calls, str):
                raise DataError(f"message {index} tool_calls must be a list, on an assistant message")
            for n, call in enumerate(calls):
                _call_parts(call, f"message {index} tool_calls[{n}]")


def validate_tools(tools: Any) -> None:
    """Raise DataError unless `tools` is a list of function tools, each with a string name."""
    if not isinstance(tools, Sequence) or isinstance(tools, str):
        raise DataError(f"tools must be a list, got {type(tools).__name__}")
    for n, tool in enumerate(tools):
        function = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
            raise DataError(f"tools[{n}] must be {{'type': 'function', 'function': {{'name': ..., ...}}}}")


def _call_parts(call: Any, where: str) -> tuple[str, dict[str, Any]]:
    """(name, arguments) of an OpenAI tool call ({"function": {"name", "arguments": JSON text or object}})."""
    function = call.get("function", call) if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise DataError(f"{where} must be {{'function': {{'name': ..., 'arguments': ...}}}}")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError as e:
            raise DataError(f"{where} arguments are not valid JSON ({e})") from e
    if not isinstance(arguments, Mapping):
        raise DataError(f"{where} arguments must be a JSON object")
    return function["name"], dict(arguments)


def render_tool_calls(calls: Sequence[Any]) -> str:
    """Tool calls in the model's format (string values as they are, anything else as JSON)."""
    blocks = []
    for n, call in enumerate(calls):
        name, arguments = _call_parts(call, f"tool_calls[{n}]")
        parameters = "".join(f"<parameter={key}>\n{value if isinstance(value, str) else json.dumps(value)}\n"
                             "</parameter>\n" for key, value in arguments.items())
        blocks.append(f"{TOOL_CALL_START}\n<function={name}>\n{parameters}</function>\n{TOOL_CALL_END}")
    return "\n".join(blocks)


def render_tools(tools: Sequence[Any]) -> str:
    """The system block's tool section: the tool list and the call format."""
    validate_tools(tools)
    listed = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    header = "# Tools\n\nYou have access to the following functions:\n\n"
    return f"{header}<tools>\n{listed}\n</tools>\n\n{TOOLS_INSTRUCTIONS}"


def split_thinking(message: Message) -> tuple[str, str]:
    """(thinking, answer) of an assistant message: `reasoning_content`, or a leading `<think>...</think>`."""
    content = message.get("content") or ""
    thinking = message.get("reasoning_content") or ""
    if THINK_END in content:
        head, answer = content.split(THINK_END, 1)
        thinking = thinking or head.replace(THINK_START, "", 1)
        content = answer
    return thinking.strip("\n"), content.lstrip("\n")


def render_segments(messages: Sequence[Message], *, reasoning: str = "on", tools: Sequence[Any] | None = None
                    ) -> list[tuple[str, bool]]:
    """Text pieces in order, each flagged True when it is assistant output the loss is trained on.

    The trained pieces are each assistant turn's answer (and, for the final turns, their thinking)
    with the closing `<|im_end|>`; everything the prompt would supply is untrained. Joined, the
    pieces equal `render_messages(messages, add_generation_prompt=False, reasoning=reasoning)`.
    """
    _check_reasoning(reasoning)
    validate_messages(messages)
    messages = list(messages)
    system = ""
    if messages and messages[0]["role"] == "system":
        system = messages.pop(0)["content"]
    if tools:
        system = f"{system}\n\n{render_tools(tools)}" if system else render_tools(tools)
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    segments = [(f"{IM_START}system\n{system}{IM_END}\n", False)]
    for index, message in enumerate(messages):
        role, content = message["role"], message.get("content") or ""
        if role == "assistant":
            segments.extend(_assistant_segments(message, final=index > last_user, reasoning=reasoning))
            continue
        if role == "tool":
            response = f"{TOOL_RESPONSE_START}\n{content}\n{TOOL_RESPONSE_END}\n"
            after_tool = index > 0 and messages[index - 1]["role"] == "tool"
            before_tool = index + 1 < len(messages) and messages[index + 1]["role"] == "tool"
            opening = "" if after_tool else f"{IM_START}user\n"
            closing = "" if before_tool else f"{IM_END}\n"
            segments.append((f"{opening}{response}{closing}", False))
            continue
        if index == last_user and reasoning in EFFORT_SUFFIX:
            content += EFFORT_SUFFIX[reasoning]
        segments.append((f"{IM_START}{role}\n{content}{IM_END}\n", False))
    return _merge(segments)


def render_messages(messages: Sequence[Message], *, add_generation_prompt: bool = True, reasoning: str = "on",
                    tools: Sequence[Any] | None = None) -> str:
    """The full ChatML text; with `add_generation_prompt` it ends where the assistant's reply begins."""
    text = "".join(piece for piece, _ in render_segments(messages, reasoning=reasoning, tools=tools))
    if add_generation_prompt:
        text += generation_prompt(reasoning)
    return text


def generation_prompt(reasoning: str = "on") -> str:
    """The text that opens an assistant reply: an open `<think>` block, or an empty one when thinking is off."""
    _check_reasoning(reasoning)
    return GENERATION_PROMPT_NO_THINKING if reasoning == "off" else GENERATION_PROMPT_THINKING


def _assistant_segments(message: Message, *, final: bool, reasoning: str) -> list[tuple[str, bool]]:
    """One assistant turn. A final turn keeps its thought (`<think>\\n{thinking}\\n</think>\\n{answer}`) unless
    reasoning is off; an earlier turn's thought collapses to `<think></think>\\n` (the newline, absent when it had
    no thought, follows the published template)."""
    thinking, answer = split_thinking(message)
    if message.get("tool_calls"):
        calls = render_tool_calls(message["tool_calls"])
        answer = f"{answer.rstrip()}\n{calls}" if answer.strip() else calls
    if final and thinking and reasoning != "off":
        return [
            (GENERATION_PROMPT_THINKING, False),
            (f"{thinking}\n{THINK_END}\n{answer}{IM_END}", True),
            ("\n", False),
        ]
    separator = "\n" if thinking and not final else ""
    return [(GENERATION_PROMPT_NO_THINKING, False), (f"{separator}{answer}{IM_END}", True), ("\n", False)]


def _merge(segments: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Join neighbouring pieces with the same flag (fewer, longer pieces tokenize like the full text)."""
    merged: list[tuple[str, bool]] = []
    for text, trained in segments:
        if merged and merged[-1][1] == trained:
            merged[-1] = (merged[-1][0] + text, trained)
        else:
            merged.append((text, trained))
    return merged


def _check_reasoning(reasoning: str) -> None:
    if reasoning not in REASONING_MODES:
        raise ConfigError(f"reasoning must be one of {REASONING_MODES}, got {reasoning!r}")
