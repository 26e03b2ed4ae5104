"""Stopping a run cleanly on SIGTERM (how clusters preempt) or SIGINT (Ctrl-C): the signal handler only
notes the signal; the loop asks `should_stop()` once per step and, when it says so, saves a checkpoint at
that step and ends with `TrainingStopped`.

With several processes every one must stop at the same step (saving a checkpoint is a collective), even
if only one of them was signalled. Each process passes its vote into the train step, which reduces the
votes inside the step's own program and returns the result with the metrics; the loop reads it from the
previous step's metrics (already waited for), so the agreement costs no extra wait and every process
stops one step after the first signal anywhere. (A separate all-reduce program would be independent of
the step running beside it, and on jax 0.12's CPU runtime the two programs' collectives can then
interleave differently on each process and deadlock.) A second signal restores the signal's
previous action (a second Ctrl-C interrupts at once).
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nemojax.errors import NemojaxError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(NemojaxError):
    """The run stopped on a signal after saving a checkpoint; `signum` is the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """Context manager: SIGTERM/SIGINT noted while inside (handlers installed only in the main thread, and
    not for a signal the process ignores)."""

    def __init__(self, mesh: Mesh | None):
        self.mesh = mesh
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:  # e.g. SIGINT of a background job stays ignored
                    self._previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
            sys.stderr.write(f"\n{signal.Signals(signum).name}: saving a checkpoint after the current step and "
                             "stopping (send it again to stop at once)\n")
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def votes(self) -> jax.Array:
        """This process's vote ("was I signalled?"), one bool per device of the mesh, for the train step to
        reduce: the step returns `stop` = any vote, so the agreement needs no program of its own."""
        flag = self.received is not None
        if self.mesh is None:
            return jnp.asarray([flag])
        sharding = NamedSharding(self.mesh, PartitionSpec(self.mesh.axis_names))
        return jax.make_array_from_callback((self.mesh.size,), sharding, lambda index: np.full(
            len(range(self.mesh.size)[index[0]]), flag))

    def should_stop(self, previous_metrics: dict | None) -> bool:
        """Whether to save and stop after the step just dispatched; the same answer on every process.

        One process decides from its own signal at once; several decide from the `stop` vote of the
        previous step's metrics (already waited for by the loop), so all stop at the same step."""
        if jax.process_count() == 1 or self.mesh is None:
            return self.received is not None
        return previous_metrics is not None and bool(np.asarray(previous_metrics["stop"]))
