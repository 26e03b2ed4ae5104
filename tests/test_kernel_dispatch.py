"""The `kernels` config choice (nemojax/ops/dispatch.py): "reference" is today's pure-JAX path, "auto" picks
it on CPU, and "pallas" runs the Mamba mixer through the Pallas kernels (in the GPU interpreter here)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.config import from_hf_config
from nemojax.errors import ConfigError
from nemojax.model.layers import relu2
from nemojax.model.mamba import MambaMixer, init_mamba_cache
from nemojax.model.moe import dropless_experts
from nemojax.ops import dispatch, ssd
from nemojax.ops.expert_parallel import expert_parallel_experts
from nemojax.quant import nvfp4
from nemojax.sharding import make_mesh, use_mesh

MAMBA = dict(vocab_size=50, hidden_size=32, hybrid_override_pattern="M", mamba_num_heads=4, mamba_head_dim=8,
             ssm_state_size=8, n_groups=2, chunk_size=16, compute_dtype="float32", param_dtype="float32")


def test_unknown_kernels_choice_is_a_config_error():
    with pytest.raises(ConfigError, match="`kernels`"):
        from_hf_config(dict(MAMBA, kernels="triton"))
    with pytest.raises(ConfigError, match="`kernels`"):
        dispatch.resolve("cuda")


def test_auto_and_reference_are_the_pure_jax_ops_on_cpu():
    assert dispatch.resolve("auto") == "reference"  # this machine has no GPU
    ks = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(ks[0], (2, 20, 4, 8))
    dt = jax.nn.softplus(jax.random.normal(ks[1], (2, 20, 4)))
    a = -jnp.exp(jax.random.normal(ks[2], (4,)))
    bm, cm = (jax.random.normal(k, (2, 20, 2, 8)) for k in ks[3:5])
    state = jax.random.normal(ks[5], (2, 4, 8, 8))
    step_args = (state, x[:, 0], dt[:, 0], a, bm[:, 0], cm[:, 0])
    scan = jax.jit(ssd.ssd_chunked, static_argnums=5)
    expected = (*scan(x, dt, a, bm, cm, 16, state), *jax.jit(ssd.ssd_step)(*step_args))
    for kernels in ("auto", "reference"):
        chosen = jax.jit(lambda x, dt, a, bm, cm, state, step_args, kernels=kernels: (
            *dispatch.ssd_chunked(x, dt, a, bm, cm, 16, state, kernels=kernels),
            *dispatch.ssd_step(*step_args, kernels=kernels)))
        for got, want in zip(chosen(x, dt, a, bm, cm, state, step_args), expected, strict=True):
            np.testing.assert_array_equal(got, want)


def test_mamba_mixer_with_pallas_kernels_matches_reference():
    """Prefill (chunked scan from a cache) then one decoded token (state update), both choices."""
    reference_cfg = from_hf_config(dict(MAMBA, kernels="reference"))
    pallas_cfg = reference_cfg.replace(kernels="pallas")
    x = jax.random.normal(jax.random.key(1), (2, 21, reference_cfg.hidden_size))
    variables = nn.meta.unbox(MambaMixer(reference_cfg).init(jax.random.key(2), x))
    cache = init_mamba_cache(reference_cfg, 2, jnp.float32)

    def run(cfg):
        mixer = MambaMixer(cfg)
        out, new_cache = jax.jit(lambda v, x, c: mixer.apply(v, x, cache=c))(variables, x[:, :20], cache)
        step, step_cache = jax.jit(lambda v, x, c: mixer.apply(v, x, cache=c))(variables, x[:, 20:], new_cache)
        return out, new_cache["ssm"], step, step_cache["ssm"]

    for got, want in zip(run(pallas_cfg), run(reference_cfg), strict=True):
        got, want = np.asarray(got), np.asarray(want)
        assert np.max(np.abs(got - want)) <= 2e-2 * np.max(np.abs(want))  # bf16 matmul operands in the scan


def test_under_a_mesh_the_kernels_run_per_shard(monkeypatch):
    """data=2 x tensor=2. The per-shard split is checked with the reference ops in its place (the GPU
    interpreter cannot run kernels for several devices at once); the kernels' forward, backward and
    state update compile for CUDA inside shard_map."""
    mesh = make_mesh(data=2, tensor=2, devices=jax.devices()[:4])
    ks = jax.random.split(jax.random.key(3), 6)
    x, dt = jax.random.normal(ks[0], (2, 24, 4, 8)), jax.nn.softplus(jax.random.normal(ks[1], (2, 24, 4)))
    a = -jnp.exp(jax.random.normal(ks[2], (4,)))
    bm, cm = (jax.random.normal(k, (2, 24, 2, 8)) for k in ks[3:5])
    state = jax.random.normal(ks[5], (2, 4, 8, 8))
    scan = lambda *args: ssd.ssd_chunked(*args[:5], 8, args[5])
    step_args = (state, x[:, 0], dt[:, 0], a, bm[:, 0], cm[:, 0])
    with use_mesh(mesh):
        got = jax.jit(lambda *args: (*dispatch.scan_per_shard(scan, *args[:6]),
                                     *dispatch.step_per_shard(ssd.ssd_step, *args[6:])))(
            x, dt, a, bm, cm, state, *step_args)
    want = (*scan(x, dt, a, bm, cm, state), *ssd.ssd_step(*step_args))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)

    monkeypatch.setattr(dispatch, "_interpret", lambda: False)  # compile for the GPU instead
    shapes = [((2, 128, 4, 64), jnp.bfloat16), ((2, 128, 4), jnp.float32), ((4,), jnp.float32),
              ((2, 128, 2, 128), jnp.bfloat16), ((2, 128, 2, 128), jnp.bfloat16), ((2, 4, 64, 128), jnp.float32)]
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    step_args = [args[5], *(jax.ShapeDtypeStruct((s[0], *s[2:]), d) for s, d in (shapes[0], shapes[1])),
                 args[2], *(jax.ShapeDtypeStruct((s[0], *s[2:]), d) for s, d in shapes[3:5])]

    def loss(*a):
        y, final = dispatch.ssd_chunked(*a[:5], 128, a[5], kernels="pallas")
        y_step, state = dispatch.ssd_step(*a[6:], kernels="pallas")
        return jnp.sum(y) + jnp.sum(final) + jnp.sum(y_step) + jnp.sum(state)

    with use_mesh(mesh):
        text = jax.jit(jax.grad(loss, argnums=range(6))).trace(*args, *step_args).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 3 and "sdy.manual_computation" in text


def _nvfp4_bank(key, e: int, n: int, k: int) -> dict:
    """An NVFP4 expert bank ([E, N, K] weights quantized by nemojax.quant.nvfp4) in the bank layout."""
    packed, block_scale, global_scale = nvfp4.quantize(jax.random.normal(key, (e, n, k)))
    return {"weight": packed, "weight_scale": block_scale, "weight_scale_2": global_scale}


def _routing(t: int, k: int, e: int):
    ks = jax.random.split(jax.random.key(7), 3)
    x = jax.random.normal(ks[0], (t, 32)).astype(jnp.bfloat16)
    ids = jax.vmap(lambda key: jax.random.permutation(key, e)[:k])(jax.random.split(ks[1], t)).astype(jnp.int32)
    return x, ids, jax.random.uniform(ks[2], (t, k))


def test_nvfp4_experts_run_through_the_fp4_kernel():
    """NVFP4 routed experts with kernels="pallas" (the kernel in the GPU interpreter) equal the reference."""
    up, down = _nvfp4_bank(jax.random.key(1), 4, 48, 32), _nvfp4_bank(jax.random.key(2), 4, 32, 48)
    x, ids, weights = _routing(6, 2, 4)
    run = lambda kernels: jax.jit(lambda *a: dropless_experts(*a, kernels=kernels))(x, ids, weights, up, down)
    got, want = np.asarray(run("pallas")), np.asarray(run("reference"))
    assert np.abs(want).max() > 0
    assert np.max(np.abs(got - want)) <= 2e-2 * np.max(np.abs(want))  # bf16 outputs of the kernel


def test_nvfp4_experts_lower_to_the_kernel_on_a_mesh(monkeypatch):
    """Expert parallel (expert=2: the kernel per device on its experts' rows) and data=2 without an expert
    axis (replicated operands) both compile the FP4 kernel for CUDA inside shard_map."""
    monkeypatch.setattr(dispatch, "_interpret", lambda: False)
    up, down = _nvfp4_bank(jax.random.key(1), 4, 48, 32), _nvfp4_bank(jax.random.key(2), 4, 32, 48)
    x, ids, weights = _routing(8, 2, 4)
    runs = (({"expert": 2}, functools.partial(expert_parallel_experts, activation=relu2, kernels="pallas")),
            ({"data": 2}, functools.partial(dropless_experts, kernels="pallas")))
    for axes, experts in runs:
        with use_mesh(make_mesh(**axes, devices=jax.devices()[:2])):
            text = jax.jit(experts).trace(x, ids, weights, up, down).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("mosaic_gpu") >= 2 and "sdy.manual_computation" in text, axes
