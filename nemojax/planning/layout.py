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

from nemojax.errors import ConfigError
from nemojax.sharding import MESH_AXES, make_mesh, sized_spec


def mesh_devices(mesh_shape: Mapping[str, int]) -> int:
    return math.prod(mesh_shape.values())


def mesh_text(mesh_shape: Mapping[str, int]) -> str:
    """The non-trivial axes, e.g. "tensor=4,expert=2" (or "single device")."""
    used = [f"{a}={s}" for a, s in mesh_shape.items() if s > 1]
    return ",".join(used) or "single device"


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
