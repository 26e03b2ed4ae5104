"""nemojax's own checkpoint format: a model config plus its variables, stored with Orbax.

Three directory shapes hold a model, and `load_model` reads all of them:
- a model directory: `config.json` ({"format": "nemojax", "model": ModelConfig.to_dict()}) and
  `variables/` (an Orbax tree {"params", "buffers"} in the model's in-memory layout: per layer, or
  stacked per layer kind when `model.scan_layers`), written by `save_model`;
- a training workdir: `config.json` (same "model" key, plus the run config) and
  `checkpoints/<step>/variables/`: the latest finalised step is read, or, when it cannot be restored,
  the newest one before it that can (reported with a `NemojaxWarning` naming the step);
- one training step directory `WORKDIR/checkpoints/<step>`.
Orbax writes each checkpoint to a temporary directory and renames it when complete, so a
half-written checkpoint is never found here.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

from nemojax.config import ModelConfig, dtype_name
from nemojax.config.nemojax_dir import (  # noqa: F401  (re-exported: the checkpoint API)
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    LAYOUT_VERSION,
    READABLE_VERSIONS,
    config_dir,
    is_nemojax_dir,
    read_config,
    read_model_config,
    write_config,
)
from nemojax.errors import CheckpointError, NemojaxWarning
from nemojax.model import NemotronH, abstract_variables
from nemojax.model.stacking import to_layout
from nemojax.sharding.placement import variable_shardings

VARIABLES_ITEM = "variables"

def finished_steps(checkpoints_dir: str) -> list[int]:
    """The finalised steps under `checkpoints_dir`, newest first (temporary, unfinished saves are ignored)."""
    if not os.path.isdir(checkpoints_dir):
        return []
    return sorted((int(name) for name in os.listdir(checkpoints_dir)
                   if name.isdigit() and os.path.isdir(os.path.join(checkpoints_dir, name, VARIABLES_ITEM))),
                  reverse=True)


def latest_step(checkpoints_dir: str) -> int | None:
    """The newest finalised step under `checkpoints_dir`."""
    steps = finished_steps(checkpoints_dir)
    return steps[0] if steps else None


def variables_paths(directory: str) -> list[str]:
    """The `variables/` Orbax trees to try, in order: a model or step directory's own, or a workdir's
    finished steps, newest first."""
    directory = os.path.abspath(os.fspath(directory))
    direct = os.path.join(directory, VARIABLES_ITEM)
    if os.path.isdir(direct):
        return [direct]
    steps = finished_steps(os.path.join(directory, CHECKPOINTS_DIR))
    if not steps:
        raise CheckpointError(f"{directory}: neither a {VARIABLES_ITEM}/ tree nor a finished checkpoint under "
                              f"{CHECKPOINTS_DIR}/")
    return [os.path.join(directory, CHECKPOINTS_DIR, str(step), VARIABLES_ITEM) for step in steps]


def out_of_memory(error: BaseException) -> bool:
    """Whether a restore failed for lack of memory (the checkpoint itself may be fine)."""
    return isinstance(error, MemoryError) or "RESOURCE_EXHAUSTED" in str(error) or "Out of memory" in str(error)


def abstract_target(config: ModelConfig, shardings: Any | None = None) -> dict:
    """ShapeDtypeStructs of the variables carrying the shardings to restore onto (one device by default)."""
    abstract = abstract_variables(config)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def save_model(path: str | os.PathLike, config: ModelConfig, variables: dict) -> None:
    """Write a model directory: config.json and the {"params", "buffers"} tree under variables/."""
    directory = os.path.abspath(os.fspath(path))
    write_config(directory, config)
    tree = {"params": variables["params"], "buffers": variables.get("buffers", {})}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(directory, VARIABLES_ITEM), tree, force=True)
        checkpointer.wait_until_finished()


def load_model(path: str | os.PathLike, dtype: str | None = None, param_dtype: str | None = None,
               mesh: jax.sharding.Mesh | None = None, scan_layers: bool | None = None) -> tuple[NemotronH, dict]:
    """Load (model, variables) from a model directory, a training workdir or a step directory.

    `dtype` / `param_dtype` override the stored compute and parameter dtypes (values are cast while
    restoring); with `mesh`, each variable lands sharded by the logical-axis rules. `scan_layers`
    (None: as stored) other than the stored layout converts the variables after restoring (both
    layouts are in device memory for a moment).
    """
    directory = os.path.abspath(os.fspath(path))
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    overrides = {k: dtype_name(v) for k, v in (("compute_dtype", dtype), ("param_dtype", param_dtype)) if v is not None}
    config = read_model_config(directory).replace(**overrides)
    shardings = None
    if mesh is not None:
        shardings = variable_shardings(config, mesh)
    target = {"buffers": {}, **abstract_target(config, shardings)}  # a model without MoE layers has no buffers
    failures = []
    for source in variables_paths(directory):
        try:
            with ocp.StandardCheckpointer() as checkpointer:
                restored = checkpointer.restore(source, target)
        except Exception as e:  # whatever the reader raises, this tree cannot be used ...
            if out_of_memory(e):  # ... unless the machine, not the checkpoint, is at fault
                raise
            failures.append(f"{source} ({type(e).__name__}: {str(e)[:300]})")
            continue
        if failures:
            warnings.warn(f"skipped unreadable checkpoints: {'; '.join(failures)}; using {source}", NemojaxWarning,
                          stacklevel=2)
        break
    else:
        raise CheckpointError("cannot restore the model variables: " + "; ".join(failures))
    variables = {"params": restored["params"], "buffers": restored["buffers"]}
    if scan_layers is not None and scan_layers != config.scan_layers:
        config = config.replace(scan_layers=scan_layers)
        out = {} if mesh is None else {"out_shardings": {"buffers": {}, **variable_shardings(config, mesh)}}
        variables = jax.jit(lambda v: to_layout(config, v, scan_layers), **out)(variables)
    return NemotronH(config), variables
