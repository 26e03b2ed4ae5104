"""Throughput and peak memory of `python -m nemojax.convert` on a synthetic checkpoint of >= 2 GB.

    python bench/convert.py [--out bench/results] [--workdir /tmp/nemojax_bench_convert] [--keep]

Writes a BF16 checkpoint in the published layout with numpy (random values; Nano's layer pattern's
first 16 layers at reduced widths, so the Orbax tree has scanned, stacked leaves), in 1 GB shards,
then times, each in a fresh process: a plain copy of the shards (the disk baseline, read + write),
hf-to-orbax, and orbax-to-hf (back to 1 GB shards; checked byte-identical to the source). Peak resident
memory is the process's own ru_maxrss (Python, jax and tensorstore included). The source was just
written, so its reads may come from the page cache: the copy baseline is measured under the same
conditions, and the ratio to it is the number to read. Removes the files unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from synthetic_checkpoint import write_synthetic_checkpoint  # noqa: E402

from nemojax.config import resolve_model_config  # noqa: E402
from nemojax.config.model_config import kinds_to_pattern  # noqa: E402

WIDTHS = dict(vocab_size=131072, hidden_size=2048, num_attention_heads=16, num_key_value_heads=2, head_dim=128,
              mamba_num_heads=32, mamba_head_dim=64, ssm_state_size=128, n_groups=8, intermediate_size=4096,
              n_routed_experts=20, num_experts_per_tok=4, moe_intermediate_size=1024,
              moe_shared_expert_intermediate_size=2048, moe_latent_size=None, mtp_layer_types=(),
              num_nextn_predict_layers=0)

CHILD = """
import resource, sys, time
start = time.perf_counter()
{body}
seconds = time.perf_counter() - start
print("RESULT", seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def run_child(body: str) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of `body` run in a fresh Python process."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", CHILD.format(body=body)], env=env, check=True, capture_output=True,
                         text=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("RESULT"))
    _, seconds, rss = line.split()
    return float(seconds), int(rss)


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    parser.add_argument("--workdir", default="/tmp/nemojax_bench_convert")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = parser.parse_args()
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    nano = resolve_model_config("nano").layer_types[:16]
    config = resolve_model_config("nano", **dict(WIDTHS, layer_types=nano))
    src, orbax_dir, back, copy = (os.path.join(work, n) for n in ("hf", "orbax", "hf_back", "copy"))
    try:
        start = time.perf_counter()
        size = write_synthetic_checkpoint(src, config, 10**9)
        generate_s = time.perf_counter() - start
        copy_s, copy_rss = run_child(f"import shutil; shutil.copytree({src!r}, {copy!r})")
        shutil.rmtree(copy)
        to_orbax_s, to_orbax_rss = run_child(
            f"from nemojax.convert import main; assert main(['hf-to-orbax', {src!r}, {orbax_dir!r}, '--quiet']) == 0")
        to_hf_s, to_hf_rss = run_child(
            f"from nemojax.convert import main; "
            f"assert main(['orbax-to-hf', {orbax_dir!r}, {back!r}, '--max-shard-size', '1GB', '--quiet']) == 0")
        identical = sorted(os.listdir(src)) == sorted(f for f in os.listdir(back)) and all(
            subprocess.run(["cmp", "-s", os.path.join(src, f), os.path.join(back, f)]).returncode == 0
            for f in os.listdir(src) if f.endswith(".safetensors"))
        orbax_bytes = directory_bytes(os.path.join(orbax_dir, "variables"))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    mb = size / 1e6
    result = {
        "checkpoint": {"bytes": size, "pattern": kinds_to_pattern(nano), "shards": "1GB", "dtype": "bfloat16",
                       "orbax_tree_bytes": orbax_bytes, "generate_seconds": round(generate_s, 1)},
        "copy_baseline": {"seconds": round(copy_s, 2), "mb_per_s": round(mb / copy_s),
                          "peak_rss_mb": copy_rss // 2**20},
        "hf_to_orbax": {"seconds": round(to_orbax_s, 2), "mb_per_s": round(mb / to_orbax_s),
                        "peak_rss_mb": to_orbax_rss // 2**20, "vs_copy": round(copy_s / to_orbax_s, 2)},
        "orbax_to_hf": {"seconds": round(to_hf_s, 2), "mb_per_s": round(mb / to_hf_s),
                        "peak_rss_mb": to_hf_rss // 2**20, "vs_copy": round(copy_s / to_hf_s, 2)},
        "round_trip_byte_identical": identical,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "convert.json"), "w") as f:
        json.dump(result, f, indent=2)
    rows = [("plain copy of the shards (baseline)", result["copy_baseline"]), ("hf-to-orbax", result["hf_to_orbax"]),
            ("orbax-to-hf", result["orbax_to_hf"])]
    lines = [f"Conversion of a synthetic {size / 1e9:.2f} GB BF16 checkpoint (`python bench/convert.py`; 16 layers "
             f"{kinds_to_pattern(nano)}, hidden 2048, 20 experts, 1 GB shards; shared 2-core machine, each step a "
             "fresh process; the source may be in the page cache, as for the copy baseline).", "",
             "| step | seconds | MB/s | peak RSS (MB) | speed vs copy |", "|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['seconds']} | {r['mb_per_s']} | {r['peak_rss_mb']} | {r.get('vs_copy', 1.0)} |")
    lines += ["", f"Round trip byte-identical: {identical}. Orbax tree: {orbax_bytes / 1e9:.2f} GB."]
    with open(os.path.join(args.out, "convert.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
