"""Post-training quantization quality on a briefly trained tiny model: each PTQ recipe against the BF16
checkpoint it came from, on the held-out set of the training data.

    python bench/quant_quality.py [--config configs/tiny.py] [--steps 300] [--workdir runs/quant_quality]
        [--out bench/results]

Trains (or resumes) the model, writes it as a BF16 Hugging Face checkpoint, quantizes it with every
recipe (`python -m nemojax.quantize`, calibrated on the training corpus), and evaluates all of them in
float32 compute: held-out loss, mean KL(BF16 || quantized) per token, top-1 agreement with BF16, and
stored bits per parameter. A last row zeroes the routed experts (shared experts kept): how much this
model relies on them at all. Writes quant_quality.json and quant_quality.md.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from nemojax.checkpoint.hf import load_pretrained, save_pretrained
from nemojax.checkpoint.orbax import load_model
from nemojax.checkpoint.safetensors_io import SafetensorsDir
from nemojax.quant.recipes import RECIPES
from nemojax.quantize import quantize_checkpoint
from nemojax.train.data import heldout_batches
from nemojax.train.loop import train
from nemojax.train.run_config import load_run_config
from nemojax.train.tokenizer import load_tokenizer


def evaluate(directory: str, batches: list[dict], reference: list[np.ndarray] | None,
             drop_experts: bool = False) -> tuple[dict, list]:
    """Held-out loss (and KL / top-1 agreement against `reference` log-probabilities) of a checkpoint;
    `drop_experts` zeroes the routed experts' output (how much they matter to this model at all)."""
    model, variables = load_pretrained(directory, dtype="float32")
    if drop_experts:
        variables = jax.tree_util.tree_map_with_path(
            lambda path, x: jnp.zeros_like(x) if any(getattr(k, "key", None) == "experts" for k in path) else x,
            variables)
    forward = jax.jit(lambda v, ids: jax.nn.log_softmax(model.apply(v, ids), axis=-1))
    loss = count = kl = agree = 0.0
    logps = []
    for i, batch in enumerate(batches):
        logp = forward(variables, batch["inputs"])
        mask = batch["loss_mask"]
        target = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        loss += float(-jnp.sum(target * mask))
        count += float(np.sum(mask))
        if reference is not None:
            ref = reference[i]
            kl += float(jnp.sum(jnp.sum(jnp.exp(ref) * (ref - logp), axis=-1) * mask))
            agree += float(jnp.sum((jnp.argmax(ref, -1) == jnp.argmax(logp, -1)) * mask))
        logps.append(np.asarray(logp))
    row = {"heldout_loss": loss / count}
    if reference is not None:
        row.update(kl_per_token=kl / count, top1_agreement=agree / count)
    return row, logps


def stored_bits(directory: str) -> float:
    """Bits per parameter of a checkpoint's tensors as stored (the BF16 export keeps the routers in float32)."""
    st = SafetensorsDir(directory)
    tensors = [st.read(name) for name in st.keys()]
    return 8 * sum(t.nbytes for t in tensors) / sum(t.size for t in tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workdir", default="runs/quant_quality")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    cfg = load_run_config(args.config, [f"--config.num_steps={args.steps}"])
    last = train(cfg, args.workdir)
    model, variables = load_model(args.workdir)
    bf16 = os.path.join(args.workdir, "hf_bf16")
    save_pretrained(bf16, model.config, variables, dtype="bfloat16")
    tokenizer = load_tokenizer(args.workdir)
    tokenizer.save(os.path.join(bf16, "tokenizer.json"))
    batches = heldout_batches(cfg.data, tokenizer, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                              num_batches=cfg.eval_batches)
    reference_row, reference = evaluate(bf16, batches, None)
    rows = [{"recipe": "bf16", **reference_row, "bits_per_param": stored_bits(bf16)}]
    for recipe in RECIPES:
        directory = os.path.join(args.workdir, f"hf_{recipe}")
        if not os.path.isdir(directory):
            report = quantize_checkpoint(bf16, directory, recipe)
            with open(os.path.join(directory, "ptq_report.json"), "w") as f:
                json.dump(report, f, indent=2)
        with open(os.path.join(directory, "ptq_report.json")) as f:
            storage = json.load(f)["storage"]
        row, _ = evaluate(directory, batches, reference)
        rows.append({"recipe": recipe, **row, "bits_per_param": storage["total"]["bits_per_param"],
                     "by_format": {k: round(v["bits_per_param"], 3) for k, v in storage.items() if k != "total"}})
    rows.append({"recipe": "bf16, routed experts removed", **evaluate(bf16, batches, reference,
                                                                       drop_experts=True)[0],
                 "bits_per_param": None})
    bf16_loss = rows[0]["heldout_loss"]
    for row in rows:
        row["loss_vs_bf16"] = row["heldout_loss"] / bf16_loss - 1
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quant_quality.json"), "w") as f:
        json.dump({"config": args.config, "train_steps": args.steps, "train_last": last,
                   "heldout_tokens": int(sum(np.sum(b["loss_mask"]) for b in batches)), "rows": rows}, f, indent=2)
    write_table(rows, args.out)


def write_table(rows: list[dict], out: str) -> None:
    """quant_quality.md from the rows (also printed)."""
    lines = ["| weights | bits / param (all tensors) | held-out loss | vs BF16 | KL(BF16 ‖ q) / token "
             "| top-1 agreement |", "|---|---|---|---|---|---|"]
    for r in rows:
        bits = "-" if r["bits_per_param"] is None else f"{r['bits_per_param']:.2f}"
        kl = f"{r['kl_per_token']:.2e}" if "kl_per_token" in r else "-"
        top1 = f"{100 * r['top1_agreement']:.2f} %" if "top1_agreement" in r else "-"
        lines.append(f"| {r['recipe']} | {bits} | {r['heldout_loss']:.4f} | {100 * r['loss_vs_bf16']:+.3f} % | "
                     f"{kl} | {top1} |")
    with open(os.path.join(out, "quant_quality.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

if __name__ == "__main__":
    main()
