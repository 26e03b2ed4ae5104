"""Pallas GPU kernels against their XLA references, at Nemotron 3 Ultra shapes, on one H200.

    python bench/kernels_gpu.py [--out bench/results] [--iters 20]     # on a GPU
    python bench/kernels_gpu.py --smoke                               # anywhere: tiny shapes, interpreter

For each case: the kernel's result is compared with the reference on the same device (max error
relative to the largest reference value), both are timed (median of `--iters`; decode-sized cases
run `--iters` calls chained inside one jit so that dispatch does not count), and the kernel's
achieved HBM bandwidth and TFLOP/s are put against the H200's peaks. Cases (Ultra: 256 Mamba heads
x 64, state 128, 8 groups, chunk 128; 512 experts of 5120 x 2048 in NVFP4, top-22):

- ssd prefill: `chunked_scan` vs `nemojax.ops.ssd.ssd_chunked`, 8K tokens, forward and forward+backward;
- ssd decode: `state_update` vs `ssd_step`, batch 1, 8, 64;
- fp4 experts: `fp4_moe.grouped_matmul` vs dequantise-every-expert + `jax.lax.ragged_dot`, at decode
  batch 1, 8, 64 (batch x 22 rows) and an 8K-token prefill.

Writes kernels_gpu.json and kernels_gpu.md (kernels_gpu_smoke.* with --smoke, whose timings mean
nothing: the kernels run in the CPU interpreter).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nemojax.ops import ssd as ssd_reference  # noqa: E402
from pallas_kernels import fp4_moe  # noqa: E402
from pallas_kernels import ssd as ssd_kernels  # noqa: E402
from pallas_kernels.ssd_forward import CHUNK  # noqa: E402

H200 = {"hbm_bytes_per_s": 4.8e12, "bf16_dense_flops_per_s": 989e12}
ULTRA = dict(heads=256, head_dim=64, state=128, groups=8, chunk=128, prefill=8192, decode_batches=(1, 8, 64),
             experts=512, top_k=22, expert_n=5120, expert_k=2048, moe_prefill=8192)
SMOKE = dict(heads=4, head_dim=8, state=16, groups=2, chunk=32, prefill=96, decode_batches=(1, 3),
             experts=16, top_k=3, expert_n=64, expert_k=256, moe_prefill=8)


def _timed(fn, args, iters: int) -> tuple[object, float]:
    out = jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def _chained(step, iters: int):
    """`iters` calls of step(carry, zero) -> carry inside one jit; `zero` is a traced 0 that XLA cannot fold."""
    return jax.jit(lambda carry, zero: jax.lax.fori_loop(0, iters, lambda _, c: step(c, zero), carry))


def _row(name, kernel_out, reference_out, kernel_s, reference_s, hbm_bytes, flops) -> dict:
    k = np.asarray(jnp.asarray(kernel_out, jnp.float32))
    r = np.asarray(jnp.asarray(reference_out, jnp.float32))
    scale = float(np.max(np.abs(r))) or 1.0
    return {"case": name, "max_rel_error": float(np.max(np.abs(k - r))) / scale,
            "kernel_ms": kernel_s * 1e3, "reference_ms": reference_s * 1e3, "speedup": reference_s / kernel_s,
            "hbm_GBps": hbm_bytes / kernel_s / 1e9, "hbm_fraction": hbm_bytes / kernel_s / H200["hbm_bytes_per_s"],
            "TFLOPps": flops / kernel_s / 1e12, "flops_fraction": flops / kernel_s / H200["bf16_dense_flops_per_s"]}


def _scan_inputs(s: dict, b: int, t: int, key):
    h, p, g, n = s["heads"], s["head_dim"], s["groups"], s["state"]
    ks = jax.random.split(key, 5)
    x = jax.random.normal(ks[0], (b, t, h, p), jnp.bfloat16)
    dt = jax.nn.softplus(jax.random.normal(ks[1], (b, t, h)) - 2.0)
    a = -jnp.exp(jax.random.normal(ks[2], (h,)))
    bm = jax.random.normal(ks[3], (b, t, g, n), jnp.bfloat16)
    cm = jax.random.normal(ks[4], (b, t, g, n), jnp.bfloat16)
    return x, dt, a, bm, cm


def _scan_flops(b, t, h, p, n, backward: bool) -> float:
    chunks, L = b * h * -(-t // CHUNK), CHUNK
    forward = 2 * L * L * n + 2 * L * L * p + 4 * L * n * p
    return chunks * (forward + (6 * L * L * n + 4 * L * L * p + 10 * L * n * p if backward else 0))


def ssd_prefill(s: dict, iters: int, interpret: bool) -> list[dict]:
    b, t, h, p, g, n = 1, s["prefill"], s["heads"], s["head_dim"], s["groups"], s["state"]
    args = _scan_inputs(s, b, t, jax.random.key(0))
    kernel = jax.jit(lambda *a: ssd_kernels.chunked_scan(*a, chunk_size=s["chunk"], interpret=interpret)[0])
    reference = jax.jit(lambda *a: ssd_reference.ssd_chunked(*a, s["chunk"])[0])
    ko, ks = _timed(kernel, args, iters)
    ro, rs = _timed(reference, args, iters)
    io_bytes = b * t * (h * p * (2 + 4) + 2 * g * n * 2 + 2 * h * 4)
    rows = [_row(f"ssd prefill fwd, {t} tokens", ko, ro, ks, rs, io_bytes, _scan_flops(b, t, h, p, n, False))]

    weight = jax.random.normal(jax.random.key(1), args[0].shape, jnp.float32)
    def grads(scan):
        return jax.jit(jax.grad(lambda *a: jnp.sum(scan(*a) * weight), argnums=(0, 1, 3, 4)))
    kg, ks = _timed(grads(lambda *a: ssd_kernels.chunked_scan(*a, chunk_size=s["chunk"], interpret=interpret)[0]),
                    args, iters)
    rg, rs = _timed(grads(lambda *a: ssd_reference.ssd_chunked(*a, s["chunk"])[0]), args, iters)
    worst = max(range(4), key=lambda i: float(jnp.max(jnp.abs(kg[i].astype(jnp.float32) - rg[i]))
                                              / jnp.max(jnp.abs(rg[i].astype(jnp.float32)))))
    rows.append(_row(f"ssd prefill fwd+bwd, {t} tokens (worst grad)", kg[worst], rg[worst], ks, rs, 3 * io_bytes,
                     _scan_flops(b, t, h, p, n, True)))
    return rows


def _decode_step(update, x, dt, a, bm, cm):
    return lambda state, zero: update(state, x, dt + zero, a, bm, cm)[1]


def ssd_decode(s: dict, iters: int, interpret: bool) -> list[dict]:
    rows = []
    h, p, n = s["heads"], s["head_dim"], s["state"]
    kernel_step = functools.partial(ssd_kernels.state_update, interpret=interpret)
    for b in s["decode_batches"]:
        x, dt, a, bm, cm = (v[:, 0] if v.ndim > 1 else v for v in _scan_inputs(s, b, 1, jax.random.key(b)))
        state = jax.random.normal(jax.random.key(2), (b, h, p, n))
        ko, ks = _timed(_chained(_decode_step(kernel_step, x, dt, a, bm, cm), iters), (state, 0.0), 1)
        ro, rs = _timed(_chained(_decode_step(ssd_reference.ssd_step, x, dt, a, bm, cm), iters), (state, 0.0), 1)
        rows.append(_row(f"ssd decode state update, batch {b}", ko, ro, ks / iters, rs / iters,
                         2 * b * h * p * n * 4, 5 * b * h * p * n))
    return rows


def _routed(s: dict, tokens: int, key):
    """Rows sorted by expert for `tokens` tokens each routed to top_k distinct random experts."""
    e, k, n = s["experts"], s["expert_k"], s["expert_n"]
    ks = jax.random.split(key, 5)
    experts = jnp.argsort(jax.random.uniform(ks[0], (tokens, e)), axis=1)[:, :s["top_k"]].reshape(-1)
    group_sizes = jnp.bincount(experts, length=e).astype(jnp.int32)
    x = jax.random.normal(ks[1], (tokens * s["top_k"], k), jnp.bfloat16)
    packed = jax.random.randint(ks[2], (e, n, k // 2), 0, 256).astype(jnp.uint8)
    block_scale = (0.01 + 0.02 * jax.random.uniform(ks[3], (e, n, k // 16))).astype(jnp.float8_e4m3fn)
    global_scale = jnp.ones((e,), jnp.float32)
    return x, packed, block_scale, global_scale, group_sizes


def _dequantize_then_ragged_dot(x, packed, block_scale, global_scale, group_sizes):
    """The XLA baseline: every expert dequantised to bf16 (the FACTS.md formula), then lax.ragged_dot."""
    values = jnp.asarray([0, .5, 1, 1.5, 2, 3, 4, 6, 0, -.5, -1, -1.5, -2, -3, -4, -6], jnp.float32)
    codes = jnp.stack([packed & 15, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    scale = jnp.repeat(block_scale.astype(jnp.float32), 16, axis=-1) * global_scale[:, None, None]
    w_enk = (values[codes] * scale).astype(x.dtype)
    return jax.lax.ragged_dot(x, jnp.swapaxes(w_enk, 1, 2), group_sizes)


def _matmul_step(matmul, weights):
    """x -> x + 0 * sum(matmul(x)): chains the calls without changing x."""
    return lambda x, zero: x + zero * jnp.sum(matmul(x, *weights)).astype(x.dtype)


def fp4_experts(s: dict, iters: int, interpret: bool) -> list[dict]:
    rows = []
    n, k = s["expert_n"], s["expert_k"]
    cases = [(f"fp4 experts decode, batch {b}", b, 16 if b < 8 else 64) for b in s["decode_batches"]]
    cases.append((f"fp4 experts prefill, {s['moe_prefill']} tokens", s["moe_prefill"], 128))
    for name, tokens, tile in cases:
        x, packed, scale, gscale, sizes = _routed(s, tokens, jax.random.key(tokens))
        active = int(jnp.sum(sizes > 0))
        kernel = functools.partial(fp4_moe.grouped_matmul, tile_tokens=tile, interpret=interpret)
        weights = (packed, scale, gscale, sizes)
        _, ks = _timed(_chained(_matmul_step(kernel, weights), iters), (x, 0.0), 1)
        _, rs = _timed(_chained(_matmul_step(_dequantize_then_ragged_dot, weights), iters), (x, 0.0), 1)
        ko = kernel(x, *weights)
        ro = jax.jit(_dequantize_then_ragged_dot)(x, *weights)
        weight_bytes = active * n * k * (0.5 + 1 / 16)
        rows.append(_row(f"{name} ({active} experts active)", ko, ro, ks / iters, rs / iters,
                         weight_bytes + x.size * 2 + x.shape[0] * n * 2, 2 * x.shape[0] * n * k))
    return rows


def _markdown(report: dict) -> str:
    smoke = " (smoke run: CPU interpreter, timings meaningless)" if report["smoke"] else ""
    lines = [f"Device: {report['device']}, jax {report['jax']}{smoke}", "",
             "| case | max rel. error | kernel ms | reference ms | speed-up | HBM GB/s (% of peak) "
             "| TFLOP/s (% of peak) |", "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['case']} | {r['max_rel_error']:.2e} | {r['kernel_ms']:.3f} | {r['reference_ms']:.3f} | "
                     f"{r['speedup']:.2f} | {r['hbm_GBps']:.0f} ({100 * r['hbm_fraction']:.1f} %) | "
                     f"{r['TFLOPps']:.1f} ({100 * r['flops_fraction']:.1f} %) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, kernels in the CPU interpreter")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--iters", type=int, default=None, help="timed repetitions (default 20, smoke 1)")
    args = parser.parse_args(argv)
    shapes, iters = (SMOKE, args.iters or 1) if args.smoke else (ULTRA, args.iters or 20)
    if not args.smoke and jax.default_backend() != "gpu":
        print("kernels_gpu.py needs a GPU (use --smoke to check the script on CPU)", file=sys.stderr)
        return 2
    rows = [*ssd_prefill(shapes, iters, args.smoke), *ssd_decode(shapes, iters, args.smoke),
            *fp4_experts(shapes, iters, args.smoke)]
    report = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "smoke": args.smoke,
              "peak": H200, "shapes": {k: list(v) if isinstance(v, tuple) else v for k, v in shapes.items()},
              "rows": rows}
    stem = os.path.join(args.out, "kernels_gpu_smoke" if args.smoke else "kernels_gpu")
    os.makedirs(args.out, exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(_markdown(report))
    print(_markdown(report))
    bad = [r["case"] for r in rows if not r["max_rel_error"] <= 2e-2]
    if bad:
        print("kernel results differ from the references: " + ", ".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
