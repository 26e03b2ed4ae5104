"""Training checkpoints: an asynchronous Orbax CheckpointManager in WORKDIR/checkpoints/<step>.

Each step directory holds four items: `variables` ({"params", "buffers"}, the part that
`nemojax.checkpoint.orbax.load_model` reads), `opt_state`, `train` (step, PRNG key, bad-step
count) and `data` (the batch iterator's position, JSON). Orbax writes a step to a temporary
directory and renames it when every item is complete, so a run killed mid-save leaves the
previous step as the latest.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

from nemojax.checkpoint.orbax import CHECKPOINTS_DIR, VARIABLES_ITEM
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
        self.manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, CHECKPOINTS_DIR)),
                                             options=options, item_names=ITEMS)

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

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
