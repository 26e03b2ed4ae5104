"""MOPD demonstration on CPU: two small teachers trained on different parts of the standard-library corpus
(code with its docstrings and comments removed, and the docstrings and comments alone; the prose teacher
is wider, a teacher of another size) distilled into one student with multi-teacher on-policy
distillation (configs mopd_tiny), starting from a student trained briefly on both.

    python bench/mopd_demo.py [--workdir runs/mopd_demo] [--teacher-steps 100] [--student-steps 30]
                              [--mopd-steps 40] [--out bench/results]

Writes mopd_demo.json and mopd_demo.md: the held-out LM loss (nats/token) on each domain of the student
before and after MOPD, and of each teacher.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import time
import tokenize

import jax
import numpy as np

from nemojax.checkpoint.orbax import load_model
from nemojax.posttrain.loop import train_onpolicy
from nemojax.train import corpus
from nemojax.train.data import default_data_config, heldout_batches
from nemojax.train.loop import train
from nemojax.train.run_config import load_run_config
from nemojax.train.step import make_eval_step
from nemojax.train.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

CORPUS_BYTES = 1_500_000
SEQ_LEN = 128


def split_source(source: str) -> tuple[str, str] | None:
    """(code without docstrings and comments, the docstrings and comments), None when it does not parse."""
    try:
        tree = ast.parse(source)
        comments = [tok.string.lstrip("#").strip() for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                    if tok.type == tokenize.COMMENT]
    except (SyntaxError, tokenize.TokenError, ValueError):
        return None
    docstrings = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value,
                                                                                                     str):
                docstrings.append(first.value.value.strip())
                node.body = node.body[1:] or [ast.Pass()]
    return ast.unparse(tree), "\n\n".join(docstrings + [c for c in comments if c])


def write_domains(directory: str) -> dict[str, str]:
    """code.jsonl and prose.jsonl: one record per standard-library file (keys as the file names)."""
    os.makedirs(directory, exist_ok=True)
    paths = {name: os.path.join(directory, f"{name}.jsonl") for name in ("code", "prose")}
    root = corpus.stdlib_root()
    with open(paths["code"], "w") as code, open(paths["prose"], "w") as prose:
        for rel in corpus.stdlib_files(CORPUS_BYTES):
            with open(os.path.join(root, rel), errors="replace") as f:
                parts = split_source(f.read())
            if parts is None:
                continue
            if parts[0].strip():
                code.write(json.dumps({"text": parts[0]}) + "\n")
            if parts[1].strip():
                prose.write(json.dumps({"text": parts[1]}) + "\n")
    return paths


def heldout_loss(model_dir: str, data_path: str, tokenizer_path: str, batches: int) -> float:
    """Mean LM loss (nats/token) of a model on the first `batches` held-out batches of a domain."""
    model, variables = load_model(model_dir)
    cfg = default_data_config()
    cfg.update(source="files", paths=(data_path,), tokenizer_path=tokenizer_path)
    eval_set = heldout_batches(cfg, load_tokenizer(tokenizer_path), batch_size=8, seq_len=SEQ_LEN,
                               num_batches=batches)
    step = jax.jit(make_eval_step(model))
    sums = [step({"params": variables["params"], "buffers": variables.get("buffers", {})}, jax.device_put(b))
            for b in eval_set]
    total, count = np.sum(jax.device_get(sums), axis=0)
    return float(total / count)


def pretrain(workdir: str, paths: tuple[str, ...], tokenizer_path: str, steps: int, extra: list[str]) -> None:
    cfg = load_run_config("mopd_tiny", [
        f"--config.num_steps={steps}", "--config.batch_size=8", f"--config.seq_len={SEQ_LEN}",
        "--config.eval_every=100000", "--config.eval_batches=1", f"--config.checkpoint_every={steps}",
        "--config.data.source=files", f"--config.data.paths={','.join(paths)}",
        f"--config.data.tokenizer_path={tokenizer_path}", "--config.optimizer.learning_rate=3e-3",
        "--config.optimizer.warmup_steps=10", "--config.optimizer.schedule=cosine", "--config.log_every=50",
        *extra])
    del cfg["posttrain"]
    train(cfg, workdir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/mopd_demo")
    parser.add_argument("--teacher-steps", type=int, default=100)
    parser.add_argument("--student-steps", type=int, default=30)
    parser.add_argument("--mopd-steps", type=int, default=40)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    paths = write_domains(os.path.join(args.workdir, "data"))
    texts = []
    for path in paths.values():
        with open(path) as f:
            texts += [json.loads(line)["text"] for line in f]
    tokenizer_dir = os.path.join(args.workdir, "tokenizer")
    save_tokenizer(train_tokenizer(texts, 512), tokenizer_dir)
    tokenizer_path = os.path.join(tokenizer_dir, "tokenizer.json")

    seconds = {}
    begin = time.perf_counter()
    teachers = {name: os.path.join(args.workdir, f"teacher_{name}") for name in ("code", "prose")}
    pretrain(teachers["code"], (paths["code"],), tokenizer_path, args.teacher_steps, [])
    # The prose teacher is wider (another size than the student).
    pretrain(teachers["prose"], (paths["prose"],), tokenizer_path, args.teacher_steps,
             ["--config.model.hidden_size=96", "--config.model.intermediate_size=192"])
    seconds["teachers"] = time.perf_counter() - begin
    begin = time.perf_counter()
    student = os.path.join(args.workdir, "student_base")
    pretrain(student, (paths["code"], paths["prose"]), tokenizer_path, args.student_steps, [])
    seconds["student_base"] = time.perf_counter() - begin
    begin = time.perf_counter()
    distilled = os.path.join(args.workdir, "student_mopd")
    cfg = load_run_config("mopd_tiny", [
        f"--config.num_steps={args.mopd_steps}", f"--config.checkpoint_every={args.mopd_steps}",
        f"--config.posttrain.domains.code.teacher={teachers['code']}",
        f"--config.posttrain.domains.code.paths={paths['code']}",
        f"--config.posttrain.domains.prose.teacher={teachers['prose']}",
        f"--config.posttrain.domains.prose.paths={paths['prose']}"])
    train_onpolicy(cfg, distilled, init_from=student)
    seconds["mopd"] = time.perf_counter() - begin

    models = {"teacher code": teachers["code"], "teacher prose (wider)": teachers["prose"],
              "student before MOPD": student, "student after MOPD": distilled}
    losses = {name: {domain: heldout_loss(path, paths[domain], tokenizer_path, args.eval_batches)
                     for domain in ("code", "prose")} for name, path in models.items()}
    records = [json.loads(line) for line in open(os.path.join(distilled, "metrics.jsonl"))]
    window = max(1, len(records) // 4)
    kl_rows = [(f"{w[0]['step']}-{w[-1]['step']}", np.mean([r["kl/code"] for r in w]),
                np.mean([r["kl/prose"] for r in w])) for w in (records[i:i + window]
                                                             for i in range(0, len(records), window))]
    result = {"args": vars(args), "seconds": seconds, "heldout_loss": losses,
              "kl_windows": [{"steps": s, "kl_code": float(c), "kl_prose": float(p)} for s, c, p in kl_rows]}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "mopd_demo.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = [
        "# MOPD demonstration on CPU", "",
        f"Command: `python bench/mopd_demo.py --teacher-steps {args.teacher_steps} --student-steps "
        f"{args.student_steps} --mopd-steps {args.mopd_steps}` (2-core CPU shared with other jobs; teachers "
        f"{seconds['teachers']:.0f} s, student base {seconds['student_base']:.0f} s, MOPD {seconds['mopd']:.0f} s).",
        "",
        f"Data: the first {CORPUS_BYTES / 1e6:.1f} MB of the embedded standard-library corpus, each file split into "
        "its code (docstrings and comments removed, `ast.unparse`) and its docstrings and comments (prose). "
        "Models: `mopd_tiny` (the tiny layer pattern at hidden 64, vocab 512; the prose teacher at hidden 96). "
        f"Teachers: {args.teacher_steps} steps (batch 8 x {SEQ_LEN}) on their domain; student: "
        f"{args.student_steps} steps on both, then {args.mopd_steps} MOPD steps (4 prompts of 24 tokens per "
        "domain, 24 sampled tokens each, temperature 1, learning rate 1e-3).", "",
        f"Held-out LM loss (nats/token, {args.eval_batches} batches of 8 x {SEQ_LEN} per domain):", "",
        "| model | code | prose |", "|---|---|---|",
        *[f"| {name} | {v['code']:.3f} | {v['prose']:.3f} |" for name, v in losses.items()], "",
        "Reverse KL of the student's rollouts to the domain's teacher (nats/token, mean over steps):", "",
        "| steps | code | prose |", "|---|---|---|",
        *[f"| {s} | {c:.3f} | {p:.3f} |" for s, c, p in kl_rows], "",
    ]
    with open(os.path.join(args.out, "mopd_demo.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
