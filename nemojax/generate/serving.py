"""Prompt lines in, one output record per line out, in input order, each as soon as its batch finishes.

A bad line gets `{"error": "line N: ..."}` (N its physical line) and the rest are served. Good lines are
batched in input order (a batch holds the next `batch_size` good lines), so when a batch finishes, every
line up to its last one is answered and their records are emitted at once: a consumer that writes each
record out (serve.py) holds at most one batch in memory and loses at most one batch when stopped.
Completions are decoded to text with stop strings applied (the text ends before the first stop string;
the ids end with the token that completed it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from tokenizers import Tokenizer
from tqdm import tqdm

from nemojax.errors import DataError
from nemojax.generate.engine import Completion, Engine
from nemojax.generate.jsonl import Line
from nemojax.generate.requests import Defaults, Encoder, Request, parse_line

Record = dict[str, Any]


def parse(line: Line, defaults: Defaults, encoder: Encoder, vocab_size: int, max_context: int) -> Request | Record:
    """A line as a Request, or as its error record naming the line."""
    try:
        if line.problem is not None:
            raise DataError(line.problem)
        return parse_line(line.text, line.number - 1, defaults, encoder, vocab_size, max_context)
    except DataError as e:
        return {"error": f"line {line.number}: {e}"}


def serve_stream(lines: Iterable[Line], engine: Engine, encoder: Encoder, tokenizer: Tokenizer | None,
                 defaults: Defaults, batch_size: int, emit: Callable[[Record], None],
                 after_batch: Callable[[], None] = lambda: None, progress: tqdm | None = None,
                 segment_steps: int = 32) -> None:
    """Generate for every line: `emit(record)` once per line, in input order; `after_batch()` after each
    batch's records (a writer flushes there) and at the end."""
    config = engine.config
    queue: list[Request | Record] = []  # the lines since the last batch, in order

    def run_batch() -> None:
        batch = [item for item in queue if isinstance(item, Request)]
        done = dict(zip((r.index for r in batch), _generate(batch, engine, tokenizer, segment_steps), strict=True))
        for item in queue:
            emit(done[item.index] if isinstance(item, Request) else item)
        if progress is not None:
            progress.update(len(queue))
        queue.clear()
        after_batch()

    for line in lines:
        item = parse(line, defaults, encoder, config.vocab_size, config.max_position_embeddings)
        if isinstance(item, dict) and not queue:  # nothing before it is pending: answer it now
            emit(item)
            if progress is not None:
                progress.update(1)
            continue
        queue.append(item)
        if sum(isinstance(i, Request) for i in queue) == batch_size:
            run_batch()
    if queue:
        run_batch()
    after_batch()


def _generate(batch: Sequence[Request], engine: Engine, tokenizer: Tokenizer | None,
              segment_steps: int) -> list[Record]:
    """One batch through the engine: a record per request, in order."""
    if not batch:
        return []
    stops = [StopStrings(r.stop, tokenizer) for r in batch]
    stop_check = _stop_check(stops) if any(s.active for s in stops) else None
    completions = engine.generate(batch, stop_check=stop_check, segment_steps=segment_steps)
    return [_record(c, stop, tokenizer, engine.eos_ids) for c, stop in zip(completions, stops, strict=True)]


def serve(lines: Sequence[str], engine: Engine, encoder: Encoder, tokenizer: Tokenizer | None, defaults: Defaults,
          batch_size: int, segment_steps: int = 32) -> list[Record]:
    """In memory: one record per line (numbered from 1), in order."""
    records: list[Record] = []
    serve_stream((Line(n, text) for n, text in enumerate(lines, start=1)), engine, encoder, tokenizer, defaults,
                 batch_size, records.append, segment_steps=segment_steps)
    return records


def _stop_check(stops: Sequence[StopStrings]):
    return lambda row, ids: stops[row].find(ids) is not None


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
