"""The one place that chooses between a Pallas GPU kernel and its pure-JAX reference.

A model config's `kernels` field says which runs: "reference" (the ops in `nemojax.ops`), "pallas"
(the kernels in `pallas_kernels`; on a machine without a GPU they run in JAX's GPU interpreter, slow
but exact, for tests) or "auto" (the kernels on a GPU, the references elsewhere). The functions
here take the reference ops' arguments plus `kernels=`.

Under a device mesh (`nemojax.sharding.use_mesh`) a kernel runs inside `jax.shard_map`, split like
the Mamba mixer's activations (batch over the batch axes, heads over "tensor" when it divides the
groups), since XLA cannot partition a kernel's custom call by itself. The NVFP4 expert matmul runs per
device inside expert parallelism's own shard_map; outside it, on replicated operands.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import PartitionSpec

from nemojax.config import KERNEL_CHOICES
from nemojax.errors import ConfigError
from nemojax.ops import ssd
from nemojax.ops.grouped_matmul_nvfp4 import grouped_matmul_nvfp4
from nemojax.sharding import context_mesh, sized_spec


def resolve(kernels: str) -> str:
    """"pallas" or "reference" for a `kernels` choice; "auto" means the kernels on a GPU only."""
    if kernels not in KERNEL_CHOICES:
        raise ConfigError(f"config field `kernels`: expected one of {KERNEL_CHOICES}, got {kernels!r}")
    if kernels == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "reference"
    return kernels


def _interpret() -> bool:
    return jax.default_backend() != "gpu"


def _on_mesh(fn: Callable, args: tuple, logical: tuple, units: tuple, out_logical: tuple, out_units: tuple):
    """fn(*args), inside shard_map when a mesh with more than one device is in context."""
    mesh = context_mesh()
    if mesh is None or mesh.size == 1:
        return fn(*args)
    shape = dict(mesh.shape)
    spec = lambda axes, sizes: PartitionSpec() if axes is None else sized_spec(axes, sizes, shape)
    # check_vma=False: values a kernel computes from its (device-varying) inputs are not typed as varying.
    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec(a, u) for a, u in zip(logical, units, strict=True)),
                         out_specs=tuple(spec(a, u) for a, u in zip(out_logical, out_units, strict=True)),
                         check_vma=False)(*args)


def ssd_chunked(x_bthp, dt_bth, a_h, b_btgn, c_btgn, chunk_size: int, initial_state_bhpn=None, *,
                kernels: str = "auto", doc_bt=None) -> tuple[jax.Array, jax.Array]:
    """`nemojax.ops.ssd.ssd_chunked` or `pallas_kernels.ssd.chunked_scan`.

    The Pallas scan cannot restart the state at document starts: with packed documents (`doc_bt`)
    "auto" runs the reference scan, and an explicit "pallas" is refused (ConfigError).
    """
    choice = resolve(kernels)
    if doc_bt is not None and kernels == "pallas":
        raise ConfigError("config field `kernels`: the Pallas SSD scan does not restart the state at document "
                          "starts (packed sequences); use kernels='auto' (reference scan for packed inputs) "
                          "or 'reference'")
    if choice == "reference" or doc_bt is not None:
        return ssd.ssd_chunked(x_bthp, dt_bth, a_h, b_btgn, c_btgn, chunk_size, initial_state_bhpn, doc_bt)
    from pallas_kernels.ssd import chunked_scan

    b, h, p, n = x_bthp.shape[0], x_bthp.shape[2], x_bthp.shape[3], b_btgn.shape[3]
    if initial_state_bhpn is None:
        initial_state_bhpn = jax.numpy.zeros((b, h, p, n), jax.numpy.float32)
    scan = lambda *args: chunked_scan(*args[:5], chunk_size=chunk_size, initial_state=args[5],
                                      interpret=_interpret())
    return scan_per_shard(scan, x_bthp, dt_bth, a_h, b_btgn, c_btgn, initial_state_bhpn)


def scan_per_shard(scan: Callable, x_bthp, dt_bth, a_h, b_btgn, c_btgn, state_bhpn):
    """scan(x, dt, A, B, C, state) -> (y, final state), run per shard of the context mesh, if any."""
    b, t, _, p = x_bthp.shape
    g, n = b_btgn.shape[2:]
    heads = ("batch", None, "mamba_heads", None)
    state = ("batch", "mamba_heads", None, None)
    return _on_mesh(scan, (x_bthp, dt_bth, a_h, b_btgn, c_btgn, state_bhpn),
                    (heads, heads[:3], ("mamba_heads",), heads, heads, state),
                    ((b, t, g, p), (b, t, g), (g,), (b, t, g, n), (b, t, g, n), (b, g, p, n)),
                    (heads, state), ((b, t, g, p), (b, g, p, n)))


def ssd_step(state_bhpn, x_bhp, dt_bh, a_h, b_bgn, c_bgn, *, kernels: str = "auto") -> tuple[jax.Array, jax.Array]:
    """`nemojax.ops.ssd.ssd_step` or `pallas_kernels.ssd.state_update`."""
    if resolve(kernels) == "reference":
        return ssd.ssd_step(state_bhpn, x_bhp, dt_bh, a_h, b_bgn, c_bgn)
    from pallas_kernels.ssd import state_update

    update = lambda *args: state_update(*args, interpret=_interpret())
    return step_per_shard(update, state_bhpn, x_bhp, dt_bh, a_h, b_bgn, c_bgn)


def step_per_shard(update: Callable, state_bhpn, x_bhp, dt_bh, a_h, b_bgn, c_bgn):
    """update(state, x, dt, A, B, C) -> (y, new state), run per shard of the context mesh, if any."""
    b, _, p, n = state_bhpn.shape
    g = b_bgn.shape[1]
    state = ("batch", "mamba_heads", None, None)
    heads = ("batch", "mamba_heads", None)
    return _on_mesh(update, (state_bhpn, x_bhp, dt_bh, a_h, b_bgn, c_bgn),
                    (state, heads, heads[:2], ("mamba_heads",), heads, heads),
                    ((b, g, p, n), (b, g, p), (b, g), (g,), (b, g, n), (b, g, n)),
                    (heads, state), ((b, g, p), (b, g, p, n)))


def nvfp4_grouped_matmul(x_mk, packed_enk, block_scale_enk, global_scale_e, group_sizes_e, *,
                         kernels: str = "auto", per_shard: bool = False) -> jax.Array:
    """`nemojax.ops.grouped_matmul_nvfp4.grouped_matmul_nvfp4` or `pallas_kernels.fp4_moe.grouped_matmul`.

    `per_shard`: the caller already runs per device (expert parallelism's shard_map). Otherwise, under a
    mesh of several devices, the kernel runs on replicated operands (without an expert axis every device
    holds every expert and the rows routed to them)."""
    args = (x_mk, packed_enk, block_scale_enk, global_scale_e, group_sizes_e)
    if resolve(kernels) == "reference":
        return grouped_matmul_nvfp4(*args)
    from pallas_kernels.fp4_moe import grouped_matmul

    matmul = lambda *a: (grouped_matmul(*a, interpret=_interpret()),)
    if per_shard:
        return matmul(*args)[0]
    units = tuple(a.shape for a in args)
    return _on_mesh(matmul, args, (None,) * 5, units, (None,), ((x_mk.shape[0], packed_enk.shape[1]),))[0]
