"""Post-training quantization of published tensors into the ModelOpt checkpoint layout, and back.

Per quantized module X (published name, e.g. `backbone.layers.1.mixer.experts.0.up_proj`):
- NVFP4: `X.weight` uint8 [N, K/2], `X.weight_scale` float8_e4m3fn [N, K/16], `X.weight_scale_2`
  float32 [], `X.input_scale` float32 [] = input amax / (6 * 448);
- FP8: `X.weight` float8_e4m3fn [N, K], `X.weight_scale` float32 [], `X.input_scale` = input amax / 448;
and with an FP8 KV cache, `<attention>.k_scale` / `.v_scale` = key / value amax / 448 (ModelOpt's
scale formulas). Every other tensor is copied unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from nemojax.errors import CheckpointError
from nemojax.quant import fp8, nvfp4
from nemojax.quant.modelopt import QuantScheme

E4M3_MAX = 448.0
SCALE_SUFFIXES = (".weight_scale", ".weight_scale_2", ".input_scale")
KV_SCALE_SUFFIXES = (".k_scale", ".v_scale")


def _input_scale(amax: float, fmt: str) -> np.ndarray:
    bound = nvfp4.E2M1_MAX * E4M3_MAX if fmt == "nvfp4" else E4M3_MAX
    return np.asarray(np.float32(amax if amax > 0 else 1.0) / np.float32(bound), np.float32)


def quantize_tensors(tensors: Mapping[str, np.ndarray], scheme: QuantScheme,
                     amax: Mapping[str, float]) -> dict[str, np.ndarray]:
    """Published float tensors -> the ModelOpt tensors of `scheme`; `amax` from `calibrate`."""
    missing = sorted(m for m in scheme.formats if f"{m}.weight" not in tensors or m not in amax)
    if missing:
        raise CheckpointError("cannot quantize modules without a weight or a calibrated input range:\n  "
                              + "\n  ".join(missing))
    out: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        module = name.removesuffix(".weight")
        fmt = scheme.format_of(module) if name.endswith(".weight") else None
        if fmt == "nvfp4":
            packed, block_scale, global_scale = nvfp4.quantize(value, name)
            out[name], out[f"{module}.weight_scale"] = np.asarray(packed), np.asarray(block_scale)
            out[f"{module}.weight_scale_2"] = np.asarray(global_scale)
        elif fmt == "fp8":
            q, scale = fp8.quantize(value, name=name)
            out[name], out[f"{module}.weight_scale"] = np.asarray(q), np.asarray(scale)
        else:
            out[name] = value
        if fmt is not None:
            out[f"{module}.input_scale"] = _input_scale(amax[module], fmt)
    if scheme.kv_cache == "fp8":
        for key, value in amax.items():
            if key.endswith((".k_cache", ".v_cache")):
                attention, which = key.rsplit(".", 1)
                out[f"{attention}.{which[0]}_scale"] = _input_scale(value, "fp8")
    return out


def dequantize_tensors(tensors: Mapping[str, np.ndarray], scheme: QuantScheme) -> dict[str, np.ndarray]:
    """ModelOpt tensors -> float32 published tensors (scales dropped): what the quantized model computes with."""
    out: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if name.endswith(SCALE_SUFFIXES + KV_SCALE_SUFFIXES):
            continue
        module = name.removesuffix(".weight")
        fmt = scheme.format_of(module) if name.endswith(".weight") else None
        if fmt == "nvfp4":
            value = nvfp4.dequantize(value, tensors[f"{module}.weight_scale"], tensors[f"{module}.weight_scale_2"])
        elif fmt == "fp8":
            value = fp8.dequantize(value, tensors[f"{module}.weight_scale"])
        out[name] = np.asarray(value, np.float32)
    return out


def storage_report(float_tensors: Mapping[str, np.ndarray], quantized: Mapping[str, np.ndarray],
                   scheme: QuantScheme) -> dict[str, dict[str, float]]:
    """Parameters, bytes and bits per parameter of the quantized tensors, by format and in total
    (scales counted with their weights; the KV scales under "other")."""
    groups: dict[str, list[float]] = {}
    for name, value in float_tensors.items():
        module = name.removesuffix(".weight")
        fmt = (scheme.format_of(module) if name.endswith(".weight") else None) or "unquantized"
        params, stored = groups.setdefault(fmt, [0, 0])
        stored += quantized[name].nbytes
        if fmt != "unquantized":
            stored += sum(quantized[module + s].nbytes for s in SCALE_SUFFIXES if module + s in quantized)
        groups[fmt] = [params + value.size, stored]
    kv = sum(v.nbytes for k, v in quantized.items() if k.endswith(KV_SCALE_SUFFIXES))
    groups.setdefault("unquantized", [0, 0])[1] += kv
    report = {fmt: {"params": p, "bytes": b, "bits_per_param": 8 * b / p if p else 0.0}
              for fmt, (p, b) in groups.items()}
    params, stored = sum(p for p, _ in groups.values()), sum(b for _, b in groups.values())
    report["total"] = {"params": params, "bytes": stored, "bits_per_param": 8 * stored / params}
    return report

