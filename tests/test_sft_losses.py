"""Fine-tuning losses: the MTP block chained over depths against the direct formula, packed documents
scoring what their documents score alone, and targets outside the loss mask (a chat's non-assistant
tokens) leaving loss and gradients untouched."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.config import from_hf_config
from nemojax.model import NemotronH, init_variables
from nemojax.train.losses import model_losses, token_counts

CONFIG = dict(vocab_size=64, hidden_size=32, hybrid_override_pattern="M*", num_attention_heads=2,
              num_key_value_heads=1, head_dim=16, mamba_num_heads=2, mamba_head_dim=16, ssm_state_size=8,
              n_groups=1, chunk_size=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
              moe_shared_expert_intermediate_size=16, mtp_hybrid_override_pattern="*E", num_nextn_predict_layers=1,
              compute_dtype="float32", param_dtype="float32", mtp_num_depths=2)
ROWS, T = 5, 12
MTP_WEIGHT = 0.3


@pytest.fixture(scope="module")
def setup():
    cfg = from_hf_config(CONFIG)
    model = NemotronH(cfg)
    variables = jax.jit(lambda key: init_variables(cfg, key))(jax.random.key(0))

    @jax.jit
    def loss_and_grads(params, batch, denominators):
        fn = lambda p: model_losses(model, p, variables["buffers"], batch, denominators, MTP_WEIGHT, 0.0)
        return jax.value_and_grad(fn, has_aux=True)(params)

    return model, variables, loss_and_grads


def _batch(tokens_bt1, mask_bt, segments_bt=None):
    batch = {"inputs": jnp.asarray(tokens_bt1[:, :-1], jnp.int32), "targets": jnp.asarray(tokens_bt1[:, 1:], jnp.int32),
             "loss_mask": jnp.asarray(mask_bt, jnp.float32)}
    batch["segments"] = jnp.ones((ROWS, T), jnp.int32) if segments_bt is None else jnp.asarray(segments_bt, jnp.int32)
    return batch


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_two_depth_mtp_loss_matches_the_direct_formula(setup):
    """MTP = (L1 + L2) / 2, L_k = masked mean of -log p_k(token t+k+1), p_1 from (h_t, token t+1) and p_2 from
    (depth 1's output at t, token t+2)."""
    model, variables, loss_and_grads = setup
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, (ROWS, T + 1))
    mask = (rng.random((ROWS, T)) > 0.3).astype(np.float32)
    batch = _batch(tokens, mask)
    (total, parts), _ = loss_and_grads(variables["params"], batch, token_counts(batch, 2))

    @jax.jit
    def chained(ids):
        logits, h0, _ = model.apply(variables, ids, method="forward")
        logits1, h1, _ = model.apply(variables, h0[:, :-1], ids[:, 1:], method="mtp_forward")
        logits2, _, _ = model.apply(variables, h1[:, :-1], ids[:, 2:], method="mtp_forward")
        return logits, logits1, logits2

    logits, logits1, logits2 = chained(batch["inputs"])
    depth_losses = []
    for k, depth_logits in ((1, logits1), (2, logits2)):
        logp = _log_softmax(depth_logits)
        picked = np.take_along_axis(logp, tokens[:, k + 1:, None], axis=-1)[..., 0]  # token t+k+1
        depth_losses.append(-(picked * mask[:, k:]).sum() / mask[:, k:].sum())
    lm = -(np.take_along_axis(_log_softmax(logits), tokens[:, 1:, None], -1)[..., 0] * mask).sum() / mask.sum()
    np.testing.assert_allclose(parts["mtp_loss"], np.mean(depth_losses), rtol=1e-5)
    np.testing.assert_allclose(parts["lm_loss"], lm, rtol=1e-5)
    np.testing.assert_allclose(total, lm + MTP_WEIGHT * np.mean(depth_losses), rtol=1e-5)
    assert abs(depth_losses[0] - depth_losses[1]) > 1e-3  # the depths really score different targets


def _trained_mask(rng, segments_bt1):
    """A random 'assistant' mask, zero where the target (input t+1) starts another document."""
    crossing = segments_bt1[:, 1:] != segments_bt1[:, :-1]
    return ((rng.random(crossing.shape) > 0.25) & ~crossing).astype(np.float32)


def test_packed_documents_score_what_they_score_alone(setup):
    """Sums of the LM and MTP (both depths) losses over a packed batch equal the sums over its documents,
    each alone in a row (left-padded, id 0); gradients too. No target crosses a document end."""
    model, variables, loss_and_grads = setup
    rng = np.random.default_rng(1)
    lengths = [(4, 6, 3), (2, 11)]  # tokens per document (inputs + the last target), T + 1 per row
    tokens = rng.integers(0, 64, (len(lengths), T + 1))
    segments = np.stack([np.repeat(np.arange(1, len(ls) + 1), ls) for ls in lengths])
    mask = _trained_mask(rng, segments)
    pad = ROWS - len(lengths)  # fill the batch with rows that train nothing (one compiled program for both)
    packed = _batch(np.pad(tokens, ((0, pad), (0, 0))), np.pad(mask, ((0, pad), (0, 0))),
                    np.pad(segments[:, :-1], ((0, pad), (0, 0))))

    alone_tokens, alone_mask, alone_segments = [], [], []
    for row, ls in enumerate(lengths):
        for start, n in zip(np.cumsum((0,) + ls[:-1]), ls, strict=True):
            left = T + 1 - n
            alone_tokens.append(np.pad(tokens[row, start:start + n], (left, 0)))
            alone_mask.append(np.pad(mask[row, start:start + n - 1], (left, 0)))
            alone_segments.append(np.pad(np.ones(n - 1, np.int32), (left, 0)))
    assert len(alone_tokens) == ROWS
    alone = _batch(np.stack(alone_tokens), np.stack(alone_mask), np.stack(alone_segments))

    sums = (jnp.float32(1.0), (jnp.float32(1.0), jnp.float32(1.0)))  # unnormalised: sums add over documents
    (packed_total, packed_parts), packed_grads = loss_and_grads(variables["params"], packed, sums)
    (alone_total, alone_parts), alone_grads = loss_and_grads(variables["params"], alone, sums)
    for name in ("lm_loss", "mtp_loss"):
        np.testing.assert_allclose(packed_parts[name], alone_parts[name], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(packed_grads), jax.tree.leaves(alone_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
    # Without segments the packed rows would score differently: the test can tell.
    unpacked = dict(packed, segments=(packed["segments"] > 0).astype(jnp.int32))
    (_, unpacked_parts), _ = loss_and_grads(variables["params"], unpacked, sums)
    assert abs(float(unpacked_parts["mtp_loss"]) - float(packed_parts["mtp_loss"])) > 1e-3


def test_targets_outside_the_loss_mask_change_nothing(setup):
    """A chat's prompt tokens (loss mask 0) may hold anything as targets: loss and gradients do not move;
    changing one trained target does move them."""
    _, variables, loss_and_grads = setup
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 64, (ROWS, T + 1))
    mask = np.zeros((ROWS, T), np.float32)
    mask[:, 6:] = 1.0  # an "assistant" reply after a prompt
    batch = _batch(tokens, mask)
    (total, _), grads = loss_and_grads(variables["params"], batch, token_counts(batch, 2))
    changed = tokens.copy()
    changed[:, 1:5] = (changed[:, 1:5] + 7) % 64  # prompt targets only (inputs 1..4 are targets 0..3)
    changed_batch = dict(batch, targets=jnp.asarray(changed[:, 1:], jnp.int32))
    (changed_total, _), changed_grads = loss_and_grads(variables["params"], changed_batch,
                                                       token_counts(changed_batch, 2))
    np.testing.assert_allclose(changed_total, total, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(changed_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
    moved = dict(batch, targets=batch["targets"].at[0, 8].set((batch["targets"][0, 8] + 1) % 64))
    (moved_total, _), _ = loss_and_grads(variables["params"], moved, token_counts(moved, 2))
    assert abs(float(moved_total) - float(total)) > 1e-4
