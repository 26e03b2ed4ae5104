"""A file of prompt lines in, one output record per line out (in input order), through the engine.

Lines are parsed first; a bad line gets `{"error": ...}` and the rest are served. Good requests
are sorted by prompt length so a batch pads little, served in batches, and their completions are
decoded to text with stop strings applied (the text ends before the first stop string; the ids end
with the token that completed it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from tokenizers import Tokenizer
from tqdm import tqdm

from nemojax.errors import DataError
from nemojax.generate.engine import Completion, Engine
from nemojax.generate.requests import Defaults, Encoder, Request, parse_line


def parse_lines(lines: Sequence[str], defaults: Defaults, encoder: Encoder, vocab_size: int, max_context: int
                ) -> list[Request | dict[str, Any]]:
    """Each line as a Request, or as its error record."""
    parsed: list[Request | dict[str, Any]] = []
    for index, line in enumerate(lines):
        try:
            parsed.append(parse_line(line, index, defaults, encoder, vocab_size, max_context))
        except DataError as e:
            parsed.append({"error": str(e)})
    return parsed


def serve(lines: Sequence[str], engine: Engine, encoder: Encoder, tokenizer: Tokenizer | None, defaults: Defaults,
          batch_size: int, progress: bool = True, segment_steps: int = 32) -> list[dict[str, Any]]:
    """Generate for every line; returns one record per line, in input order."""
    parsed = parse_lines(lines, defaults, encoder, engine.config.vocab_size, engine.config.max_position_embeddings)
    records: list[dict[str, Any] | None] = [p if isinstance(p, dict) else None for p in parsed]
    requests = sorted((p for p in parsed if isinstance(p, Request)), key=lambda r: len(r.prompt_ids))
    with tqdm(total=len(lines), disable=not progress, unit="prompt") as bar:
        bar.update(len(lines) - len(requests))
        for batch in _batches(requests, batch_size):
            stops = [StopStrings(r.stop, tokenizer) for r in batch]
            stop_check = _stop_check(stops) if any(s.active for s in stops) else None
            completions = engine.generate(batch, stop_check=stop_check, segment_steps=segment_steps)
            for request, completion, stop in zip(batch, completions, stops, strict=True):
                records[request.index] = _record(completion, stop, tokenizer, engine.eos_ids)
            bar.update(len(batch))
    return records  # type: ignore[return-value]


def _stop_check(stops: Sequence[StopStrings]):
    return lambda row, ids: stops[row].find(ids) is not None


def _batches(requests: Sequence[Request], batch_size: int) -> Iterable[list[Request]]:
    for start in range(0, len(requests), batch_size):
        yield list(requests[start:start + batch_size])


def _record(completion: Completion, stop: StopStrings, tokenizer: Tokenizer | None,
            eos_ids: Sequence[int]) -> dict[str, Any]:
    ids, reason = completion.output_ids, completion.finish_reason
    hit = stop.find(ids)
    if hit is not None:
        ids, text, reason = ids[:hit[0]], hit[1], "stop"
    else:
        shown = ids[:-1] if ids and ids[-1] in eos_ids and reason == "stop" else ids
        text = None if tokenizer is None else tokenizer.decode(shown, skip_special_tokens=False)
    return {"output_ids": ids, "text": text, "finish_reason": reason}


class StopStrings:
    """Finds where generated text first contains one of the stop strings."""

    def __init__(self, stops: Sequence[str], tokenizer: Tokenizer | None) -> None:
        self.stops = tuple(stops) if tokenizer is not None else ()
        self.tokenizer = tokenizer

    @property
    def active(self) -> bool:
        return bool(self.stops)

    def find(self, ids: Sequence[int]) -> tuple[int, str] | None:
        """(tokens up to the one completing the earliest stop string, the text before it), or None."""
        if not self.stops or self._cut(self._decode(ids)) is None:
            return None
        for n in range(1, len(ids) + 1):
            cut = self._cut(self._decode(ids[:n]))
            if cut is not None:
                return n, cut
        return None

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def _cut(self, text: str) -> str | None:
        hits = [text.find(s) for s in self.stops if s in text]
        return text[:min(hits)] if hits else None
