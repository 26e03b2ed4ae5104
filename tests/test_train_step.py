"""Training pieces: schedules, weight-decay mask, gradient accumulation, MoE bias balancing, MTP loss
alignment, run-config overrides."""

import os

import jax
import jax.extend
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from nemojax.config import from_hf_config
from nemojax.errors import ConfigError
from nemojax.model import NemotronH, init_variables
from nemojax.train.losses import masked_xent_sum, model_losses, token_counts
from nemojax.train.moe_balance import load_ratios, update_correction_bias
from nemojax.train.optimizer import default_optimizer_config, make_optimizer, make_schedule
from nemojax.train.run_config import load_run_config
from nemojax.train.step import init_state, make_train_step

# One worker runs this module, so its module fixtures are built once under `pytest -n 2 --dist loadgroup`.
pytestmark = pytest.mark.xdist_group("train_step")
TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")
MICRO = dict(vocab_size=64, hidden_size=32, hybrid_override_pattern="E", num_attention_heads=2,
             num_key_value_heads=1, head_dim=16, mamba_num_heads=2, mamba_head_dim=16, ssm_state_size=8,
             n_groups=1, chunk_size=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
             moe_shared_expert_intermediate_size=16, mtp_hybrid_override_pattern="*E", num_nextn_predict_layers=1,
             compute_dtype="float32", param_dtype="float32")


def _optimizer(**changes):
    opt = default_optimizer_config()
    opt.update(changes)
    return opt


def test_wsd_schedule_warms_up_holds_then_decays():
    lr = make_schedule(_optimizer(learning_rate=1.0, warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.1), 110)
    assert float(lr(0)) == pytest.approx(0.1)  # the first update already moves
    assert float(lr(9)) == pytest.approx(1.0)
    assert float(lr(50)) == pytest.approx(1.0) and float(lr(89)) == pytest.approx(1.0)
    assert float(lr(100)) == pytest.approx(0.55)  # halfway through the last 20 steps
    assert float(lr(110)) == pytest.approx(0.1)


def test_cosine_schedule_ends_at_the_floor():
    lr = make_schedule(_optimizer(learning_rate=2.0, schedule="cosine", warmup_steps=4, min_lr_ratio=0.1), 104)
    assert float(lr(3)) == pytest.approx(2.0)
    assert float(lr(54)) == pytest.approx(1.1)  # cosine midpoint between 2.0 and 0.2
    assert float(lr(104)) == pytest.approx(0.2)


def test_weight_decay_leaves_vectors_alone():
    tx = make_optimizer(_optimizer(learning_rate=0.1, warmup_steps=0, weight_decay=0.5), 10)
    params = {"kernel": jnp.ones((2, 3)), "norm": {"weight": jnp.ones((3,))}}
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["kernel"], 1 - 0.1 * 0.5)
    np.testing.assert_array_equal(new["norm"]["weight"], 1.0)


def test_correction_bias_moves_towards_underused_experts():
    buffers = {"layers_0": {"mixer": {"gate": {"e_score_correction_bias": jnp.zeros(4)}}}}
    loads = {("layers_0", "mixer"): jnp.array([10, 2, 4, 0])}
    new = update_correction_bias(buffers, loads, 0.01)["layers_0"]["mixer"]["gate"]["e_score_correction_bias"]
    np.testing.assert_allclose(new, [-0.01, 0.01, 0.0, 0.01])
    assert float(load_ratios(loads)["layers_0/mixer"]) == pytest.approx(2.5)
    # scanned layers: one bias and one load row per stacked MoE layer
    stacked = {"layers": {"moe": {"mixer": {"gate": {"e_score_correction_bias": jnp.zeros((2, 4))}}}}}
    loads = {("layers", "moe", "mixer"): jnp.array([[10, 2, 4, 0], [3, 3, 3, 3]])}
    new = update_correction_bias(stacked, loads, 0.01)["layers"]["moe"]["mixer"]["gate"]["e_score_correction_bias"]
    np.testing.assert_allclose(new, [[-0.01, 0.01, 0.0, 0.01], [0.0, 0.0, 0.0, 0.0]])
    ratios = load_ratios(loads)
    assert float(ratios["layers/moe/mixer/0"]) == pytest.approx(2.5) and float(ratios["layers/moe/mixer/1"]) == 1.0


@pytest.fixture(scope="module")
def micro_model():
    config = from_hf_config(MICRO)
    variables = jax.jit(lambda: init_variables(config, jax.random.key(0)))()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, (4, 17))
    mask = (rng.random((4, 16)) > 0.3).astype(np.float32)  # uneven masks: rows weigh differently
    batch = {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
             "loss_mask": jnp.asarray(mask)}
    return NemotronH(config), variables, batch


def test_mtp_loss_predicts_two_tokens_ahead(micro_model):
    model, variables, batch = micro_model
    losses = jax.jit(lambda v, b: model_losses(model, v["params"], v["buffers"], b, token_counts(b), 0.3, 0.0))
    _, parts = losses(variables, batch)
    logits, hidden, _ = jax.jit(lambda v, ids: model.apply(v, ids, method="forward"))(variables, batch["inputs"])
    mtp_logits, _, _ = jax.jit(lambda v, h, ids: model.apply(v, h, ids, method="mtp_forward"))(
        variables, hidden[:, :-1], batch["inputs"][:, 1:])
    mask = batch["loss_mask"]
    # position t of the MTP head sees hidden(t) and token t+1, and is scored on target t+1 = token t+2
    want = masked_xent_sum(mtp_logits, batch["targets"][:, 1:], mask[:, 1:]) / jnp.sum(mask[:, 1:])
    np.testing.assert_allclose(parts["mtp_loss"], want, rtol=1e-6)
    np.testing.assert_allclose(parts["lm_loss"], masked_xent_sum(logits, batch["targets"], mask) / jnp.sum(mask),
                               rtol=1e-6)


def test_chunked_loss_equals_full_logits_value_and_gradient(micro_model):
    """LM + MTP loss computed 3 positions x 4 rows at a time (the last LM chunk padded) equals the loss on
    the full [b, t, V] logits: value and the gradient of every parameter."""
    model, variables, batch = micro_model
    inputs, targets, mask = batch["inputs"], batch["targets"], batch["loss_mask"]
    lm_den, (mtp_den,) = token_counts(batch)

    def full(params):
        v = {"params": params, "buffers": variables["buffers"]}
        logits, hidden, _ = model.apply(v, inputs, method="forward")
        mtp_logits, _, _ = model.apply(v, hidden[:, :-1], inputs[:, 1:], method="mtp_forward")
        return (masked_xent_sum(logits, targets, mask) / lm_den
                + 0.3 * masked_xent_sum(mtp_logits, targets[:, 1:], mask[:, 1:]) / mtp_den)

    def chunked(params):
        return model_losses(model, params, variables["buffers"], batch, (lm_den, (mtp_den,)), 0.3, 0.0, 12)[0]

    (want, want_grads), (got, got_grads) = (jax.jit(jax.value_and_grad(f))(variables["params"])
                                            for f in (full, chunked))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))


def test_gradient_accumulation_matches_the_full_batch(micro_model):
    model, variables, batch = micro_model
    opt = _optimizer(learning_rate=1e-2, warmup_steps=0)
    tx, schedule = make_optimizer(opt, 10), make_schedule(opt, 10)
    outputs = []
    for accum in (1, 4):
        cfg = ml_collections.ConfigDict(dict(grad_accum_steps=accum, mtp_loss_weight=0.3, aux_loss_weight=0.01,
                                             bias_update_rate=1e-3))
        step = jax.jit(make_train_step(model, tx, cfg, schedule))
        outputs.append(step(init_state(variables, tx, 0), batch))
    (full, full_metrics), (accumulated, accumulated_metrics) = outputs
    for key in ("loss", "lm_loss", "mtp_loss", "aux_loss", "grad_norm"):
        np.testing.assert_allclose(accumulated_metrics[key], full_metrics[key], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(accumulated["params"]), jax.tree.leaves(full["params"]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)  # Adam's first step is ~lr*sign(g)
    for a, b in zip(jax.tree.leaves(accumulated["buffers"]), jax.tree.leaves(full["buffers"]), strict=True):
        np.testing.assert_array_equal(a, b)  # the same total expert loads move the biases


def _sums_and_products(jaxpr, found):
    """(primitive, output dtype) of every matmul and sum in a jaxpr and the jaxprs nested in it."""
    for eqn in jaxpr.eqns:
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _sums_and_products(sub, found)
        if eqn.primitive.name in ("dot_general", "ragged_dot_general", "reduce_sum"):
            found.add((eqn.primitive.name, str(eqn.outvars[0].aval.dtype)))
    return found


@pytest.mark.parametrize("scan", [False, True])
def test_bf16_training_gradients_are_summed_in_float32(scan):
    """With bf16 compute every matmul and sum of the training loss and its gradient (main stack of every
    layer kind, scanned or not, MTP, chunked loss) produces float32: the weight gradients (sums over the
    batch) leave their matmuls in float32, so the partitioner's cross-device reductions of them are float32."""
    config = from_hf_config(dict(MICRO, hybrid_override_pattern="M*E-", compute_dtype="bfloat16",
                                 scan_layers=scan))
    model = NemotronH(config)
    variables = jax.eval_shape(lambda: init_variables(config, jax.random.key(0)))
    batch = {"inputs": jnp.zeros((2, 16), jnp.int32), "targets": jnp.zeros((2, 16), jnp.int32),
             "loss_mask": jnp.ones((2, 16))}

    def grads(params, buffers):
        return jax.grad(lambda p: model_losses(model, p, buffers, batch, token_counts(batch), 0.3, 0.0, 8)[0])(params)

    found = _sums_and_products(jax.make_jaxpr(grads)(variables["params"], variables["buffers"]).jaxpr, set())
    assert {name for name, _ in found} >= {"dot_general", "reduce_sum"}
    assert {dtype for name, dtype in found if name != "reduce_sum" or dtype != "int32"} == {"float32"}, found


def test_default_meshes_use_every_device():
    """train.py (run config mesh fsdp=-1) and serve.py (--mesh fsdp=-1) default to every device."""
    from nemojax.cli.serve import parse_args
    from nemojax.sharding import parse_mesh, resolve_mesh_shape
    from nemojax.train.placement import build_mesh
    from nemojax.train.run_config import default_run_config

    mesh = build_mesh(default_run_config().mesh)
    assert mesh.devices.size == jax.device_count() == 8 and dict(mesh.shape)["fsdp"] == 8
    args = parse_args(["--checkpoint", "c", "--prompts", "p", "--output", "o"])
    assert resolve_mesh_shape(parse_mesh(args.mesh), 8) == {"data": 1, "fsdp": 8, "tensor": 1, "expert": 1}
    with pytest.raises(ConfigError, match="at most one"):
        resolve_mesh_shape(parse_mesh("data=-1,fsdp=-1"), 8)


def test_run_config_overrides_are_typed():
    cfg = load_run_config(TINY, ["--config.num_steps=7", "--config.optimizer.learning_rate", "2e-4",
                                 "--config.data.paths=a.txt,b.txt", "--config.remat=dots",
                                 "--config.model.hidden_size=128"])
    assert (cfg.num_steps, cfg.optimizer.learning_rate, cfg.data.paths, cfg.remat) == (7, 2e-4, ("a.txt", "b.txt"),
                                                                                        "dots")
    assert cfg.model.hidden_size == 128 and cfg.data.source == "stdlib"  # defaults fill what the file omits
    with pytest.raises(ConfigError, match="optimizer.learning_rat"):
        load_run_config(TINY, ["--config.optimizer.learning_rat=1"])
    with pytest.raises(ConfigError, match="num_steps"):
        load_run_config(TINY, ["--config.num_steps=many"])


def test_model_without_experts_trains_on_a_mesh():
    """A model with no MoE layer has no `buffers` collection: its train state still gets a sharding per
    leaf on a mesh (once a KeyError), and a step runs there with the loss of one device."""
    from nemojax.sharding import make_mesh
    from nemojax.train.programs import build_programs
    from nemojax.train.run_config import default_run_config

    config = from_hf_config(dict(MICRO, hybrid_override_pattern="M*-", mtp_hybrid_override_pattern="",
                                 num_nextn_predict_layers=0))
    cfg = default_run_config()
    cfg.num_steps = 2
    batch = {"inputs": jnp.zeros((4, 8), jnp.int32), "targets": jnp.ones((4, 8), jnp.int32),
             "loss_mask": jnp.ones((4, 8))}
    mesh = make_mesh(fsdp=2, tensor=2, data=2)
    programs = build_programs(cfg, config, mesh)
    assert programs.abstract_state["buffers"] == {}
    assert jax.tree.structure(programs.shardings) == jax.tree.structure(programs.abstract_state)
    state = programs.fresh_state()
    kernel = state["params"]["backbone"]["layers_2"]["mixer"]["up_proj"]["kernel"]
    assert kernel.sharding.mesh == mesh and kernel.addressable_shards[0].data.shape != kernel.shape
    want = jax.jit(lambda p: model_losses(NemotronH(config), p, {}, batch, token_counts(batch), 0.3, 0.0)[0])(
        jax.device_get(state["params"]))
    votes = jax.device_put(jnp.zeros((mesh.size,), bool), NamedSharding(mesh, PartitionSpec(mesh.axis_names)))
    _, metrics = programs.train_step(state, jax.device_put(batch, NamedSharding(mesh, PartitionSpec(("data", "fsdp")))),
                                     votes)
    np.testing.assert_allclose(float(metrics["loss"]), float(want), rtol=1e-5)
