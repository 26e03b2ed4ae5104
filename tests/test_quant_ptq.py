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
