"""Training-step throughput of a config on this machine: fp32 vs bf16 compute (fp32 master weights),
and remat policies, measured in one run (interleaved rounds, median) so the ratios are comparable.

    python bench/train_step.py [--config configs/tiny.py] [--steps 5] [--rounds 5] [--out bench/results]

Writes train_step.json and train_step.md (tokens/s and seconds per step for each variant).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from nemojax.train.programs import build_programs
from nemojax.train.run_config import load_run_config, model_config

NO_STOP = np.zeros(1, bool)  # the train step's stop vote (nemojax.train.stopping)

VARIANTS = (("float32", "none"), ("bfloat16", "none"), ("float32", "full"), ("bfloat16", "full"))


def prepare(config_path: str, dtype: str, remat: str) -> dict:
    """Compile one variant and run its first step; returns what the timing rounds need."""
    cfg = load_run_config(config_path, [f"--config.compute_dtype={dtype}", f"--config.remat={remat}"])
    programs = build_programs(cfg, model_config(cfg), None)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, (cfg.batch_size, cfg.seq_len + 1)).astype(np.int32)
    batch = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                            "loss_mask": np.ones((cfg.batch_size, cfg.seq_len), np.float32)})
    start = time.perf_counter()
    state, metrics = programs.train_step(programs.fresh_state(), batch, NO_STOP)
    jax.block_until_ready(metrics)
    return {"dtype": dtype, "remat": remat, "cfg": cfg, "step": programs.train_step, "state": state,
            "batch": batch, "first_step_s": time.perf_counter() - start, "times": []}


def time_round(variant: dict, steps: int) -> None:
    start = time.perf_counter()
    for _ in range(steps):
        variant["state"], metrics = variant["step"](variant["state"], variant["batch"], NO_STOP)
    jax.block_until_ready(metrics)
    variant["times"].append((time.perf_counter() - start) / steps)


def summary(variant: dict) -> dict:
    cfg, step_s = variant["cfg"], float(np.median(variant["times"]))
    return {"dtype": variant["dtype"], "remat": variant["remat"], "batch_size": cfg.batch_size,
            "seq_len": cfg.seq_len, "first_step_s": round(variant["first_step_s"], 2), "step_s": round(step_s, 4),
            "tokens_per_second": round(cfg.batch_size * cfg.seq_len / step_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--steps", type=int, default=5, help="steps per timing round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, alternating variants (median is kept)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    variants = [prepare(args.config, dtype, remat) for dtype, remat in VARIANTS]
    for _ in range(args.rounds):  # interleaved, so load from other processes hits every variant alike
        for variant in variants:
            time_round(variant, args.steps)
    rows = [summary(v) for v in variants]
    base = rows[0]["step_s"]
    for row in rows:
        row["step_time_vs_fp32"] = round(row["step_s"] / base, 3)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "train_step.json"), "w") as f:
        json.dump({"config": args.config, "device": str(jax.devices()[0]), "rows": rows}, f, indent=2)
    header = "| compute dtype | remat | batch x seq | first step (s) | step (s) | tokens/s | step time vs fp32 |"
    lines = [header, "|" + "---|" * 7]
    lines += [f"| {r['dtype']} | {r['remat']} | {r['batch_size']}x{r['seq_len']} | {r['first_step_s']} | "
              f"{r['step_s']} | {r['tokens_per_second']} | {r['step_time_vs_fp32']} |" for r in rows]
    with open(os.path.join(args.out, "train_step.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
