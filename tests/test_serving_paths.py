"""The serving fast paths against slow, obviously-correct versions: the grouped matmul's per-tile loop
(CPU decoding) and distinct-group ragged_dot (GPU decoding) against a per-group loop and the tiled
lowering, both expert projections in one loop against two grouped matmuls, the MoE at decoding sizes
against a per-token loop, the greedy argmax, the one-token SSM
update against the recurrence, and attention over a kv-major cache whose empty tail is skipped."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.generate.sampling import greedy_tokens
from nemojax.model.moe import dropless_experts
from nemojax.ops import grouped_matmul as gm
from nemojax.ops.attention import causal_mask, gqa_attention, gqa_attention_kv_major
from nemojax.ops.expert_banks import expert_matmul
from nemojax.ops.expert_mlp import grouped_mlp
from nemojax.ops.ssd import ssd_step


def _per_group(x, w, sizes):
    """y[i] = x[i] @ w[group(i)] one group at a time; rows past the groups stay zero."""
    y = np.zeros((x.shape[0], w.shape[2]), np.float64)
    start = 0
    for g, size in enumerate(sizes):
        y[start:start + size] = np.asarray(x[start:start + size], np.float64) @ np.asarray(w[g], np.float64)
        start += size
    return y


CASES = [  # (group sizes, rows m): empty groups, a group larger than a tile, rows past the sum, no rows at all
    ([1, 0, 2, 0, 0, 1], 4),
    ([0, 9, 0, 1], 12),
    ([3, 0, 0, 0, 0, 0, 0, 1], 6),
    ([0, 0, 0], 3),
]


@pytest.mark.parametrize("sizes,m", CASES)
def test_grouped_matmul_loop_and_distinct_equal_per_group(sizes, m):
    rng = np.random.default_rng(m)
    x = jnp.asarray(rng.normal(size=(m, 5)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(len(sizes), 5, 3)), jnp.float32)
    s = jnp.asarray(sizes, jnp.int32)
    expected = _per_group(x, w, sizes)
    for rows in (None, 2):  # the default tile height, and tiles smaller than a group
        np.testing.assert_allclose(gm.grouped_matmul_loop(x, w, s, rows=rows), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gm.grouped_matmul_distinct(x, w, s), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gm.grouped_matmul_tiled(x, w, s, tile=4), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gm.grouped_matmul(x, w, s), expected, rtol=1e-5, atol=1e-5)

    def loss(fn):
        return lambda x_, w_: jnp.sum(jnp.sin(fn(x_, w_, s)))

    got = jax.grad(loss(lambda *a: gm.grouped_matmul_loop(*a, rows=2)), argnums=(0, 1))(x, w)
    want = jax.grad(loss(lambda *a: gm.grouped_matmul_tiled(*a, tile=4)), argnums=(0, 1))(x, w)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_grouped_matmul_chooses_its_lowering_by_rows():
    """CPU: a loop that slices one group's weight at a time for few rows, static tiles for many; GPU: for
    fewer rows than groups, the ragged_dot runs over the gathered weights of at most m groups."""
    w, few, many = jnp.ones((8, 4, 2)), jnp.ones((6, 4)), jnp.ones((gm.LOOP_MAX_ROWS + 8, 4))

    def lowered(x, platform):
        sizes = jnp.zeros((8,), jnp.int32).at[1].set(x.shape[0])
        return jax.jit(gm.grouped_matmul).trace(x, w, sizes).lower(lowering_platforms=(platform,)).as_text()

    one_weight = "tensor<1x4x2xf32>"
    assert one_weight in lowered(few, "cpu") and one_weight not in lowered(many, "cpu")
    assert "tensor<6x4x2xf32>" in lowered(few, "cuda") and "tensor<6x4x2xf32>" not in lowered(many[:16], "cuda")


def test_grouped_matmul_casts_only_the_chosen_weights():
    """FP8 experts with bfloat16 rows: every lowering equals the matmul with the bank upcast first (exact:
    E4M3 values are bfloat16 values), and the CPU decoding program never holds the upcast bank."""
    e, k, n, sizes = 6, 16, 24, jnp.asarray([1, 0, 2, 0, 0, 1], jnp.int32)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(4, k)), jnp.bfloat16)
    w8 = jnp.asarray(rng.normal(size=(e, k, n)), jnp.float8_e4m3fn)
    want = np.asarray(gm.grouped_matmul_tiled(x, w8.astype(jnp.bfloat16), sizes, tile=4), np.float32)
    for fn in (gm.grouped_matmul_loop, gm.grouped_matmul_distinct, gm.grouped_matmul_tiled, gm.grouped_matmul):
        got = fn(x, w8, sizes)
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2, atol=1e-2)
    program = jax.jit(gm.grouped_matmul).lower(x, w8, sizes).compile().as_text()
    assert f"bf16[{e},{k},{n}]" not in program and f"f8e4m3fn[{e},{k},{n}]" in program


def test_grouped_mlp_equals_two_grouped_matmuls():
    """The fused CPU loop (both projections per expert tile) gives the values of the two grouped matmuls
    with the activation between them, for float32 and bfloat16 rows (float32 weights), and their
    gradients (empty groups, a group over several tiles, rows past the groups)."""
    relu2 = lambda a: jnp.square(jax.nn.relu(a))  # noqa: E731
    sizes = jnp.asarray([0, 9, 0, 1], jnp.int32)
    rng = np.random.default_rng(0)
    up = jnp.asarray(rng.normal(size=(4, 5, 6)), jnp.float32)
    down = jnp.asarray(rng.normal(size=(4, 6, 3)), jnp.float32)

    def fused(x, up, down):
        return grouped_mlp(x, up, down, sizes, relu2)

    def two(x, up, down):  # the float experts' two projections
        h = relu2(expert_matmul(x, up, sizes).astype(x.dtype))
        return expert_matmul(h, down, sizes).astype(x.dtype)

    for dtype in (jnp.float32, jnp.bfloat16):
        x = jnp.asarray(rng.normal(size=(12, 5)), dtype)
        got = jax.jit(fused)(x, up, down)
        assert got.dtype == dtype and not np.any(np.asarray(got, np.float32)[10:])
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(jax.jit(two)(x, up, down), np.float32))
    grads = [jax.jit(jax.grad(lambda *a, fn=fn: jnp.sum(jnp.sin(fn(*a))), argnums=(0, 1, 2)))(x.astype(jnp.float32),
                                                                                            up, down)
             for fn in (fused, two)]
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_moe_experts_at_decoding_sizes_equal_a_per_token_loop():
    """Decoding batches (T tokens, k of E experts each, some experts shared by several tokens)."""
    e, width, f, k = 6, 4, 3, 2
    rng = np.random.default_rng(0)
    up, down = rng.normal(size=(e, width, f)), rng.normal(size=(e, f, width))
    for tokens in (1, 3, 8):
        x = rng.normal(size=(tokens, width))
        ids = np.stack([rng.choice(e, k, replace=False) for _ in range(tokens)]).astype(np.int32)
        weights = rng.random((tokens, k))
        expected = np.zeros((tokens, width))
        for t in range(tokens):
            for j in range(k):
                h = np.maximum(x[t] @ up[ids[t, j]], 0) ** 2
                expected[t] += weights[t, j] * (h @ down[ids[t, j]])
        x32, w32, up32, down32 = (jnp.asarray(a, jnp.float32) for a in (x, weights, up, down))
        got = dropless_experts(x32, jnp.asarray(ids), w32, up32, down32)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_greedy_tokens_equal_argmax():
    logits = np.random.default_rng(0).normal(size=(6, 40)).astype(np.float32)
    logits[1, [3, 7]] = 9.0  # a tie: the first index
    logits[2, [9, 5]] = np.nan  # NaN wins, the first one
    logits[3] = -np.inf
    logits[4, 2] = np.inf
    logits[5] = 0.0
    np.testing.assert_array_equal(greedy_tokens(jnp.asarray(logits)), np.argmax(logits, axis=-1))


def test_ssm_step_equals_the_recurrence():
    """state' = exp(dt A) state + dt x B^T per head (B, C shared by a group's heads), y = state' C."""
    b, h, p, g, n = 2, 4, 3, 2, 5
    rng = np.random.default_rng(1)
    state, x = rng.normal(size=(b, h, p, n)), rng.normal(size=(b, h, p))
    dt, a = rng.random((b, h)), -rng.random(h)
    bm, cm = rng.normal(size=(b, g, n)), rng.normal(size=(b, g, n))
    group = np.repeat(np.arange(g), h // g)
    new = (np.exp(dt * a)[:, :, None, None] * state
           + (dt[:, :, None] * x)[..., None] * bm[:, group][:, :, None, :])
    y, got = ssd_step(*(jnp.asarray(v, jnp.float32) for v in (state, x, dt, a, bm, cm)))
    np.testing.assert_allclose(got, new, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, np.einsum("bhpn,bhn->bhp", new, cm[:, group]), rtol=1e-5, atol=1e-5)


def test_attention_over_a_kv_major_cache_skips_its_empty_tail():
    """Keys past the written part of a cache never matter: blocks of them are skipped, with the same
    values and gradients as one block over everything."""
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 5, 4, 8))
    k, v = (jax.random.normal(key, (2, 2, 16, 8)) for key in keys[1:])  # [b, kv, s, d], 16 slots
    valid = np.zeros((2, 16), bool)
    valid[:, :7] = True  # 2 prompt tokens + 5 new ones written; slots 7.. are empty
    valid[1, :3] = False  # row 1 is left-padded
    mask = causal_mask(jnp.asarray(valid), 2, 5)
    whole = gqa_attention_kv_major(q, k, v, mask, key_block=16)
    np.testing.assert_allclose(gqa_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask), whole,
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gqa_attention_kv_major(q, k, v, mask, key_block=4), whole, rtol=1e-5, atol=1e-6)

    def loss(block):
        return lambda *a: jnp.sum(jnp.sin(gqa_attention_kv_major(*a, mask, key_block=block)))

    for got, want in zip(jax.grad(loss(4), argnums=(0, 1, 2))(q, k, v), jax.grad(loss(16), argnums=(0, 1, 2))(q, k, v),
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
