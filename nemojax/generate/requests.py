"""Prompt lines in, generation requests out: parsing, tokenizing and checking one JSONL line.

A line is `{"prompt": str}`, `{"messages": [...]}` or `{"input_ids": [...]}`, with optional
per-line overrides of the command-line sampling settings. Anything wrong with a line becomes a
`DataError` naming the problem; the server writes it on that line's output and serves the rest.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from nemojax.chat import REASONING_MODES, THINK_END, THINK_START
from nemojax.config import INT32_MAX
from nemojax.errors import DataError, NemojaxError

_OVERRIDES: dict[str, tuple[type, ...]] = {
    "max_new_tokens": (int,), "temperature": (int, float), "top_k": (int,), "top_p": (int, float),
    "min_p": (int, float), "seed": (int,), "stop": (str, list), "ignore_eos": (bool,),
    "thinking_budget": (int, type(None)), "reasoning": (str,),
}
LINE_FIELDS = ("prompt", "messages", "input_ids", *_OVERRIDES)


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
    """One input line (0-based physical `index`) -> Request; DataError naming the field when it cannot be
    served (the caller adds the line number)."""
    if not line.strip():
        raise DataError("blank line (every input line needs a prompt)")
    try:
        record = json.loads(line)
    except RecursionError as e:
        raise DataError("not valid JSON: nested too deeply") from e
    except ValueError as e:  # JSONDecodeError, or an integer with too many digits
        raise DataError(f"not valid JSON: {e}") from e
    if not isinstance(record, dict):
        raise DataError(f"must be a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(LINE_FIELDS))
    if unknown:
        raise DataError(_unknown_fields(unknown))
    settings = _settings(record, defaults)
    check_settings(settings)
    if settings["stop"] and encoder.encode is None:
        raise DataError("stop strings need a tokenizer and the checkpoint has none")
    ids = _prompt_ids(record, settings["reasoning"], encoder)
    if not ids:
        raise DataError("empty prompt")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise DataError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    if len(ids) >= max_context:
        raise DataError(f"prompt has {len(ids)} tokens; the context holds {max_context}")
    budget = settings["thinking_budget"] if _ends_inside_thinking(ids, encoder) else None
    stop = settings["stop"]
    return Request(
        index=index, prompt_ids=tuple(ids),
        max_new_tokens=min(settings["max_new_tokens"], max_context - len(ids)),
        temperature=float(settings["temperature"]), top_k=settings["top_k"], top_p=float(settings["top_p"]),
        min_p=float(settings["min_p"]), seed=settings["seed"],
        stop=(stop,) if isinstance(stop, str) else tuple(stop), ignore_eos=settings["ignore_eos"],
        thinking_budget=budget)


def _unknown_fields(unknown: Sequence[str]) -> str:
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, LINE_FIELDS, n=1, cutoff=0.8)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"unknown field {', '.join(hints)}; a line may hold {', '.join(LINE_FIELDS)}"


def _settings(record: dict[str, Any], defaults: Defaults) -> dict[str, Any]:
    settings = dataclasses.asdict(defaults)
    for name, types in _OVERRIDES.items():
        if name not in record:
            continue
        value = record[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise DataError(f"{name} must be {' or '.join(t.__name__ for t in types)}, got {value!r}")
        settings[name] = value
    return settings


def check_settings(s: dict[str, Any], error: type[NemojaxError] = DataError,
                   name: Callable[[str], str] = str) -> None:
    """Raise `error` naming the first setting out of range (`name` turns a field into what the user wrote,
    e.g. a command-line flag). Integers that reach the device must fit in int32."""
    def require(ok: bool, field: str, expected: str) -> None:
        if not ok:
            raise error(f"{name(field)} must be {expected}, got {s[field]!r}")

    require(s["max_new_tokens"] >= 1, "max_new_tokens", "at least 1")
    require(_within(s["temperature"], 0, math.inf), "temperature", "a finite number >= 0 (0 is greedy)")
    require(0 <= s["top_k"] <= INT32_MAX, "top_k", f"in [0, {INT32_MAX}] (0 disables it)")
    require(_within(s["top_p"], 0, 1) and s["top_p"] > 0, "top_p", "in (0, 1]")
    require(_within(s["min_p"], 0, 1), "min_p", "in [0, 1]")
    budget = s["thinking_budget"]
    require(budget is None or 0 <= budget <= INT32_MAX, "thinking_budget", f"in [0, {INT32_MAX}] or null")
    stop = s["stop"]
    stops = [stop] if isinstance(stop, str) else stop
    require(isinstance(stops, (list, tuple)) and all(isinstance(x, str) and x for x in stops), "stop",
            "a non-empty string or a list of non-empty strings")
    require(s["reasoning"] in REASONING_MODES, "reasoning", f"one of {REASONING_MODES}")


def _within(value: float, low: float, high: float) -> bool:
    """low <= value <= high for a finite value (an integer too large for a float is out of range)."""
    try:
        number = float(value)
    except OverflowError:
        return False
    return math.isfinite(number) and low <= number <= high


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
        text = record["prompt"]
    else:
        text = encoder.render(record["messages"], reasoning)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{kind} holds an unpaired surrogate ({text[e.start]!r} at character {e.start}); "
                        "it is not text") from e
    return encoder.encode(text) if text else []


def _ends_inside_thinking(ids: Sequence[int], encoder: Encoder) -> bool:
    """True when the prompt's last think marker opens a block (the reply starts by thinking)."""
    if encoder.think_start_id is None or encoder.think_end_id is None:
        return False
    last = {tok: i for i, tok in enumerate(ids) if tok in (encoder.think_start_id, encoder.think_end_id)}
    return last.get(encoder.think_start_id, -1) > last.get(encoder.think_end_id, -1)


__all__ = ["Defaults", "Request", "Encoder", "parse_line", "check_settings", "LINE_FIELDS", "THINK_START", "THINK_END"]
