"""The optimizer: AdamW with global-norm clipping and a warmup + (WSD | cosine | constant) schedule.

Weight decay applies to matrices only: every 1-D parameter (norm weights, conv biases, Mamba's
A_log / D / dt_bias) is left undecayed.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

SCHEDULES = ("wsd", "cosine", "constant")


def default_optimizer_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        learning_rate=3e-4,
        schedule="wsd",          # "wsd" | "cosine" | "constant" (all after a linear warmup)
        warmup_steps=100,
        decay_fraction=0.2,      # WSD: share of the steps spent decaying at the end
        min_lr_ratio=0.1,        # final learning rate / peak
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        grad_clip_norm=1.0,      # 0 disables clipping
    ))


def make_schedule(opt: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Learning rate per optimizer step: linear warmup, then the configured shape down to min_lr_ratio."""
    if opt.schedule not in SCHEDULES:
        raise ValueError(f"optimizer.schedule: expected one of {SCHEDULES}, got {opt.schedule!r}")
    peak, warmup = float(opt.learning_rate), int(min(opt.warmup_steps, max(num_steps - 1, 0)))
    floor = peak * float(opt.min_lr_ratio)
    after = max(num_steps - warmup, 1)
    ramp = optax.linear_schedule(peak / max(warmup, 1), peak, max(warmup - 1, 1))
    if opt.schedule == "cosine":
        rest = optax.cosine_decay_schedule(peak, after, alpha=float(opt.min_lr_ratio))
    elif opt.schedule == "wsd":
        decay = max(int(round(after * float(opt.decay_fraction))), 1)
        rest = optax.join_schedules([optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)],
                                    [after - decay])
    else:
        rest = optax.constant_schedule(peak)
    if warmup == 0:
        return rest
    return optax.join_schedules([ramp, rest], [warmup])


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: matrices and higher, never 1-D vectors."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(opt: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW with the schedule and the decay mask."""
    adamw = optax.adamw(make_schedule(opt, num_steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                        weight_decay=opt.weight_decay, mask=decay_mask)
    if opt.grad_clip_norm and opt.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), adamw)
    return adamw


def learning_rate(opt_state: Any, schedule: optax.Schedule) -> jax.Array:
    """The rate the next update uses: the schedule at optax's own update count (skipped steps do not count)."""
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
    (state,) = [s for s in jax.tree.leaves(opt_state, is_leaf=is_schedule) if is_schedule(s)]
    return schedule(state.count)
