"""The prefix cache's bookkeeping (host arrays stand in for device ones): chained block keys, the
deepest usable hit, and least-recently-used eviction within the byte budget (the deepest blocks of a
chain go first, a chain longer than the budget keeps its shallowest blocks); one row's cache entries
copied out and back in either cache layout. Hits served by the scheduler are tests/test_scheduler.py's,
the flags tests/test_serve.py's."""

import numpy as np
import pytest

from nemojax.generate.prefix_cache import PrefixCache

BLOCK = 4
SPAN = (np.zeros(10, np.float32),)  # 40 bytes
STATES = (np.zeros(5, np.float32),)  # 20 bytes


def fill(cache, prompt, states_at=None):
    """Store every key of `prompt`, with states at the block indices in `states_at` (default: all)."""
    keys = cache.keys(prompt)
    for j in range(len(keys)):
        cache.add_span(keys, j, SPAN)
        if states_at is None or j in states_at:
            cache.add_states(keys[:j + 1], STATES)
    cache.touch(keys)
    return keys


def test_keys_chain_whole_blocks_before_the_last_token():
    cache = PrefixCache(10**6, BLOCK)
    prompt = list(range(3, 16))  # 13 tokens: blocks ending at 4, 8, 12
    keys = cache.keys(prompt)
    assert len(keys) == 3 and len(cache.keys(prompt[:12])) == 2  # a hit always leaves a token to prefill
    assert cache.keys(prompt[:9]) == keys[:2]
    changed = cache.keys([99] + prompt[1:])  # the first token differs: every later key does
    assert not set(changed) & set(keys)
    with_next = PrefixCache(10**6, BLOCK, with_next_token=True)
    assert with_next.keys(prompt)[0][1] == prompt[4] and keys[0][1] == -1


def test_lookup_takes_the_deepest_block_with_states():
    cache = PrefixCache(10**6, BLOCK)
    prompt = list(range(3, 20))  # 17 tokens: 4 usable blocks
    keys = fill(cache, prompt, states_at={0, 2})
    assert len(cache.lookup(keys)) == 3  # block 3 has no states: the hit stops at block 2
    assert len(cache.lookup(keys[:2])) == 1
    assert cache.lookup(cache.keys([1] + prompt[1:])) == []
    assert cache.stats.hits == 2 and cache.stats.hit_tokens == 4 * BLOCK and cache.stats.lookups == 3


def test_eviction_keeps_the_budget_and_drops_deepest_least_recent_blocks():
    entry = 60  # SPAN + STATES bytes
    cache = PrefixCache(5 * entry, BLOCK)
    old = fill(cache, list(range(3, 16)))  # 3 entries
    new = fill(cache, list(range(50, 63)))  # 3 more: one must go
    assert cache.nbytes == 5 * entry == sum(e.nbytes for e in cache.entries.values())
    assert cache.stats.evictions == 1 and old[2] not in cache.entries and old[1] in cache.entries
    assert len(cache.lookup(old)) == 2  # still a (shallower) hit; now the most recent chain
    fill(cache, list(range(70, 79)))  # 2 entries: the other chain's deepest blocks go
    assert new[2] not in cache.entries and new[1] not in cache.entries and new[0] in cache.entries
    assert cache.nbytes <= cache.budget_bytes and len(cache.lookup(old)) == 2


def test_a_chain_longer_than_the_budget_keeps_its_shallowest_blocks():
    cache = PrefixCache(3 * 60, BLOCK)
    keys = fill(cache, list(range(3, 24)))  # 5 blocks, room for 3
    assert list(cache.entries) == keys[2::-1] and cache.nbytes == 3 * 60  # no orphaned deeper block
    assert len(cache.lookup(keys)) == 3


def test_entries_larger_than_the_budget_are_not_kept():
    cache = PrefixCache(30, BLOCK)
    keys = fill(cache, list(range(3, 12)))
    assert cache.entries == {} and cache.nbytes == 0 and cache.lookup(keys) == []
    with pytest.raises(ValueError, match="block size"):
        PrefixCache(100, 0)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_row_span_and_states_round_trip_in_either_cache_layout(scan_layers):
    """Copying one row's positions and states out and into another row moves exactly those entries, per
    layer or stacked per kind (axes found by name, so a kv-major layout works the same)."""
    import jax
    import jax.numpy as jnp

    from nemojax.config import from_hf_config
    from nemojax.generate import caches
    from nemojax.model import init_cache

    config = from_hf_config(dict(vocab_size=40, hidden_size=16, hybrid_override_pattern="M*M*", num_attention_heads=2,
                                 num_key_value_heads=1, head_dim=4, mamba_num_heads=2, mamba_head_dim=4,
                                 ssm_state_size=4, n_groups=1, compute_dtype="float32", scan_layers=scan_layers))
    cache = init_cache(config, 3, 12)
    leaves, treedef = jax.tree.flatten(cache)
    cache = jax.tree.unflatten(treedef, [jnp.arange(a.size).reshape(a.shape).astype(a.dtype) for a in leaves])

    @jax.jit
    def check(cache):
        span, states = caches.row_span(cache, 0, 4, 4), caches.row_states(cache, 0)
        moved = caches.put_row_states(caches.put_row_span(cache, 2, 8, span), 2, states)
        rows = jnp.asarray([0, 1])
        return (span, states, caches.row_span(moved, 2, 8, 4), caches.row_states(moved, 2),
                caches.take_rows(moved, rows), caches.take_rows(cache, rows),  # other rows untouched
                caches.row_span(moved, 2, 0, 8), caches.row_span(cache, 2, 0, 8))  # and row 2 before position 8

    span, states, *pairs = check(cache)
    for got, want in [(pairs[0], span), (pairs[1], states), (pairs[2], pairs[3]), (pairs[4], pairs[5])]:
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(g, w)
    attention, mamba = (2, 2) if not scan_layers else (1, 1)  # per layer, or stacked per kind
    assert len(span) == 3 * attention and len(states) == 1 + 2 * mamba  # k, v, valid; index, conv, ssm
