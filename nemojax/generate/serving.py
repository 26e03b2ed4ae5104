"""Prompt lines in, one output record per line out, in input order, through the continuous-batching
scheduler (`nemojax.generate.scheduler`).

A bad line gets `{"error": "line N: ..."}` (N its physical line) and the rest are served. Good lines are
submitted in input order to `batch_size` decode slots; a line's record is emitted as soon as it and
every line before it are answered, so a short line never waits for a long one to get a slot, while
the output keeps input order. Lines are read ahead only while fewer than 2 x `batch_size` requests are
unfinished and fewer than 8 x `batch_size` records wait for an earlier line: a consumer that writes each
record out (serve.py) holds a bounded number of records in memory and loses at most those when
stopped. Completions are decoded to text with stop strings applied (the text ends before the first
stop string; the ids end with the token that completed it).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from tokenizers import Tokenizer
from tqdm import tqdm

from nemojax.errors import DataError
from nemojax.generate.engine import Engine
from nemojax.generate.jsonl import Line
from nemojax.generate.requests import Defaults, Encoder, Request, parse_line
from nemojax.generate.scheduler import Ticket

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
                 segment_steps: int = 16) -> None:
    """Generate for every line: `emit(record)` once per line, in input order; `after_batch()` after each
    scheduler round that emitted records (a writer flushes there) and at the end."""
    config = engine.config
    scheduler = engine.scheduler(batch_size, config.max_position_embeddings, segment_steps)
    pending: collections.deque[Ticket | Record] = collections.deque()  # unanswered lines, in order
    stops: dict[Ticket, StopStrings] = {}
    source = iter(lines)
    exhausted = False

    def unfinished() -> int:
        return sum(isinstance(item, Ticket) and not item.finished for item in pending)

    def emit_ready() -> None:
        emitted = 0
        while pending and (isinstance(pending[0], dict) or pending[0].finished):
            item = pending.popleft()
            emit(item if isinstance(item, dict) else _record(item, stops.pop(item), tokenizer, engine.eos_ids))
            emitted += 1
        if emitted:
            if progress is not None:
                progress.update(emitted)
            after_batch()

    while True:
        while not exhausted and unfinished() < 2 * batch_size and len(pending) < 8 * batch_size:
            line = next(source, None)
            if line is None:
                exhausted = True
                break
            item = parse(line, defaults, encoder, config.vocab_size, config.max_position_embeddings)
            if isinstance(item, Request):
                finder = StopStrings(item.stop, tokenizer)
                item = scheduler.submit(Ticket(item, finder.stop_check if finder.active else None))
                stops[item] = finder
            pending.append(item)
            emit_ready()
        if not scheduler.busy:
            emit_ready()
            if exhausted:
                break
            continue
        scheduler.step()
        emit_ready()
    after_batch()


def serve(lines: Sequence[str], engine: Engine, encoder: Encoder, tokenizer: Tokenizer | None, defaults: Defaults,
          batch_size: int, segment_steps: int = 16) -> list[Record]:
    """In memory: one record per line (numbered from 1), in order."""
    records: list[Record] = []
    serve_stream((Line(n, text) for n, text in enumerate(lines, start=1)), engine, encoder, tokenizer, defaults,
                 batch_size, records.append, segment_steps=segment_steps)
    return records


def _record(ticket: Ticket, stop: StopStrings, tokenizer: Tokenizer | None, eos_ids: Sequence[int]
            ) -> dict[str, Any]:
    ids, reason = ticket.output_ids, ticket.finish_reason
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

    def stop_check(self, ids: Sequence[int]) -> bool:
        """True once the generated text contains a stop string."""
        return self.find(ids) is not None

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def _cut(self, text: str) -> str | None:
        hits = [text.find(s) for s in self.stops if s in text]
        return text[:min(hits)] if hits else None
