"""The NVFP4 training recipe against plain training: the same config, seed, data and steps, trained once
with `quant.training="none"` and once with `"nvfp4"`, and the loss gap at the end.

    python bench/quant_training.py [--config configs/tiny.py] [--steps 300] [--workdir runs/quant_training]
        [--out bench/results]

Writes quant_training.json and quant_training.md: final training loss (mean of the last 20 steps),
held-out loss, the relative gap, and the step time of each run.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from nemojax.train.loop import train
from nemojax.train.metrics import read_metrics
from nemojax.train.run_config import load_run_config

TAIL = 20


def run(config: str, steps: int, workdir: str, recipe: str) -> dict:
    cfg = load_run_config(config, [f"--config.num_steps={steps}", f"--config.quant.training={recipe}"])
    train(cfg, workdir)
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    speeds = [r["tokens_per_second"] for r in records if r.get("tokens_per_second")]
    return {"recipe": recipe, "compute_dtype": cfg.compute_dtype or cfg.model.get("compute_dtype"),
            "train_loss": float(np.mean([r["lm_loss"] for r in records[-TAIL:]])), "heldout_loss": evals[-1],
            "tokens_per_second": float(np.median(speeds))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workdir", default="runs/quant_training")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    rows = [run(args.config, args.steps, os.path.join(args.workdir, recipe), recipe) for recipe in ("none", "nvfp4")]
    base = rows[0]
    for row in rows:
        row["train_gap"] = row["train_loss"] / base["train_loss"] - 1
        row["heldout_gap"] = row["heldout_loss"] / base["heldout_loss"] - 1
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quant_training.json"), "w") as f:
        json.dump({"config": args.config, "steps": args.steps, "rows": rows}, f, indent=2)
    lines = [f"| recipe | LM loss (last {TAIL} steps) | vs plain | held-out loss | vs plain | tokens/s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['recipe']} | {r['train_loss']:.4f} | {100 * r['train_gap']:+.2f} % | {r['heldout_loss']:.4f} | "
              f"{100 * r['heldout_gap']:+.2f} % | {r['tokens_per_second']:.0f} |" for r in rows]
    with open(os.path.join(args.out, "quant_training.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
