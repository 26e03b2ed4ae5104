"""Tier 2: reference ops against slow, obviously-correct versions (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.ops.attention import causal_mask, gqa_attention
from nemojax.ops.grouped_matmul import grouped_matmul, grouped_matmul_tiled
from nemojax.ops.ssd import ssd_chunked, ssd_sequential, ssd_step


def _ssd_inputs(key, b, t, h, p, g, n):
    ks = jax.random.split(key, 6)
    x = jax.random.normal(ks[0], (b, t, h, p))
    dt = jax.nn.softplus(jax.random.normal(ks[1], (b, t, h)) - 1.0)
    a = -jnp.exp(jax.random.normal(ks[2], (h,)))
    bm = jax.random.normal(ks[3], (b, t, g, n))
    cm = jax.random.normal(ks[4], (b, t, g, n))
    s0 = jax.random.normal(ks[5], (b, h, p, n))
    return x, dt, a, bm, cm, s0


@pytest.mark.parametrize("t,chunk", [(1, 4), (7, 4), (16, 4), (33, 8), (20, 64)])
@pytest.mark.parametrize("with_state", [False, True])
def test_ssd_chunked_equals_sequential(t, chunk, with_state):
    x, dt, a, bm, cm, s0 = _ssd_inputs(jax.random.key(t), 2, t, 4, 3, 2, 5)
    init = s0 if with_state else None
    y, final = ssd_chunked(x, dt, a, bm, cm, chunk, init)
    y_ref, final_ref = ssd_sequential(x, dt, a, bm, cm, init)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(final, final_ref, rtol=1e-4, atol=1e-4)


def test_ssd_gradients_match_sequential():
    x, dt, a, bm, cm, s0 = _ssd_inputs(jax.random.key(0), 1, 11, 4, 3, 2, 5)

    def loss(fn, *args):
        y, s = fn(*args)
        return jnp.sum(jnp.sin(y)) + jnp.sum(s ** 2)

    chunked = jax.grad(lambda *v: loss(lambda *w: ssd_chunked(*w[:5], 4, w[5]), *v), argnums=range(6))
    seq = jax.grad(lambda *v: loss(lambda *w: ssd_sequential(*w), *v), argnums=range(6))
    for g1, g2 in zip(chunked(x, dt, a, bm, cm, s0), seq(x, dt, a, bm, cm, s0), strict=True):
        np.testing.assert_allclose(g1, g2, rtol=1e-3, atol=1e-4)


def test_ssd_chunks_compose_across_calls():
    """Prefill in two pieces, carrying the state, equals one pass (what chunked prefill relies on)."""
    x, dt, a, bm, cm, _ = _ssd_inputs(jax.random.key(3), 2, 19, 4, 3, 2, 5)
    y_all, s_all = ssd_chunked(x, dt, a, bm, cm, 8)
    y1, s1 = ssd_chunked(x[:, :7], dt[:, :7], a, bm[:, :7], cm[:, :7], 8)
    y2, s2 = ssd_chunked(x[:, 7:], dt[:, 7:], a, bm[:, 7:], cm[:, 7:], 8, s1)
    y3, s3 = ssd_step(s2, x[:, -1], dt[:, -1] * 0, a, bm[:, -1], cm[:, -1])
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), y_all, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s2, s_all, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s3, s2, rtol=1e-6)  # dt = 0 leaves the state untouched


@pytest.mark.parametrize("sizes", [[5, 0, 3, 9], [0, 0, 17, 0], [1, 1, 1, 1], [40, 2, 0, 30], [0, 2, 0, 1, 0, 0]])
def test_grouped_matmul_equals_per_group_matmul(sizes):
    rng = np.random.default_rng(sum(sizes))
    m, k, n = sum(sizes), 6, 5
    x = rng.normal(size=(m, k)).astype(np.float32)
    w = rng.normal(size=(len(sizes), k, n)).astype(np.float32)
    y = grouped_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes))
    groups = np.repeat(np.arange(len(sizes)), sizes)
    expected = np.einsum("mk,mkn->mn", x, w[groups])
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    grad_w = jax.grad(lambda w_: jnp.sum(grouped_matmul(jnp.asarray(x), w_, jnp.asarray(sizes)) ** 2))(w)
    grad_ref = jax.grad(lambda w_: jnp.sum(jnp.einsum("mk,mkn->mn", x, w_[groups]) ** 2))(w)
    np.testing.assert_allclose(grad_w, grad_ref, rtol=1e-4, atol=1e-4)


def test_tiled_lowering_equals_ragged_dot_with_trailing_rows():
    """The CPU tiles and XLA's ragged_dot (the GPU lowering) agree, including rows past the groups."""
    rng = np.random.default_rng(0)
    sizes = jnp.asarray([3, 0, 6, 2])
    x = jnp.asarray(rng.normal(size=(15, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 4, 3)), jnp.float32)
    tiled = grouped_matmul_tiled(x, w, sizes, tile=8)
    np.testing.assert_allclose(tiled, jax.lax.ragged_dot(x, w, sizes), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(tiled[11:], 0)
    few = grouped_matmul_tiled(x[:4], w, jnp.asarray([1, 0, 2, 0]))  # fewer rows than groups: per-row path
    np.testing.assert_allclose(few, jax.lax.ragged_dot(x[:4], w, jnp.asarray([1, 0, 2, 0])), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(few[3:], 0)


def _softmax_attention_numpy(q, k, v, mask):
    """The textbook formula in float64, kv heads repeated for their query heads."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    repeat = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, repeat, axis=2), np.repeat(v, repeat, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(np.asarray(mask)[:, None], scores, -np.inf)
    peak = np.max(scores, axis=-1, keepdims=True)
    weights = np.where(np.isfinite(peak), np.exp(scores - np.where(np.isfinite(peak), peak, 0)), 0)
    weights = weights / np.maximum(weights.sum(-1, keepdims=True), 1e-300)
    return np.einsum("bhts,bshd->bthd", weights, v)


@pytest.mark.parametrize("key_block", [None, 4, 13])
def test_gqa_attention_equals_softmax_formula(key_block):
    """One block and key blocks with a running softmax (4 does not divide 13 keys: padded) agree with
    the formula, padding and causality from the mask, a fully masked query row gives zeros; gradients
    of the blocked form equal those of one block."""
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 5, 4, 8))
    k, v = (jax.random.normal(key, (2, 13, 2, 8)) for key in keys[1:])
    valid = np.ones((2, 13), bool)
    valid[1, :9] = False  # row 1: left padding, so its first query sees nothing
    mask = causal_mask(jnp.asarray(valid), 8, 5)
    got = gqa_attention(q, k, v, mask, key_block=key_block)
    np.testing.assert_allclose(got, _softmax_attention_numpy(q, k, v, mask), rtol=1e-5, atol=1e-6)
    assert not np.any(np.asarray(got)[1, 0])

    def loss(block):
        return lambda *args: jnp.sum(jnp.sin(gqa_attention(*args, mask, key_block=block)))

    grads = jax.grad(loss(key_block), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(loss(13), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(grads, expected, strict=True):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_causal_attention_mask_is_built_per_block():
    """The causal form (key validity + query offset) equals the explicit mask, values and gradients, and
    its blocked backward keeps no [b, t, s] mask among its residuals (the explicit form does)."""
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (2, 6, 4, 8))
    k, v = (jax.random.normal(key, (2, 13, 2, 8)) for key in keys[1:])
    valid = np.ones((2, 13), bool)
    valid[0, :3] = False

    def explicit(q, k, v):
        return gqa_attention(q, k, v, causal_mask(jnp.asarray(valid), 7, 6), key_block=4)

    def causal(q, k, v):
        return gqa_attention(q, k, v, key_block=4, causal_valid_bs=jnp.asarray(valid), query_offset=7)

    for f, g in zip(jax.grad(lambda *a: jnp.sum(jnp.sin(causal(*a))), argnums=(0, 1, 2))(q, k, v),
                    jax.grad(lambda *a: jnp.sum(jnp.sin(explicit(*a))), argnums=(0, 1, 2))(q, k, v), strict=True):
        np.testing.assert_allclose(f, g, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(causal(q, k, v), explicit(q, k, v), rtol=1e-6, atol=1e-6)

    def largest_mask_residual(fn):
        _, backward = jax.vjp(fn, q, k, v)
        return max(leaf.size for leaf in jax.tree.leaves(backward) if leaf.dtype == bool)

    assert largest_mask_residual(causal) == valid.size
    assert largest_mask_residual(explicit) >= 2 * 6 * 13


def test_packed_documents_join_the_per_block_causal_mask():
    """Document numbers in the causal form (per-row query offsets, keys of a cache whose entries before
    the offset continue document 0) equal the explicit causal-and-same-document mask, values and
    gradients, and the blocked backward keeps neither a [b, t, s] mask nor [b, t, s] document numbers."""
    keys = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(keys[0], (2, 6, 4, 8))
    k, v = (jax.random.normal(key, (2, 13, 2, 8)) for key in keys[1:])
    valid = np.ones((2, 13), bool)
    valid[1, :2] = False
    offset = jnp.asarray([7, 4])
    query_doc = jnp.asarray([[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 2, 2]])
    key_doc = np.zeros((2, 13), np.int32)
    for row in range(2):
        key_doc[row, int(offset[row]):int(offset[row]) + 6] = query_doc[row, :13 - int(offset[row])]
    key_doc = jnp.asarray(key_doc)
    causal_only = causal_mask(jnp.asarray(valid), offset, 6)
    explicit_mask = causal_only & (query_doc[:, :, None] == key_doc[:, None, :])
    assert explicit_mask.any(-1).all() and (explicit_mask != causal_only).any()  # documents hide keys

    def explicit(q, k, v):
        return gqa_attention(q, k, v, explicit_mask, key_block=4)

    def packed(q, k, v):
        return gqa_attention(q, k, v, key_block=4, causal_valid_bs=jnp.asarray(valid), query_offset=offset,
                             query_doc_bt=query_doc, key_doc_bs=key_doc)

    np.testing.assert_allclose(packed(q, k, v), _softmax_attention_numpy(q, k, v, explicit_mask), rtol=1e-5, atol=1e-6)
    one_block = gqa_attention(q, k, v, causal_valid_bs=jnp.asarray(valid), query_offset=offset,
                              query_doc_bt=query_doc, key_doc_bs=key_doc)
    np.testing.assert_allclose(one_block, packed(q, k, v), rtol=1e-5, atol=1e-6)
    for f, g in zip(jax.grad(lambda *a: jnp.sum(jnp.sin(packed(*a))), argnums=(0, 1, 2))(q, k, v),
                    jax.grad(lambda *a: jnp.sum(jnp.sin(explicit(*a))), argnums=(0, 1, 2))(q, k, v), strict=True):
        np.testing.assert_allclose(f, g, rtol=1e-5, atol=1e-6)
    _, backward = jax.vjp(packed, q, k, v)
    masks = [leaf for leaf in jax.tree.leaves(backward)
             if leaf.dtype == bool or jnp.issubdtype(leaf.dtype, np.integer)]
    assert masks and max(leaf.size for leaf in masks) == valid.size


def test_blocked_causal_attention_takes_one_query_offset_per_row():
    """The serving engine prefills rows at different cache positions (`query_offset` [b]): the blocked
    causal form equals the explicit per-row mask (a batch of rows once failed to broadcast here)."""
    keys = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(keys[0], (3, 5, 4, 8))
    k, v = (jax.random.normal(key, (3, 13, 2, 8)) for key in keys[1:])
    valid = jnp.ones((3, 13), bool)
    offset = jnp.asarray([0, 4, 8], jnp.int32)
    blocked = gqa_attention(q, k, v, key_block=4, causal_valid_bs=valid, query_offset=offset)
    explicit = gqa_attention(q, k, v, causal_mask(valid, offset, 5), key_block=13)
    np.testing.assert_allclose(blocked, explicit, rtol=1e-6, atol=1e-6)
