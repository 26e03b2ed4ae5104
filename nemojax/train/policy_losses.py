"""Losses of on-policy post-training, on token log-probabilities of the student's own rollouts.

- MOPD (multi-teacher on-policy distillation): at every token the student generated, the reverse KL
  KL(student || teacher) = sum_v p_s(v) (log p_s(v) - log p_t(v)) over the whole vocabulary, the
  teacher being the one of the prompt's domain. Reverse KL is mode-seeking: the student is pushed off
  tokens the teacher finds unlikely rather than spread over everything the teacher allows.
- GRPO: advantages normalised within each group of rollouts of one prompt, a clipped policy-ratio
  objective, and a KL penalty to a reference model (the k3 estimator, unbiased and non-negative).

Everything is float32, masked by `mask_bt` (1 on the tokens the student generated), and reduced as a
masked sum over a caller-given denominator (default: the mask's sum), as the training losses are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nemojax.errors import ConfigError


def _masked_mean(values_bt: jax.Array, mask_bt: jax.Array, denominator: jax.Array | float | None) -> jax.Array:
    mask = mask_bt.astype(jnp.float32)
    denominator = jnp.maximum(jnp.sum(mask), 1.0) if denominator is None else denominator
    return jnp.sum(values_bt * mask) / denominator


def reverse_kl_per_token(student_logits_btv: jax.Array, teacher_logits_btv: jax.Array) -> jax.Array:
    """KL(student || teacher) [b, t] at each position, over the vocabulary; the teacher gets no gradient."""
    if student_logits_btv.shape != teacher_logits_btv.shape:
        raise ConfigError(f"MOPD: teacher logits {teacher_logits_btv.shape} do not match the student's "
                          f"{student_logits_btv.shape} (teachers must share the student's vocabulary)")
    log_s = jax.nn.log_softmax(student_logits_btv.astype(jnp.float32), axis=-1)
    log_t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits_btv).astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(log_s) * (log_s - log_t), axis=-1)


def mopd_loss(student_logits_btv: jax.Array, teacher_logits_btv: jax.Array, mask_bt: jax.Array,
              denominator: jax.Array | float | None = None) -> jax.Array:
    """Masked mean reverse KL of the student from the teacher over the student's generated tokens.

    Position t's logits are the distributions for token t+1, so `mask_bt[t]` is 1 when token t+1 was
    sampled by the student (not the prompt).
    """
    return _masked_mean(reverse_kl_per_token(student_logits_btv, teacher_logits_btv), mask_bt, denominator)


def group_advantages(rewards_n: jax.Array, group_size: int, scale: bool = True, eps: float = 1e-6) -> jax.Array:
    """GRPO advantages [n]: each reward minus its group's mean, divided by the group's standard deviation
    (population, + eps) when `scale`. Rewards come grouped: rows g*group_size .. (g+1)*group_size - 1 are
    the rollouts of prompt g. A group whose rewards are all equal gets zero advantages."""
    n = rewards_n.shape[0]
    if group_size < 1 or n % group_size:
        raise ConfigError(f"GRPO: {n} rewards do not split into groups of {group_size}")
    r = rewards_n.astype(jnp.float32).reshape(n // group_size, group_size)
    centred = r - jnp.mean(r, axis=1, keepdims=True)
    if scale:
        centred = centred / (jnp.std(r, axis=1, keepdims=True) + eps)
    return centred.reshape(n)


def grpo_loss(logp_bt: jax.Array, old_logp_bt: jax.Array, ref_logp_bt: jax.Array, advantages_b: jax.Array,
              mask_bt: jax.Array, clip_eps: float = 0.2, kl_coef: float = 0.0,
              denominator: jax.Array | float | None = None) -> jax.Array:
    """Clipped policy-gradient loss with a KL penalty to the reference, on the sampled tokens' log-probs.

    per token: -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + kl_coef * k3, where
    ratio = exp(logp - old_logp) and k3 = exp(ref - logp) - (ref - logp) - 1 (>= 0, zero when equal).
    """
    ratio = jnp.exp(logp_bt - jax.lax.stop_gradient(old_logp_bt))
    advantage = advantages_b.astype(jnp.float32)[:, None]
    surrogate = jnp.minimum(ratio * advantage, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantage)
    log_ref_ratio = jax.lax.stop_gradient(ref_logp_bt) - logp_bt
    k3 = jnp.exp(log_ref_ratio) - log_ref_ratio - 1.0
    return _masked_mean(-surrogate + kl_coef * k3, mask_bt, denominator)


def token_logprobs(logits_btv: jax.Array, tokens_bt: jax.Array) -> jax.Array:
    """log p(token) [b, t] of given tokens under logits (position t's logits score tokens_bt[t])."""
    log_p = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_p, tokens_bt[..., None], axis=-1)[..., 0]
