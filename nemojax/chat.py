"""The Nemotron ChatML template: render conversations for generation and for training.

`<|im_start|>role\\n...<|im_end|>\\n` blocks, a system block always first, and thinking handled the
Nemotron 3 way: the generation prompt opens a `<think>` block (thinking on) or an empty one (off);
assistant turns before the last user message keep only their answer (thinking collapsed to
`<think></think>`). `render_segments` marks which pieces a fine-tuning loss is trained on, so a
tokenizer that encodes piece by piece gets an exact loss mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from nemojax.errors import ConfigError, DataError

UNK = "<unk>"
BOS = "<s>"
EOS = "</s>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_START = "<think>"
THINK_END = "</think>"

ROLES = ("system", "user", "assistant")
REASONING_MODES = ("on", "off", "medium", "low")
EFFORT_SUFFIX = {"medium": "\n\n{reasoning effort: efficient}", "low": "\n\n{reasoning effort: low}"}

GENERATION_PROMPT_THINKING = f"{IM_START}assistant\n{THINK_START}\n"
GENERATION_PROMPT_NO_THINKING = f"{IM_START}assistant\n{THINK_START}{THINK_END}"

Message = Mapping[str, str]


def validate_messages(messages: Sequence[Message]) -> None:
    """Raise DataError naming the first message without a known role or a string content."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise DataError(f"messages must be a list of {{'role', 'content'}} objects, got {type(messages).__name__}")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise DataError(f"message {index} must be an object with 'role' and 'content', got {message!r}")
        if "role" not in message or "content" not in message:
            raise DataError(f"message {index} needs both 'role' and 'content', got keys {sorted(message)}")
        if message["role"] not in ROLES:
            raise DataError(f"message {index} has unknown role {message['role']!r}; expected one of {ROLES}")
        if not isinstance(message["content"], str):
            raise DataError(f"message {index} content must be a string, got {type(message['content']).__name__}")
        reasoning = message.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise DataError(f"message {index} reasoning_content must be a string, got {type(reasoning).__name__}")


def split_thinking(message: Message) -> tuple[str, str]:
    """(thinking, answer) of an assistant message: `reasoning_content`, or a leading `<think>...</think>`."""
    content = message["content"]
    thinking = message.get("reasoning_content") or ""
    if THINK_END in content:
        head, answer = content.split(THINK_END, 1)
        thinking = thinking or head.replace(THINK_START, "", 1)
        content = answer
    return thinking.strip("\n"), content.lstrip("\n")


def render_segments(messages: Sequence[Message], *, reasoning: str = "on") -> list[tuple[str, bool]]:
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
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    segments = [(f"{IM_START}system\n{system}{IM_END}\n", False)]
    for index, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role == "assistant":
            segments.extend(_assistant_segments(message, final=index > last_user, reasoning=reasoning))
            continue
        if index == last_user and reasoning in EFFORT_SUFFIX:
            content += EFFORT_SUFFIX[reasoning]
        segments.append((f"{IM_START}{role}\n{content}{IM_END}\n", False))
    return _merge(segments)


def render_messages(messages: Sequence[Message], *, add_generation_prompt: bool = True, reasoning: str = "on") -> str:
    """The full ChatML text; with `add_generation_prompt` it ends where the assistant's reply begins."""
    text = "".join(piece for piece, _ in render_segments(messages, reasoning=reasoning))
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
