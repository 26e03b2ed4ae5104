"""Compiled memory of one training step (forward + backward + AdamW) on a large vocabulary.

    python bench/train_memory.py [--vocab 131072] [--batch 1] [--seq-len 8192] [--remat none] [--out DIR]

The tiny config's layers (every kind and the MTP block) with Nemotron 3's 131,072-token vocabulary,
one step on batch x seq-len tokens, compiled ahead of time on one CPU device (nothing runs):
`memory_analysis()` of the jitted train step as the trainer builds it. The run-config fields it sets
exist in every nemojax version since the trainer landed, so the same script measures older commits.
Writes train_memory.json (and prints it).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax

from nemojax.train.programs import build_programs
from nemojax.train.run_config import load_run_config, model_config


def measure(vocab: int, batch: int, seq_len: int, remat: str) -> dict:
    cfg = load_run_config("tiny", [f"--config.model.vocab_size={vocab}", f"--config.batch_size={batch}",
                                   f"--config.seq_len={seq_len}", f"--config.remat={remat}",
                                   "--config.compute_dtype=bfloat16"])
    cfg.mesh.update(data=1, fsdp=1, tensor=1, expert=1)
    programs = build_programs(cfg, model_config(cfg), None)
    batch_spec = {name: jax.ShapeDtypeStruct((batch, seq_len), dtype)
                  for name, dtype in (("inputs", "int32"), ("targets", "int32"), ("loss_mask", "float32"))}
    start = time.perf_counter()
    stats = programs.train_step.lower(programs.abstract_state, batch_spec).compile().memory_analysis()
    return {"vocab": vocab, "tokens": batch * seq_len, "batch": batch, "seq_len": seq_len, "remat": remat,
            "temp_bytes": stats.temp_size_in_bytes, "argument_bytes": stats.argument_size_in_bytes,
            "logits_f32_bytes": batch * seq_len * vocab * 4, "compile_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--remat", default="none")
    parser.add_argument("--out", default=None, help="directory for train_memory.json (default: print only)")
    args = parser.parse_args()
    result = measure(args.vocab, args.batch, args.seq_len, args.remat)
    print(json.dumps(result, indent=2))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "train_memory.json"), "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
