"""Turning logits into tokens: temperature, top-k, top-p, min-p, per row of the batch.

Every setting is a per-row array, so one compiled program serves a batch whose lines ask for
different sampling. A row with temperature 0 is greedy: its distribution is the one-hot of the
argmax, which makes greedy decoding a special case of sampling (speculative acceptance relies on
this). Randomness comes from one key per row folded with the row's token position, so a row's
output depends on its seed alone, never on which other rows share its batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-row sampling settings (arrays of shape [b]); `top_k` 0, `top_p` 1 and `min_p` 0 disable a filter."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array

    @classmethod
    def create(cls, temperature, top_k, top_p, min_p) -> SamplingParams:
        return cls(jnp.asarray(temperature, jnp.float32), jnp.asarray(top_k, jnp.int32),
                   jnp.asarray(top_p, jnp.float32), jnp.asarray(min_p, jnp.float32))


def greedy_tokens(logits_v: jax.Array) -> jax.Array:
    """argmax over the last axis as int32, equal to `jnp.argmax` (the first maximal index; the first NaN
    when there is one) but computed as two plain reductions (max, then the smallest index attaining
    it): on CPU the fused (value, index) reduction of argmax costs several times more per decoding step.
    """
    vocab = logits_v.shape[-1]
    nan = jnp.isnan(logits_v)
    top = jnp.max(logits_v, axis=-1, keepdims=True)
    hit = jnp.where(jnp.any(nan, axis=-1, keepdims=True), nan, logits_v == top)
    return jnp.min(jnp.where(hit, jnp.arange(vocab, dtype=jnp.int32), vocab), axis=-1)


def filtered_logits(logits_bv: jax.Array, params: SamplingParams, use_sort: bool = True) -> jax.Array:
    """Logits divided by the temperature, with tokens outside top-k / top-p / min-p set to -inf.

    `use_sort` False skips top-k and top-p (a static choice: the vocabulary sort is the costly part).
    """
    temperature = jnp.where(params.temperature > 0, params.temperature, 1.0)[:, None]
    scaled = logits_bv.astype(jnp.float32) / temperature
    vocab = scaled.shape[-1]
    if use_sort:
        sorted_desc = -jnp.sort(-scaled, axis=-1)
        k = jnp.where(params.top_k > 0, jnp.minimum(params.top_k, vocab), vocab)
        in_top_k = jnp.arange(vocab)[None, :] < k[:, None]
        sorted_desc = jnp.where(in_top_k, sorted_desc, -jnp.inf)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above each one
        keep = in_top_k & ((before < params.top_p[:, None]) | (params.top_p[:, None] >= 1.0))
        threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        scaled = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    probs = jax.nn.softmax(scaled, axis=-1)
    floor = params.min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(probs >= floor, scaled, -jnp.inf)


def token_probs(logits_bv: jax.Array, params: SamplingParams, use_sort: bool = True) -> jax.Array:
    """The distribution each row samples from (one-hot of the argmax for greedy rows), [b, V] float32."""
    probs = jax.nn.softmax(filtered_logits(logits_bv, params, use_sort), axis=-1)
    greedy = jax.nn.one_hot(greedy_tokens(logits_bv), logits_bv.shape[-1], dtype=jnp.float32)
    return jnp.where((params.temperature > 0)[:, None], probs, greedy)


def sample(keys_b: jax.Array, logits_bv: jax.Array, params: SamplingParams, use_sort: bool = True) -> jax.Array:
    """One token per row: argmax for greedy rows, else a draw from the filtered distribution."""
    drawn = jax.vmap(jax.random.categorical)(keys_b, filtered_logits(logits_bv, params, use_sort))
    return jnp.where(params.temperature > 0, drawn, greedy_tokens(logits_bv)).astype(jnp.int32)


def sample_from_probs(keys_b: jax.Array, probs_bv: jax.Array) -> jax.Array:
    """A draw from explicit per-row probabilities (zero-probability tokens are never drawn)."""
    logits = jnp.where(probs_bv > 0, jnp.log(jnp.maximum(probs_bv, 1e-38)), -jnp.inf)
    return jax.vmap(jax.random.categorical)(keys_b, logits).astype(jnp.int32)


def row_keys(base_keys_b: jax.Array, position_b: jax.Array, stream: int = 0) -> jax.Array:
    """The key of each row for its token at `position_b` (a `stream` tag separates independent uses)."""
    return jax.vmap(lambda k, p: jax.random.fold_in(jax.random.fold_in(k, p), stream))(base_keys_b, position_b)
