"""Run metrics: DIR/metrics.jsonl (one JSON object per logged step) and the loss-curve PNG."""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"


def read_metrics(path: str) -> list[dict[str, Any]]:
    """Every complete record of a metrics file (a torn last line from a killed run is dropped)."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class MetricsLog:
    """Appends records to metrics.jsonl; on resume, first drops the records past the restored step."""

    def __init__(self, workdir: str, resume_step: int):
        self.path = os.path.join(workdir, METRICS_FILE)
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")


def plot_loss_curve(workdir: str) -> str | None:
    """Write DIR/loss_curve.png (train loss parts and held-out loss against step); None without records,
    and None with a message on stderr where matplotlib (the `plot` extra) is not installed."""
    records = read_metrics(os.path.join(workdir, METRICS_FILE))
    if not records:
        return None
    try:
        import matplotlib
        import matplotlib.figure  # a figure without pyplot: a notebook's or script's backend stays as it is
    except ImportError:
        print(f"{LOSS_CURVE_FILE} not written: matplotlib is not installed (pip install 'nemojax[plot]'); "
              f"the losses are in {os.path.join(workdir, METRICS_FILE)}", file=sys.stderr)
        return None

    fig = matplotlib.figure.Figure(figsize=(7, 4))
    ax = fig.subplots()
    for key, label in (("loss", "train loss"), ("lm_loss", "train LM loss"), ("eval_loss", "held-out LM loss")):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), label=label, marker="o" if key == "eval_loss" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(workdir, LOSS_CURVE_FILE)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path
