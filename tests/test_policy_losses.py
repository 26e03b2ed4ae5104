"""On-policy post-training losses against direct float64 computations: MOPD reverse KL (and a gradient
step of a model toward its teacher), GRPO group advantages and the clipped objective with its KL penalty."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.config import from_hf_config
from nemojax.errors import ConfigError
from nemojax.model import NemotronH, init_variables
from nemojax.train.policy_losses import group_advantages, grpo_loss, mopd_loss, token_logprobs


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_mopd_loss_is_the_masked_mean_reverse_kl():
    ks = jax.random.split(jax.random.key(0), 2)
    student, teacher = (3.0 * jax.random.normal(k, (2, 5, 11)) for k in ks)
    mask = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 1]], np.float32)  # the student's tokens only
    log_s, log_t = _log_softmax(student), _log_softmax(teacher)
    kl = (np.exp(log_s) * (log_s - log_t)).sum(-1)
    np.testing.assert_allclose(mopd_loss(student, teacher, mask), (kl * mask).sum() / mask.sum(), rtol=1e-5)
    assert float(mopd_loss(teacher, teacher, mask)) == pytest.approx(0.0, abs=1e-6)
    # Reverse, not forward: swapping the arguments gives another number.
    forward = (np.exp(log_t) * (log_t - log_s)).sum(-1)
    assert not np.allclose(forward * mask, kl * mask, atol=1e-2)
    with pytest.raises(ConfigError, match="vocabulary"):
        mopd_loss(student, teacher[..., :7], mask)


def test_mopd_gradient_moves_only_the_students_tokens_toward_the_teacher():
    teacher = 2.0 * jax.random.normal(jax.random.key(1), (1, 6, 9))
    student = jnp.zeros((1, 6, 9))
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1]], jnp.float32)
    grad_fn = jax.jit(jax.value_and_grad(lambda s: mopd_loss(s, teacher, mask)))
    first, grads = grad_fn(student)
    assert np.all(np.asarray(grads[0, :2]) == 0)  # prompt positions get no gradient
    for _ in range(300):
        loss, grads = grad_fn(student)
        student = student - 2.0 * grads
    assert float(loss) < 1e-3 * float(first)
    np.testing.assert_allclose(jax.nn.softmax(student[0, 2:]), jax.nn.softmax(teacher[0, 2:]), atol=1e-2)


MICRO = dict(vocab_size=32, hidden_size=16, hybrid_override_pattern="M*", num_attention_heads=2,
             num_key_value_heads=1, head_dim=8, mamba_num_heads=2, mamba_head_dim=8, ssm_state_size=4, n_groups=1,
             chunk_size=4, compute_dtype="float32", param_dtype="float32")


def test_a_mopd_step_brings_a_model_closer_to_its_teacher():
    """One SGD step on the student's parameters lowers the reverse KL to a differently initialised teacher
    on the student's own tokens."""
    cfg = from_hf_config(MICRO)
    model = NemotronH(cfg)
    student, teacher = (jax.jit(lambda k: init_variables(cfg, k))(jax.random.key(seed)) for seed in (0, 1))
    tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, cfg.vocab_size)
    mask = jnp.ones((2, 10), jnp.float32).at[:, :4].set(0.0)  # a 4-token prompt, then the student's tokens
    teacher_logits = model.apply(teacher, tokens)

    @jax.jit
    def loss_and_grads(params):
        return jax.value_and_grad(lambda p: mopd_loss(model.apply({**student, "params": p}, tokens),
                                                      teacher_logits, mask))(params)

    before, grads = loss_and_grads(student["params"])
    stepped = jax.tree.map(lambda p, g: p - 0.05 * g, student["params"], grads)
    after, _ = loss_and_grads(stepped)
    assert float(after) < float(before) - 1e-4


def test_group_advantages_are_normalised_within_each_group():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 5.0, 5.0, 5.0, 5.0, 0.2, 0.9, 0.4, 0.1], np.float32)
    adv = np.asarray(group_advantages(jnp.asarray(rewards), 4))
    groups = rewards.reshape(3, 4).astype(np.float64)
    direct = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(adv, direct.reshape(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(adv.reshape(3, 4).mean(1), 0.0, atol=1e-6)
    np.testing.assert_allclose(adv.reshape(3, 4)[[0, 2]].std(1), 1.0, rtol=1e-4)
    np.testing.assert_array_equal(adv[4:8], 0.0)  # all rollouts equally good: no signal
    # Each group is normalised on its own: shifting and scaling one group changes nothing.
    moved = rewards.copy()
    moved[8:] = 10.0 * moved[8:] - 3.0
    np.testing.assert_allclose(group_advantages(jnp.asarray(moved), 4), adv, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(group_advantages(jnp.asarray(rewards), 4, scale=False),
                               (groups - groups.mean(1, keepdims=True)).reshape(-1), atol=1e-6)
    with pytest.raises(ConfigError, match="groups of 5"):
        group_advantages(jnp.asarray(rewards), 5)


def test_grpo_loss_matches_the_clipped_objective_with_k3_penalty():
    rng = np.random.default_rng(0)
    logp, old, ref = (np.log(rng.uniform(0.05, 0.9, (3, 4))).astype(np.float32) for _ in range(3))
    adv = np.array([1.5, -0.7, 0.3], np.float32)
    mask = np.array([[1, 1, 0, 1], [1, 1, 1, 1], [0, 1, 1, 0]], np.float32)
    ratio = np.exp(logp.astype(np.float64) - old)
    surrogate = np.minimum(ratio * adv[:, None], np.clip(ratio, 0.8, 1.2) * adv[:, None])
    k3 = np.exp(ref - logp.astype(np.float64)) - (ref - logp) - 1.0
    direct = ((-surrogate + 0.1 * k3) * mask).sum() / mask.sum()
    ours = grpo_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv), jnp.asarray(mask),
                     clip_eps=0.2, kl_coef=0.1)
    np.testing.assert_allclose(ours, direct, rtol=1e-5)
    assert np.any(np.abs(ratio - 1) > 0.2)  # the clip is exercised
    # On-policy (logp = old = ref) the gradient raises the log-prob of tokens with positive advantage.
    grads = jax.grad(lambda lp: grpo_loss(lp, jnp.asarray(logp), jnp.asarray(logp), jnp.asarray(adv),
                                          jnp.asarray(mask), kl_coef=0.1))(jnp.asarray(logp))
    np.testing.assert_allclose(grads, -(adv[:, None] * mask) / mask.sum(), rtol=1e-5, atol=1e-7)


def test_token_logprobs_pick_the_given_tokens():
    logits = jax.random.normal(jax.random.key(3), (2, 3, 7))
    tokens = jnp.asarray([[1, 6, 0], [3, 3, 2]])
    expected = np.take_along_axis(_log_softmax(logits), np.asarray(tokens)[..., None], -1)[..., 0]
    np.testing.assert_allclose(token_logprobs(logits, tokens), expected, rtol=1e-5)
