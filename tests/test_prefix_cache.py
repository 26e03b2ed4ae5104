"""The prefix cache's bookkeeping (host arrays stand in for device ones): chained block keys, the
deepest usable hit, and least-recently-used eviction within the byte budget (the deepest blocks of a
chain go first). Hits served by the scheduler are tests/test_scheduler.py's; the flags tests/test_serve.py's."""

import numpy as np
import pytest

from nemojax.generate.prefix_cache import PrefixCache

BLOCK = 4
SPAN = (np.zeros(10, np.float32),)  # 40 bytes
STATES = (np.zeros(5, np.float32),)  # 20 bytes


def fill(cache, prompt, states_at=None):
    """Store every key of `prompt`, with states at the block indices in `states_at` (default: all)."""
    keys = cache.keys(prompt)
    for j, key in enumerate(keys):
        cache.add_span(key, SPAN)
        if states_at is None or j in states_at:
            cache.add_states(key, STATES)
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


def test_entries_larger_than_the_budget_are_not_kept():
    cache = PrefixCache(30, BLOCK)
    keys = fill(cache, list(range(3, 12)))
    assert cache.entries == {} and cache.nbytes == 0 and cache.lookup(keys) == []
    with pytest.raises(ValueError, match="block size"):
        PrefixCache(100, 0)
