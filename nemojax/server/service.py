"""The generation service behind the HTTP server: one scheduler driven by one worker thread.

Requests arrive from the event loop (`submit`, thread-safe) and are handed to the worker, which runs
scheduler rounds while anything is waiting or running and sleeps otherwise. Each ticket's progress is
posted back to the event loop (`Stream.updates`, an asyncio queue) after every round that gave it
tokens and when it finishes. The queue of waiting requests is bounded: `submit` raises `Overloaded`
when it is full, and the server answers 429 with a Retry-After. A cancelled ticket (client gone)
leaves its slot at the start of the next round.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from nemojax.generate.engine import Engine
from nemojax.generate.requests import Request
from nemojax.generate.scheduler import Scheduler, Ticket
from nemojax.server.metrics import Metrics

RATE_WINDOW_SECONDS = 10.0


class Overloaded(Exception):
    """The waiting queue is full."""


class Unavailable(Exception):
    """The worker has stopped (shut down, or a device failure)."""


class Stream:
    """The tickets of one API call and the asyncio queue their updates arrive on (one item per update:
    the ticket's index within the call)."""

    def __init__(self, tickets: Sequence[Ticket], loop: asyncio.AbstractEventLoop) -> None:
        self.tickets = list(tickets)
        self.updates: asyncio.Queue[int] = asyncio.Queue()
        self.loop = loop

    def cancel(self) -> None:
        for ticket in self.tickets:
            ticket.cancel()

    @property
    def finished(self) -> bool:
        return all(t.finished for t in self.tickets)


class GenerationService:
    """Owns the scheduler (`slots` decode slots of `max_len` positions) and its worker thread."""

    def __init__(self, engine: Engine, slots: int, max_len: int, max_waiting: int, segment_steps: int = 8,
                 stop_finder: Callable[[Request], Callable[[list[int]], bool] | None] = lambda r: None,
                 scheduler: Scheduler | None = None) -> None:
        """`scheduler`: one already built (default: a new one over `engine`)."""
        self.engine = engine
        self.scheduler = scheduler or Scheduler(engine, slots, max_len, segment_steps)
        self.max_waiting = max_waiting
        self.stop_finder = stop_finder
        self.metrics = Metrics(slots)
        self._inbox: queue.Queue[Ticket | None] = queue.Queue()
        self._waiting = 0  # submitted, not yet in a slot (read on the event loop, updated under the lock)
        self._lock = threading.Lock()
        self._stopped: BaseException | None = None
        self._tokens: collections.deque[tuple[float, int]] = collections.deque()
        self._thread = threading.Thread(target=self._work, name="nemojax-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._stopped is None

    def submit(self, requests: Sequence[Request], loop: asyncio.AbstractEventLoop, logprobs: bool) -> Stream:
        """Queue one call's requests (all or none); Overloaded when the waiting queue cannot take them."""
        if not self.alive:
            raise Unavailable("the generation worker is not running")
        tickets = [Ticket(r, self.stop_finder(r), logprobs=logprobs) for r in requests]
        stream = Stream(tickets, loop)
        for index, ticket in enumerate(tickets):
            ticket.on_update = self._notifier(stream, index)
        with self._lock:
            if self._waiting + len(requests) > self.max_waiting:
                raise Overloaded(f"{self._waiting} requests are waiting (at most {self.max_waiting})")
            self._waiting += len(requests)
            for ticket in tickets:
                self._inbox.put(ticket)
        return stream

    def _notifier(self, stream: Stream, index: int) -> Callable[[Ticket], None]:
        def notify(ticket: Ticket) -> None:
            if ticket.finished:
                self._record_finish(ticket)
            stream.loop.call_soon_threadsafe(stream.updates.put_nowait, index)
        return notify

    def _record_finish(self, ticket: Ticket) -> None:
        now = time.perf_counter()
        self._tokens.append((now, len(ticket.output_ids)))
        self.metrics.finished(ticket)

    def rates(self) -> tuple[float, float]:
        """(finished requests per second, generated tokens per second) over the last RATE_WINDOW_SECONDS."""
        now = time.perf_counter()
        while self._tokens and self._tokens[0][0] < now - RATE_WINDOW_SECONDS:
            self._tokens.popleft()
        window = list(self._tokens)
        return len(window) / RATE_WINDOW_SECONDS, sum(n for _, n in window) / RATE_WINDOW_SECONDS

    def snapshot(self) -> dict[str, Any]:
        """Queue depth and slot use, for /metrics and /health."""
        return {"waiting": self._waiting, "running": self.scheduler.running, "slots": self.scheduler.slots}

    # ---------------------------------------------------------------- the worker thread
    def _work(self) -> None:
        try:
            while True:
                items = []
                try:
                    items.append(self._inbox.get(block=not self.scheduler.busy))
                    while True:
                        items.append(self._inbox.get_nowait())
                except queue.Empty:
                    pass
                if None in items:
                    return
                for ticket in items:
                    self.scheduler.submit(ticket)
                if self.scheduler.busy:
                    self.scheduler.step()
                with self._lock:
                    self._waiting = len(self.scheduler.waiting) + self._inbox.qsize()
                self.metrics.update(self.snapshot(), *self.rates())
        except BaseException as e:  # a device failure: every open request ends with an error
            self._stopped = e
            for ticket in list(self.scheduler.waiting) + [t for t in self.scheduler.rows if t is not None]:
                if not ticket.finished:
                    ticket.finish_reason = "error"
                    if ticket.on_update is not None:
                        ticket.on_update(ticket)
            raise
