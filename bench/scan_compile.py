"""Compile time of the model's forward, scanned vs unrolled layers, for a deep and a shallow stack.

    python bench/scan_compile.py [--out bench/results] [--layers 12 108]

The models have Ultra's layer pattern (its first N layers; 108 = all of Ultra) at narrow widths
(hidden 64, 16 experts), so the time is tracing + XLA compilation, not arithmetic. Each variant
lowers and compiles `jax.jit(model.apply)` on abstract variables (nothing is allocated), on CPU.
Writes scan_compile.json and scan_compile.md; CPU seconds are reported beside wall seconds because
this machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp

from nemojax.config import from_hf_config, resolve_model_config
from nemojax.config.model_config import kinds_to_pattern
from nemojax.model import NemotronH, abstract_variables

NARROW = dict(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16, n_groups=2, chunk_size=16,
              intermediate_size=128, n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=32,
              moe_shared_expert_intermediate_size=64, moe_latent_size=32, compute_dtype="bfloat16",
              param_dtype="bfloat16")


def ultra_pattern_config(layers: int, scan: bool):
    pattern = kinds_to_pattern(resolve_model_config("ultra").layer_types[:layers])
    return from_hf_config(dict(NARROW, hybrid_override_pattern=pattern, scan_layers=scan))


def compile_seconds(config, batch: int = 2, length: int = 64) -> dict:
    model = NemotronH(config)
    variables = abstract_variables(config)
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    wall, cpu = time.perf_counter(), time.process_time()
    lowered = jax.jit(model.apply).lower(variables, ids)
    lower_wall = time.perf_counter() - wall
    compiled = lowered.compile()
    return {"layers": config.num_layers, "scan_layers": config.scan_layers, "lower_s": round(lower_wall, 2),
            "total_s": round(time.perf_counter() - wall, 2), "cpu_s": round(time.process_time() - cpu, 2),
            "hlo_chars": len(compiled.as_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 108])
    args = parser.parse_args()
    rows = []
    for layers in args.layers:
        for scan in (False, True):
            rows.append(compile_seconds(ultra_pattern_config(layers, scan)))
            print(rows[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scan_compile.json"), "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "rows": rows}, f, indent=2)
    lines = ["| layers | layers run as | lower (s) | lower + compile (s) | CPU (s) | compiled HLO (chars) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layers']} | {'scan' if r['scan_layers'] else 'unrolled'} | {r['lower_s']} | "
                     f"{r['total_s']} | {r['cpu_s']} | {r['hlo_chars']:,} |")
    with open(os.path.join(args.out, "scan_compile.md"), "w") as f:
        f.write("Forward compile time, Ultra's layer pattern at narrow widths (`python bench/scan_compile.py`, "
                "CPU, shared 2-core machine).\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
