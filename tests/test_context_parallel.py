"""Context parallelism on 8 simulated CPU devices: the KV caches of a long request sharded along the
sequence over the mesh axes the batch leaves unused; prefill and decoding equal the unsharded model,
the caches stay sharded, and the planner divides the KV bytes per device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from nemojax.config import from_hf_config
from nemojax.generate.programs import Programs
from nemojax.model import NemotronH, init_cache, init_variables
from nemojax.planning.caches import cache_bytes_per_device
from nemojax.sharding import cache_axes, cache_shardings, head_units, make_mesh
from nemojax.sharding.placement import shard_variables

pytestmark = pytest.mark.xdist_group("context_parallel")
TINY = dict(vocab_size=64, hidden_size=32, hybrid_override_pattern="M*M*", num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2,
            chunk_size=4, intermediate_size=48, compute_dtype="float32", param_dtype="float32", eos_token_id=2)
CAPACITY, PROMPT, STEPS = 32, 7, 3


def _length_spec(leaf_name: str, spec: PartitionSpec, ndim: int):
    axes = cache_axes(leaf_name, ndim)
    return tuple(spec)[axes.index("length")] if len(tuple(spec)) > axes.index("length") else None


def test_sequence_takes_the_batch_axes_the_rows_leave():
    config = from_hf_config(TINY)
    for mesh, batch, want_batch, want_length in ((make_mesh(fsdp=8), 1, None, "fsdp"),
                                                 (make_mesh(data=2, fsdp=4), 2, "data", "fsdp")):
        cache = jax.eval_shape(lambda batch=batch: init_cache(config, batch, CAPACITY))
        plain = cache_shardings(cache, mesh, head_units(config))
        parallel = cache_shardings(cache, mesh, head_units(config), context_parallel=True)
        k = parallel["layers"][1]["k"].spec
        assert _length_spec("k", k, 4) == want_length and _length_spec("valid", parallel["layers"][1]["valid"].spec,
                                                                       2) == want_length
        assert (tuple(k)[0] if len(tuple(k)) else None) == want_batch
        assert _length_spec("k", plain["layers"][1]["k"].spec, 4) is None
        assert parallel["layers"][0]["ssm"] == plain["layers"][0]["ssm"]  # Mamba states have no sequence


def test_sharded_sequence_decoding_equals_unsharded():
    config = from_hf_config(TINY)
    model = NemotronH(config)
    variables = jax.jit(init_variables, static_argnums=0)(config, jax.random.key(2))
    mesh = make_mesh(fsdp=8)
    prompt = np.random.default_rng(3).integers(3, 64, PROMPT)[None]

    def decode(variables, shardings):
        forward = jax.jit(lambda v, ids, c: model.apply(v, ids, None, c, method="forward")[::2],
                          out_shardings=None if shardings is None else (None, shardings))
        cache = init_cache(config, 1, CAPACITY)
        if shardings is not None:
            cache = jax.device_put(cache, shardings)
        logits, cache = forward(variables, jnp.asarray(prompt), cache)
        steps = [logits[0, -1]]
        for _ in range(STEPS):
            logits, cache = forward(variables, jnp.argmax(logits[:, -1:], axis=-1), cache)
            steps.append(logits[0, -1])
        return np.stack(steps), cache

    want, _ = decode(variables, None)
    shardings = cache_shardings(jax.eval_shape(lambda: init_cache(config, 1, CAPACITY)), mesh, head_units(config),
                                context_parallel=True)
    got, cache = decode(shard_variables(variables, config, mesh), shardings)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    k = cache["layers"][3]["k"]
    assert _length_spec("k", k.sharding.spec, k.ndim) == "fsdp"
    assert {s.data.shape[cache_axes("k", k.ndim).index("length")] for s in k.addressable_shards} == {CAPACITY // 8}


def test_engine_state_and_planner_use_the_rule():
    config = from_hf_config(TINY)
    mesh = make_mesh(fsdp=8)
    programs = Programs(NemotronH(config), (2,), -1, 0, 0, mesh, context_parallel=True)
    state = jax.jit(lambda: programs.empty(1, CAPACITY, 4))()
    k = state["cache"]["layers"][1]["k"]
    assert isinstance(k.sharding, NamedSharding) and _length_spec("k", k.sharding.spec, k.ndim) == "fsdp"
    shape = {"data": 1, "fsdp": 8, "tensor": 1, "expert": 1}
    plain = cache_bytes_per_device(config, 1, 1024, shape)
    parallel = cache_bytes_per_device(config, 1, 1024, shape, context_parallel=True)
    assert parallel["kv_cache"] * 8 == plain["kv_cache"] and parallel["ssm_state"] == plain["ssm_state"]
