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

import json
import os
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

from nemojax.config import ModelConfig, dtype_name, from_dict
from nemojax.errors import CheckpointError, NemojaxWarning
from nemojax.model import NemotronH, abstract_variables
from nemojax.model.stacking import to_layout
from nemojax.sharding.placement import variable_shardings

CONFIG_FILE = "config.json"
VARIABLES_ITEM = "variables"
CHECKPOINTS_DIR = "checkpoints"
# The in-memory variable layout the checkpoint was written in; 2: Mamba in_proj / conv1d group-major;
# 3: as 2, and the main stack per layer or stacked per kind as the model config's `scan_layers` says
# (version 2 files are always per layer and still read).
LAYOUT_VERSION = 3
READABLE_VERSIONS = (2, 3)


def write_config(directory: str, config: ModelConfig, **extra: Any) -> None:
    """Write `config.json` with the model config (and any extra sections, such as the run config)."""
    os.makedirs(directory, exist_ok=True)
    payload = {"format": "nemojax", "layout_version": LAYOUT_VERSION, "model": config.to_dict(), **extra}
    tmp = os.path.join(directory, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, os.path.join(directory, CONFIG_FILE))


def read_config(directory: str) -> dict[str, Any]:
    """The parsed `config.json` of a nemojax directory; CheckpointError when absent, not ours, or written
    in another variable layout."""
    payload = _read_payload(directory)
    if payload.get("layout_version", 1) == 2:  # written before scanned layers: per-layer variables
        payload["model"] = dict(payload["model"], scan_layers=False)
    if payload.get("layout_version", 1) not in READABLE_VERSIONS:
        raise CheckpointError(f"{os.path.join(directory, CONFIG_FILE)}: variables in layout version "
                              f"{payload.get('layout_version', 1)}, this nemojax reads versions {READABLE_VERSIONS} "
                              "(Mamba in_proj/conv1d stored group-major); convert the model again from its "
                              "Hugging Face checkpoint")
    return payload


def _read_payload(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, CONFIG_FILE)
    try:
        with open(path) as f:
            payload = json.load(f)
    except FileNotFoundError as e:
        raise CheckpointError(f"{directory}: no {CONFIG_FILE}") from e
    except IsADirectoryError as e:
        raise CheckpointError(f"{path} is a directory, not a config file") from e
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != "nemojax" or not isinstance(payload.get("model"),
                                                                                              dict):
        raise CheckpointError(f"{path} is not a nemojax config (no \"format\": \"nemojax\" and \"model\")")
    return payload


def is_nemojax_dir(directory: str) -> bool:
    """True when `directory` (or, for a step directory, its workdir) carries a nemojax config.json."""
    try:
        _read_payload(config_dir(directory))
        return True
    except CheckpointError:
        return False


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


def config_dir(directory: str) -> str:
    """Where config.json lives: the directory itself, or the workdir above a step directory."""
    parent = os.path.dirname(os.path.normpath(directory))
    if os.path.basename(os.path.normpath(directory)).isdigit() and os.path.basename(parent) == CHECKPOINTS_DIR:
        return os.path.dirname(parent)
    return directory


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


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a model directory, a training workdir or a step directory (nothing else is read)."""
    directory = os.path.abspath(os.fspath(path))
    return from_dict(read_config(config_dir(directory))["model"])


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
