"""What the routed experts cost a decoding step, by batch size: the step with and without them.

    python bench/decode_parts.py [--rounds 5] [--out bench/results]

Times bench/profile_ops.py's decode program (32 greedy steps in one program, context 128) of the serving
benchmark's model at batch 1, 8 and 32, as it is and with the routed experts' two projections replaced by
zeros (everything else, routing and sorting included, unchanged), the programs' runs alternating; each
number is the fastest of `rounds` x 15 calls (the least disturbed by other jobs). Also the machine's
single-thread read rate of 64 KB blocks (one expert projection's size here) scattered over 12 MB, copied
by numpy after a cache flush: what one loop over the routed experts can hope for. Writes
decode_parts.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import profile_ops  # noqa: E402

import nemojax.ops.expert_banks as expert_banks  # noqa: E402

BATCHES = (1, 8, 32)
STEPS = 32


def _no_routed_experts(x_mk, up_ekf, down_efn, group_sizes_e, activation):
    """The routed experts' output replaced by zeros (shape and dependence on the input kept)."""
    return jnp.zeros((x_mk.shape[0], down_efn.shape[2]), x_mk.dtype) * x_mk[:, :1]


def block_read_rate(block_bytes: int = 65536, blocks: int = 128, repeats: int = 20) -> float:
    """Bytes/s of one thread copying `blocks` scattered blocks out of a 12 MB array after a 64 MB flush."""
    words = block_bytes // 4
    source = np.ones((192, words), np.float32)
    flush = np.ones(16 * 2**20, np.float32)
    out = np.empty(words, np.float32)
    chosen = np.sort(np.random.default_rng(0).permutation(source.shape[0])[:blocks])
    best = float("inf")
    for _ in range(repeats):
        flush.sum()
        begin = time.perf_counter()
        for i in chosen:
            np.copyto(out, source[i])
        best = min(best, time.perf_counter() - begin)
    return blocks * block_bytes / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    began, load = time.strftime("%Y-%m-%d %H:%M:%S"), os.getloadavg()
    model, variables = profile_ops.model_and_variables()
    programs = {}
    full = expert_banks.grouped_mlp
    for variant, mlp in (("full", full), ("no routed experts", _no_routed_experts)):
        expert_banks.grouped_mlp = mlp
        for batch in BATCHES:
            programs[variant, batch] = profile_ops.decode_program(model, variables, batch, 128, STEPS)
    expert_banks.grouped_mlp = full
    best = {key: float("inf") for key in programs}
    for _ in range(args.rounds):
        for key, (compiled, inputs) in programs.items():
            for _ in range(15):
                begin = time.perf_counter()
                jax.block_until_ready(compiled(*inputs))
                best[key] = min(best[key], (time.perf_counter() - begin) / STEPS)
    rows = []
    for batch in BATCHES:
        with_experts, without = best["full", batch], best["no routed experts", batch]
        rows.append({"batch": batch, "step_ms": 1e3 * with_experts, "without_routed_experts_ms": 1e3 * without,
                     "routed_experts_ms": 1e3 * (with_experts - without)})
    results = {"conditions": f"run {began} to {time.strftime('%H:%M:%S')}, load average "
                             f"{'/'.join(f'{x:.1f}' for x in load)} at the start",
               "block_read_gb_per_s": block_read_rate() / 1e9, "rows": rows}
    first = rows[0]
    lines = ["# Routed experts in a decoding step", "", f"Conditions: {results['conditions']}", "",
             "Model: bench/serve.py's (MEM*EMEM, hidden 256, 32 experts top-4, float32); ms per step, fastest of "
             f"{args.rounds} x 15 calls of 32 steps, the programs alternating.", "",
             "| batch | step | without routed experts | routed experts | steps relative to batch 1 "
             "(with / without experts) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['step_ms']:.3f} | {r['without_routed_experts_ms']:.3f} | "
                     f"{r['routed_experts_ms']:.3f} | {r['step_ms'] / first['step_ms']:.2f}x / "
                     f"{r['without_routed_experts_ms'] / first['without_routed_experts_ms']:.2f}x |")
    lines += ["", "One thread copying scattered 64 KB blocks from cold memory: "
              f"{results['block_read_gb_per_s']:.1f} GB/s."]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "decode_parts.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(args.out, "decode_parts.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
