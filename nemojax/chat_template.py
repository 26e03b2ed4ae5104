"""One chat template for serving and fine-tuning: the checkpoint's Jinja template when it has one, the
built-in Nemotron ChatML (`nemojax.chat`) otherwise.

`ChatTemplate.render` makes a generation prompt (serve.py's `messages` lines, the OpenAI server's
chat completions); `ChatTemplate.segments` makes training text with the pieces the loss is trained
on flagged (`nemojax.train.corpus`). A Jinja template is rendered the way Hugging Face tokenizers
render it: with `messages`, `tools`, `add_generation_prompt`, `bos_token`, `eos_token`,
`raise_exception` and the template keyword arguments (`enable_thinking` among them). Reasoning modes
map onto both: `off` sets enable_thinking False; `medium` / `low` append the effort suffix to the
last user message (as the built-in renderer does).

Trained pieces of a Jinja rendering are found from the ChatML markers the Nemotron templates share:
each assistant turn from the end of its generation prompt (`<|im_start|>assistant\\n` and an opening
`<think>\\n` or an empty `<think></think>`) through its `<|im_end|>`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.sandbox

from nemojax.chat import (
    BOS,
    EFFORT_SUFFIX,
    EOS,
    GENERATION_PROMPT_NO_THINKING,
    GENERATION_PROMPT_THINKING,
    IM_END,
    IM_START,
    REASONING_MODES,
    Message,
    render_segments,
    validate_messages,
    validate_tools,
)
from nemojax.errors import CheckpointError, ConfigError, DataError

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
_ASSISTANT_HEADER = f"{IM_START}assistant\n"


class ChatTemplate:
    """Renders conversations; `source` is the Jinja text (None: the built-in ChatML)."""

    def __init__(self, source: str | None = None, bos_token: str = BOS, eos_token: str = EOS) -> None:
        self.source = source
        self.bos_token, self.eos_token = bos_token, eos_token
        self._compiled = None
        if source is not None:
            environment = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            environment.filters["tojson"] = _tojson
            self._compiled = environment.from_string(source)  # jinja2.TemplateError when it does not parse

    @classmethod
    def from_directory(cls, directory: str | None) -> ChatTemplate:
        """The template of a tokenizer directory (its tokenizer_config.json), else the built-in one;
        CheckpointError naming the file when it cannot be read or does not parse."""
        path = None if directory is None else os.path.join(directory, TOKENIZER_CONFIG_FILE)
        if path is None or not os.path.isfile(path):
            return cls()
        try:
            with open(path) as f:
                settings = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read ({e})") from e
        if not isinstance(settings, dict) or not isinstance(settings.get("chat_template"), str):
            return cls()
        try:
            return cls(settings["chat_template"], _token_text(settings.get("bos_token"), BOS),
                       _token_text(settings.get("eos_token"), EOS))
        except jinja2.TemplateError as e:
            raise CheckpointError(f"{path}: the chat template does not parse ({e})") from e

    @property
    def builtin(self) -> bool:
        return self._compiled is None

    def render(self, messages: Sequence[Message], reasoning: str = "on", tools: Sequence[Any] | None = None,
               add_generation_prompt: bool = True) -> str:
        """The conversation as text; with `add_generation_prompt` it ends where the assistant's reply begins."""
        _check_reasoning(reasoning)
        if self.builtin:
            text = "".join(piece for piece, _ in render_segments(messages, reasoning=reasoning, tools=tools))
            if add_generation_prompt:
                text += GENERATION_PROMPT_NO_THINKING if reasoning == "off" else GENERATION_PROMPT_THINKING
            return text
        validate_messages(messages)
        if tools is not None:
            validate_tools(tools)
        messages = [dict(m) for m in messages]
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if users and reasoning in EFFORT_SUFFIX:
            messages[users[-1]]["content"] += EFFORT_SUFFIX[reasoning]
        try:
            return self._compiled.render(
                messages=messages, tools=list(tools) if tools else None, add_generation_prompt=add_generation_prompt,
                enable_thinking=reasoning != "off", bos_token=self.bos_token, eos_token=self.eos_token,
                raise_exception=_raise_exception)
        except jinja2.TemplateError as e:
            raise DataError(f"the checkpoint's chat template failed: {e}") from e

    def segments(self, messages: Sequence[Message], reasoning: str = "on", tools: Sequence[Any] | None = None
                 ) -> list[tuple[str, bool]]:
        """Training text in pieces, each flagged True when the loss is trained on it (assistant output)."""
        if self.builtin:
            return render_segments(messages, reasoning=reasoning, tools=tools)
        return _assistant_spans(self.render(messages, reasoning, tools, add_generation_prompt=False))


def _assistant_spans(text: str) -> list[tuple[str, bool]]:
    """Split ChatML text into (piece, trained) with each assistant reply (after its generation prompt,
    through `<|im_end|>`) trained."""
    pieces: list[tuple[str, bool]] = []
    at = 0
    while (header := text.find(_ASSISTANT_HEADER, at)) >= 0:
        start = header + len(_ASSISTANT_HEADER)
        for opening in (GENERATION_PROMPT_NO_THINKING, GENERATION_PROMPT_THINKING):
            opening = opening[len(_ASSISTANT_HEADER):]
            if text.startswith(opening, start):
                start += len(opening)
                break
        end = text.find(IM_END, start)
        end = len(text) if end < 0 else end + len(IM_END)
        pieces += [(text[at:start], False), (text[start:end], True)]
        at = end
    pieces.append((text[at:], False))
    return [(piece, trained) for piece, trained in pieces if piece]


def _check_reasoning(reasoning: str) -> None:
    if reasoning not in REASONING_MODES:
        raise ConfigError(f"reasoning must be one of {REASONING_MODES}, got {reasoning!r}")


def _raise_exception(message: str) -> None:
    raise DataError(f"the checkpoint's chat template refused the conversation: {message}")


def _tojson(value: Any, indent: int | None = None) -> str:
    """Hugging Face's `tojson` (key order kept, non-ASCII kept as is)."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _token_text(token: Any, default: str) -> str:
    """A special token from tokenizer_config.json: a string or an {"content": ...} object."""
    if isinstance(token, str):
        return token
    if isinstance(token, Mapping) and isinstance(token.get("content"), str):
        return token["content"]
    return default
