"""Helpers shared by the quantizers: input checks and a division XLA may not rewrite."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nemojax.errors import QuantizationError


def check_floating_finite(w: jax.Array, name: str, fmt: str) -> None:
    """QuantizationError unless `w` is floating and, where its values are known (not under tracing), finite."""
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise QuantizationError(f"{name}: dtype {w.dtype} is not a floating type")
    try:
        finite = bool(jnp.all(jnp.isfinite(w)))
    except jax.errors.ConcretizationTypeError:
        return
    if not finite:
        raise QuantizationError(f"{name}: {int(jnp.sum(~jnp.isfinite(w)))} NaN or Inf values cannot be "
                                f"{fmt}-quantized")


def exact_div(a: jax.Array, b: jax.Array | float) -> jax.Array:
    """a / b correctly rounded, as ModelOpt's quantizers compute it.

    XLA rewrites a division by a broadcast value into a multiplication by its reciprocal, which is off
    by one unit in the last place for about a fifth of float32 inputs; quantised bytes would then differ
    from the published formula's. The barrier hides the broadcast from that rewrite.
    """
    a = jnp.asarray(a)
    shape = jnp.broadcast_shapes(a.shape, jnp.shape(b))
    divisor = jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(b, a.dtype), shape))
    return jax.lax.div(jnp.broadcast_to(a, shape), divisor)
