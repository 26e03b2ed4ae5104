"""Where the CPU grouped matmul should switch from the per-tile loop to the static tiles (one run).

    python bench/grouped_matmul.py [--quick] [--rows M ...] [--out bench/results]

For m rows routed like an MoE layer (m/k tokens, each to k distinct experts drawn at random), times
`grouped_matmul_loop` (a loop over the non-empty one-group tiles) and `grouped_matmul_tiled` (a
static number of tiles, one gathered weight each) on the same inputs, forward alone (serving) and
forward with the gradients of x and w (training), interleaved, median of several repeats. The
weights cycle through enough expert sets to exceed the last-level cache, as in a model whose other
layers evict them between calls. `nemojax.ops.grouped_matmul.LOOP_MAX_ROWS` is read off
this table. Writes grouped_matmul.json and grouped_matmul.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from nemojax.ops.grouped_matmul import LOOP_MAX_ROWS, grouped_matmul_loop, grouped_matmul_tiled

LOWERINGS = {"loop": grouped_matmul_loop, "tiled": grouped_matmul_tiled}


def routed_sizes(rng: np.random.Generator, tokens: int, experts: int, k: int) -> np.ndarray:
    """Rows per expert when each token picks k distinct experts at random."""
    ids = np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)])
    return np.bincount(ids.reshape(-1), minlength=experts).astype(np.int32)


def timed_calls(fn, x, ws, sizes, calls: int, grad: bool) -> jax.stages.Compiled:
    """One program that runs `calls` grouped matmuls (with `grad`: and their x and w gradients), cycling
    through the weight sets `ws`."""
    if grad:
        forward = fn

        def fn(x, w, sizes):  # noqa: F811 - the call timed: value and gradients
            dx, dw = jax.grad(lambda x, w: jnp.sum(jnp.sin(forward(x, w, sizes))), argnums=(0, 1))(x, w)
            return dx + jnp.sum(dw) * 1e-9

    def run(x, ws, sizes):
        def body(i, acc):
            for w in ws:
                acc = acc + fn(x + acc[:, :1] * 1e-9, w, sizes)[:, :x.shape[1]]
            return acc
        return jax.lax.fori_loop(0, calls // len(ws), body, jnp.zeros_like(x))
    return jax.jit(run).lower(x, ws, sizes).compile()


def measure(m: int, experts: int, width: int, k: int, sets: int, repeats: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    sizes = jnp.asarray(routed_sizes(rng, m // k, experts, k))
    x = jnp.asarray(rng.normal(size=(m, width)), jnp.float32)
    ws = tuple(jnp.asarray(rng.normal(size=(experts, width, width)) * 0.05, jnp.float32) for _ in range(sets))
    reference = np.asarray(grouped_matmul_tiled(x, ws[0], sizes))
    np.testing.assert_allclose(np.asarray(grouped_matmul_loop(x, ws[0], sizes)), reference, rtol=1e-4, atol=1e-4)
    programs = {f"{name}{suffix}": timed_calls(fn, x, ws, sizes, sets, grad)
                for name, fn in LOWERINGS.items() for suffix, grad in (("", False), ("_grad", True))}
    times: dict[str, list[float]] = {name: [] for name in programs}
    for program in programs.values():
        jax.block_until_ready(program(x, ws, sizes))
    for _ in range(repeats):
        for name, program in programs.items():
            begin = time.perf_counter()
            jax.block_until_ready(program(x, ws, sizes))
            times[name].append((time.perf_counter() - begin) / sets)
    row = {"rows": m, "experts": experts, "distinct_groups": int(np.sum(np.asarray(sizes) > 0))}
    for name, ts in times.items():
        row[f"{name}_us"] = 1e6 * float(np.median(ts))
    row["loop_speedup"] = row["tiled_us"] / row["loop_us"]
    row["loop_grad_speedup"] = row["tiled_grad_us"] / row["loop_grad_us"]
    return row


def markdown(results: dict) -> str:
    lines = [f"# CPU grouped matmul: loop over tiles vs static tiles ({results['device']})", "",
             f"Experts {results['experts']}, width {results['width']} (k = n), top-{results['k']} routing of "
             f"m/{results['k']} tokens, float32, weights cycled over {results['sets']} sets "
             f"({results['weight_mb']:.0f} MB); median of {results['repeats']} interleaved repeats.", "",
             f"Conditions: {results['conditions']}", "",
             "| rows m | distinct experts | loop us | tiled us | loop speed-up | with gradients: loop us | tiled us "
             "| loop speed-up |", "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['rows']} | {r['distinct_groups']} | {r['loop_us']:.1f} | {r['tiled_us']:.1f} | "
                     f"{r['loop_speedup']:.2f}x | {r['loop_grad_us']:.1f} | {r['tiled_grad_us']:.1f} | "
                     f"{r['loop_grad_speedup']:.2f}x |")
    lines += ["", f"`LOOP_MAX_ROWS` in the code: {results['loop_max_rows']} (the loop up to that many rows)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats (a smoke run)")
    parser.add_argument("--rows", type=int, nargs="*", help="the row counts m to time (default: 4 to 16384)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    experts, width, k = 32, 128, 4
    sets, repeats = (2, 2) if args.quick else (24, 7)
    rows = args.rows or ([4, 32, 256] if args.quick else [2**i for i in range(2, 15)])
    began, load = time.strftime("%Y-%m-%d %H:%M:%S"), os.getloadavg()
    results = {"device": f"{jax.devices()[0].platform}, {os.cpu_count()} CPU cores", "experts": experts,
               "width": width, "k": k, "sets": sets, "repeats": repeats,
               "weight_mb": sets * experts * width * width * 4 / 2**20, "loop_max_rows": LOOP_MAX_ROWS,
               "rows": []}
    for m in rows:
        results["rows"].append(measure(m, experts, width, k, sets, repeats, seed=m))
        print(results["rows"][-1], flush=True)
    results["conditions"] = (f"run {began} to {time.strftime('%H:%M:%S')}, load average (1/5/15 min) "
                             f"{'/'.join(f'{x:.1f}' for x in load)} at the start (a shared machine)")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "grouped_matmul.json"), "w") as f:
        json.dump(results, f, indent=2)
    table = markdown(results)
    with open(os.path.join(args.out, "grouped_matmul.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
