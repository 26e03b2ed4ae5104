"""Post-training quantization of published tensors: the ModelOpt tensors, scales and storage counts."""

import numpy as np
import pytest

from nemojax.errors import CheckpointError
from nemojax.quant import fp8, nvfp4, ptq
from nemojax.quant.modelopt import QuantScheme


def _tensors():
    rng = np.random.default_rng(0)
    return {"a.experts.0.up_proj.weight": rng.standard_normal((32, 64)).astype(np.float32),
            "a.in_proj.weight": rng.standard_normal((16, 48)).astype(np.float32),
            "a.norm.weight": np.ones(48, np.float32)}


def test_quantized_tensors_scales_and_round_trip():
    tensors = _tensors()
    scheme = QuantScheme({"a.experts.0.up_proj": "nvfp4", "a.in_proj": "fp8"}, "fp8")
    amax = {"a.experts.0.up_proj": 3.0, "a.in_proj": 0.0, "a.mixer.k_cache": 44.8, "a.mixer.v_cache": 8.96}
    out = ptq.quantize_tensors(tensors, scheme, amax)
    assert out["a.experts.0.up_proj.weight"].dtype == np.uint8
    assert out["a.experts.0.up_proj.weight"].shape == (32, 32)
    assert out["a.experts.0.up_proj.weight_scale"].shape == (32, 4)
    assert out["a.experts.0.up_proj.weight_scale_2"].shape == ()
    assert float(out["a.experts.0.up_proj.input_scale"]) == np.float32(3.0) / np.float32(2688)
    assert float(out["a.in_proj.input_scale"]) == np.float32(1.0) / np.float32(448)  # unseen input: amax 1
    assert float(out["a.mixer.k_scale"]) == np.float32(44.8) / np.float32(448)
    assert float(out["a.mixer.v_scale"]) == np.float32(8.96) / np.float32(448)
    np.testing.assert_array_equal(out["a.norm.weight"], tensors["a.norm.weight"])
    back = ptq.dequantize_tensors(out, scheme)
    assert sorted(back) == sorted(tensors)
    np.testing.assert_array_equal(back["a.experts.0.up_proj.weight"],
                                  nvfp4.dequantize(*nvfp4.quantize(tensors["a.experts.0.up_proj.weight"])))
    np.testing.assert_array_equal(back["a.in_proj.weight"], fp8.dequantize(*fp8.quantize(tensors["a.in_proj.weight"])))


def test_storage_report_counts_bytes_by_format():
    tensors = _tensors()
    scheme = QuantScheme({"a.experts.0.up_proj": "nvfp4", "a.in_proj": "fp8"})
    out = ptq.quantize_tensors(tensors, scheme, {"a.experts.0.up_proj": 1.0, "a.in_proj": 1.0})
    report = ptq.storage_report(tensors, out, scheme)
    # NVFP4: 2048 values -> 1024 code bytes + 128 scale bytes + weight_scale_2 + input_scale (4 + 4).
    assert report["nvfp4"] == {"params": 2048, "bytes": 1160, "bits_per_param": 8 * 1160 / 2048}
    assert report["fp8"] == {"params": 768, "bytes": 768 + 8, "bits_per_param": 8 * 776 / 768}
    assert report["unquantized"]["bytes"] == 48 * 4
    assert report["total"]["params"] == 2048 + 768 + 48


def test_missing_calibration_is_named():
    with pytest.raises(CheckpointError, match="a.in_proj"):
        ptq.quantize_tensors(_tensors(), QuantScheme({"a.in_proj": "fp8"}), {})


def test_calibration_ranges_against_brute_force():
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from nemojax.config import from_hf_config
    from nemojax.model import NemotronH, init_variables
    from nemojax.model.layers import relu2
    from nemojax.model.moe import Experts
    from nemojax.quant.calibrate import calibrate

    config = from_hf_config(dict(vocab_size=40, hidden_size=32, hybrid_override_pattern="E*", num_attention_heads=2,
                                 num_key_value_heads=1, head_dim=16, n_routed_experts=6, num_experts_per_tok=2,
                                 moe_intermediate_size=16, moe_shared_expert_intermediate_size=16,
                                 compute_dtype="float32"))
    model, variables = NemotronH(config), init_variables(config, jax.random.key(0))
    ids = np.random.default_rng(0).integers(0, 40, (2, 9))
    amax = calibrate(model, variables, [ids])
    seen = {}

    def grab(next_fun, args, kwargs, context):
        if isinstance(context.module, Experts) and context.method_name == "__call__":
            seen["x"], seen["ids"] = np.asarray(args[0]), np.asarray(args[1])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
        _, hidden, _ = model.apply(variables, ids, method=model.forward)
    assert amax["lm_head"] == pytest.approx(float(jnp.max(jnp.abs(hidden))), rel=1e-6)
    up = np.asarray(variables["params"]["backbone"]["layers_0"]["mixer"]["experts"]["up_proj"])
    want = {}
    for e in range(6):  # brute force: every token that chose expert e
        rows = seen["x"][(seen["ids"] == e).any(axis=1)]
        if len(rows):
            want[e] = (np.abs(rows).max(), float(np.asarray(relu2(jnp.asarray(rows) @ up[e])).max()))
    largest = tuple(max(v[i] for v in want.values()) for i in range(2))  # for experts no token reached
    for e in range(6):
        prefix = f"backbone.layers.0.mixer.experts.{e}"
        got = (amax[f"{prefix}.up_proj"], amax[f"{prefix}.down_proj"])
        np.testing.assert_allclose(got, want.get(e, largest), rtol=1e-5)
    assert "backbone.layers.1.mixer.k_cache" in amax and "backbone.layers.1.mixer.q_proj" in amax


def test_calibration_of_a_scanned_model_equals_unscanned():
    """Scanned layers (the published depths) calibrate per layer, as the unrolled model does."""
    import dataclasses

    import jax

    from nemojax.config import from_hf_config
    from nemojax.model import NemotronH, init_variables
    from nemojax.model.stacking import to_layout
    from nemojax.quant.calibrate import calibrate

    config = from_hf_config(dict(vocab_size=40, hidden_size=32, hybrid_override_pattern="E*M-" * 4,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=16, mamba_num_heads=4,
                                 mamba_head_dim=8, ssm_state_size=8, n_groups=1, chunk_size=8,
                                 intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
                                 moe_intermediate_size=16, moe_shared_expert_intermediate_size=16,
                                 compute_dtype="float32", scan_layers=True))
    unrolled = dataclasses.replace(config, scan_layers=False)
    variables = init_variables(unrolled, jax.random.key(0))
    ids = [np.random.default_rng(0).integers(0, 40, (2, 9))]
    want = calibrate(NemotronH(unrolled), variables, ids)
    got = calibrate(NemotronH(config), to_layout(config, variables, stacked=True), ids)
    assert len(got) == len(want) and "backbone.layers.15.mixer.down_proj" in got
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-6), name
