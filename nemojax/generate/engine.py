"""The generation engine: one model's variables, its compiled device programs, and `generate()`.

The device programs (`nemojax.generate.programs`: chunked prefill into decode slots, decode segments
in a `lax.while_loop`, plain or MTP-speculative) are compiled ahead of time per argument shapes and
their compile time kept apart, so the timings in `EngineStats` are pure generation. Host scheduling
(continuous batching over the slots) lives in `nemojax.generate.scheduler`; `Engine.generate(requests)`
serves a list of requests through one scheduler and returns when all are done.

On a mesh (`mesh=`), the variables and caches are sharded by the logical-axis rules (cache rows over
the batch axes, KV / SSM heads over `tensor`, experts over `expert`), the programs are traced in the
mesh context, and host values travel as replicated global arrays: with several processes
(`jax.distributed`) every process runs the same schedule and reads the same replicated results. On CPU
devices (threads of one process) a variable block that several devices hold is one buffer in memory
(`share_host_replicas`), so a mesh that splits only the rows reads the weights once, not once per device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nemojax import sharding
from nemojax.errors import ConfigError
from nemojax.generate.prefix_cache import PrefixCache
from nemojax.generate.programs import Programs
from nemojax.generate.requests import Request
from nemojax.generate.scheduler import Scheduler, Ticket
from nemojax.model import NemotronH
from nemojax.sharding.placement import shard_variables, share_host_replicas

DEFAULT_PREFIX_BLOCK = 64  # tokens per prefix-cache block


@dataclasses.dataclass
class Completion:
    """Generated ids (prompt excluded, cut after the first end-of-sequence id) and why generation ended."""

    output_ids: list[int]
    finish_reason: str  # "stop" (an end-of-sequence id or a stop check) | "length"


@dataclasses.dataclass
class EngineStats:
    prompts: int = 0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0
    compile_seconds: float = 0.0
    verify_steps: int = 0  # speculative: row-steps that verified K drafts
    accepted_drafts: int = 0
    cached_tokens: int = 0  # prompt tokens restored from the prefix cache (not in prefill_tokens)
    first_tokens: int = 0  # requests that produced a first token
    ttft_seconds: float = 0.0  # summed over those requests: submission to first token read back


GENERATE_SEGMENT_STEPS = 32  # `generate` reads tokens back only between segments: each costs a dispatch


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class Engine:
    """Generation for one model; `num_draft_tokens` > 0 turns on MTP speculative decoding.

    `generate` uses at least `min_batch` slots (a power of two: one compiled shape serves every smaller
    batch). `top_logprobs`: the most alternatives per token a request may ask for (0: log-probabilities
    of the chosen tokens only). With `mesh`, generation runs sharded over it (variables are placed on
    it if they are not already; blocks repeated over CPU devices become one fresh shared buffer, never the
    caller's). `prefix_cache_bytes` > 0 keeps a prefix cache of that many bytes
    (`nemojax.generate.prefix_cache`) in blocks of `prefix_block_size` tokens, shared by every scheduler
    of the engine. `context_parallel` shards the KV caches along the sequence over the batch mesh axes the
    rows leave unused (long requests on many devices).
    """

    def __init__(self, model: NemotronH, variables: dict, *, eos_ids: Sequence[int], think_end_id: int | None = None,
                 prefill_chunk: int = 256, num_draft_tokens: int = 0, min_batch: int = 1, top_logprobs: int = 0,
                 mesh: Mesh | None = None, prefix_cache_bytes: int = 0,
                 prefix_block_size: int = DEFAULT_PREFIX_BLOCK, context_parallel: bool = False) -> None:
        config = model.config
        if config.remat != "none":
            config = config.replace(remat="none")
            model = NemotronH(config)
        if num_draft_tokens and not config.has_mtp:
            raise ConfigError("--speculative mtp needs a checkpoint with an MTP block (num_nextn_predict_layers > 0)")
        if num_draft_tokens and "mamba" in config.mtp_layer_types:
            raise ConfigError("MTP speculation supports attention/MoE/MLP MTP layers only (no Mamba in the MTP block)")
        if mesh is not None:  # on CPU devices (threads of this process) one copy of what they all hold
            variables = share_host_replicas(shard_variables(variables, config, mesh))
        self.model, self.config, self.variables, self.mesh = model, config, variables, mesh
        self.eos_ids = tuple(int(i) for i in eos_ids)
        self.think_end_id = -1 if think_end_id is None else int(think_end_id)
        self.prefill_chunk = prefill_chunk
        self.min_batch = min_batch
        self.k = num_draft_tokens
        self.programs = Programs(model, self.eos_ids, self.think_end_id, num_draft_tokens, top_logprobs, mesh,
                                 context_parallel)
        self.stats = EngineStats()
        self.prefix_cache = (PrefixCache(prefix_cache_bytes, prefix_block_size, with_next_token=self.k > 0)
                             if prefix_cache_bytes > 0 else None)
        self._executables: dict[Any, Any] = {}

    def scheduler(self, slots: int, max_len: int, segment_steps: int = 16, prefill_rows: int | None = None
                  ) -> Scheduler:
        """A continuous-batching scheduler over `slots` decode slots of up to `max_len` positions."""
        return Scheduler(self, slots, max_len, segment_steps, prefill_rows)

    def generate(self, requests: Sequence[Request], stop_check: Callable[[int, list[int]], bool] | None = None,
                 segment_steps: int | None = None) -> list[Completion]:
        """Serve `requests` together (one slot each) and return their completions in order.
        `stop_check(i, ids)` is asked between segments (of `segment_steps` decoding steps, default
        GENERATE_SEGMENT_STEPS) whether request i should stop."""
        slots = max(self.min_batch, next_pow2(len(requests)))
        max_len = max(len(r.prompt_ids) + r.max_new_tokens for r in requests)
        steps = segment_steps or GENERATE_SEGMENT_STEPS
        scheduler = self.scheduler(slots, max_len, steps)
        tickets = [scheduler.submit(Ticket(r, None if stop_check is None else functools.partial(stop_check, i)))
                   for i, r in enumerate(requests)]
        scheduler.run_until_idle()
        return [Completion(t.output_ids, t.finish_reason) for t in tickets]

    # ---------------------------------------------------------------- compiled programs
    def replicate(self, value: Any) -> Any:
        """Host values as device arrays: without a mesh unchanged (jit takes numpy); on a mesh replicated
        global arrays (every process holds the same prompts and settings)."""
        if self.mesh is None:
            return value
        replicated = NamedSharding(self.mesh, PartitionSpec())
        return jax.tree.map(lambda v: sharding.place(np.asarray(v), replicated), value)

    @staticmethod
    def partial(fn: Callable, **static: Any) -> functools.partial:
        """`fn` with static keyword settings (each combination compiles its own program)."""
        return functools.partial(fn, **static)

    def run(self, name: str, fn: Callable, *args: Any) -> Any:
        """Run `fn` jitted, compiling once per (name, static settings, argument shapes and shardings) and
        counting compile time apart. On a mesh the program is traced in its context. The slot state (the
        argument after the variables) is donated to programs that return a new one."""
        key = (name, tuple(sorted(fn.keywords.items())) if isinstance(fn, functools.partial) else (),
               jax.tree.structure(args), tuple(_signature(a) for a in jax.tree.leaves(args)))
        if key not in self._executables:
            static = tuple(i for i, a in enumerate(args) if isinstance(a, int) and not isinstance(a, bool))
            begin = time.perf_counter()
            jitted = jax.jit(fn, static_argnums=static, donate_argnums=_DONATED.get(name, ()))
            with contextlib.nullcontext() if self.mesh is None else sharding.use_mesh(self.mesh):
                self._executables[key] = (jitted.lower(*args).compile(), static)
            self.stats.compile_seconds += time.perf_counter() - begin
        executable, static = self._executables[key]
        return executable(*(a for i, a in enumerate(args) if i not in static))


_DONATED = {"prefill": (1,), "segment": (1,), "release": (0,), "drain": (0,), "put_span": (0,), "put_states": (0,)}


def _signature(leaf: Any) -> Any:
    """What decides a compiled program: shape, dtype (and sharding) of arrays, the value of Python ints."""
    if isinstance(leaf, jax.Array):
        return leaf.shape, str(leaf.dtype), leaf.sharding
    if hasattr(leaf, "dtype"):
        return np.shape(leaf), str(leaf.dtype)
    return type(leaf).__name__, leaf
