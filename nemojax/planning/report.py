"""Assemble a memory plan (counts, per-device bytes, activations, verdict) and print it."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from nemojax.config import KV_CACHE_DTYPES, ModelConfig
from nemojax.errors import ConfigError
from nemojax.ops.expert_banks import use_expert_matmul
from nemojax.planning import activations
from nemojax.planning.caches import cache_bytes_per_device, request_cache_bytes
from nemojax.planning.counts import count_parameters
from nemojax.planning.layout import build_mesh, mesh_devices, mesh_text
from nemojax.planning.matmuls import GROUPED_MATMUL_CHOICES, planning_matmul
from nemojax.planning.weights import (
    WEIGHT_FORMATS,
    serving_config,
    training_bytes_per_device,
    training_config,
    weight_bytes_per_device,
)

# Memory of one accelerator, in bytes (as the vendors state it).
DEVICE_MEMORY: dict[str, int] = {
    "a100-80gb": 80 * 10**9,
    "h100-80gb": 80 * 10**9,
    "h100-94gb": 94 * 10**9,
    "h200": 141 * 10**9,
    "b200": 180 * 10**9,
}
COMBINE_NOTE = {
    False: "prefill of batch x chunk tokens against full caches: peak = max over parts of "
           "(compiled temp + input and output activations); each part compiled once",
    True: "training step on batch x seq_len: peak = sum over all layers of kept residuals + max over "
          "parts of (compiled backward temp + activations in/out); each part compiled once",
}


@dataclasses.dataclass(frozen=True)
class PlanRequest:
    mesh_shape: Mapping[str, int]
    weights: str = "bf16"
    batch: int = 1
    seq_len: int = 4096
    prefill_chunk: int | None = None   # serving: tokens per prefill step (default min(seq_len, 1024))
    train: bool = False
    device: str = "h200"
    compile_activations: bool = True
    grouped_matmul: str = "kernel"     # how the routed experts are compiled (`nemojax.planning.matmuls`)
    kv_cache_dtype: str | None = None  # serving: "fp8" | "bf16" | "fp32" K/V storage (None: the compute dtype)
    request_tokens: int = 2**20        # the one long request whose cache the plan reports (1M tokens)
    context_parallel: bool = False     # serving: KV caches sharded along the sequence

    def validate(self) -> None:
        if self.weights not in WEIGHT_FORMATS:
            raise ConfigError(f"--weights: expected one of {WEIGHT_FORMATS}, got {self.weights!r}")
        if self.train and self.weights != "bf16":
            raise ConfigError("--train plans bf16 weights (with a float32 master copy); drop --weights")
        if self.grouped_matmul not in GROUPED_MATMUL_CHOICES:
            raise ConfigError(f"--grouped-matmul: expected one of {GROUPED_MATMUL_CHOICES}, "
                              f"got {self.grouped_matmul!r}")
        if self.device not in DEVICE_MEMORY:
            raise ConfigError(f"--device: expected one of {sorted(DEVICE_MEMORY)}, got {self.device!r}")
        for name in ("batch", "seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer")
        if self.kv_cache_dtype is not None and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"--kv-cache-dtype: expected one of {sorted(KV_CACHE_DTYPES)}, "
                              f"got {self.kv_cache_dtype!r}")
        if self.request_tokens < 1:
            raise ConfigError("--request-tokens must be a positive integer")
        if self.prefill_chunk is not None and not 1 <= self.prefill_chunk <= self.seq_len:
            raise ConfigError("--prefill-chunk must be between 1 and --seq-len")

    @property
    def chunk(self) -> int:
        return self.prefill_chunk or min(self.seq_len, 1024)


def make_plan(config: ModelConfig, request: PlanRequest, devices: Sequence[jax.Device] | None = None,
              name: str = "") -> dict[str, Any]:
    """The full plan as a JSON-ready dict (bytes are per device)."""
    request.validate()
    start = time.perf_counter()
    config = serving_config(config)
    if request.kv_cache_dtype is not None and not request.train:
        config = config.replace(kv_cache_dtype=KV_CACHE_DTYPES[request.kv_cache_dtype])
    mesh_shape = dict(request.mesh_shape)
    counts = count_parameters(config)
    weights = weight_bytes_per_device(config, mesh_shape, request.weights)
    memory = {"weights": weights["routed_experts"] + weights["other"], "buffers": weights["buffers"]}
    if request.train:
        memory.update(training_bytes_per_device(config, mesh_shape))
        config = training_config(config)
    else:
        memory.update(cache_bytes_per_device(config, request.batch, request.seq_len, mesh_shape,
                                             request.context_parallel))
    parts = []
    if request.compile_activations:
        mesh = build_mesh(mesh_shape, devices)
        with use_expert_matmul(planning_matmul(request.grouped_matmul)):
            for part in activations.model_parts(config):
                if request.train:
                    parts.append(activations.training_part(part, config, mesh, request.batch, request.seq_len))
                else:
                    parts.append(activations.serving_part(part, config, mesh, request.batch, request.chunk,
                                                          request.seq_len))
        union = config.scan_layers and config.remat != "full"
        memory["activations"] = activations.activation_bytes(parts, request.train, config.num_layers if union else 0)
    total = sum(memory.values())
    capacity = DEVICE_MEMORY[request.device]
    return {
        "config": name,
        "mode": "train" if request.train else "serve",
        "mesh": mesh_shape,
        "devices": mesh_devices(mesh_shape),
        "weights_format": "float32 master (training)" if request.train else request.weights,
        "batch": request.batch,
        "seq_len": request.seq_len,
        "prefill_chunk": None if request.train else request.chunk,
        "remat": config.remat,
        "scan_layers": config.scan_layers,
        "grouped_matmul": request.grouped_matmul,
        **counts.as_dict(),
        "bytes_per_device": {**memory, "total": total},
        "weight_bytes_by_group": None if request.train else weights,
        "activation_parts": [dataclasses.asdict(p) for p in parts],
        "kv_cache_dtype": None if request.train else request.kv_cache_dtype,
        "context_parallel": request.context_parallel and not request.train,
        "one_request": None if request.train else request_cache_bytes(config, request.request_tokens),
        "activation_method": COMBINE_NOTE[request.train] if parts else "not compiled (--no-compile)",
        "device": request.device,
        "device_memory_bytes": capacity,
        "fits": total <= capacity,
        "headroom_bytes": capacity - total,
        "plan_seconds": round(time.perf_counter() - start, 2),
    }


def _gb(n: int) -> str:
    return f"{n / 1e9:10.2f} GB" if n >= 10**8 else f"{n / 1e6:10.2f} MB"


def format_plan(plan: Mapping[str, Any]) -> str:
    """A readable table of a plan."""
    lines = [
        f"plan: {plan['config']}  {plan['mode']}  mesh {mesh_text(plan['mesh'])} ({plan['devices']} devices)  "
        f"weights {plan['weights_format']}  batch {plan['batch']} x seq_len {plan['seq_len']}"
        + (f" (prefill chunk {plan['prefill_chunk']})" if plan["prefill_chunk"] else "")
        + f"  remat {plan['remat']}" + ("  scanned layers" if plan["scan_layers"] else "")
        + f"  experts: {plan['grouped_matmul']} grouped matmul",
        "",
        "parameters",
    ]
    for key in ("params_total", "params_main", "params_mtp", "params_active", "buffers_main",
                "checkpoint_tensors_main"):
        lines.append(f"  {key:<26}{plan[key]:>20,}")
    lines += ["  (buffers = MoE e_score_correction_bias, not parameters; the checkpoint stores them)", "",
              "bytes per device"]
    for key, value in plan["bytes_per_device"].items():
        lines.append(f"  {key:<26}{_gb(value)}")
    if plan["activation_parts"]:
        lines += ["", "activation parts (per device)",
                  f"  {'part':<20}{'count':>6}{'peak':>14}{'kept/layer':>14}{'compile':>9}"]
        for p in plan["activation_parts"]:
            lines.append(f"  {p['name']:<20}{p['count']:>6}{_gb(p['peak_bytes'])}{_gb(p['saved_bytes'])}"
                         f"{p['compile_seconds']:>8.1f}s")
    lines += [f"  method: {plan['activation_method']}", ""]
    one = plan.get("one_request")
    if one:
        lines += [f"one request of {one['tokens']:,} tokens (its whole cache, before sharding)",
                  f"  {'':<34}{'bf16 KV':>14}{'fp8 KV':>14}",
                  f"  {'KV per attention layer':<34}{_gb(one['kv_bytes_per_attention_layer_bf16']):>14}"
                  f"{_gb(one['kv_bytes_per_attention_layer_fp8']):>14}",
                  f"  {'KV, ' + str(one['attention_layers']) + ' attention layers':<34}{_gb(one['kv_bytes_bf16']):>14}"
                  f"{_gb(one['kv_bytes_fp8']):>14}",
                  f"  {'Mamba state, ' + str(one['mamba_layers']) + ' layers':<34}{_gb(one['mamba_state_bytes']):>14}"
                  f"{_gb(one['mamba_state_bytes']):>14}",
                  f"  {'total':<34}{_gb(one['total_bytes_bf16']):>14}{_gb(one['total_bytes_fp8']):>14}", ""]
    verdict = "FITS" if plan["fits"] else "DOES NOT FIT"
    lines.append(f"verdict: {verdict} on {plan['device']} ({plan['device_memory_bytes'] / 1e9:.0f} GB): "
                 f"headroom {plan['headroom_bytes'] / 1e9:.2f} GB  (planned in {plan['plan_seconds']} s)")
    return "\n".join(lines)
