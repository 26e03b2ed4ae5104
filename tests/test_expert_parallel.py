"""Expert parallelism divides the work: each device's grouped matmuls multiply exactly the rows routed
to its experts (all devices together: tokens x k), with forward and gradients equal to one device; an
optional capacity factor drops (and counts) the copies past each expert's capacity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax import sharding
from nemojax.model.layers import relu2
from nemojax.model.moe import dropless_experts
from nemojax.ops.expert_banks import expert_matmul, use_expert_matmul
from nemojax.ops.expert_parallel import expert_capacity, expert_parallel_moe

TOKENS, E, WIDTH, F, K = 32, 8, 6, 4, 3


def _problem(seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (TOKENS, WIDTH))
    # skewed routing: some experts get many copies, some none
    logits = jax.random.normal(keys[1], (TOKENS, E)) + jnp.linspace(2.0, -2.0, E)
    ids = jnp.argsort(-logits, axis=1)[:, :K].astype(jnp.int32)
    w = jax.random.uniform(keys[2], (TOKENS, K))
    up, down = jax.random.normal(keys[3], (E, WIDTH, F)), jax.random.normal(keys[4], (E, F, WIDTH))
    return x, ids, w, up, down


def _loss(fn, x, w, up, down):
    return jnp.sum(fn(x, w, up, down) ** 2)


def test_each_device_multiplies_only_its_routed_rows_and_matches_one_device():
    """data=2 x expert=4: tokens split over data, gathered over expert. Every grouped matmul on device
    (d, e) is handed group sizes summing to the copies of data shard d routed to e's experts."""
    x, ids, w, up, down = _problem()
    mesh = sharding.make_mesh(data=2, expert=4)
    seen = []

    def recording_matmul(x_mk, w_ekn, group_sizes):
        jax.debug.callback(lambda d, e, n: seen.append((int(d), int(e), int(n))), jax.lax.axis_index("data"),
                           jax.lax.axis_index("expert"), jnp.sum(group_sizes))
        return expert_matmul(x_mk, w_ekn, group_sizes)

    def ep(x, w, up, down):
        return expert_parallel_moe(x, ids, w, up, down, relu2)

    with sharding.use_mesh(mesh), use_expert_matmul(recording_matmul):
        (y, stats) = jax.jit(ep)(x, w, up, down)
        jax.block_until_ready(y)
        got = jax.jit(jax.value_and_grad(lambda *a: _loss(lambda *b: ep(*b)[0], *a), argnums=(0, 1, 2, 3)))(
            x, w, up, down)
    ids_np = np.asarray(ids)
    expected = {(d, e): int(np.sum((ids_np[d * 16:(d + 1) * 16] // 2) == e)) for d in range(2) for e in range(4)}
    forward = seen[:16]  # 8 devices x (up, down) in the forward
    assert sorted(set(forward)) == sorted((d, e, n) for (d, e), n in expected.items())
    assert sum(expected.values()) == TOKENS * K
    assert stats.routed_rows.tolist() == [expected[0, e] + expected[1, e] for e in range(4)]
    assert int(stats.dropped_rows) == 0

    want = jax.value_and_grad(lambda *a: _loss(lambda *b: dropless_experts(b[0], ids, *b[1:]), *a),
                              argnums=(0, 1, 2, 3))(x, w, up, down)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("capacity_factor", [0.6, 4.0])
def test_capacity_factor_drops_late_copies_and_counts_them(capacity_factor):
    """Each expert keeps its first ceil(cf * T * k / E) copies in token order (T: the tokens one expert
    group sees), the others contribute nothing and are counted; a large factor drops none."""
    x, ids, w, up, down = _problem(1)
    mesh = sharding.make_mesh(expert=8)
    with sharding.use_mesh(mesh):
        y, stats = jax.jit(lambda *a: expert_parallel_moe(*a, relu2, capacity_factor=capacity_factor))(
            x, ids, w, up, down)
    capacity = expert_capacity(TOKENS, K, E, capacity_factor)
    ids_np = np.asarray(ids)
    keep = np.zeros(ids_np.shape, bool)
    taken = np.zeros(E, int)
    for t in range(TOKENS):
        for j in range(K):
            e = ids_np[t, j]
            keep[t, j] = taken[e] < capacity
            taken[e] += 1
    assert int(stats.dropped_rows) == int((~keep).sum())
    assert (capacity_factor > 1) == (int(stats.dropped_rows) == 0)
    assert int(stats.routed_rows.sum()) == int(keep.sum())
    want = dropless_experts(x, ids, jnp.where(keep, w, 0.0), up, down)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
