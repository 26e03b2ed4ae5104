"""Sharded execution on 8 simulated CPU devices equals one device: logits on three meshes, expert
parallelism (forward and gradients), one AdamW training step, sharded checkpoint loading."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, PartitionSpec

from nemojax import sharding
from nemojax.checkpoint.hf import load_pretrained, save_pretrained
from nemojax.config import from_hf_config
from nemojax.errors import ConfigError
from nemojax.model import NemotronH, init_cache, init_variables
from nemojax.model.layers import relu2
from nemojax.model.moe import dropless_experts
from nemojax.ops.expert_parallel import expert_parallel_experts
from nemojax.sharding.placement import shard_variables, share_host_replicas, variable_shardings

# Every layer kind (M, *, E with a latent, -); dims divisible by tensor=4 except the 2 KV heads and 2 Mamba groups.
SMALL = dict(vocab_size=64, hidden_size=32, hybrid_override_pattern="M*E-", num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8,
             n_groups=2, chunk_size=4, intermediate_size=48, n_routed_experts=8, num_experts_per_tok=3,
             moe_intermediate_size=16, moe_shared_expert_intermediate_size=24, moe_latent_size=12, n_group=2,
             topk_group=1, routed_scaling_factor=2.5, compute_dtype="float32", param_dtype="float32")
BATCH, LENGTH = 8, 12


@pytest.fixture(scope="module")
def setup():
    cfg = from_hf_config(SMALL)
    variables = jax.jit(lambda key: init_variables(cfg, key))(jax.random.key(0))
    bias = 0.3 * jax.random.normal(jax.random.key(5), (cfg.n_routed_experts,))
    variables["buffers"]["backbone"]["layers_2"]["mixer"]["gate"]["e_score_correction_bias"] = bias
    ids = jax.random.randint(jax.random.key(1), (BATCH, LENGTH), 0, cfg.vocab_size)
    return cfg, variables, ids


@pytest.fixture(scope="module")
def single_device_logits(setup):
    cfg, variables, ids = setup
    return jax.jit(NemotronH(cfg).apply)(variables, ids)


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _leaf(variables, path):
    for key in path.split("/"):
        variables = variables[key]
    return variables


def test_make_mesh_axes_and_errors():
    mesh = sharding.make_mesh(data=2, tensor=4)
    assert mesh.axis_names == ("data", "fsdp", "tensor", "expert")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4, "expert": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 4
    assert sharding.make_mesh(expert=2, devices=jax.devices()[:2]).devices.size == 2
    with pytest.raises(ConfigError, match=r"data=3, fsdp=1, tensor=2, expert=1 needs 6 devices.*there are 8"):
        sharding.make_mesh(data=3, tensor=2)
    with pytest.raises(ConfigError, match="positive"):
        sharding.make_mesh(data=0)


def test_constrain_outside_jit_uses_the_concrete_mesh():
    mesh = sharding.make_mesh(data=2, tensor=4)
    x = jnp.ones((6, 8))
    assert sharding.constrain(x, ("batch", "act_mlp")) is x  # no mesh in context
    with sharding.use_mesh(mesh):
        y = sharding.constrain(x, ("batch", "act_mlp"))
    assert y.sharding.spec == PartitionSpec("data", "tensor") and y.addressable_shards[0].data.shape == (3, 2)


def test_sized_spec_keeps_only_dividing_axes():
    shape = {"data": 2, "fsdp": 2, "tensor": 4, "expert": 2}
    # two KV heads cannot split over tensor=4; four query heads can
    assert sharding.sized_spec(("embed", "kv_heads"), (32, 2), shape) == PartitionSpec("fsdp", None)
    assert sharding.sized_spec(("embed", "heads"), (32, 4), shape) == PartitionSpec("fsdp", "tensor")
    # a batch of 4 shards over data and fsdp, not also over expert
    assert sharding.sized_spec(("batch", "length"), (4, 7), shape) == PartitionSpec(("data", "fsdp"), None)
    assert sharding.sized_spec(("batch", "length"), (1, 7), shape) == PartitionSpec(None, None)


@pytest.mark.parametrize("axes", [dict(data=2, tensor=2, expert=2), dict(fsdp=2, tensor=4), dict(expert=8)])
def test_sharded_logits_equal_single_device(setup, single_device_logits, axes):
    cfg, variables, ids = setup
    model = NemotronH(cfg)
    mesh = sharding.make_mesh(**axes)
    placed = shard_variables(variables, cfg, mesh)
    with sharding.use_mesh(mesh):
        logits = jax.jit(model.apply)(placed, jax.device_put(ids, sharding.batch_sharding(mesh, BATCH)))
    assert _rel_err(logits, single_device_logits) < 1e-5

    params = placed["params"]["backbone"]
    up = _leaf(params, "layers_2/mixer/experts/up_proj")
    in_proj = _leaf(params, "layers_0/mixer/in_proj/kernel")
    k_proj = _leaf(params, "layers_1/mixer/k_proj/kernel")
    n = mesh.shape
    # every device holds only its block of the large weights
    assert up.addressable_shards[0].data.shape == (8 // n["expert"], 12 // n["fsdp"], 16 // n["tensor"])
    # Mamba in_proj columns split by whole groups: over tensor=2, replicated over tensor=4 (2 groups)
    group_split = n["tensor"] if cfg.n_groups % n["tensor"] == 0 else 1
    assert in_proj.addressable_shards[0].data.shape == (32 // n["fsdp"], in_proj.shape[1] // group_split)
    # 2 KV heads: split over tensor=2, replicated over tensor=4
    kv_split = 2 if n["tensor"] == 2 else 1
    assert k_proj.addressable_shards[0].data.shape == (32 // n["fsdp"], 16 // kv_split)
    if n["expert"] > 1:
        assert up.sharding.spec[0] == "expert"


def _collectives(hlo: str) -> dict[str, int]:
    names = ("collective-permute", "all-gather", "all-to-all", "reduce-scatter", "all-reduce")
    return {name: len(re.findall(rf"\b{name}(-start)?\(", hlo)) for name in names}


def test_mamba_tensor_parallelism_is_local_up_to_out_proj(setup):
    """In_proj columns and conv channels are stored group-major, so a tensor shard of whole groups runs its
    heads alone: a Mamba-only model on tensor=4 (prefill and one decode step) compiles to all-reduces
    (row-parallel out_proj, sharded lm_head) and no collective that moves activations between shards."""
    cfg = from_hf_config(dict(SMALL, hybrid_override_pattern="MM", mamba_num_heads=8, n_groups=4))
    model = NemotronH(cfg)
    mesh = sharding.make_mesh(data=2, tensor=4)
    placed = shard_variables(init_variables(cfg, jax.random.key(0)), cfg, mesh)
    ids = jax.device_put(jnp.ones((BATCH, LENGTH), jnp.int32), sharding.batch_sharding(mesh, BATCH))
    cache = init_cache(cfg, BATCH, 2 * LENGTH)
    cache = jax.device_put(cache, sharding.cache_shardings(cache, mesh))
    step = jax.jit(lambda v, c, t: model.apply(v, t, cache=c, method="forward"))
    with sharding.use_mesh(mesh):
        programs = [jax.jit(model.apply).lower(placed, ids), step.lower(placed, cache, ids[:, :1])]
        counts = [_collectives(program.compile().as_text()) for program in programs]
    for count in counts:
        assert count["all-reduce"] > 0  # the programs really are tensor-parallel
        moved = {k: v for k, v in count.items() if k != "all-reduce"}
        assert moved == dict.fromkeys(moved, 0), count


def test_mamba_with_more_tensor_shards_than_groups_replicates_consistently(setup):
    """2 Mamba groups on tensor=4: whole groups cannot split, so every Mamba weight, its caches and its
    activations replicate over tensor together (no weight sharded by heads against replicated in_proj
    columns), and a decode step compiles without resharding collectives."""
    cfg = from_hf_config(dict(SMALL, hybrid_override_pattern="MM", mamba_num_heads=8, n_groups=2))
    model = NemotronH(cfg)
    mesh = sharding.make_mesh(data=2, tensor=4)
    shardings = variable_shardings(cfg, mesh)["params"]["backbone"]
    for path, leaf in jax.tree_util.tree_leaves_with_path(shardings["layers_0"]):
        assert "tensor" not in jax.tree.leaves(tuple(leaf.spec)), jax.tree_util.keystr(path)
    cache = init_cache(cfg, BATCH, 2 * LENGTH)
    cache_shardings = sharding.cache_shardings(cache, mesh, sharding.head_units(cfg))
    for leaf in jax.tree.leaves(cache_shardings["layers"]):
        assert "tensor" not in jax.tree.leaves(tuple(leaf.spec))
    placed = shard_variables(init_variables(cfg, jax.random.key(0)), cfg, mesh)
    step = jax.jit(lambda v, c, t: model.apply(v, t, cache=c, method="forward"))
    with sharding.use_mesh(mesh):
        hlo = step.lower(placed, jax.device_put(cache, cache_shardings), jax.device_put(
            jnp.ones((BATCH, 1), jnp.int32), sharding.batch_sharding(mesh, BATCH))).compile().as_text()
    counts = _collectives(hlo)
    assert counts["collective-permute"] == counts["all-gather"] == counts["all-to-all"] == 0, counts  # old: 12, 6


def test_expert_parallel_equals_dropless_with_gradients():
    """6 tokens cannot split over expert=4: the path without the all-gather (the gathered path runs in
    the logits and training-step tests). The expert intermediate dim is split over tensor as well."""
    tokens, e, width, f, k = 6, 8, 6, 4, 3
    keys = jax.random.split(jax.random.key(2), 5)
    x = jax.random.normal(keys[0], (tokens, width))
    ids = jnp.argsort(jax.random.uniform(keys[1], (tokens, e)), axis=1)[:, :k].astype(jnp.int32)
    w = jax.random.uniform(keys[2], (tokens, k))
    up, down = jax.random.normal(keys[3], (e, width, f)), jax.random.normal(keys[4], (e, f, width))

    def loss(fn, x, w, up, down):
        return jnp.sum(fn(x, ids, w, up, down) ** 2)

    expected = jax.value_and_grad(lambda *a: loss(dropless_experts, *a), argnums=(0, 1, 2, 3))(x, w, up, down)
    mesh = sharding.make_mesh(tensor=2, expert=4)
    with sharding.use_mesh(mesh):
        ep = jax.jit(jax.value_and_grad(
            lambda *a: loss(lambda *b: expert_parallel_experts(*b, relu2), *a), argnums=(0, 1, 2, 3)))
        got = ep(x, w, up, down)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        assert _rel_err(a, b) < 1e-5


def test_cached_decoding_on_mesh_equals_single_device(setup):
    """Prefill into a sharded cache, then one decode step; the cache stays sharded."""
    cfg, variables, ids = setup
    model = NemotronH(cfg)

    @jax.jit
    def prefill_and_step(variables, cache, ids):
        _, _, cache = model.apply(variables, ids[:, :-1], cache=cache, method="forward")
        logits, _, cache = model.apply(variables, ids[:, -1:], cache=cache, method="forward")
        return logits, cache

    cache = init_cache(cfg, BATCH, LENGTH)
    expected, _ = prefill_and_step(variables, cache, ids)
    mesh = sharding.make_mesh(data=2, tensor=2, expert=2)
    placed = shard_variables(variables, cfg, mesh)
    shardings = sharding.cache_shardings(cache, mesh)
    with sharding.use_mesh(mesh):
        logits, new_cache = prefill_and_step(placed, jax.device_put(cache, shardings),
                                             jax.device_put(ids, sharding.batch_sharding(mesh, BATCH)))
    assert _rel_err(logits, expected) < 1e-5
    kv, ssm = new_cache["layers"][1]["k"], new_cache["layers"][0]["ssm"]
    assert kv.sharding.is_equivalent_to(shardings["layers"][1]["k"], kv.ndim)
    assert kv.addressable_shards[0].data.shape == (BATCH // 4, 1, LENGTH, cfg.head_dim)  # [b, kv_heads, s, d]
    assert ssm.addressable_shards[0].data.shape == (BATCH // 4, 2, cfg.mamba_head_dim, cfg.ssm_state_size)


def _lm_loss(model, params, buffers, ids):
    logits = model.apply({"params": params, "buffers": buffers}, ids[:, :-1])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]))


LEARNING_RATE = 1e-2


def test_training_step_on_mesh_equals_single_device(setup):
    cfg, variables, ids = setup
    model = NemotronH(cfg)
    tx = optax.adamw(LEARNING_RATE, weight_decay=0.1)

    @jax.jit
    def step(params, opt_state, buffers, ids):
        loss, grads = jax.value_and_grad(lambda p: _lm_loss(model, p, buffers, ids))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return loss, grads, optax.apply_updates(params, updates), opt_state

    expected = step(variables["params"], tx.init(variables["params"]), variables["buffers"], ids)

    mesh = sharding.make_mesh(fsdp=2, tensor=2, expert=2)
    placed = shard_variables(variables, cfg, mesh)
    with sharding.use_mesh(mesh):
        opt_state = jax.jit(tx.init)(placed["params"])
        got = step(placed["params"], opt_state, placed["buffers"],
                   jax.device_put(ids, sharding.batch_sharding(mesh, BATCH)))
    assert _rel_err(got[0], expected[0]) < 1e-5
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(got[1]), jax.tree.leaves(expected[1]), strict=True):
        assert np.allclose(x, y, rtol=1e-4, atol=1e-6 * max(1.0, float(np.max(np.abs(y))))), ("grads", path)
    # AdamW's first update is lr * g / (|g| + 1e-8) per element: a gradient of ~1e-9 that differs in its
    # last digits (summation order) moves its update by a visible fraction of lr, so the new parameters
    # are compared against the update's scale, lr, not their own magnitude.
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(got[2]), jax.tree.leaves(expected[2]), strict=True):
        assert np.allclose(x, y, rtol=0, atol=1e-3 * LEARNING_RATE), ("params", path)
    # the optimizer state (FSDP) and the updated params keep the parameters' shardings
    mu = got[3][0].mu
    for p, m, new in zip(jax.tree.leaves(placed["params"]), jax.tree.leaves(mu), jax.tree.leaves(got[2]),
                         strict=True):
        assert m.sharding.is_equivalent_to(p.sharding, p.ndim) and new.sharding.is_equivalent_to(p.sharding, p.ndim)
    assert _leaf(mu, "backbone/layers_2/mixer/experts/up_proj").sharding.spec == PartitionSpec(
        "expert", "fsdp", "tensor")


def test_load_pretrained_onto_mesh_is_sharded(setup, tmp_path):
    cfg, variables, _ = setup
    save_pretrained(tmp_path, cfg, variables)
    mesh = sharding.make_mesh(data=2, tensor=2, expert=2)
    _, loaded = load_pretrained(tmp_path, mesh=mesh)
    wanted = variable_shardings(cfg, mesh)
    for leaf, want, ref in zip(jax.tree.leaves(loaded), jax.tree.leaves(wanted), jax.tree.leaves(variables),
                               strict=True):
        assert leaf.sharding == want
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref))
    up = _leaf(loaded["params"], "backbone/layers_2/mixer/experts/up_proj")
    assert up.addressable_shards[0].data.shape == (4, 12, 8)


def test_host_replicas_share_one_buffer(setup):
    """On CPU devices each distinct block of a variable is held once: its replicas on other devices are the
    same memory (pointers equal), the values are unchanged and stay valid once the source is gone, and
    the caller's arrays are not aliased (they may be donated later)."""
    cfg, variables, _ = setup
    mesh = sharding.make_mesh(data=2, tensor=2, devices=jax.devices()[:4])
    placed = shard_variables(variables, cfg, mesh)
    shared = share_host_replicas(placed)
    kernel = shared["params"]["backbone"]["layers_3"]["mixer"]["up_proj"]["kernel"]  # split over tensor
    pointers = {}
    for shard in kernel.addressable_shards:
        pointers.setdefault(repr(shard.index), set()).add(shard.data.unsafe_buffer_pointer())
    assert len(pointers) == 2 and all(len(p) == 1 for p in pointers.values())
    source = {s.data.unsafe_buffer_pointer()
              for s in placed["params"]["backbone"]["layers_3"]["mixer"]["up_proj"]["kernel"].addressable_shards}
    assert not source & set().union(*pointers.values())
    want = jax.tree.map(np.asarray, placed)
    del placed
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(shared), strict=True))
    on_each = jax.jit(lambda k: jax.tree.map(lambda x: x * 2, k))(kernel)  # every device reads its block
    np.testing.assert_array_equal(np.asarray(on_each), 2 * np.asarray(want["params"]["backbone"]["layers_3"]
                                                                        ["mixer"]["up_proj"]["kernel"]))
