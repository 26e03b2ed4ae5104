"""Prompt lines in, generation requests out: parsing, tokenizing and checking one JSONL line.

A line is `{"prompt": str}`, `{"messages": [...]}` or `{"input_ids": [...]}`, with optional
per-line overrides of the command-line sampling settings. Anything wrong with a line becomes a
`DataError` naming the problem; the server writes it on that line's output and serves the rest.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from nemojax.chat import REASONING_MODES, THINK_END, THINK_START
from nemojax.errors import DataError

_OVERRIDES: dict[str, tuple[type, ...]] = {
    "max_new_tokens": (int,), "temperature": (int, float), "top_k": (int,), "top_p": (int, float),
    "min_p": (int, float), "seed": (int,), "stop": (str, list), "ignore_eos": (bool,),
    "thinking_budget": (int, type(None)), "reasoning": (str,),
}


@dataclasses.dataclass(frozen=True)
class Defaults:
    """The command-line settings each line starts from."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    thinking_budget: int | None = None
    reasoning: str = "on"


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt ready for the engine: token ids and its resolved settings."""

    index: int
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    seed: int
    stop: tuple[str, ...]
    ignore_eos: bool
    thinking_budget: int | None  # None: no budget, or the prompt does not end inside a think block


class Encoder:
    """What parsing needs from the checkpoint: a tokenizer (optional) and a chat template."""

    def __init__(self, encode: Callable[[str], list[int]] | None,
                 render: Callable[[Sequence[Mapping[str, str]], str], str] | None,
                 think_ids: tuple[int | None, int | None] = (None, None)) -> None:
        self.encode = encode
        self.render = render
        self.think_start_id, self.think_end_id = think_ids


def parse_line(line: str, index: int, defaults: Defaults, encoder: Encoder, vocab_size: int,
               max_context: int) -> Request:
    """One input line -> Request; DataError with a readable reason when the line cannot be served."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"line {index + 1} is not valid JSON: {e}") from e
    if not isinstance(record, dict):
        raise DataError(f"line {index + 1} must be a JSON object, got {type(record).__name__}")
    settings = _settings(record, defaults)
    ids = _prompt_ids(record, settings["reasoning"], encoder)
    if not ids:
        raise DataError("empty prompt")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise DataError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    if len(ids) >= max_context:
        raise DataError(f"prompt has {len(ids)} tokens; the context holds {max_context}")
    if settings["max_new_tokens"] < 1:
        raise DataError(f"max_new_tokens must be at least 1, got {settings['max_new_tokens']}")
    _check_sampling(settings)
    budget = settings["thinking_budget"] if _ends_inside_thinking(ids, encoder) else None
    stop = settings["stop"]
    return Request(
        index=index, prompt_ids=tuple(ids),
        max_new_tokens=min(settings["max_new_tokens"], max_context - len(ids)),
        temperature=float(settings["temperature"]), top_k=settings["top_k"], top_p=float(settings["top_p"]),
        min_p=float(settings["min_p"]), seed=settings["seed"],
        stop=(stop,) if isinstance(stop, str) else tuple(stop), ignore_eos=settings["ignore_eos"],
        thinking_budget=budget)


def _settings(record: dict[str, Any], defaults: Defaults) -> dict[str, Any]:
    settings = dataclasses.asdict(defaults)
    for name, types in _OVERRIDES.items():
        if name not in record:
            continue
        value = record[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise DataError(f"{name} must be {' or '.join(t.__name__ for t in types)}, got {value!r}")
        settings[name] = value
    if isinstance(settings["stop"], list) and not all(isinstance(s, str) and s for s in settings["stop"]):
        raise DataError(f"stop must be a string or a list of non-empty strings, got {settings['stop']!r}")
    if settings["reasoning"] not in REASONING_MODES:
        raise DataError(f"reasoning must be one of {REASONING_MODES}, got {settings['reasoning']!r}")
    return settings


def _check_sampling(s: dict[str, Any]) -> None:
    if s["temperature"] < 0:
        raise DataError(f"temperature must be >= 0, got {s['temperature']}")
    if s["top_k"] < 0:
        raise DataError(f"top_k must be >= 0 (0 disables it), got {s['top_k']}")
    if not 0 < s["top_p"] <= 1:
        raise DataError(f"top_p must be in (0, 1], got {s['top_p']}")
    if not 0 <= s["min_p"] <= 1:
        raise DataError(f"min_p must be in [0, 1], got {s['min_p']}")
    if s["thinking_budget"] is not None and s["thinking_budget"] < 0:
        raise DataError(f"thinking_budget must be >= 0, got {s['thinking_budget']}")


def _prompt_ids(record: dict[str, Any], reasoning: str, encoder: Encoder) -> list[int]:
    kinds = [k for k in ("prompt", "messages", "input_ids") if k in record]
    if len(kinds) != 1:
        raise DataError(f"a line needs exactly one of 'prompt', 'messages', 'input_ids'; got {kinds or 'none'}")
    kind = kinds[0]
    if kind == "input_ids":
        ids = record["input_ids"]
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise DataError("input_ids must be a list of integers")
        return ids
    if encoder.encode is None:
        raise DataError(f"'{kind}' needs a tokenizer and the checkpoint has none; give 'input_ids' instead")
    if kind == "prompt":
        if not isinstance(record["prompt"], str):
            raise DataError("prompt must be a string")
        return encoder.encode(record["prompt"]) if record["prompt"] else []
    return encoder.encode(encoder.render(record["messages"], reasoning))


def _ends_inside_thinking(ids: Sequence[int], encoder: Encoder) -> bool:
    """True when the prompt's last think marker opens a block (the reply starts by thinking)."""
    if encoder.think_start_id is None or encoder.think_end_id is None:
        return False
    last = {tok: i for i, tok in enumerate(ids) if tok in (encoder.think_start_id, encoder.think_end_id)}
    return last.get(encoder.think_start_id, -1) > last.get(encoder.think_end_id, -1)


__all__ = ["Defaults", "Request", "Encoder", "parse_line", "THINK_START", "THINK_END"]
