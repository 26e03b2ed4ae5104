"""MTP speculative decoding: draft with the MTP block, verify in one forward, keep what the target agrees with.

One step, for every row (the pending token x_n is sampled but not yet in the main cache):
1. The MTP block first takes the pairs (main hidden state at t, token t+1) that the last step
   committed, which keeps its own KV cache equal to what it would hold after plain decoding, and
   drafts d_1 from the last of them; it is reused K-1 more times on its own output hidden state.
   Those K-1 speculative entries of its cache are dropped again at the end of the step.
2. The main model runs once over [x_n, d_1 .. d_K] and returns its Mamba states after every
   position, so rollback is a selection, never a recomputation.
3. Acceptance is standard rejection sampling: d_i is kept with probability min(1, p/q) and the
   first rejection is replaced by a draw from max(p - q, 0); after K acceptances a bonus token is
   drawn from p. Greedy rows have one-hot p and q, so this is exactly "keep the longest prefix that
   equals the target's argmax, then the argmax": greedy output equals plain greedy decoding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nemojax.generate import sampling


def accept(keys_accept_b: jax.Array, keys_residual_b: jax.Array, drafts_bk: jax.Array, draft_probs_bkv: jax.Array,
           target_probs_bkv: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rejection-sample the drafts against the target.

    drafts [b, K], draft_probs q [b, K, V] (what each draft was drawn from), target_probs p
    [b, K+1, V] (the target at each verified position). Returns (accepted count a [b] in 0..K,
    the next token [b]: a draw from the residual at the first rejection, or from p at position K).
    """
    b, k = drafts_bk.shape
    p_draft = jnp.take_along_axis(target_probs_bkv[:, :k], drafts_bk[..., None], axis=-1)[..., 0]
    q_draft = jnp.take_along_axis(draft_probs_bkv, drafts_bk[..., None], axis=-1)[..., 0]
    uniform = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(keys_accept_b)
    accepted = uniform * q_draft < p_draft
    count = jnp.sum(jnp.cumprod(accepted.astype(jnp.int32), axis=1), axis=1)
    target_at = jnp.take_along_axis(target_probs_bkv, count[:, None, None], axis=1)[:, 0]
    padded_q = jnp.concatenate([draft_probs_bkv, jnp.zeros_like(draft_probs_bkv[:, :1])], axis=1)
    draft_at = jnp.take_along_axis(padded_q, count[:, None, None], axis=1)[:, 0]
    residual = jnp.maximum(target_at - draft_at, 0.0)
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), target_at)
    return count.astype(jnp.int32), sampling.sample_from_probs(keys_residual_b, residual)


def accept_greedy(drafts_bk: jax.Array, target_logits_bkv: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`accept` for an all-greedy batch without probabilities or randomness: the longest prefix of
    drafts equal to the target's argmax, then the target's argmax after it."""
    target = sampling.greedy_tokens(target_logits_bkv)
    matches = drafts_bk == target[:, :drafts_bk.shape[1]]
    count = jnp.sum(jnp.cumprod(matches.astype(jnp.int32), axis=1), axis=1)
    return count.astype(jnp.int32), jnp.take_along_axis(target, count[:, None], axis=1)[:, 0]


def emitted_tokens(drafts_bk: jax.Array, count_b: jax.Array, next_b: jax.Array) -> jax.Array:
    """[d_1 .. d_K, _] with the next token written at position `count`: the step's new tokens are e[:count+1]."""
    e = jnp.concatenate([drafts_bk, jnp.zeros_like(drafts_bk[:, :1])], axis=1)
    return jnp.where(jnp.arange(e.shape[1])[None, :] == count_b[:, None], next_b[:, None], e)
