"""Memory planning: exact parameter counts, per-device bytes, AOT activation compiles, the CLI."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from nemojax.config import resolve_model_config
from nemojax.ops.expert_banks import use_expert_matmul
from nemojax.planning import activations, count_parameters, matmuls
from nemojax.planning.caches import cache_bytes_per_device
from nemojax.planning.layout import build_mesh
from nemojax.planning.report import PlanRequest
from nemojax.planning.weights import serving_config, training_bytes_per_device, weight_bytes_per_device
from nemojax.sharding import parse_mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def expected_counts(c) -> dict[str, int]:
    """Parameter counts written out by hand from the config fields (independent of the model code)."""
    d, inner, heads = c.hidden_size, c.mamba_num_heads * c.mamba_head_dim, c.mamba_num_heads
    conv_dim = inner + 2 * c.n_groups * c.ssm_state_size
    width = c.moe_latent_size or d
    latent = 2 * d * c.moe_latent_size if c.moe_latent_size else 0
    experts = c.n_routed_experts * 2 * width * c.moe_intermediate_size
    per_layer = {
        "mamba": d + d * (2 * inner + 2 * c.n_groups * c.ssm_state_size + heads)   # norm, in_proj
        + c.conv_kernel * conv_dim + conv_dim + 3 * heads + inner + inner * d,   # conv, dt/A/D, norm, out
        "attention": d + 2 * d * c.num_attention_heads * c.head_dim + 2 * d * c.num_key_value_heads * c.head_dim,
        "moe": d + d * c.n_routed_experts + latent + experts + 2 * d * c.moe_shared_expert_intermediate_size,
        "mlp": d + 2 * d * c.intermediate_size,
    }
    main = 2 * c.vocab_size * d + d + sum(per_layer[k] for k in c.layer_types)
    # enorm, hnorm, eh_proj [2d -> d], final_layernorm, then the sublayers (each with its pre-norm)
    mtp = (3 * d + 2 * d * d + sum(per_layer[k] for k in c.mtp_layer_types)) if c.has_mtp else 0
    routed_unused = c.layer_types.count("moe") * (c.n_routed_experts - c.num_experts_per_tok) * experts
    return {"main": main, "mtp": mtp, "active": main - routed_unused // c.n_routed_experts,
            "buffers_main": c.layer_types.count("moe") * c.n_routed_experts}


@pytest.mark.parametrize("name", ["tiny", "nano", "super", "ultra"])
def test_counts_match_hand_formula(name):
    config = resolve_model_config(name)
    counts = count_parameters(config)
    want = expected_counts(config)
    assert (counts.main, counts.mtp, counts.active, counts.buffers_main) == (
        want["main"], want["mtp"], want["active"], want["buffers_main"])
    assert counts.total == counts.main + counts.mtp
    assert counts.active < counts.main


def test_published_counts_are_exact():
    nano, sup, ultra = (count_parameters(resolve_model_config(n)) for n in ("nano", "super", "ultra"))
    # Super's published main-model count includes the 40 MoE layers' 512-wide correction biases.
    assert sup.main + sup.buffers_main == 120_668_707_840
    assert sup.main == 120_668_707_840 - 40 * 512
    assert (nano.main, nano.mtp) == (31_577_937_344, 0)
    assert (ultra.main, ultra.mtp) == (549_308_968_960, 11_215_609_856)
    assert 12e9 < sup.active < 13e9 and 3e9 < nano.active < 4e9 and 50e9 < ultra.active < 60e9


@pytest.mark.parametrize("fmt", ["bf16", "nvfp4-experts"])
def test_expert_bytes_halve_when_expert_axis_doubles(fmt):
    config = resolve_model_config("tiny")
    two = weight_bytes_per_device(config, parse_mesh("expert=2,tensor=4"), fmt)
    four = weight_bytes_per_device(config, parse_mesh("expert=4,tensor=4"), fmt)
    assert two["routed_experts"] == 2 * four["routed_experts"]
    assert two["other"] == four["other"]


def test_weight_formats_per_value():
    config = resolve_model_config("tiny")
    one = parse_mesh("")
    bf16 = weight_bytes_per_device(config, one, "bf16")
    fp4 = weight_bytes_per_device(config, one, "nvfp4-experts")
    fp8 = weight_bytes_per_device(config, one, "fp8")
    c = config
    main_expert_values = c.layer_types.count("moe") * c.n_routed_experts * 2 * c.moe_latent_size \
        * c.moe_intermediate_size
    mtp_expert_values = c.mtp_layer_types.count("moe") * c.n_routed_experts * 2 * c.moe_latent_size \
        * c.moe_intermediate_size
    assert bf16["routed_experts"] == 2 * (main_expert_values + mtp_expert_values)
    # Per expert and projection two float32 scalars: weight_scale_2 (NVFP4) or weight_scale (FP8), and input_scale.
    scales = 8 * 2 * c.n_routed_experts
    assert fp4["routed_experts"] == main_expert_values * 9 // 16 + 2 * mtp_expert_values \
        + c.layer_types.count("moe") * scales
    assert fp8["routed_experts"] == main_expert_values + mtp_expert_values + (c.layer_types.count("moe") + 1) * scales
    assert fp8["other"] < bf16["other"] == fp4["other"]


def test_kv_heads_replicate_beyond_tensor_two():
    config = serving_config(resolve_model_config("super"))
    b, t = 4, 1024
    attn = config.layer_types.count("attention") + config.mtp_layer_types.count("attention")
    kv_full = attn * (2 * b * t * config.num_key_value_heads * config.head_dim * 2 + b * t)
    sizes = {n: cache_bytes_per_device(config, b, t, parse_mesh(f"tensor={n}")) for n in (1, 2, 4)}
    assert sizes[1]["kv_cache"] == sizes[4]["kv_cache"] == kv_full
    assert sizes[2]["kv_cache"] == kv_full - (kv_full - attn * b * t) // 2
    ssm_full = config.layer_types.count("mamba") * b * (
        (config.conv_kernel - 1) * config.mamba_conv_dim * 2
        + config.mamba_num_heads * config.mamba_head_dim * config.ssm_state_size * 4)
    assert sizes[1]["ssm_state"] == ssm_full == 4 * sizes[4]["ssm_state"]


def test_training_state_is_sixteen_bytes_per_param_sharded_like_params():
    config = resolve_model_config("tiny")
    counts = count_parameters(config)
    state = training_bytes_per_device(config, parse_mesh(""))
    assert state["optimizer"] == 8 * counts.total
    assert state["gradients"] == state["weights"] == 4 * counts.total
    # fsdp=4 shards every matrix along its embed dim; only vectors (norms, A_log, ...) replicate.
    sharded = training_bytes_per_device(config, parse_mesh("fsdp=4"))["optimizer"] // 8
    assert counts.total / 4 <= sharded < counts.total / 3


def test_training_compile_on_two_devices_grows_with_length():
    config = serving_config(resolve_model_config("tiny"))
    mesh = build_mesh(parse_mesh("tensor=2"), jax.devices()[:2])
    part = next(p for p in activations.model_parts(config) if p.name == "attention")
    short = activations.training_part(part, config, mesh, batch=2, seq_len=32)
    long = activations.training_part(part, config, mesh, batch=2, seq_len=64)
    # Attention keeps its [b, heads/2, t, t] float32 probabilities for the backward.
    assert long.saved_bytes >= 2 * 2 * 64 * 64 * 4
    assert long.saved_bytes > 2 * short.saved_bytes and long.peak_bytes > short.peak_bytes > 0


def test_grouped_gemm_stand_in_has_a_grouped_gemms_buffers():
    """The planner's kernel stand-in allocates what a grouped GEMM does: [m, n] float32 out, and in the
    backward [m, k] and [E, k, n] gradients, like ragged_dot's."""
    x = jax.ShapeDtypeStruct((40, 16), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((4, 16, 24), jnp.float32)
    sizes = jax.ShapeDtypeStruct((4,), jnp.int32)
    for fn in (matmuls.grouped_gemm_shapes, matmuls.ragged_dot_matmul):
        out = jax.eval_shape(fn, x, w, sizes)
        grads = jax.eval_shape(jax.grad(lambda a, b, c, f=fn: jnp.sum(f(a, b, c)), argnums=(0, 1)), x, w, sizes)
        assert (out.shape, out.dtype) == ((40, 24), jnp.float32)
        assert [(g.shape, g.dtype) for g in grads] == [((40, 16), jnp.bfloat16), ((4, 16, 24), jnp.float32)]
    assert PlanRequest({"fsdp": 8}).grouped_matmul == "kernel"  # plans describe the GPU path by default


def test_moe_plans_compile_the_chosen_grouped_matmul():
    """The choice changes the compiled MoE part: XLA's ragged_dot expansion (one operand copy per expert)
    needs more than a grouped GEMM's shapes, and the CPU path compiles its own loop (whose temporaries
    depend on the XLA version: a weight copy per tile on jax 0.10, none on jax 0.12)."""
    config = serving_config(resolve_model_config("tiny"))
    mesh = build_mesh(parse_mesh("tensor=2"), jax.devices()[:2])
    part = next(p for p in activations.model_parts(config) if p.name == "moe")
    peaks = {}
    for choice in matmuls.GROUPED_MATMUL_CHOICES:
        with use_expert_matmul(matmuls.planning_matmul(choice)):
            peaks[choice] = activations.serving_part(part, config, mesh, batch=2, chunk=64, max_len=64).peak_bytes
    assert peaks["kernel"] < peaks["ragged-dot"] and peaks["cpu-tiled"] < peaks["ragged-dot"], peaks
    assert peaks["cpu-tiled"] != peaks["kernel"], peaks


def test_scanned_layers_without_full_remat_keep_every_kinds_residuals():
    parts = [activations.PartMemory("mamba", 3, 10, 100, 0.0), activations.PartMemory("moe", 3, 20, 300, 0.0),
             activations.PartMemory("norm_f+lm_head", 1, 50, 7, 0.0)]
    assert activations.activation_bytes(parts, train=False) == 50
    assert activations.activation_bytes(parts, train=True) == 50 + 3 * 100 + 3 * 300 + 7
    assert activations.activation_bytes(parts, train=True, scanned_layers=6) == 50 + 6 * (100 + 300) + 7


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "nemojax.plan", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_cli_json_plan_with_activation_compile():
    run = _cli("tiny", "--mesh", "tensor=2", "--batch", "2", "--seq-len", "64", "--json", "--device", "h100-80gb")
    assert run.returncode == 0, run.stderr
    plan = json.loads(run.stdout)
    for key in ("params_total", "params_main", "params_mtp", "params_active", "bytes_per_device", "fits",
                "headroom_bytes", "activation_parts", "activation_method", "plan_seconds"):
        assert key in plan
    memory = plan["bytes_per_device"]
    assert set(memory) == {"weights", "buffers", "kv_cache", "ssm_state", "activations", "total"}
    assert plan["devices"] == 2 and plan["fits"] is True
    assert memory["total"] == sum(v for k, v in memory.items() if k != "total")
    assert plan["headroom_bytes"] == 80 * 10**9 - memory["total"]
    attention = next(p for p in plan["activation_parts"] if p["name"] == "attention")
    assert attention["peak_bytes"] >= 2 * 2 * 64 * 64 * 4  # [b, heads/2, t, t] float32 scores
    assert memory["activations"] == max(p["peak_bytes"] for p in plan["activation_parts"])


@pytest.mark.parametrize("args, message", [
    (["no-such-model"], "unknown model config"),
    (["tiny", "--mesh", "tensor=3", "--devices", "8"], "must multiply to the device count"),
    (["tiny", "--mesh", "pipeline=2"], "expected AXIS=SIZE"),
])
def test_cli_bad_input_exits_2(args, message):
    run = _cli(*args, "--no-compile")
    assert run.returncode == 2
    assert message in run.stderr and "Traceback" not in run.stderr
