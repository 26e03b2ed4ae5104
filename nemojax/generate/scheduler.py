"""Continuous batching on the host: requests enter free decode slots between decode segments and leave
as soon as they finish.

One `step()`:
1. cancelled requests leave (waiting ones at once; running ones are released on the device);
2. waiting requests take the free slots, first come first served; with a prefix cache
   (`nemojax.generate.prefix_cache`) the deepest cached prefix of the prompt is restored into the slot;
3. one prompt chunk for up to `prefill_rows` slots still being prefilled (rows whose prompt ends in
   the chunk sample their first token and start decoding); with a prefix cache a chunk stops at a
   block boundary it reaches, and the blocks and states there are snapshotted into the cache;
4. one decode segment of up to `segment_steps` steps for every decoding row; when requests are
   waiting or being prefilled, it stops after the step in which any row finished, so a short request
   never waits for a long one;
5. the tokens emitted since the last step are read back and appended to their tickets; a ticket
   that hit end-of-sequence, its token limit or its `stop` check finishes and its slot is free.

The caches hold every slot at its own position (`nemojax.generate.caches`), so which requests share
the batch never changes a request's tokens: greedy output equals the request served alone. The cache
length starts small and doubles (up to what the longest allowed request needs) when the rows about
to run need more room; each length compiles its own programs once.

Everything here is deterministic given the requests and the device results, so with several
processes (`jax.distributed`) every process runs the same sequence of programs.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import numpy as np

from nemojax.generate.requests import Request


class EngineLike(Protocol):
    """What the scheduler uses of `nemojax.generate.engine.Engine` (named here, so the scheduler does not
    import the engine module that imports it)."""

    programs: Any
    variables: Any
    stats: Any
    prefix_cache: Any
    prefill_chunk: int

    def replicate(self, value: Any) -> Any: ...

    def partial(self, fn: Callable, **static: Any) -> Callable: ...

    def run(self, name: str, fn: Callable, *args: Any) -> Any: ...

MIN_CHUNK = 16
MIN_LENGTH = 64


@dataclasses.dataclass(eq=False)
class Ticket:
    """One request's life in the scheduler; its outputs grow as segments finish.

    `stop(ids) -> bool` (optional) is asked after each segment whether the request should end there
    (stop strings). `on_update(ticket)` (optional) is called from the scheduler's thread after new
    tokens arrive and once more when the ticket finishes. `cancel()` may be called from any thread.
    """

    request: Request
    stop: Callable[[list[int]], bool] | None = None
    on_update: Callable[[Ticket], None] | None = None
    logprobs: bool = False
    output_ids: list[int] = dataclasses.field(default_factory=list)
    token_logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    submitted_at: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    accepted_drafts: int = 0
    verify_steps: int = 0
    slot: int | None = None
    prefilled: int = 0  # prompt tokens already in the cache
    cached_tokens: int = 0  # prompt tokens restored from the prefix cache instead of prefilled
    prefix_keys: list = dataclasses.field(default_factory=list)  # the prompt's block keys in the prefix cache
    _cancel: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def decoding(self) -> bool:
        return self.slot is not None and self.prefilled == len(self.request.prompt_ids)

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()


class Scheduler:
    """A fixed number of decode slots over one preallocated slot state (see `nemojax.generate.programs`).

    `max_len`: the longest prompt + completion any request may have (positions per slot); requests
    must respect it (`submit` raises ValueError otherwise). `min_length`: the first cache length; from
    `max_len` + 2K + 1 (K draft tokens) on, the cache never grows, so no program is compiled for a new
    length while serving. `prefix`: the prefix cache in use (the engine's; None turns it off).
    """

    def __init__(self, engine: EngineLike, slots: int, max_len: int, segment_steps: int = 16,
                 prefill_rows: int | None = None, min_length: int = MIN_LENGTH) -> None:
        self.engine, self.slots, self.max_len = engine, slots, max_len
        self.segment_steps = segment_steps
        self.prefill_rows = prefill_rows or slots
        self.programs = engine.programs
        k = self.programs.k
        self.extra = 2 * k + 1  # speculative writes past the last kept position
        self.length = min(self._bucket(min_length), self.max_len + self.extra)
        self.width = self.programs.out_width(segment_steps)
        self.state = engine.run("empty", self.programs.empty, slots, self.length, self.width)
        self.waiting: collections.deque[Ticket] = collections.deque()
        self.rows: list[Ticket | None] = [None] * slots
        self._releases: list[int] = []
        self.prefix = engine.prefix_cache

    # ---------------------------------------------------------------- requests
    def submit(self, ticket: Ticket) -> Ticket:
        request = ticket.request
        if len(request.prompt_ids) + request.max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({len(request.prompt_ids)}) + max_new_tokens ({request.max_new_tokens}) "
                             f"exceed the {self.max_len} positions of a slot")
        self.waiting.append(ticket)
        return ticket

    @property
    def busy(self) -> bool:
        """Requests waiting or in a slot."""
        return bool(self.waiting) or any(t is not None for t in self.rows)

    @property
    def running(self) -> int:
        return sum(t is not None for t in self.rows)

    # ---------------------------------------------------------------- one round
    def step(self) -> list[Ticket]:
        """One round (see the module docstring); returns the tickets that finished in it."""
        finished = self._drop_cancelled()
        self._admit()
        prefilling = [t for t in self.rows if t is not None and not t.decoding]
        worked = False
        if prefilling:
            self._prefill(prefilling[:self.prefill_rows])
            worked = True
        decoding = [t for t in self.rows if t is not None and t.decoding]  # rows that just started included
        if decoding:
            still_prefilling = any(t is not None and not t.decoding for t in self.rows)
            self._segment(decoding, exit_on_finish=bool(self.waiting) or still_prefilling)
            worked = True
        if worked:
            finished += self._collect()
        return finished

    def run_until_idle(self) -> None:
        while self.busy:
            self.step()

    def _drop_cancelled(self) -> list[Ticket]:
        finished = []
        for ticket in [t for t in self.waiting if t.cancelled]:
            self.waiting.remove(ticket)
            finished.append(self._finish(ticket, "cancelled"))
        for slot, ticket in enumerate(self.rows):
            if ticket is not None and ticket.cancelled:
                if ticket.decoding:
                    self._releases.append(slot)  # rows being prefilled are `done` on the device already
                self._free(slot)
                finished.append(self._finish(ticket, "cancelled"))
        self._flush_releases()
        return finished

    def _admit(self) -> None:
        for slot in range(self.slots):
            if self.rows[slot] is None and self.waiting:
                ticket = self.waiting.popleft()
                ticket.slot, ticket.prefilled, ticket.cached_tokens = slot, 0, 0
                self.rows[slot] = ticket
                if self.prefix is not None:
                    self._restore(ticket)

    # ---------------------------------------------------------------- prefix cache
    def _restore(self, ticket: Ticket) -> None:
        """Put the deepest cached prefix of the ticket's prompt into its slot: the prompt continues after it."""
        prefix, engine = self.prefix, self.engine
        ticket.prefix_keys = prefix.keys(ticket.request.prompt_ids)
        entries = prefix.lookup(ticket.prefix_keys)
        if not entries:
            return
        begin, compile_before = time.perf_counter(), engine.stats.compile_seconds
        depth = len(entries) * prefix.block_size
        self._ensure_length(depth)
        row = np.int32(ticket.slot)
        for j, entry in enumerate(entries):
            self.state = engine.run("put_span", self.programs.put_span, self.state,
                                    *engine.replicate((row, np.int32(j * prefix.block_size))), entry.span)
        self.state = engine.run("put_states", self.programs.put_states, self.state, engine.replicate(row),
                                entries[-1].states)
        jax.block_until_ready(self.state["done"])
        engine.stats.prefill_seconds += time.perf_counter() - begin - (engine.stats.compile_seconds - compile_before)
        ticket.prefilled = ticket.cached_tokens = depth
        engine.stats.cached_tokens += depth

    def _segment_end(self, ticket: Ticket, chunk: int) -> int:
        """Where the ticket's next prefill chunk stops: after `chunk` tokens or at the prompt's end; with
        the prefix cache, at a block boundary when one is passed (the deepest one before the prompt's
        last token included), so that the states there can be snapshotted exactly."""
        length = len(ticket.request.prompt_ids)
        end = min(ticket.prefilled + chunk, length)
        if self.prefix is None:
            return end
        b = self.prefix.block_size
        deepest = (length - 1) // b * b
        if ticket.prefilled < deepest:
            end = min(end, deepest)
        aligned = end // b * b
        return aligned if aligned > ticket.prefilled else end

    def _snapshot(self, ticket: Ticket) -> None:
        """After a chunk that stopped at a block boundary below the prompt's end: store the blocks up to
        it that the cache lacks and the states there."""
        prefix, engine = self.prefix, self.engine
        b, end = prefix.block_size, ticket.prefilled
        if end % b or end >= len(ticket.request.prompt_ids):
            return
        keys = ticket.prefix_keys[:end // b]
        if prefix.has_states(keys[-1]):
            prefix.touch(keys)
            return
        begin, compile_before = time.perf_counter(), engine.stats.compile_seconds
        row = np.int32(ticket.slot)
        for j in prefix.missing(keys):
            prefix.add_span(keys, j, engine.run("take_span", self.programs.take_span, self.state,
                                                *engine.replicate((row, np.int32(j * b))), b))
        prefix.add_states(keys, engine.run("take_states", self.programs.take_states, self.state,
                                           engine.replicate(row)))
        prefix.touch(keys)
        engine.stats.prefill_seconds += time.perf_counter() - begin - (engine.stats.compile_seconds - compile_before)

    def _prefill(self, tickets: Sequence[Ticket]) -> None:
        """One chunk for each of `tickets` (each continues where its prompt stands)."""
        engine = self.engine
        remaining = [len(t.request.prompt_ids) - t.prefilled for t in tickets]
        chunk = min(engine.prefill_chunk, max(MIN_CHUNK, _next_pow2(max(remaining))))
        self._ensure_length(max(t.prefilled + min(chunk, r) for t, r in zip(tickets, remaining, strict=True)))
        # Rows device-major when each device prefills its own slots (programs.row_devices), numbered per device.
        devices = self.programs.row_devices(self.slots)
        local = self.slots // devices
        groups = [[t for t in tickets if t.slot // local == d] for d in range(devices)]
        per_device = _next_pow2(max(len(group) for group in groups))
        placed = [(d * per_device + j, t) for d, group in enumerate(groups) for j, t in enumerate(group)]
        n = devices * per_device
        ids, valid = np.zeros((n, chunk), np.int32), np.zeros((n, chunk), bool)
        next_ids, next_valid = np.zeros((n, chunk), np.int32), np.zeros((n, chunk), bool)
        rows, fresh, last = np.full(n, local, np.int32), np.zeros(n, bool), np.zeros(n, bool)
        starting, starts = [], [None] * n
        for i, t in placed:
            prompt = t.request.prompt_ids
            end = self._segment_end(t, chunk)
            part = prompt[t.prefilled:end]
            ids[i, :len(part)], valid[i, :len(part)] = part, True
            following = prompt[t.prefilled + 1:end + 1]
            next_ids[i, :len(following)], next_valid[i, :len(following)] = following, True
            rows[i], fresh[i] = t.slot % local, t.prefilled == 0
            t.prefilled += len(part)
            last[i] = t.prefilled == len(prompt)
            if last[i]:
                starting.append(t)
                starts[i] = t.request
        settings = settings_arrays(starts, n)
        use_sort = any(r.top_k > 0 or r.top_p < 1.0 for r in (t.request for t in starting))
        logprobs = any(t.logprobs for t in starting)
        begin = time.perf_counter()
        compile_before = engine.stats.compile_seconds
        self.state = engine.run(
            "prefill", engine.partial(self.programs.prefill, use_sort=use_sort, logprobs=logprobs), engine.variables,
            self.state, *engine.replicate((rows, ids, valid, next_ids, next_valid, fresh, last, settings)))
        jax.block_until_ready(self.state["done"])
        engine.stats.prefill_seconds += time.perf_counter() - begin - (engine.stats.compile_seconds - compile_before)
        engine.stats.prefill_tokens += int(valid.sum())
        if self.prefix is not None:
            for t in tickets:
                self._snapshot(t)

    def _segment(self, decoding: Sequence[Ticket], exit_on_finish: bool) -> None:
        engine, k = self.engine, self.programs.k
        steps = self.segment_steps
        self._ensure_length(max(len(t.request.prompt_ids) + min(t.request.max_new_tokens,
                                                                len(t.output_ids) + steps * (k + 1))
                                for t in decoding) + self.extra)
        requests = [t.request for t in decoding]
        options = dict(use_sort=any(r.top_k > 0 or r.top_p < 1.0 for r in requests),
                       greedy=all(r.temperature == 0 for r in requests), logprobs=any(t.logprobs for t in decoding))
        begin = time.perf_counter()
        compile_before = engine.stats.compile_seconds
        held = np.asarray([t is not None and not t.decoding and t.prefilled > 0 for t in self.rows])
        self.state = engine.run("segment", engine.partial(self.programs.segment, **options), engine.variables,
                                self.state, *engine.replicate((np.int32(steps), np.bool_(exit_on_finish), held)))
        jax.block_until_ready(self.state["done"])
        engine.stats.decode_seconds += time.perf_counter() - begin - (engine.stats.compile_seconds - compile_before)

    def _collect(self) -> list[Ticket]:
        """Read back the emitted tokens and hand them to their tickets; finish the tickets that ended."""
        engine = self.engine
        self.state, view = engine.run("drain", self.programs.drain, self.state)
        view = jax.device_get(view)
        finished = []
        now = time.perf_counter()
        for slot, ticket in enumerate(self.rows):
            if ticket is None or not ticket.decoding:
                continue
            fill = int(view["fill"][slot])
            ticket.accepted_drafts, ticket.verify_steps = int(view["accepted"][slot]), int(view["verify_steps"][slot])
            reason = self._append(ticket, view, slot, fill) if fill else None
            if fill and ticket.first_token_at is None:
                ticket.first_token_at = now
            if reason is None and bool(view["done"][slot]):
                reason = "length" if len(ticket.output_ids) >= ticket.request.max_new_tokens else "stop"
            if reason is not None:
                if not bool(view["done"][slot]):
                    self._releases.append(slot)
                self._free(slot)
                finished.append(self._finish(ticket, reason))
            elif fill and ticket.on_update is not None:
                ticket.on_update(ticket)
        self._flush_releases()
        return finished

    def _append(self, ticket: Ticket, view: dict, slot: int, fill: int) -> str | None:
        """Add a row's new tokens to its ticket, cut at end-of-sequence or the token limit; the reason
        the ticket ends here, if it does."""
        request, eos = ticket.request, self.programs.eos_ids
        for j in range(fill):
            token = int(view["out"][slot, j])
            ticket.output_ids.append(token)
            if ticket.logprobs:
                ticket.token_logprobs.append(float(view["logprob"][slot, j]))
                ticket.top_logprobs.append([(int(i), float(p)) for i, p in zip(
                    view["top_ids"][slot, j], view["top_logprobs"][slot, j], strict=True)])
            if token in eos and not request.ignore_eos:
                return "stop"
            if len(ticket.output_ids) >= request.max_new_tokens:
                return "length"
        if ticket.stop is not None and ticket.stop(ticket.output_ids):
            return "stop"
        return None

    def _finish(self, ticket: Ticket, reason: str) -> Ticket:
        ticket.finish_reason = reason
        ticket.finished_at = time.perf_counter()
        self.engine.stats.prompts += 1
        self.engine.stats.generated_tokens += len(ticket.output_ids)
        self.engine.stats.accepted_drafts += ticket.accepted_drafts
        self.engine.stats.verify_steps += ticket.verify_steps
        if ticket.first_token_at is not None:
            self.engine.stats.first_tokens += 1
            self.engine.stats.ttft_seconds += ticket.first_token_at - ticket.submitted_at
        if ticket.on_update is not None:
            ticket.on_update(ticket)
        return ticket

    def _free(self, slot: int) -> None:
        self.rows[slot].slot = None
        self.rows[slot] = None

    def _flush_releases(self) -> None:
        if not self._releases:
            return
        mask = np.zeros(self.slots, bool)
        mask[self._releases] = True
        self._releases = []
        self.state = self.engine.run("release", self.programs.release, self.state, *self.engine.replicate((mask,)))

    def _ensure_length(self, need: int) -> None:
        """Grow the caches (doubling, up to what the longest request needs) when `need` positions do not fit."""
        if need <= self.length:
            return
        self.length = min(max(self._bucket(need), 2 * self.length), self.max_len + self.extra)
        self.state = self.engine.run("grow", self.programs.grow, self.state, self.length)

    def _bucket(self, n: int) -> int:
        """Cache lengths are powers of two, or whole prefill chunks beyond one chunk."""
        chunk = self.engine.prefill_chunk
        return _next_pow2(n) if n <= chunk else -(-n // chunk) * chunk


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def settings_arrays(requests: Sequence[Request | None], size: int) -> dict[str, np.ndarray]:
    """Per-row `prefill` settings, padded to `size` rows (None or missing: a row that does not start)."""
    rows: list[Any] = list(requests) + [None] * (size - len(requests))

    def column(field: Callable[[Request], Any], dtype: Any, fill: Any = 0) -> np.ndarray:
        return np.asarray([fill if r is None else field(r) for r in rows], dtype)

    return {
        "temperature": column(lambda r: r.temperature, np.float32), "top_k": column(lambda r: r.top_k, np.int32),
        "top_p": column(lambda r: r.top_p, np.float32, 1.0), "min_p": column(lambda r: r.min_p, np.float32),
        "seed": column(lambda r: r.seed % 2**32, np.uint32), "salt": column(lambda r: r.index % 2**32, np.uint32),
        "max_new": column(lambda r: r.max_new_tokens, np.int32), "ignore_eos": column(lambda r: r.ignore_eos, bool),
        "think_left": column(lambda r: -1 if r.thinking_budget is None else r.thinking_budget, np.int32, -1),
    }
