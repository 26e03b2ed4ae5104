"""Long prompts: attention visits only the key blocks a query can see (the cache after a chunk is never
read), chunked prefill equals one-shot prefill (logits, KV entries, Mamba conv and SSM states) for chunk
sizes that do and do not divide the Mamba chunk, and the compiled memory of a prefill chunk does not
grow with the cache it writes into."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.config import from_hf_config
from nemojax.model import NemotronH, init_cache, init_variables
from nemojax.ops import attention as attention_ops
from nemojax.ops.attention import causal_mask, default_key_block, gqa_attention, gqa_attention_kv_major
from nemojax.sharding import cache_axes

pytestmark = pytest.mark.xdist_group("long_context")
TINY = dict(vocab_size=64, hidden_size=32, hybrid_override_pattern="M*M*", num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2,
            chunk_size=4, intermediate_size=48, compute_dtype="float32", param_dtype="float32", eos_token_id=2)
PROMPT = 13


def test_blocked_attention_skips_blocks_after_the_last_visible_key():
    """Per-row query offsets, a length blocks do not divide (the last block slides back): equal to the
    dense softmax; NaN keys and values after the last visible block change nothing (they are never read)."""
    rng = np.random.default_rng(0)
    b, t, s, block = 2, 3, 22, 4
    q = jnp.asarray(rng.standard_normal((b, t, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, s, 2, 8)), jnp.float32) for _ in range(2))
    valid = jnp.asarray(rng.random((b, s)) > 0.2)
    for offset in (jnp.asarray([5, 9]), jnp.asarray([17, 19])):  # the second reaches the sliding last block
        want = gqa_attention(q, k, v, causal_mask(valid, offset, t))
        got = gqa_attention(q, k, v, key_block=block, causal_valid_bs=valid, query_offset=offset)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    offset = jnp.asarray([5, 9])
    live_end = -(-(9 + t) // block) * block  # keys from here on are in blocks no query can see
    poisoned = (k.at[:, live_end:].set(jnp.nan), v.at[:, live_end:].set(jnp.nan))
    got = gqa_attention(q, *poisoned, key_block=block, causal_valid_bs=valid, query_offset=offset)
    np.testing.assert_allclose(got, gqa_attention(q, k, v, causal_mask(valid, offset, t)), rtol=1e-5, atol=1e-6)


def test_decoding_attention_reads_the_cache_in_place():
    """Decoding takes blocks of 1024 keys, prefill from 256 queries blocks of 256, keys that fit one block go
    at once; a cache the blocks do not divide is read in place: the compiled step pads (copies) no keys."""
    assert [default_key_block(1, s) for s in (2048, 1536, 8225, 1024)] == [1024] * 4
    assert default_key_block(300, 4096) == 256 and default_key_block(8, 24) == 24
    s = 8225
    q, kv = jax.ShapeDtypeStruct((1, 1, 4, 64), jnp.float32), jax.ShapeDtypeStruct((1, 2, s, 64), jnp.float32)
    step = jax.jit(lambda q, k, v, valid: gqa_attention_kv_major(q, k, v, causal_valid_bs=valid, query_offset=s - 9))
    hlo = step.lower(q, kv, kv, jax.ShapeDtypeStruct((1, s), bool)).compile().as_text()
    assert re.search(r"= f32\[[^\]]*\](\{[^}]*\})? pad\(", hlo) is None  # a float pad, with or without a layout


@pytest.fixture(scope="module")
def tiny():
    config = from_hf_config(TINY)
    return NemotronH(config), jax.jit(init_variables, static_argnums=0)(config, jax.random.key(5))


@pytest.fixture(scope="module")
def prefill(tiny):
    """`run(chunk)`: the prompt in chunks of `chunk` tokens (the last right-padded) into one cache of 24
    positions, attention over key blocks of 8: (logits [t, vocab], cache)."""
    model, variables = tiny
    forward = jax.jit(lambda v, ids, valid, c: model.apply(v, ids, valid, c, method="forward"))
    prompt = np.random.default_rng(1).integers(3, 64, PROMPT)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention_ops, "FEW_QUERY_KEY_BLOCK", 8)
        yield lambda chunk: _prefill(model, variables, forward, prompt, chunk, 24)


def _prefill(model, variables, forward, prompt_t, chunk: int, capacity: int):
    cache, logits = init_cache(model.config, 1, capacity), []
    for start in range(0, len(prompt_t), chunk):
        part = prompt_t[start:start + chunk]
        ids = np.zeros((1, chunk), np.int32)
        ids[0, :len(part)] = part
        out, _, cache = forward(variables, ids, np.arange(chunk)[None] < len(part), cache)
        logits.append(out[0, :len(part)])
    return np.concatenate(logits), cache


@pytest.mark.parametrize("chunk", [3, 5])
def test_chunked_prefill_equals_one_shot(tiny, prefill, chunk):
    """Chunks of 3 and 5 tokens split the Mamba chunk (4) (5 also spans two); attention runs over key blocks
    of 8 (so chunks skip the cache after them): logits and the final caches equal one forward."""
    model, _ = tiny
    want_logits, want = prefill(PROMPT)
    got_logits, got = prefill(chunk)
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-4, atol=1e-5)
    assert int(got["index"][0]) == PROMPT
    for layer, kind in enumerate(model.config.layer_types):
        names = {"attention": ("k", "v", "valid"), "mamba": ("conv", "ssm")}.get(kind, ())
        for name in names:
            a, b = got["layers"][layer][name], want["layers"][layer][name]
            if name in ("k", "v", "valid"):  # entries past the prompt are scratch (right padding)
                length = cache_axes(name, a.ndim).index("length")
                a, b = (jnp.take(x, jnp.arange(PROMPT), axis=length) for x in (a, b))
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-4, atol=1e-5,
                                       err_msg=f"layer {layer} {name}")


def test_prefill_chunk_memory_does_not_grow_with_the_cache(tiny):
    """The compiled prefill step of one chunk against caches of 2K and 16K positions: its temporary memory
    (everything but the inputs and outputs: scores, activations) is the same; only the cache itself grows."""
    model, variables = tiny
    chunk = 64

    def compiled(capacity):
        cache = jax.eval_shape(lambda: init_cache(model.config, 1, capacity))
        ids = jax.ShapeDtypeStruct((1, chunk), jnp.int32)
        step = jax.jit(lambda v, i, c: model.apply(v, i, None, c, method="forward"), donate_argnums=2)
        return step.lower(variables, ids, cache).compile().memory_analysis()

    small, large = compiled(2048), compiled(16384)
    kv_growth = 2 * 2 * (16384 - 2048) * 2 * 8 * 4  # layers * (k, v) * positions * kv_heads * d * float32
    assert large.argument_size_in_bytes - small.argument_size_in_bytes >= kv_growth
    # dense scores alone would add 2 layers * 4 heads * 64 queries * 14336 keys * 4 bytes = 29 MB
    assert large.temp_size_in_bytes <= small.temp_size_in_bytes + 64 * 1024, (small.temp_size_in_bytes,
                                                                              large.temp_size_in_bytes)
