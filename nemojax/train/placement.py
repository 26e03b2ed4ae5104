"""Where training arrays live: one device, or a mesh built from the run config's `mesh` block.

On a mesh, params and buffers follow the logical-axis rules (`nemojax.sharding`), the optimizer's
per-parameter moments follow their parameter, scalars are replicated, and each process's slice of
the batch becomes one global array sharded over the batch axes.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nemojax.config import ModelConfig
from nemojax.distributed import global_batch, local_batch_rows
from nemojax.errors import ConfigError
from nemojax.sharding import MESH_AXES, make_mesh, resolve_mesh_shape
from nemojax.sharding.placement import variable_shardings


def build_mesh(mesh_cfg: ml_collections.ConfigDict) -> Mesh | None:
    """The run's mesh, or None for single-device training (every size 1 on a single process).

    One size may be -1: it takes the devices the others leave (the default, fsdp=-1, uses them all).
    """
    sizes = resolve_mesh_shape({axis: int(mesh_cfg[axis]) for axis in MESH_AXES}, jax.device_count())
    if math.prod(sizes.values()) == 1 and jax.process_count() == 1:
        return None
    return make_mesh(**sizes)


def state_shardings(abstract_state: dict, config: ModelConfig, tx: optax.GradientTransformation,
                    mesh: Mesh | None) -> dict:
    """A sharding for every leaf of the train state (all on the first device without a mesh)."""
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: device, abstract_state)
    replicated = NamedSharding(mesh, PartitionSpec())
    variables = variable_shardings(config, mesh)
    opt_state = optax.tree_map_params(tx, lambda _, sharding: sharding, abstract_state["opt_state"],
                                      variables["params"], transform_non_params=lambda _: replicated)
    out = jax.tree.map(lambda _: replicated, abstract_state)
    # A model without MoE layers has no "buffers" collection (the state holds an empty dict for it).
    return dict(out, params=variables["params"], buffers=variables.get("buffers", {}), opt_state=opt_state)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that carry their target sharding (what Orbax restores onto)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def process_slice(mesh: Mesh | None, global_batch_size: int) -> dict[str, int]:
    """`process_index` / `process_count` for the batch iterator: which equal share of each global batch
    this process loads (the rows its devices hold on the mesh)."""
    if mesh is None:
        return {"process_index": 0, "process_count": 1}
    rows = local_batch_rows(mesh, global_batch_size)
    size = rows.stop - rows.start
    if global_batch_size % size or rows.start % size:
        raise ConfigError(f"batch_size {global_batch_size} does not split into equal per-process shares on "
                          f"mesh {dict(mesh.shape)}")
    return {"process_index": rows.start // size, "process_count": global_batch_size // size}


def put_batch(local_batch: dict[str, np.ndarray], mesh: Mesh | None, global_batch_size: int) -> dict[str, jax.Array]:
    """This process's rows as device arrays; on a mesh, one global array per field over all processes."""
    if mesh is None:
        return jax.device_put(local_batch)
    return {k: global_batch(mesh, v, global_batch_size) for k, v in local_batch.items()}
