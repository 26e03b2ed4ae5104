"""FP8 (E4M3) KV cache: the storage rule against a naive e4m3 round trip, the checkpoint's k_scale / v_scale
in use, decoding within a stated tolerance of a bfloat16 cache (logits and greedy tokens), half the
cache memory in the planner, and --kv-cache-dtype refusing other values."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from nemojax.config import KV_CACHE_DTYPES, from_hf_config
from nemojax.model import NemotronH, init_cache, init_variables
from nemojax.planning.caches import cache_bytes_per_device
from nemojax.quant import kv_cache

pytestmark = pytest.mark.xdist_group("kv_cache_fp8")
TINY = dict(vocab_size=64, hidden_size=32, hybrid_override_pattern="M*M*", num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2,
            chunk_size=4, intermediate_size=48, compute_dtype="float32", param_dtype="float32", eos_token_id=2)
PROMPT, NEW = 12, 10
# Stated tolerance of FP8 vs bfloat16 KV decoding (tiny model, float32 compute): logits differ by at most
# 5% of their spread (E4M3 keeps 3 mantissa bits: 2^-4 relative per entry), greedy tokens agree.
LOGIT_TOL = 0.05


def test_storage_rule_is_scaled_e4m3_round_trip():
    x = jnp.asarray([0.0, 0.013, -0.77, 3.3, 100.0, 1e4, -1e4], jnp.float32)
    scale = jnp.float32(0.5)
    stored = kv_cache.to_cache(x, scale, jnp.float8_e4m3fn)
    assert stored.dtype == jnp.float8_e4m3fn
    naive = np.clip(np.asarray(x) / 0.5, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(np.asarray(stored).view(np.uint8), naive.view(np.uint8))
    back = np.asarray(kv_cache.from_cache(stored, scale, jnp.float32))
    np.testing.assert_allclose(back[:5], np.asarray(x)[:5], rtol=2 ** -4)
    assert back[5] == 224.0 and back[6] == -224.0  # saturates at ±448·scale
    # Any other cache dtype: a plain cast, the scale ignored.
    assert kv_cache.to_cache(x, scale, jnp.bfloat16).dtype == jnp.bfloat16
    np.testing.assert_array_equal(kv_cache.from_cache(x.astype(jnp.bfloat16), scale, jnp.float32),
                                  x.astype(jnp.bfloat16).astype(jnp.float32))


@pytest.fixture(scope="module")
def tiny():
    config = from_hf_config(TINY)
    return config, jax.jit(init_variables, static_argnums=0)(config, jax.random.key(3))


def _greedy(config, variables, prompt_t, new: int):
    """Prefill then `new` greedy steps with the cache of `config`: (logits [new, vocab], tokens, cache)."""
    model = NemotronH(config)
    forward = jax.jit(lambda v, ids, c: model.apply(v, ids, None, c, method="forward"))
    logits, _, cache = forward(variables, jnp.asarray(prompt_t)[None], init_cache(config, 1, PROMPT + new))
    steps, tokens = [], []
    for _ in range(new):
        steps.append(logits[0, -1])
        tokens.append(int(jnp.argmax(logits[0, -1])))
        logits, _, cache = forward(variables, jnp.asarray([[tokens[-1]]]), cache)
    return np.stack(steps), tokens, cache


def test_fp8_decoding_within_tolerance_of_bf16(tiny):
    config, variables = tiny
    prompt = np.random.default_rng(0).integers(3, 64, PROMPT)
    ref_logits, ref_tokens, ref_cache = _greedy(config.replace(kv_cache_dtype="bfloat16"), variables, prompt, NEW)
    fp8_logits, fp8_tokens, fp8_cache = _greedy(config.replace(kv_cache_dtype="float8_e4m3fn"), variables,
                                                prompt, NEW)
    assert ref_cache["layers"][1]["k"].dtype == jnp.bfloat16
    assert fp8_cache["layers"][1]["k"].dtype == jnp.float8_e4m3fn
    spread = float(np.ptp(ref_logits))
    diff = np.abs(fp8_logits - ref_logits)
    assert 0 < diff.max() <= LOGIT_TOL * spread, (diff.max(), spread)
    assert fp8_tokens == ref_tokens


def test_checkpoint_scales_divide_the_stored_values(tiny):
    """With kv_cache_quant="fp8" the layers' k_scale / v_scale are the FP8 cache's scales: each stored entry
    is e4m3(k / k_scale) of the float32 cache's entry for the same prompt (in the first attention layer,
    whose inputs do not depend on the cache's dtype)."""
    config, variables = tiny
    quant = config.replace(kv_cache_quant="fp8")
    params = dict(variables["params"], backbone=dict(variables["params"]["backbone"]))
    k_scale, v_scale = 0.004, 0.0025
    for layer in ("layers_1", "layers_3"):
        mixer = params["backbone"][layer]["mixer"]
        params["backbone"][layer] = dict(params["backbone"][layer],
                                         mixer=dict(mixer, k_scale=jnp.float32(k_scale), v_scale=jnp.float32(v_scale)))
    scaled = {**variables, "params": params}
    prompt = jnp.asarray(np.random.default_rng(1).integers(3, 64, PROMPT))[None]

    def prefill_cache(dtype):
        cfg = quant.replace(kv_cache_dtype=dtype)
        run = jax.jit(lambda v, c: NemotronH(cfg).apply(v, prompt, None, c, method="forward")[2])
        return run(scaled, init_cache(cfg, 1, PROMPT))

    fp32, fp8 = prefill_cache("float32"), prefill_cache("float8_e4m3fn")
    for name, scale in (("k", k_scale), ("v", v_scale)):
        want = kv_cache.to_cache(fp32["layers"][1][name], scale, jnp.float8_e4m3fn)
        got = fp8["layers"][1][name]
        np.testing.assert_array_equal(np.asarray(got).view(np.uint8), np.asarray(want).view(np.uint8))
        assert np.abs(np.asarray(got, np.float32)).max() > 4  # the scale spreads values over the E4M3 range


def test_planner_fp8_cache_is_half_of_bf16():
    config = from_hf_config(TINY)
    single = {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}
    batch, length = 2, 1024
    sizes = {dtype: cache_bytes_per_device(config.replace(kv_cache_dtype=dtype), batch, length, single)
             for dtype in ("bfloat16", "float8_e4m3fn", "float32")}
    valid = 2 * batch * length  # two attention layers' bool validity
    kv = {dtype: size["kv_cache"] - valid for dtype, size in sizes.items()}
    assert kv["bfloat16"] == 2 * 2 * batch * length * 2 * 8 * 2  # layers * (k, v) * b * s * kv_heads * d * bytes
    assert kv["float8_e4m3fn"] * 2 == kv["bfloat16"] and kv["float32"] == 2 * kv["bfloat16"]
    assert sizes["float8_e4m3fn"]["ssm_state"] == sizes["bfloat16"]["ssm_state"]  # Mamba states unchanged


def test_serve_flag_choices_match_config_and_refuse_others(capsys):
    from nemojax.cli.serve import KV_CACHE_CHOICES, main

    assert set(KV_CACHE_CHOICES) == set(KV_CACHE_DTYPES)
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", "/nonexistent", "--kv-cache-dtype", "int8"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--kv-cache-dtype" in err and "int8" in err and "fp8" in err
