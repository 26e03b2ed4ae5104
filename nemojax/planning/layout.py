"""Where each array lands on a mesh: build the mesh (or a device-free abstract
one) and give arrays the shardings of `nemojax.sharding` (the one rule table, `sized_spec`).

Byte counts only need the axis sizes, so they use an `AbstractMesh` and work for any mesh. A mesh
axis that does not divide a dimension leaves it replicated (JAX shards evenly only): this is how
the two KV heads replicate when `tensor` > 2.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding

from nemojax.config import ModelConfig
from nemojax.errors import ConfigError
from nemojax.sharding import MESH_AXES, make_mesh, sized_spec

MAX_DEVICES = 1 << 20
MAX_COMPILED_DEVICES = 4096  # the activation compiles simulate one CPU device per mesh device


def mesh_devices(mesh_shape: Mapping[str, int]) -> int:
    return math.prod(mesh_shape.values())


def mesh_text(mesh_shape: Mapping[str, int]) -> str:
    """The non-trivial axes, e.g. "tensor=4,expert=2" (or "single device")."""
    used = [f"{a}={s}" for a, s in mesh_shape.items() if s > 1]
    return ",".join(used) or "single device"


def check_mesh_for_model(mesh_shape: Mapping[str, int], config: ModelConfig, batch: int, compile: bool) -> None:
    """ConfigError when an axis has more shards than the model (or batch) has units to split, or the mesh
    is too large to plan; checked before any device is simulated."""
    limits = {
        "tensor": (max(config.num_attention_heads, config.mamba_num_heads), "attention or Mamba heads"),
        "expert": (config.n_routed_experts, "routed experts"),
        "fsdp": (config.hidden_size, "hidden units (fsdp splits the hidden dimension)"),
        "data": (batch, "sequences in --batch (data splits only the batch)"),
    }
    for axis, (units, what) in limits.items():
        if mesh_shape[axis] > units:
            raise ConfigError(f"--mesh {axis}={mesh_shape[axis]}: the model has only {units} {what}; "
                              f"more {axis} shards than that cannot be used")
    devices = mesh_devices(mesh_shape)
    if devices > MAX_DEVICES:
        raise ConfigError(f"--mesh {mesh_text(mesh_shape)}: {devices} devices; plans go up to {MAX_DEVICES}")
    if compile and devices > MAX_COMPILED_DEVICES:
        raise ConfigError(f"--mesh {mesh_text(mesh_shape)}: {devices} devices; the activation compiles simulate "
                          f"one CPU device each and go up to {MAX_COMPILED_DEVICES}: add --no-compile")


def use_fake_cpu_devices(count: int) -> None:
    """Plan on `count` simulated CPU devices (the supported form of XLA's
    --xla_force_host_platform_device_count); must run before JAX starts its backend."""
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", count)


def abstract_mesh(mesh_shape: Mapping[str, int]) -> AbstractMesh:
    """A device-free mesh: enough to compute every sharding and per-device shape."""
    return AbstractMesh(tuple(mesh_shape[a] for a in MESH_AXES), MESH_AXES,
                        axis_types=(AxisType.Auto,) * len(MESH_AXES))


def build_mesh(mesh_shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """`nemojax.make_mesh` over the first N of `devices` (default: all devices)."""
    needed = mesh_devices(mesh_shape)
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < needed:
        raise ConfigError(f"mesh {mesh_text(mesh_shape)} needs {needed} devices; {len(devices)} are available")
    return make_mesh(**{a: mesh_shape[a] for a in MESH_AXES}, devices=devices[:needed])


def array_sharding(mesh: Mesh | AbstractMesh, shape: Sequence[int],
                   logical_axes: Sequence[str | None]) -> NamedSharding:
    """The sharding the rule table gives an array (mesh axes that do not divide a dimension dropped)."""
    names = tuple(logical_axes) + (None,) * (len(shape) - len(logical_axes))
    return NamedSharding(mesh, sized_spec(names, tuple(shape), dict(mesh.shape)))


def local_bytes(leaf: jax.ShapeDtypeStruct, sharding: NamedSharding) -> int:
    """Bytes one device holds of `leaf` under `sharding`."""
    return math.prod(sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
