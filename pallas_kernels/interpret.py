"""Running Mosaic GPU kernels on CPU: the one place that touches JAX's GPU interpret mode.

Mosaic GPU kernels (`plgpu.kernel`) run on a CPU when given `interpret=InterpretGPUParams()`: JAX
then simulates shared memory, barriers, TMA copies and wgmma in Python callbacks. The parameters
class is private in jax 0.10/0.11 (`jax._src.pallas.mosaic_gpu.interpret`) and public as
`plgpu.InterpretGPUParams` from jax 0.12; this module finds whichever exists so that kernels and
tests never import a private module themselves.

After an exception inside an interpreted kernel the simulator keeps stale state and the next
interpreted kernel can hang; `run_interpreted` resets it whenever a call fails.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from jax.experimental.pallas import mosaic_gpu as plgpu

T = TypeVar("T")

try:  # jax >= 0.12: public
    _PARAMS_CLASS = plgpu.InterpretGPUParams
except AttributeError:  # jax 0.10 / 0.11: private
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as _PARAMS_CLASS


def _reset_state() -> None:
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    interpret_pallas_call.reset_gpu_interpret_mode_state()


def interpret_params(interpret: bool) -> Any:
    """The `interpret=` argument for `plgpu.kernel`: simulator parameters, or None to compile for a GPU."""
    return _PARAMS_CLASS() if interpret else None


def run_interpreted(fn: Callable[..., T], *args: Any, interpret: bool, **kwargs: Any) -> T:
    """Calls `fn(*args, interpret=interpret, **kwargs)`; when interpreting, resets the simulator if it raises."""
    if not interpret:
        return fn(*args, interpret=False, **kwargs)
    try:
        return fn(*args, interpret=True, **kwargs)
    except BaseException:
        _reset_state()
        raise
