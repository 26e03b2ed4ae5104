"""Training checkpoints: an asynchronous Orbax CheckpointManager in WORKDIR/checkpoints/<step>.

Each step directory holds four items: `variables` ({"params", "buffers"}, the part that
`nemojax.checkpoint.orbax.load_model` reads), `opt_state`, `train` (step, PRNG key, bad-step
count) and `data` (the batch iterator's position, JSON). Orbax writes a step to a temporary
directory and renames it when every item is complete, so a run killed mid-save leaves the
previous step as the latest. A finished step that still cannot be restored (a damaged disk, a partial
copy) is reported by its number, moved aside to `<step>.unreadable`, and the step before it is used.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

from nemojax.checkpoint.orbax import CHECKPOINTS_DIR, VARIABLES_ITEM, out_of_memory
from nemojax.errors import CheckpointError, NemojaxWarning
from nemojax.train.step import TrainState

ITEMS = (VARIABLES_ITEM, "opt_state", "train", "data")
_TRAIN_KEYS = ("step", "rng", "bad_steps")


def _split(state: TrainState) -> tuple[dict, Any, dict]:
    return ({"params": state["params"], "buffers": state["buffers"]}, state["opt_state"],
            {k: state[k] for k in _TRAIN_KEYS})


class TrainCheckpoints:
    """Save and restore (train state, data iterator state), keeping the newest `keep` steps."""

    def __init__(self, workdir: str, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                               cleanup_tmp_directories=True)
        self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINTS_DIR))
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_state: dict) -> None:
        """Start an asynchronous save (the arrays are copied off the device before this returns)."""
        variables, opt_state, train = _split(state)
        self.manager.save(step, args=ocp.args.Composite(
            variables=ocp.args.StandardSave(variables),
            opt_state=ocp.args.StandardSave(opt_state),
            train=ocp.args.StandardSave(train),
            data=ocp.args.JsonSave(data_state),
        ))

    def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict]:
        """State restored onto the shardings carried by `abstract_state` (ShapeDtypeStructs), and the data state."""
        variables, opt_state, train = _split(abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            variables=ocp.args.StandardRestore(variables),
            opt_state=ocp.args.StandardRestore(opt_state),
            train=ocp.args.StandardRestore(train),
            data=ocp.args.JsonRestore(),
        ))
        state = dict(restored[VARIABLES_ITEM], opt_state=restored["opt_state"], **restored["train"])
        return state, restored["data"]

    def restore_newest(self, abstract_state: TrainState) -> tuple[int, TrainState, dict] | None:
        """(step, state, data state) of the newest step that restores, None when there is no checkpoint.

        A step that fails is reported by number, moved aside, and the previous one tried; CheckpointError
        when none restores.
        """
        failures = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, data_state = self.restore(step, abstract_state)
            except Exception as e:  # whatever the reader raises, this step cannot be used ...
                if out_of_memory(e):  # ... unless the machine, not the checkpoint, is at fault
                    raise
                reason = f"{type(e).__name__}: {str(e)[:300]}"
                failures.append(f"step {step} ({reason})")
                self._set_aside(step)
                warnings.warn(f"checkpoint step {step} in {self.directory} cannot be restored ({reason}); moved "
                              f"it to {step}.unreadable and trying the previous step", NemojaxWarning, stacklevel=2)
                continue
            return step, state, data_state
        if failures:
            raise CheckpointError(f"no checkpoint in {self.directory} can be restored: " + "; ".join(failures))
        return None

    def _set_aside(self, step: int) -> None:
        """Rename an unreadable step (process 0; every process waits), so later saves can reuse its number."""
        if jax.process_index() == 0:
            path = os.path.join(self.directory, str(step))
            aside, n = f"{path}.unreadable", 1
            while os.path.exists(aside):
                aside, n = f"{path}.unreadable.{n}", n + 1
            try:
                os.replace(path, aside)
            except OSError as e:
                raise CheckpointError(f"checkpoint step {step} cannot be restored and cannot be moved aside to "
                                      f"{aside} ({e.strerror or e}); move or delete {path} and rerun") from e
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"nemojax: checkpoint {step} set aside")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
