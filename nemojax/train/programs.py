"""The jitted programs of a run (train step, eval step, state initialisers) with their shardings.

They depend only on the model config, the optimisation settings and the mesh, so they are built
once per process for each combination: a second run in the same process (a notebook, a test, a
resumed session) reuses the compiled executables instead of compiling again.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nemojax.config import ModelConfig
from nemojax.model import NemotronH, init_variables
from nemojax.train.optimizer import make_optimizer, make_schedule
from nemojax.train.placement import state_shardings
from nemojax.train.step import TrainState, init_state, make_eval_step, make_train_step

# The run-config fields the programs depend on (data, logging and checkpoint fields do not matter).
_PROGRAM_FIELDS = ("seed", "num_steps", "grad_accum_steps", "mtp_loss_weight", "aux_loss_weight",
                   "bias_update_rate", "loss_chunk_tokens", "optimizer")


class Programs(NamedTuple):
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_state: TrainState          # ShapeDtypeStructs
    shardings: TrainState               # one sharding per state leaf
    train_step: Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]  # donates the state
    eval_step: Callable[[TrainState, dict], Any]
    fresh_state: Callable[[], TrainState]
    state_from: Callable[[dict], TrainState]  # a fresh optimizer around given variables


def build_programs(cfg: ml_collections.ConfigDict, config: ModelConfig, mesh: Mesh | None) -> Programs:
    """The programs for this run (cached per process by model config, settings and mesh)."""
    settings = {k: cfg[k].to_dict() if isinstance(cfg[k], ml_collections.ConfigDict) else cfg[k]
                for k in _PROGRAM_FIELDS}
    return _build(config, json.dumps(settings, sort_keys=True), mesh)


@functools.lru_cache(maxsize=4)
def _build(config: ModelConfig, settings_json: str, mesh: Mesh | None) -> Programs:
    settings = ml_collections.ConfigDict(json.loads(settings_json))
    seed, num_steps = int(settings.seed), int(settings.num_steps)
    tx, schedule = make_optimizer(settings.optimizer, num_steps), make_schedule(settings.optimizer, num_steps)
    model = NemotronH(config)

    def fresh() -> TrainState:
        return init_state(init_variables(config, jax.random.key(seed)), tx, seed)

    abstract = jax.eval_shape(fresh)
    shardings = state_shardings(abstract, config, tx, mesh)
    metrics_sharding = {} if mesh is None else {"out_shardings": (shardings, NamedSharding(mesh, PartitionSpec()))}
    return Programs(
        tx=tx,
        schedule=schedule,
        abstract_state=abstract,
        shardings=shardings,
        train_step=jax.jit(_with_stop_votes(make_train_step(model, tx, settings, schedule)), donate_argnums=0,
                           **metrics_sharding),
        eval_step=jax.jit(make_eval_step(model, int(settings.loss_chunk_tokens))),
        fresh_state=jax.jit(fresh, out_shardings=shardings),
        state_from=jax.jit(lambda variables: init_state(variables, tx, seed), out_shardings=shardings),
    )


def _with_stop_votes(step: Callable) -> Callable:
    """The train step taking the processes' stop votes (one bool per device) and returning `stop` = any
    vote in its metrics: the agreement runs inside the step's program, ordered with its collectives."""

    def step_with_votes(state: TrainState, batch: dict, votes: jax.Array) -> tuple[TrainState, dict]:
        state, metrics = step(state, batch)
        return state, {**metrics, "stop": jnp.any(votes)}

    return step_with_votes
