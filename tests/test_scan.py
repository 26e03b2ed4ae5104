"""Scanned layers (`scan_layers=True`) equal the unrolled stack: logits, gradients and routing
statistics on every layer kind, cached decoding with speculative rollback, a mesh
with expert parallelism, and checkpoints that keep the per-layer layout on disk."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax import sharding
from nemojax.checkpoint import orbax
from nemojax.checkpoint.hf import load_pretrained, save_pretrained
from nemojax.config import from_hf_config, resolve_model_config
from nemojax.generate import caches
from nemojax.model import NemotronH, init_cache, init_variables
from nemojax.model.stacking import stack_plan, stack_variables, unstack_layer_caches, unstack_variables
from nemojax.sharding.placement import shard_variables

# Every layer kind, three of them twice, in an irregular order.
SMALL = dict(vocab_size=48, hidden_size=32, hybrid_override_pattern="M*EM-E*", num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8,
             n_groups=2, chunk_size=4, intermediate_size=48, n_routed_experts=8, num_experts_per_tok=3,
             moe_intermediate_size=16, moe_shared_expert_intermediate_size=24, moe_latent_size=12, n_group=2,
             topk_group=1, routed_scaling_factor=2.5, compute_dtype="float32", param_dtype="float32")


@pytest.fixture(scope="module")
def setup():
    config = from_hf_config(dict(SMALL, scan_layers=False))
    variables = jax.jit(init_variables, static_argnums=0)(config, jax.random.key(0))
    moe = [i for i, k in enumerate(config.layer_types) if k == "moe"]
    for n, i in enumerate(moe):  # distinct correction biases, so a wrong row would route differently
        bias = 0.3 * jax.random.normal(jax.random.key(10 + n), (config.n_routed_experts,))
        variables["buffers"]["backbone"][f"layers_{i}"]["mixer"]["gate"]["e_score_correction_bias"] = bias
    ids = jax.random.randint(jax.random.key(1), (2, 11), 0, config.vocab_size)
    return config, variables, config.replace(scan_layers=True), stack_variables(config, variables), ids


def _close(a, b, tol=1e-5, what=""):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.max(np.abs(a - b)) <= tol * max(1.0, np.max(np.abs(b))), (what, np.max(np.abs(a - b)))


def test_stack_plan_of_the_published_patterns():
    ultra = resolve_model_config("ultra")
    plan = stack_plan(ultra)
    assert ultra.scan_layers and resolve_model_config("nano").scan_layers
    assert not resolve_model_config("tiny").scan_layers
    assert plan.kinds == ("mamba", "attention", "moe")
    assert [plan.count(k) for k in plan.kinds] == [48, 12, 48]
    for kind in plan.kinds:  # each kind's layers fill its stack in layer order
        assert plan.slots[plan.layers_of(kind)].tolist() == list(range(plan.count(kind)))


def _loss_and_grads(config, variables, ids):
    """Gradient of sum(logits * fixed cotangent) w.r.t. the params, with (logits, intermediates)."""
    cotangent = jax.random.normal(jax.random.key(2), ids.shape + (config.vocab_size,))

    def loss(params):
        (logits, _, _), inter = NemotronH(config).apply({"params": params, "buffers": variables["buffers"]}, ids,
                                                        method="forward", mutable=["intermediates"])
        return jnp.sum(logits * cotangent), (logits, inter["intermediates"])

    return jax.jit(jax.grad(loss, has_aux=True))(variables["params"])


@pytest.fixture(scope="module")
def loss_and_grads(setup):
    config, variables, scanned, stacked, ids = setup
    # Scanned with per-layer remat, as large models train (the plain scan's forward runs in the decoding test).
    return {"unrolled": _loss_and_grads(config, variables, ids),
            "scanned": _loss_and_grads(scanned.replace(remat="full"), stacked, ids)}


def test_scanned_logits_gradients_and_loads_equal_unrolled(setup, loss_and_grads):
    config = setup[0]
    grads, (logits, inter) = loss_and_grads["scanned"]
    ref_grads, (ref_logits, ref_inter) = loss_and_grads["unrolled"]
    _close(logits, ref_logits)
    grads = unstack_variables(config, {"params": grads})["params"]
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads), strict=True):
        _close(g, r, 1e-4, jax.tree_util.keystr(path))
    loads = inter["backbone"]["layers"]["moe"]["mixer"]["expert_load"][0]
    moe = [i for i, k in enumerate(config.layer_types) if k == "moe"]
    expected = [ref_inter["backbone"][f"layers_{i}"]["mixer"]["expert_load"][0] for i in moe]
    np.testing.assert_array_equal(loads, np.stack(expected))


def _decode_session(model, variables, ids):
    """Chunked prefill (row 1 left-padded), a 3-token verify with per-position states kept to different
    lengths per row, two decode steps: every logit and the final cache."""
    kinds = model.config.layer_types
    cache = init_cache(model.config, 2, 24)
    valid = jnp.arange(8)[None, :] >= jnp.asarray([[0], [3]])  # row 1 left-padded
    out = []
    for s in (0, 4):
        logits, _, cache = model.apply(variables, ids[:, s:s + 4], valid[:, s:s + 4], cache, method="forward")
        out.append(logits)
    start, before = cache["index"], cache["layers"]
    logits, _, cache = model.apply(variables, ids[:, 8:11], None, cache, per_position_states=True, method="forward")
    out.append(logits)
    keep = jnp.asarray([1, 3])
    cache = dict(cache, layers=caches.keep_positions(cache["layers"], before, kinds, keep), index=start + keep)
    for _ in range(2):
        logits, _, cache = model.apply(variables, ids[:, :1], None, cache, method="forward")
        out.append(logits)
    return out, cache


def test_scanned_cached_decoding_and_rollback_equal_unrolled(setup):
    config, variables, scanned, stacked, ids = setup
    ref_logits, ref_cache = jax.jit(lambda v, i: _decode_session(NemotronH(config), v, i))(variables, ids)
    logits, cache = jax.jit(lambda v, i: _decode_session(NemotronH(scanned), v, i))(stacked, ids)
    for a, b in zip(logits, ref_logits, strict=True):
        _close(a, b)
    assert cache["index"].tolist() == ref_cache["index"].tolist()
    layers = unstack_layer_caches(config, cache["layers"])
    for a, b in zip(jax.tree.leaves(layers), jax.tree.leaves(ref_cache["layers"]), strict=True):
        _close(a, b)


def test_scanned_on_a_mesh_with_expert_parallelism_equals_one_device(setup, loss_and_grads):
    """(data, tensor, expert) = (2, 2, 2): the experts run expert-parallel inside the scan's switch and
    per-layer remat, logits and gradients as on one device; stacked weights keep their layer axis whole
    and shard the rest as a single layer's would."""
    config, _, scanned, stacked, ids = setup
    mesh = sharding.make_mesh(data=2, tensor=2, expert=2)
    placed = shard_variables(stacked, scanned, mesh)
    up = placed["params"]["backbone"]["layers"]["moe"]["mixer"]["experts"]["up_proj"]
    assert up.sharding.spec[:2] == (None, "expert") and up.addressable_shards[0].data.shape[:2] == (2, 4)
    with sharding.use_mesh(mesh):
        grads, (logits, _) = _loss_and_grads(scanned.replace(remat="full"), placed,
                                             jax.device_put(ids, sharding.batch_sharding(mesh, 2)))
    ref_grads, (ref_logits, _) = loss_and_grads["scanned"]
    _close(logits, ref_logits)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads), strict=True):
        _close(g, r, 1e-4, jax.tree_util.keystr(path))


def test_checkpoints_keep_the_per_layer_layout(setup, tmp_path):
    """Published files written from a scanned model equal those of the unrolled one and load either way;
    a nemojax directory holds the in-memory layout and converts on load."""
    config, variables, scanned, stacked, _ = setup
    save_pretrained(tmp_path / "hf", scanned, stacked)
    model, loaded = load_pretrained(tmp_path / "hf", dtype="float32")
    assert not model.config.scan_layers  # 9 layers: unrolled unless asked
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)
    model, loaded = load_pretrained(tmp_path / "hf", dtype="float32", scan_layers=True)
    jax.tree.map(np.testing.assert_array_equal, loaded, stacked)

    orbax.save_model(tmp_path / "nj", scanned, stacked)
    model, loaded = orbax.load_model(tmp_path / "nj")
    assert model.config.scan_layers
    jax.tree.map(np.testing.assert_array_equal, loaded, stacked)
    model, loaded = orbax.load_model(tmp_path / "nj", scan_layers=False)
    assert not model.config.scan_layers
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)
