"""Device meshes and the ONE table that maps logical axis names to mesh axes (data, fsdp, tensor, expert).

This module imports no model code (the model imports it; only the config, for `head_units`); placing
model variables on a mesh, which needs the model's parameter tree, lives in `nemojax.sharding.placement`.

Every parameter is created with logical axis names (see `nemojax.model.layers`); activations are
constrained at layer boundaries with `constrain`. Without a mesh in context (`use_mesh`), `constrain`
is a no-op, so the model runs unchanged on one device.

Mesh axes are Auto-typed everywhere: shardings are annotations and the compiler propagates them and
inserts the collectives. A dimension that its mesh axes do not divide stays replicated (so the two
KV heads of Nemotron 3 replicate on a tensor axis of 4 or 8).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from nemojax.config import ModelConfig
from nemojax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor", "expert")
BATCH_AXES = ("data", "fsdp", "expert")
MeshShape = dict[str, int]  # axis name -> size

# logical axis -> mesh axis (or a tuple of mesh axes, or None for replicated).
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("mamba_groups", "tensor"),
    # parameters
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mamba_proj", "tensor"),
    ("mamba_inner", "tensor"),
    ("mamba_heads", "tensor"),
    ("conv_dim", "tensor"),
    ("conv_kernel", None),
    ("mlp", "tensor"),
    ("experts", "expert"),
    ("expert_embed", "fsdp"),
    ("expert_mlp", "tensor"),
    ("latent", None),
    ("router_experts", None),
    ("mtp_concat", None),
    ("norm", None),
    ("layers", None),  # the stacking axis of scanned layers (nemojax.model.stacking)
)


def _targets(name: str | None, rules: Sequence[tuple[str, Any]]) -> tuple[str, ...]:
    target = dict(rules).get(name) if name is not None else None
    return (target,) if isinstance(target, str) else tuple(target or ())


def _spec(entries: list[tuple[str, ...]]) -> PartitionSpec:
    return PartitionSpec(*(None if not e else e[0] if len(e) == 1 else e for e in entries))


def logical_to_spec(logical_axes: Sequence[str | None], rules=LOGICAL_RULES,
                    mesh_axis_names: Sequence[str] = MESH_AXES) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec over the mesh axes present (ignoring shapes).

    A mesh axis is used at most once per tensor: a later logical axis that maps to an axis already
    taken stays replicated.
    """
    used: set[str] = set()
    entries = []
    for name in logical_axes:
        kept = tuple(a for a in _targets(name, rules) if a in mesh_axis_names and a not in used)
        used.update(kept)
        entries.append(kept)
    return _spec(entries)


def sized_spec(logical_axes: Sequence[str | None], units: Sequence[int], mesh_shape: Mapping[str, int],
               rules=LOGICAL_RULES) -> PartitionSpec:
    """Like `logical_to_spec`, but a dimension keeps only the mesh axes that divide it.

    `units[i]` is what must divide evenly along dimension i: its size, or for a fused dimension such
    as kv_heads*head_dim the number of heads, so that a head is never split. Mesh axes of size 1 are
    left out. Of several mesh axes for one dimension, each is kept while the product still divides.
    """
    used: set[str] = set()
    entries = []
    for name, unit in zip(logical_axes, units, strict=True):
        kept: tuple[str, ...] = ()
        for axis in _targets(name, rules):
            size = mesh_shape.get(axis, 1)
            if size > 1 and axis not in used and unit % (math.prod(mesh_shape[a] for a in kept) * size) == 0:
                kept += (axis,)
        used.update(kept)
        entries.append(kept)
    return _spec(entries)


def context_mesh() -> Mesh | AbstractMesh | None:
    """The mesh set by `use_mesh`: concrete outside `jax.jit` (eager code), abstract inside; None if unset
    or inside a `jax.shard_map` over all its axes (code there runs per device: nothing to constrain)."""
    abstract = jax.sharding.get_abstract_mesh()
    if abstract.empty or abstract.are_all_axes_manual:
        return None
    try:
        return jax.sharding.get_mesh()
    except ValueError:  # inside jit only the abstract mesh is available
        return abstract


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Constrain an activation's sharding when a mesh is in context; identity otherwise."""
    mesh = context_mesh()
    if mesh is None:
        return x
    spec = sized_spec(logical_axes, x.shape, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, expert: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes ("data", "fsdp", "tensor", "expert") over `devices` (default: all devices).

    The sizes must multiply to the number of devices. Axes are Auto-typed (compiler-propagated).
    """
    sizes = (data, fsdp, tensor, expert)
    devices = list(jax.devices() if devices is None else devices)
    described = ", ".join(f"{n}={s}" for n, s in zip(MESH_AXES, sizes, strict=True))
    if any(not isinstance(s, int) or s < 1 for s in sizes):
        raise ConfigError(f"mesh sizes must be positive integers, got {described}")
    if math.prod(sizes) != len(devices):
        raise ConfigError(f"mesh {described} needs {math.prod(sizes)} devices, but there are {len(devices)}; "
                          "choose sizes whose product is the device count")
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def resolve_mesh_shape(sizes: Mapping[str, int], device_count: int) -> MeshShape:
    """Mesh axis sizes with at most one -1 replaced by the devices the others leave (the default
    meshes use every device: `fsdp=-1`)."""
    sizes = {axis: int(sizes.get(axis, 1)) for axis in MESH_AXES}
    described = ", ".join(f"{n}={s}" for n, s in sizes.items())
    rest = [axis for axis, size in sizes.items() if size == -1]
    if len(rest) > 1 or any(s < 1 and s != -1 for s in sizes.values()):
        raise ConfigError(f"mesh {described}: sizes must be positive, at most one may be -1 (all other devices)")
    if rest:
        known = math.prod(s for s in sizes.values() if s != -1)
        if device_count % known:
            raise ConfigError(f"mesh {described}: {device_count} devices do not divide by {known}")
        sizes[rest[0]] = device_count // known
    return sizes


def parse_mesh(text: str) -> MeshShape:
    """`"data=2,tensor=4"` -> {"data": 2, "fsdp": 1, "tensor": 4, "expert": 1}; one size may be -1
    (resolve it with `resolve_mesh_shape`)."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES:
            raise ConfigError(f"--mesh: bad entry {item!r}; expected AXIS=SIZE with AXIS one of {MESH_AXES}")
        try:
            size = int(value)
        except ValueError:
            size = 0
        if size < 1 and size != -1:
            raise ConfigError(f"--mesh: size of {name!r} must be a positive integer or -1, got {value!r}")
        sizes[name] = size
    return sizes


@contextlib.contextmanager
def use_mesh(mesh: Mesh) -> Iterator[Mesh]:
    """Make `mesh` the context mesh: the model's `constrain` calls and expert parallelism use it.

    Trace (jit) the model inside this context.
    """
    with jax.set_mesh(mesh):
        yield mesh


def place(value: Any, sharding: NamedSharding) -> jax.Array:
    """Put one host or device array into `sharding`; each device receives only its own block.

    Works with several processes too: a process-local value must be the same full value on every
    process; a global array is resharded.
    """
    if isinstance(value, jax.Array) and (sharding.is_fully_addressable or not value.is_fully_addressable):
        return jax.device_put(value, sharding)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


# Decoding-cache leaves (see `nemojax.model.init_cache`) by their key: logical axes per dimension.
CACHE_AXES: dict[str, tuple[str | None, ...]] = {
    "k": ("batch", "kv_heads", "length", None),
    "v": ("batch", "kv_heads", "length", None),
    "valid": ("batch", "length"),
    "conv": ("batch", None, "conv_dim"),
    "ssm": ("batch", "mamba_heads", None, None),
    "index": ("batch",),
}


# Context parallelism: the sequence axis of the KV caches over the batch mesh axes their rows leave unused
# (one long request on many devices), as far as they divide the cache length.
CONTEXT_PARALLEL_RULES = tuple((name, BATCH_AXES if name == "length" else target) for name, target in LOGICAL_RULES)


def cache_axes(name: str, ndim: int) -> tuple[str | None, ...]:
    """Logical axes of a cache leaf by its key; a leaf with one more dimension is stacked over layers."""
    names = CACHE_AXES[name]
    return ("layers",) + names if ndim == len(names) + 1 else names


def head_units(config: ModelConfig) -> dict[str, int]:
    """Logical axes whose dimension fuses heads or Mamba groups: only whole ones are sharded.

    Every Mamba axis counts Mamba groups (the in_proj columns and conv channels are stored group-major,
    and B/C belong to a whole group), so all of a Mamba layer's weights, activations and caches split
    over `tensor` together when it divides the groups, and all replicate otherwise.
    """
    groups = config.n_groups
    return {"heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
            "mamba_inner": groups, "mamba_heads": groups, "mamba_proj": groups, "conv_dim": groups}


def cache_shardings(cache: Any, mesh: Mesh | AbstractMesh, units: Mapping[str, int] | None = None,
                    context_parallel: bool = False) -> Any:
    """NamedShardings for a decoding cache (arrays or ShapeDtypeStructs): rows over the batch axes,
    KV heads / conv channels / SSM heads over tensor where they divide (counted in `units`, see
    `head_units`; raw sizes if None), stacked layers replicated. `context_parallel`: the KV entries'
    sequence axis over the batch axes the rows do not use (CONTEXT_PARALLEL_RULES)."""
    rules = CONTEXT_PARALLEL_RULES if context_parallel else LOGICAL_RULES
    mesh_shape = dict(mesh.shape)
    units = units or {}

    def one(path: tuple, leaf: Any) -> NamedSharding:
        names = cache_axes(path[-1].key, len(leaf.shape))
        dims = [units.get(n, d) if n is not None else d for n, d in zip(names, leaf.shape, strict=True)]
        return NamedSharding(mesh, sized_spec(names, dims, mesh_shape, rules))

    return jax.tree_util.tree_map_with_path(one, cache)


def batch_sharding(mesh: Mesh, batch_size: int | None = None) -> NamedSharding:
    """Sharding of [B, T] inputs: rows over the batch axes (those that divide `batch_size`, if given)."""
    if batch_size is None:
        return NamedSharding(mesh, logical_to_spec(("batch", "length"), mesh_axis_names=mesh.axis_names))
    return NamedSharding(mesh, sized_spec(("batch", "length"), (batch_size, 1), dict(mesh.shape)))
