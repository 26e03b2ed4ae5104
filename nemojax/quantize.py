"""Post-training quantization of a float checkpoint into a ModelOpt checkpoint.

    python -m nemojax.quantize SRC DST --recipe nvfp4-experts|release
        [--calib-data PATH ...] [--calib-tokens N] [--calib-seq-len T] [--seed S] [--json]

SRC is a Hugging Face checkpoint directory in the published layout (float weights). The recipe picks
each module's format (`nemojax.quant.recipes`); input ranges come from running the model on
calibration text (`--calib-data` files, else the embedded standard-library corpus, tokenized with
SRC's tokenizer.json; random tokens when SRC has no tokenizer). DST gets the quantized
model.safetensors, config.json with `quantization_config`, hf_quant_config.json and SRC's other
files (tokenizer, ...). Prints parameters, bytes and effective bits per parameter by format.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence

import numpy as np

from nemojax.checkpoint.hf import load_pretrained, quantizable_modules
from nemojax.checkpoint.safetensors_io import SafetensorsDir, save_file
from nemojax.errors import CheckpointError, DataError, NemojaxError
from nemojax.quant import modelopt, ptq, recipes
from nemojax.quant.calibrate import calibrate
from nemojax.train import corpus
from nemojax.train.tokenizer import load_tokenizer

PRODUCER = "nemojax"
_OWN_FILES = ("config.json", modelopt.QUANT_CONFIG_FILE, "model.safetensors.index.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nemojax.quantize", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="float checkpoint directory (published Hugging Face layout)")
    p.add_argument("dst", help="output directory (created; must not hold a checkpoint already)")
    p.add_argument("--recipe", required=True, choices=recipes.RECIPES)
    p.add_argument("--calib-data", nargs="*", default=(), help="text/jsonl files, directories or globs")
    p.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens in all")
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="for random calibration tokens")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def calibration_batches(src: str, paths: Sequence[str], tokens: int, seq_len: int, vocab: int,
                        seed: int) -> tuple[list[np.ndarray], str]:
    """Token batches [1, seq_len] for calibration and a line saying where they came from."""
    rows = max(1, tokens // seq_len)
    if os.path.isfile(os.path.join(src, "tokenizer.json")):
        tokenizer = load_tokenizer(src)
        documents = corpus.load_documents("files" if paths else "stdlib", list(paths), "auto", 4 * tokens)
        ids = np.concatenate([np.asarray(tokenizer.encode(d.text).ids, np.int32) for d in documents])
        if ids.size >= seq_len:
            rows = min(rows, ids.size // seq_len)
            where = f"{rows * seq_len} tokens of {'the given files' if paths else 'the standard-library corpus'}"
            return [ids[i * seq_len:(i + 1) * seq_len][None] for i in range(rows)], where
    if paths:
        raise DataError(f"{src}: --calib-data needs a tokenizer.json in the checkpoint directory")
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, (1, seq_len), dtype=np.int32) for _ in range(rows)], \
        f"{rows * seq_len} random tokens (no tokenizer.json in {src})"


def quantize_checkpoint(src: str, dst: str, recipe: str, calib_data: Sequence[str] = (), calib_tokens: int = 8192,
                        calib_seq_len: int = 256, seed: int = 0) -> dict:
    """Write the quantized checkpoint; returns the report (storage by format, calibration source)."""
    if os.path.isfile(os.path.join(dst, "config.json")):
        raise CheckpointError(f"{dst} already holds a checkpoint; choose an empty directory")
    if modelopt.read_quant_config(src)[0] is not None:
        raise CheckpointError(f"{src} is already quantized; quantize a float checkpoint")
    model, variables = load_pretrained(src, dtype="float32", param_dtype="float32")
    config = model.config
    modules = quantizable_modules(config)
    scheme = recipes.recipe_scheme(recipe, modules)
    batches, source = calibration_batches(src, calib_data, calib_tokens, calib_seq_len, config.vocab_size, seed)
    amax = calibrate(model, variables, batches)
    st = SafetensorsDir(src)
    tensors = {name: np.asarray(st.read(name)) for name in st.keys()}
    quantized = ptq.quantize_tensors(tensors, scheme, amax)
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if not name.endswith(".safetensors") and name not in _OWN_FILES and os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
    save_file(quantized, os.path.join(dst, "model.safetensors"))
    block = modelopt.scheme_to_config(scheme, modules)
    with open(os.path.join(src, "config.json")) as f:
        hf = json.load(f)
    hf["quantization_config"] = {"quant_method": "modelopt", "producer": {"name": PRODUCER}, **block}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    modelopt.write_quant_config(dst, block, PRODUCER)
    return {"recipe": recipe, "calibration": source, "storage": ptq.storage_report(tensors, quantized, scheme)}


def format_report(report: dict) -> str:
    lines = [f"recipe {report['recipe']}; calibration on {report['calibration']}",
             f"{'format':<12} {'params':>14} {'bytes':>14} {'bits/param':>10}"]
    for fmt, row in report["storage"].items():
        lines.append(f"{fmt:<12} {row['params']:>14,} {row['bytes']:>14,} {row['bits_per_param']:>10.3f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = quantize_checkpoint(args.src, args.dst, args.recipe, args.calib_data, args.calib_tokens,
                                     args.calib_seq_len, args.seed)
    except NemojaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
