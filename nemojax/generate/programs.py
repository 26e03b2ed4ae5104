"""The device programs of continuous batching: pure functions of the slot state, jitted by the engine.

The slot state is one pytree for a fixed number of rows (decode slots): the caches (each row at its
own position, see `nemojax.generate.caches`), each row's sampling settings, pending token, counters
and `done` flag (a free slot, a slot still being prefilled and a finished row are all `done`), and
the tokens emitted since the host last drained them (`out`, `fill`, and their log-probabilities).

- `prefill`: one prompt chunk for n rows gathered from their slots (right-padded: real tokens first),
  written back in place; rows whose prompt ends in the chunk sample their first token and start.
- `segment`: up to `steps` decoding steps of every row in a `lax.while_loop` (plain: one token per
  step; speculative: MTP drafts + one verifying forward). Rows that are `done` emit nothing; the
  `held` rows (prompts partly prefilled) keep their caches exactly (the step's input is masked for
  them), while finished and free rows run on scratch until their slot's next prompt resets it. It
  can stop as soon as a row finishes (so that the host can hand the slot to a waiting request).
- `release`: finish rows the host stops (stop strings, cancelled requests).
- `drain`: what was emitted since the last drain (replicated on a mesh), and the emit buffer emptied.
- `take_span` / `take_states` / `put_span` / `put_states`: copy one row's KV positions or its Mamba
  states out of the slot state and back (the prefix cache's snapshots, `nemojax.generate.prefix_cache`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nemojax import sharding
from nemojax.generate import caches, sampling, speculative
from nemojax.model import NemotronH, init_cache

State = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Programs:
    """The model and the generation settings every program shares (static for compilation)."""

    model: NemotronH
    eos_ids: tuple[int, ...]
    think_end_id: int  # -1: no thinking budget
    num_draft_tokens: int
    top_logprobs: int  # how many alternatives a row may ask for (0: none)
    mesh: Mesh | None = None
    context_parallel: bool = False  # KV caches sharded along the sequence (sharding.CONTEXT_PARALLEL_RULES)

    @property
    def k(self) -> int:
        return self.num_draft_tokens

    def out_width(self, steps: int) -> int:
        """Emit-buffer columns: a segment's tokens (K+1 per speculative step) plus a first token."""
        return steps * (self.k + 1) + 1

    # ---------------------------------------------------------------- state
    def empty(self, slots: int, length: int, width: int) -> State:
        """All slots free: zero caches of `length` positions per row, emit buffers of `width`."""
        config = self.model.config
        state = {
            "cache": init_cache(config, slots, length),
            "keys": jax.vmap(jax.random.key)(jnp.zeros((slots,), jnp.uint32)),
            "params": sampling.SamplingParams.create(*(jnp.zeros((slots,)),) * 4),
            "max_new": jnp.zeros((slots,), jnp.int32), "ignore_eos": jnp.zeros((slots,), bool),
            "think_left": jnp.full((slots,), -1, jnp.int32), "count": jnp.zeros((slots,), jnp.int32),
            "done": jnp.ones((slots,), bool), "token": jnp.zeros((slots,), jnp.int32),
            "out": jnp.zeros((slots, width), jnp.int32), "fill": jnp.zeros((slots,), jnp.int32),
            "logprob": jnp.zeros((slots, width), jnp.float32),
            "top_ids": jnp.zeros((slots, width, self.top_logprobs), jnp.int32),
            "top_logprobs": jnp.zeros((slots, width, self.top_logprobs), jnp.float32),
            "accepted": jnp.zeros((slots,), jnp.int32), "verify_steps": jnp.zeros((slots,), jnp.int32),
        }
        if self.k:
            dtype = jnp.dtype(config.compute_dtype)
            state["pair_hidden"] = jnp.zeros((slots, self.k + 1, config.hidden_size), dtype)
            state["pair_tokens"] = jnp.zeros((slots, self.k + 1), jnp.int32)
            state["pair_valid"] = jnp.zeros((slots, self.k + 1), bool)
        return self.constrain(state)

    def grow(self, state: State, length: int) -> State:
        """The same state with `length` cache positions per row."""
        return self.constrain(dict(state, cache=caches.grow(state["cache"], length)))

    def constrain(self, state: State) -> State:
        """On a mesh: caches sharded by the cache rules, everything else replicated (a fixed layout, so
        each program compiles once per shape)."""
        if self.mesh is None:
            return state
        replicated = NamedSharding(self.mesh, PartitionSpec())
        shardings = {name: jax.tree.map(lambda _: replicated, value) for name, value in state.items()}
        shardings["cache"] = sharding.cache_shardings(state["cache"], self.mesh, sharding.head_units(self.model.config),
                                                      self.context_parallel)
        return jax.lax.with_sharding_constraint(state, shardings)

    # ---------------------------------------------------------------- prefill
    def prefill(self, variables: dict, state: State, rows_n, ids_nt, valid_nt, next_ids_nt, next_valid_nt,
                fresh_n, last_n, settings: dict, *, use_sort: bool, logprobs: bool) -> State:
        """One chunk of the prompts of rows `rows_n` (slot numbers; past the end for padding rows).

        `fresh_n`: the row's first chunk (its slot is reset). `last_n`: its prompt ends here: the first
        token is sampled from the logits at its last real position and the row starts decoding with
        `settings` (per-row arrays: temperature, top_k, top_p, min_p, seed, salt, max_new, ignore_eos,
        think_left).

        When rows run per device (`row_devices` > 1) the n rows are device-major (n / devices per device)
        and `rows_n` numbers each device's own slots: every device prefills its rows with no communication.
        """
        per_row = PartitionSpec("data")
        chunk = self._per_device(functools.partial(self._prefill_rows, use_sort=use_sort, logprobs=logprobs), state,
                                 *(per_row,) * 7, jax.tree.map(lambda _: per_row, settings))
        return self.constrain(chunk(variables, state, rows_n, ids_nt, valid_nt, next_ids_nt, next_valid_nt, fresh_n,
                                    last_n, settings))

    def _prefill_rows(self, variables: dict, state: State, rows_n, ids_nt, valid_nt, next_ids_nt, next_valid_nt,
                      fresh_n, last_n, settings: dict, *, use_sort: bool, logprobs: bool) -> State:
        model, k = self.model, self.k
        part = caches.reset_rows(caches.take_rows(state["cache"], rows_n), fresh_n)
        hidden, layers = model.apply(variables, ids_nt, valid_nt, part["layers"], part["index"],
                                     method=_backbone)
        end_n = jnp.max(jnp.where(valid_nt, jnp.arange(1, ids_nt.shape[1] + 1), 0), axis=1)
        part = dict(part, layers=layers, index=part["index"] + end_n)
        if k:
            _, _, mtp = model.apply(variables, hidden, next_ids_nt, next_valid_nt, part["mtp"], method="mtp_forward")
            part = dict(part, mtp=mtp)
        state = dict(state, cache=caches.put_rows(state["cache"], rows_n, part))

        last_hidden = jnp.take_along_axis(hidden, jnp.maximum(end_n - 1, 0)[:, None, None], axis=1)[:, 0]
        logits = model.apply(variables, last_hidden, method="logits")
        slots = state["done"].shape[0]
        starting = jnp.where(last_n, rows_n, slots)  # rows that do not start here are dropped
        params = sampling.SamplingParams.create(settings["temperature"], settings["top_k"], settings["top_p"],
                                                settings["min_p"])
        keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(settings["seed"], settings["salt"])
        n = rows_n.shape[0]
        row = {
            "keys": keys, "params": params, "max_new": settings["max_new"], "ignore_eos": settings["ignore_eos"],
            "think_left": settings["think_left"], "count": jnp.zeros((n,), jnp.int32),
            "done": jnp.zeros((n,), bool), "token": jnp.zeros((n,), jnp.int32),
            "accepted": jnp.zeros((n,), jnp.int32), "verify_steps": jnp.zeros((n,), jnp.int32),
            **{name: _take(state[name], rows_n) for name in ("out", "fill", "logprob", "top_ids", "top_logprobs")},
        }
        first = sampling.sample(sampling.row_keys(keys, row["count"]), logits, params, use_sort)
        row = self._emit(row, first[:, None], jnp.ones((n,), jnp.int32), logits[:, None] if logprobs else None)
        if k:
            row["pair_hidden"] = jnp.zeros((n, k + 1, last_hidden.shape[-1]), state["pair_hidden"].dtype).at[
                :, 0].set(last_hidden.astype(state["pair_hidden"].dtype))
            row["pair_tokens"] = jnp.zeros((n, k + 1), jnp.int32).at[:, 0].set(row["token"])
            row["pair_valid"] = jnp.zeros((n, k + 1), bool).at[:, 0].set(True)
        for name, value in row.items():
            state[name] = jax.tree.map(lambda a, v: a.at[starting].set(v.astype(a.dtype), mode="drop"),
                                       state[name], value)
        return state

    # ---------------------------------------------------------------- prefix reuse
    def _reused(self, cache: dict) -> dict:
        """The caches a prefix snapshot holds: all of them (the MTP block's only when it drafts)."""
        return {name: part for name, part in cache.items() if name != "mtp" or self.k}

    def take_span(self, state: State, row, start, size: int) -> tuple:
        """Row `row`'s KV entries (and validity) at positions [start, start + size)."""
        return caches.row_span(self._reused(state["cache"]), row, start, size)

    def take_states(self, state: State, row) -> tuple:
        """Row `row`'s Mamba conv and SSM states and write positions."""
        return caches.row_states(self._reused(state["cache"]), row)

    def put_span(self, state: State, row, start, span: tuple) -> State:
        """`take_span`'s inverse: `span` written at positions [start, ...) of row `row`."""
        cache = state["cache"]
        return self.constrain(dict(state, cache=dict(cache, **caches.put_row_span(self._reused(cache), row, start,
                                                                                   span))))

    def put_states(self, state: State, row, states: tuple) -> State:
        """`take_states`'s inverse."""
        cache = state["cache"]
        return self.constrain(dict(state, cache=dict(cache, **caches.put_row_states(self._reused(cache), row,
                                                                                      states))))

    # ---------------------------------------------------------------- decoding
    def segment(self, variables: dict, state: State, steps, exit_on_finish, held_b, *, use_sort: bool,
                greedy: bool, logprobs: bool) -> State:
        """Up to `steps` decoding steps. With `exit_on_finish` the loop also ends after the step in which
        any row finished. `held_b`: rows whose caches must not change (a prompt partly prefilled).

        On a mesh that only splits the rows (`data`), each device loops over its own rows with no
        communication at all (`jax.shard_map`; its loop may end earlier than another device's): on CPU
        the devices are threads, so a batch decodes on several cores at once. Otherwise one program
        for the whole mesh, partitioned by the compiler."""
        def loop(variables, state, steps, exit_on_finish, held_b):
            step = (self._speculative_step if self.k
                    else lambda variables, s, *options: self._plain_step(variables, s, held_b, *options))
            done_before = state["done"]

            def cond(carry):
                i, s = carry
                newly_done = jnp.any(s["done"] & ~done_before)
                return (i < steps) & ~jnp.all(s["done"]) & ~(exit_on_finish & newly_done)

            def body(carry):
                i, s = carry
                return i + 1, step(variables, s, use_sort, greedy, logprobs)

            return jax.lax.while_loop(cond, body, (jnp.int32(0), state))[1]

        loop = self._per_device(loop, state, PartitionSpec(), PartitionSpec(), PartitionSpec("data"))
        return self.constrain(loop(variables, state, steps, exit_on_finish, held_b))

    def _per_device(self, fn, state: State, *arg_specs: Any):
        """`fn(variables, state, *args)` as each device runs it on its own rows (`jax.shard_map`, `arg_specs`
        splitting the other arguments) when the rows run per device (`row_devices`); else `fn` itself."""
        if self.row_devices(state["done"].shape[0]) == 1:
            return fn
        rows = jax.tree_util.tree_map_with_path(self._rows_spec, state)
        return jax.shard_map(fn, mesh=self.mesh, in_specs=(PartitionSpec(), rows, *arg_specs), out_specs=rows,
                             check_vma=False)

    def row_devices(self, slots: int) -> int:
        """Over how many devices the rows run per device (1: one program for the whole mesh, or no mesh):
        a mesh whose only axis larger than 1 is `data`, dividing the slots, without context parallelism
        (the variables are then replicated and every row's work is local)."""
        if self.mesh is None or self.context_parallel:
            return 1
        shape = dict(self.mesh.shape)
        per_device = all(size == 1 for axis, size in shape.items() if axis != "data") and slots % shape["data"] == 0
        return shape["data"] if per_device else 1

    @staticmethod
    def _rows_spec(path: tuple, leaf: Any) -> PartitionSpec:
        """A state leaf split over `data` along its rows (a cache leaf's batch axis, else the first)."""
        in_cache = isinstance(path[0], jax.tree_util.DictKey) and path[0].key == "cache"
        axis = sharding.cache_axes(path[-1].key, leaf.ndim).index("batch") if in_cache else 0
        return PartitionSpec(*([None] * axis), "data")

    def release(self, state: State, rows_b) -> State:
        """Finish the rows in `rows_b` (a stop string matched, the client went away)."""
        return self.constrain(dict(state, done=state["done"] | rows_b))

    def drain(self, state: State) -> tuple[State, dict]:
        """(state with an empty emit buffer, {done, count, out, fill, logprob, top_ids, top_logprobs,
        accepted, verify_steps}: replicated on a mesh so that every process can read it)."""
        names = ("done", "count", "out", "fill", "logprob", "top_ids", "top_logprobs", "accepted", "verify_steps")
        view = {name: state[name] for name in names}
        if self.mesh is not None:
            view = jax.lax.with_sharding_constraint(view, NamedSharding(self.mesh, PartitionSpec()))
        return self.constrain(dict(state, fill=jnp.zeros_like(state["fill"]))), view

    def _plain_step(self, variables: dict, state: State, held_b, use_sort: bool, greedy: bool,
                    logprobs: bool) -> State:
        """One token per row. The held rows' input is masked (`valid` False: their write positions, Mamba
        states and KV validity stay as they are); every other row, finished or free ones included, runs
        as if active: their scratch results are never read (a slot's next prompt resets it), and masking
        them would cost a select over all the caches per step."""
        logits, _, cache = self.model.apply(variables, state["token"][:, None], ~held_b[:, None],
                                            cache=state["cache"], method="forward")
        keys = sampling.row_keys(state["keys"], state["count"])
        token = (sampling.greedy_tokens(logits[:, 0]) if greedy
                 else sampling.sample(keys, logits[:, 0], state["params"], use_sort))
        return self._emit(dict(state, cache=cache), token[:, None], jnp.ones_like(token),
                          logits if logprobs else None)

    def _speculative_step(self, variables: dict, state: State, use_sort: bool, greedy: bool,
                          logprobs: bool) -> State:
        """One draft-verify-accept-rollback step (see `nemojax.generate.speculative`); `greedy` (every
        row at temperature 0) takes argmaxes instead of building distributions."""
        k, model = self.k, self.model
        kinds = model.config.layer_types
        cache = state["cache"]
        params, count, active = state["params"], state["count"], ~state["done"]

        # Draft: the committed pairs first, then the block on its own output.
        logits, out, mtp = model.apply(variables, state["pair_hidden"], state["pair_tokens"], state["pair_valid"],
                                       cache["mtp"], method="mtp_forward")
        last = jnp.maximum(jnp.sum(state["pair_valid"], axis=1) - 1, 0)
        logits_bv = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
        hidden_bd = jnp.take_along_axis(out, last[:, None, None], axis=1)[:, 0]
        mtp_commit = mtp["index"]
        drafts, draft_probs = [], []
        for j in range(k):
            if greedy:
                draft = sampling.greedy_tokens(logits_bv)
            else:
                probs = sampling.token_probs(logits_bv, params, use_sort)
                draft = sampling.sample_from_probs(sampling.row_keys(state["keys"], count + j, stream=1), probs)
                draft_probs.append(probs)
            drafts.append(draft)
            if j < k - 1:
                logits, out, mtp = model.apply(variables, hidden_bd[:, None], draft[:, None], None, mtp,
                                               method="mtp_forward")
                logits_bv, hidden_bd = logits[:, 0], out[:, 0]
        mtp = dict(mtp, index=mtp_commit)  # the drafts' entries are dropped
        drafts_bk = jnp.stack(drafts, axis=1)

        # Verify all drafts in one forward, keeping every position's Mamba states.
        verify_ids = jnp.concatenate([state["token"][:, None], drafts_bk], axis=1)
        start = cache["index"]
        logits, hidden, main = model.apply(variables, verify_ids, None, dict(cache, mtp=None),
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

        keep = jnp.where(active, emitted, 0)
        main = dict(main, layers=caches.keep_positions(main["layers"], cache["layers"], kinds, keep),
                    index=start + keep, mtp=mtp)
        state = dict(
            state, cache=main, think_left=think_left, pair_hidden=hidden.astype(state["pair_hidden"].dtype),
            pair_tokens=tokens, pair_valid=jnp.arange(k + 1)[None, :] < keep[:, None],
            accepted=state["accepted"] + jnp.where(active, accepted, 0),
            verify_steps=state["verify_steps"] + active)
        return self._emit(state, tokens, emitted, logits if logprobs else None, budget_applied=True)

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

    def _emit(self, state: State, tokens_bj, n_b, logits_bjv=None, budget_applied: bool = False) -> State:
        """Append each unfinished row's first n tokens (and, given the logits they were drawn from, their
        log-probabilities) to its emit buffer; update pending token, counters and finished flags."""
        think_left = state["think_left"]
        if not budget_applied:
            tokens_bj, n_b, think_left = self._thinking_budget(tokens_bj, n_b, think_left)
        active = ~state["done"]
        n_b = jnp.where(active, n_b, 0)
        positions = jnp.arange(tokens_bj.shape[1])[None, :]
        rows = jnp.arange(tokens_bj.shape[0])[:, None]
        width = state["out"].shape[1]
        at = jnp.where(positions < n_b[:, None], state["fill"][:, None] + positions, width)
        written = dict(out=state["out"].at[rows, at].set(tokens_bj, mode="drop"))
        if logits_bjv is not None:
            logp_bjv = jax.nn.log_softmax(logits_bjv[:, :tokens_bj.shape[1]].astype(jnp.float32), axis=-1)
            chosen = jnp.take_along_axis(logp_bjv, tokens_bj[..., None], axis=-1)[..., 0]
            written["logprob"] = state["logprob"].at[rows, at].set(chosen, mode="drop")
            if self.top_logprobs:
                top_lp, top_ids = jax.lax.top_k(logp_bjv, self.top_logprobs)
                written["top_ids"] = state["top_ids"].at[rows, at].set(top_ids.astype(jnp.int32), mode="drop")
                written["top_logprobs"] = state["top_logprobs"].at[rows, at].set(top_lp, mode="drop")
        is_eos = jnp.isin(tokens_bj, jnp.asarray(self.eos_ids)) & (positions < n_b[:, None])
        count = state["count"] + n_b
        done = state["done"] | (jnp.any(is_eos, axis=1) & ~state["ignore_eos"]) | (count >= state["max_new"])
        last = jnp.take_along_axis(tokens_bj, jnp.maximum(n_b - 1, 0)[:, None], axis=1)[:, 0]
        token = jnp.where(active, last, state["token"])
        return dict(state, **written, fill=state["fill"] + n_b, count=count, done=done, token=token,
                    think_left=jnp.where(active, think_left, state["think_left"]))


def _take(a: jax.Array, rows_n: jax.Array) -> jax.Array:
    return jnp.take(a, rows_n, axis=0, mode="clip")


def _backbone(module: NemotronH, ids_bt, valid_bt, layer_caches: Any, index_b) -> tuple[jax.Array, Any]:
    """The main stack without the lm_head (prefill needs logits at one position per row only)."""
    return module.backbone(ids_bt, valid_bt, layer_caches, index_b)
