"""The generation engine: chunked prefill and an on-device decode loop over preallocated caches.

`Engine.generate(requests)` serves one batch. Prompts are left-padded to a bucketed length (exact:
no positional encoding, Mamba sees dt = 0 on padding) and the batch to a power of two, so a handful
of shapes are ever compiled. The prompt goes through the cache in chunks; decoding then runs in a
`lax.while_loop` (plain: one token per step; speculative: MTP drafts + one verifying forward per
step) until every row has finished or a segment ends; between segments the caller may stop rows
(stop strings). Executables are compiled ahead of time and their compile time kept apart, so the
timings in `EngineStats` are pure generation.

On a mesh (`mesh=`), the variables and caches are sharded by the logical-axis rules (cache rows over
the batch axes, KV / SSM heads over `tensor`, experts over `expert`), the programs are traced in the
mesh context, and host values travel as replicated global arrays: with several processes
(`jax.distributed`) every process runs the same batches and reads the same replicated results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nemojax import sharding
from nemojax.errors import ConfigError
from nemojax.generate import caches, sampling, speculative
from nemojax.generate.requests import Request
from nemojax.model import NemotronH, init_cache
from nemojax.sharding.placement import shard_variables

State = dict[str, Any]
MIN_PROMPT_BUCKET = 16
MIN_CACHE_LEN = 64  # short requests share one cache shape (and one compiled program)


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


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def prompt_bucket(length: int, chunk: int) -> int:
    """Padded prompt (or cache) length: a power of two (at least 16) up to one chunk, then whole chunks."""
    if length <= chunk:
        return min(chunk, max(MIN_PROMPT_BUCKET, next_pow2(length)))
    return -(-length // chunk) * chunk


class Engine:
    """Batched generation for one model; `num_draft_tokens` > 0 turns on MTP speculative decoding.

    Batches are padded to a power of two rows, at least `min_batch` (one compiled shape serves
    every smaller batch). With `mesh`, generation runs sharded over it (variables are placed on it
    if they are not already).
    """

    def __init__(self, model: NemotronH, variables: dict, *, eos_ids: Sequence[int], think_end_id: int | None = None,
                 prefill_chunk: int = 256, num_draft_tokens: int = 0, min_batch: int = 1,
                 mesh: Mesh | None = None) -> None:
        config = model.config
        if config.remat != "none":
            config = config.replace(remat="none")
            model = NemotronH(config)
        if num_draft_tokens and not config.has_mtp:
            raise ConfigError("--speculative mtp needs a checkpoint with an MTP block (num_nextn_predict_layers > 0)")
        if num_draft_tokens and "mamba" in config.mtp_layer_types:
            raise ConfigError("MTP speculation supports attention/MoE/MLP MTP layers only (no Mamba in the MTP block)")
        if mesh is not None:
            variables = shard_variables(variables, config, mesh)
        self.model, self.config, self.variables, self.mesh = model, config, variables, mesh
        self.eos_ids = tuple(int(i) for i in eos_ids)
        self.think_end_id = -1 if think_end_id is None else int(think_end_id)
        self.prefill_chunk = prefill_chunk
        self.min_batch = min_batch
        self.k = num_draft_tokens
        self.stats = EngineStats()
        self._executables: dict[Any, Any] = {}

    # ---------------------------------------------------------------- host side
    def generate(self, requests: Sequence[Request], stop_check: Callable[[int, list[int]], bool] | None = None,
                 segment_steps: int | None = None) -> list[Completion]:
        """Serve one batch. `stop_check(i, ids)` is asked between segments whether row i should stop."""
        rows = len(requests)
        batch = max(self.min_batch, next_pow2(rows))
        longest = max(len(r.prompt_ids) for r in requests)
        max_new = max(r.max_new_tokens for r in requests)
        p_len = prompt_bucket(longest, self.prefill_chunk)
        extra = 3 * self.k + 2 if self.k else 1
        cache_len = max(MIN_CACHE_LEN, prompt_bucket(p_len + max_new + extra, self.prefill_chunk))
        out_len = next_pow2(max_new) + self.k + 1

        ids = np.zeros((batch, p_len), np.int32)
        valid = np.zeros((batch, p_len), bool)
        for i, r in enumerate(requests):
            ids[i, p_len - len(r.prompt_ids):] = r.prompt_ids
            valid[i, p_len - len(r.prompt_ids):] = True
        rowwise = self._row_arrays(requests, batch)
        use_sort = any(r.top_k > 0 or r.top_p < 1.0 for r in requests)
        greedy = all(r.temperature == 0 for r in requests)

        start = time.perf_counter()
        compile_before = self.stats.compile_seconds
        cache = self._run("cache", self._empty_cache, batch, cache_len)
        chunk = min(p_len, self.prefill_chunk)
        next_ids = np.concatenate([ids[:, 1:], np.zeros((batch, 1), np.int32)], axis=1)
        next_valid = np.concatenate([valid[:, 1:] & valid[:, :-1], np.zeros((batch, 1), bool)], axis=1)
        for s in range(0, p_len, chunk):
            part = slice(s, s + chunk)
            cache, logits, hidden = self._run("prefill", self._prefill, self.variables, cache, *self._global(
                (ids[:, part], valid[:, part], next_ids[:, part], next_valid[:, part])))
        state = self._run("start", functools.partial(self._start, use_sort=use_sort), cache, logits, hidden,
                          rowwise, out_len)
        jax.block_until_ready(state)
        prefill_done = time.perf_counter()
        self.stats.prefill_seconds += prefill_done - start - (self.stats.compile_seconds - compile_before)
        self.stats.prefill_tokens += int(valid.sum())

        compile_before = self.stats.compile_seconds
        steps = segment_steps if stop_check is not None and segment_steps else max_new
        while True:
            state = self._run("segment", functools.partial(self._segment, use_sort=use_sort, greedy=greedy),
                              self.variables, state, self._global(np.int32(steps)))
            done, out, count = jax.device_get(self._run("progress", self._progress, state))
            if done.all():
                break
            if stop_check is not None:
                stopped = [i < rows and not done[i] and stop_check(i, out[i, :count[i]].tolist())
                           for i in range(batch)]
                if any(stopped):
                    state = dict(state, done=self._run("stop", jnp.logical_or, state["done"],
                                                       self._global(np.asarray(stopped))))
        self.stats.decode_seconds += time.perf_counter() - prefill_done - (self.stats.compile_seconds - compile_before)
        if self.k:
            self.stats.verify_steps += int(state["verify_steps"])
            self.stats.accepted_drafts += int(state["accepted"])
        completions = [self._completion(out[i], int(count[i]), r) for i, r in enumerate(requests)]
        self.stats.prompts += rows
        self.stats.generated_tokens += sum(len(c.output_ids) for c in completions)
        return completions

    def _completion(self, out: np.ndarray, count: int, request: Request) -> Completion:
        ids = out[:min(count, request.max_new_tokens)].tolist()
        if not request.ignore_eos:
            for n, token in enumerate(ids):
                if token in self.eos_ids:
                    return Completion(ids[:n + 1], "stop")
        return Completion(ids, "length" if len(ids) >= request.max_new_tokens else "stop")

    def _row_arrays(self, requests: Sequence[Request], batch: int) -> State:
        """Per-row settings as device arrays; padding rows are marked not real (finished from the start)."""
        pad = batch - len(requests)

        def column(field: Callable[[Request], Any], dtype: Any, fill: Any = 0) -> jax.Array:
            return self._global(np.asarray([field(r) for r in requests] + [fill] * pad, dtype))

        return {
            "params": sampling.SamplingParams.create(
                column(lambda r: r.temperature, np.float32), column(lambda r: r.top_k, np.int32),
                column(lambda r: r.top_p, np.float32, 1.0), column(lambda r: r.min_p, np.float32)),
            "seeds": column(lambda r: r.seed % 2**32, np.uint32),
            "line": column(lambda r: r.index, np.uint32),
            "max_new": column(lambda r: r.max_new_tokens, np.int32),
            "ignore_eos": column(lambda r: r.ignore_eos, bool),
            "think_left": column(lambda r: -1 if r.thinking_budget is None else r.thinking_budget, np.int32, -1),
            "real": column(lambda r: True, bool, False),
        }

    def _global(self, value: Any) -> Any:
        """Host values as device arrays: without a mesh unchanged (jit takes numpy); on a mesh replicated
        global arrays (every process holds the same prompts and settings)."""
        if self.mesh is None:
            return value
        replicated = NamedSharding(self.mesh, PartitionSpec())
        return jax.tree.map(lambda v: sharding.place(np.asarray(v), replicated), value)

    def _run(self, name: str, fn: Callable, *args: Any) -> Any:
        """Run `fn` jitted, compiling once per (name, argument shapes and shardings) and counting compile
        time apart. On a mesh the program is traced in its context."""
        key = (name, tuple(sorted(fn.keywords.items())) if isinstance(fn, functools.partial) else (),
               jax.tree.structure(args), tuple(_signature(a) for a in jax.tree.leaves(args)))
        if key not in self._executables:
            static = tuple(i for i, a in enumerate(args) if isinstance(a, int) and not isinstance(a, bool))
            begin = time.perf_counter()
            jitted = jax.jit(fn, static_argnums=static, donate_argnums=self._donated(name))
            with contextlib.nullcontext() if self.mesh is None else sharding.use_mesh(self.mesh):
                self._executables[key] = (jitted.lower(*args).compile(), static)
            self.stats.compile_seconds += time.perf_counter() - begin
        executable, static = self._executables[key]
        return executable(*(a for i, a in enumerate(args) if i not in static))

    @staticmethod
    def _donated(name: str) -> tuple[int, ...]:
        """The cache moves from prefill to prefill, into the decode state and through the decode segments
        without a second copy: each program donates the buffers it replaces."""
        return {"prefill": (1,), "start": (0,), "segment": (1,)}.get(name, ())

    # ---------------------------------------------------------------- device side
    def _empty_cache(self, batch: int, cache_len: int) -> State:
        """Zero caches, created in place: on a mesh already sharded (no full copy on any device)."""
        cache = init_cache(self.config, batch, cache_len)
        if self.mesh is None:
            return cache
        shardings = sharding.cache_shardings(cache, self.mesh, sharding.head_units(self.config))
        return jax.lax.with_sharding_constraint(cache, shardings)

    def _progress(self, state: State) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(done, out, count), replicated on a mesh so that every process can read them."""
        view = (state["done"], state["out"], state["count"])
        if self.mesh is None:
            return view
        return jax.lax.with_sharding_constraint(view, NamedSharding(self.mesh, PartitionSpec()))

    def _prefill(self, variables: dict, cache: State, ids_bl, valid_bl, next_ids_bl, next_valid_bl):
        """One prompt chunk through the cache (and, when speculating, its (hidden, next token) pairs
        through the MTP block's cache). Returns (cache, logits and hidden state at the chunk's end)."""
        hidden, cache = self.model.apply(variables, ids_bl, valid_bl, cache, method=_backbone_through_cache)
        if self.k:
            _, _, mtp = self.model.apply(variables, hidden, next_ids_bl, next_valid_bl, cache["mtp"],
                                         method="mtp_forward")
            cache = dict(cache, mtp=mtp)
        last = hidden[:, -1]
        return cache, self.model.apply(variables, last, method="logits"), last

    def _start(self, cache: State, logits_bv, hidden_bd, rows: State, out_len: int, *, use_sort: bool) -> State:
        """The decode state after prefill, with the first token sampled from the prompt's last logits."""
        batch = logits_bv.shape[0]
        keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(rows["seeds"], rows["line"])
        state = {
            "cache": cache, "keys": keys, "params": rows["params"], "max_new": rows["max_new"],
            "ignore_eos": rows["ignore_eos"], "think_left": rows["think_left"],
            "out": jnp.zeros((batch, out_len), jnp.int32), "count": jnp.zeros((batch,), jnp.int32),
            "done": ~rows["real"], "token": jnp.zeros((batch,), jnp.int32),
        }
        first = sampling.sample(sampling.row_keys(keys, state["count"]), logits_bv, rows["params"], use_sort)
        state = self._emit(state, first[:, None], jnp.ones((batch,), jnp.int32))
        if self.k:
            width = self.k + 1
            state["pair_hidden"] = jnp.zeros((batch, width, hidden_bd.shape[-1]), hidden_bd.dtype).at[:, 0].set(
                hidden_bd)
            state["pair_tokens"] = jnp.zeros((batch, width), jnp.int32).at[:, 0].set(state["token"])
            state["pair_valid"] = jnp.zeros((batch, width), bool).at[:, 0].set(True)
            state["accepted"] = jnp.zeros((), jnp.int32)
            state["verify_steps"] = jnp.zeros((), jnp.int32)
        return state

    def _segment(self, variables: dict, state: State, steps, *, use_sort: bool, greedy: bool) -> State:
        step = self._speculative_step if self.k else self._plain_step

        def cond(carry):
            i, s = carry
            return (i < steps) & ~jnp.all(s["done"])

        def body(carry):
            i, s = carry
            return i + 1, step(variables, s, use_sort, greedy)

        return jax.lax.while_loop(cond, body, (jnp.int32(0), state))[1]

    def _plain_step(self, variables: dict, state: State, use_sort: bool, greedy: bool) -> State:
        logits, _, cache = self.model.apply(variables, state["token"][:, None], cache=state["cache"],
                                            method="forward")
        keys = sampling.row_keys(state["keys"], state["count"])
        token = (jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32) if greedy
                 else sampling.sample(keys, logits[:, 0], state["params"], use_sort))
        return self._emit(dict(state, cache=cache), token[:, None], jnp.ones_like(token))

    def _speculative_step(self, variables: dict, state: State, use_sort: bool, greedy: bool) -> State:
        """One draft-verify-accept-rollback step (see `nemojax.generate.speculative`); `greedy` (every
        row at temperature 0) takes argmaxes instead of building distributions."""
        k, kinds, mtp_kinds = self.k, self.config.layer_types, self.config.mtp_layer_types
        cache = state["cache"]
        cache = dict(caches.compact_if_needed(cache, kinds, k + 1),
                     mtp=caches.compact_if_needed(cache["mtp"], mtp_kinds, 2 * k))
        params, count = state["params"], state["count"]

        # Draft: the committed pairs first, then the block on its own output.
        mtp_start = cache["mtp"]["index"]
        logits, out, mtp = self.model.apply(variables, state["pair_hidden"], state["pair_tokens"],
                                            state["pair_valid"], cache["mtp"], method="mtp_forward")
        last = jnp.maximum(jnp.sum(state["pair_valid"], axis=1) - 1, 0)
        logits_bv = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
        hidden_bd = jnp.take_along_axis(out, last[:, None, None], axis=1)[:, 0]
        mtp_commit = mtp_start + jnp.max(jnp.sum(state["pair_valid"], axis=1))
        drafts, draft_probs = [], []
        for j in range(k):
            if greedy:
                draft = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
            else:
                probs = sampling.token_probs(logits_bv, params, use_sort)
                draft = sampling.sample_from_probs(sampling.row_keys(state["keys"], count + j, stream=1), probs)
                draft_probs.append(probs)
            drafts.append(draft)
            if j < k - 1:
                logits, out, mtp = self.model.apply(variables, hidden_bd[:, None], draft[:, None], None, mtp,
                                                    method="mtp_forward")
                logits_bv, hidden_bd = logits[:, 0], out[:, 0]
        mtp = dict(mtp, index=mtp_commit, layers=caches.invalidate_from(mtp["layers"], mtp_kinds, mtp_commit))
        drafts_bk = jnp.stack(drafts, axis=1)

        # Verify all drafts in one forward, keeping every position's Mamba states.
        verify_ids = jnp.concatenate([state["token"][:, None], drafts_bk], axis=1)
        start = cache["index"]
        logits, hidden, main = self.model.apply(variables, verify_ids, None, dict(cache, mtp=None),
                                                per_position_states=True, method="forward")
        if greedy:
            accepted, nxt = speculative.accept_greedy(drafts_bk, logits)
        else:
            target_probs = jax.vmap(lambda lg: sampling.token_probs(lg, params, use_sort), in_axes=1,
                                    out_axes=1)(logits)
            accepted, nxt = speculative.accept(
                sampling.row_keys(state["keys"], count, stream=2), sampling.row_keys(state["keys"], count, stream=3),
                drafts_bk, jnp.stack(draft_probs, axis=1), target_probs)
        tokens = speculative.emitted_tokens(drafts_bk, accepted, nxt)
        tokens, emitted, think_left = self._thinking_budget(tokens, accepted + 1, state["think_left"])

        keep = jnp.where(state["done"], 0, emitted)
        main = dict(main, layers=caches.keep_positions(main["layers"], kinds, start, keep),
                    index=start + jnp.max(keep), mtp=mtp)
        active = ~state["done"]
        state = dict(
            state, cache=main, think_left=think_left, pair_hidden=hidden.astype(state["pair_hidden"].dtype),
            pair_tokens=tokens, pair_valid=jnp.arange(k + 1)[None, :] < keep[:, None],
            accepted=state["accepted"] + jnp.sum(jnp.where(active, accepted, 0)),
            verify_steps=state["verify_steps"] + jnp.sum(active))
        return self._emit(state, tokens, emitted, budget_applied=True)

    def _thinking_budget(self, tokens_bj, n_b, think_left_b):
        """Force `</think>` once a row's thinking budget is spent: the token at that position is replaced
        and everything after it dropped. Returns (tokens, kept count, remaining budget; -1 = none)."""
        positions = jnp.arange(tokens_bj.shape[1])[None, :]
        closes = (tokens_bj == self.think_end_id) & (positions < n_b[:, None])
        closed_at = jnp.min(jnp.where(closes, positions, tokens_bj.shape[1]), axis=1)
        force = (think_left_b >= 0) & (think_left_b < n_b) & (think_left_b < closed_at)
        tokens_bj = jnp.where(force[:, None] & (positions == think_left_b[:, None]), self.think_end_id, tokens_bj)
        n_b = jnp.where(force, think_left_b + 1, n_b)
        closed = force | (closed_at < n_b)
        think_left_b = jnp.where(closed | (think_left_b < 0), -1, think_left_b - n_b)
        return tokens_bj, n_b, think_left_b

    def _emit(self, state: State, tokens_bj, n_b, budget_applied: bool = False) -> State:
        """Append each unfinished row's first n tokens to its output; update pending token and finished flags."""
        think_left = state["think_left"]
        if not budget_applied:
            tokens_bj, n_b, think_left = self._thinking_budget(tokens_bj, n_b, think_left)
        active = ~state["done"]
        n_b = jnp.where(active, n_b, 0)
        positions = jnp.arange(tokens_bj.shape[1])[None, :]
        rows = jnp.arange(tokens_bj.shape[0])[:, None]
        slots = jnp.where(positions < n_b[:, None], state["count"][:, None] + positions, state["out"].shape[1])
        out = state["out"].at[rows, slots].set(tokens_bj, mode="drop")
        is_eos = jnp.isin(tokens_bj, jnp.asarray(self.eos_ids)) & (positions < n_b[:, None])
        count = state["count"] + n_b
        done = state["done"] | (jnp.any(is_eos, axis=1) & ~state["ignore_eos"]) | (count >= state["max_new"])
        last = jnp.take_along_axis(tokens_bj, jnp.maximum(n_b - 1, 0)[:, None], axis=1)[:, 0]
        token = jnp.where(active, last, state["token"])
        return dict(state, out=out, count=count, done=done, token=token,
                    think_left=jnp.where(active, think_left, state["think_left"]))


def _backbone_through_cache(module: NemotronH, ids_bt, valid_bt, cache: State) -> tuple[jax.Array, State]:
    """The main stack without the lm_head (prefill needs logits at one position only)."""
    hidden, layers = module.backbone(ids_bt, valid_bt, cache["layers"], cache["index"])
    return hidden, dict(cache, layers=layers, index=cache["index"] + ids_bt.shape[1])


def _signature(leaf: Any) -> Any:
    """What decides a compiled program: shape, dtype (and sharding) of arrays, the value of Python ints."""
    if isinstance(leaf, jax.Array):
        return leaf.shape, str(leaf.dtype), leaf.sharding
    if hasattr(leaf, "dtype"):
        return np.shape(leaf), str(leaf.dtype)
    return type(leaf).__name__, leaf
