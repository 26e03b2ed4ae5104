"""Does the recall harness see recall when there is some? A tiny hybrid trained briefly on needle prompts.

    python bench/recall_trained.py [--steps 1500] [--train-length 160] [--lengths 160,320,640] [--out bench/results]

A byte-level tokenizer (trained on the stdlib corpus) and a 4-layer hybrid (`M*M*`) are trained with the
loss on the answer tokens only, on prompts built exactly as `nemojax-eval needle` builds them (seeds
disjoint from the evaluation's), at one length and random depths; the model is saved with its tokenizer
and evaluated by the real CLI at the training length and longer ones (length generalisation). Writes
recall_trained.json / .md. A random-init model scores ~0 on the same command (the same table's step 0).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import ml_collections
import numpy as np
import optax

from nemojax.checkpoint.orbax import save_model
from nemojax.config import from_hf_config
from nemojax.eval.cli import main as eval_main
from nemojax.eval.haystack import key_and_value, make_cases
from nemojax.model import NemotronH, init_variables
from nemojax.train.corpus import load_documents
from nemojax.train.step import init_state, make_train_step
from nemojax.train.tokenizer import save_tokenizer, train_tokenizer

SHAPE = dict(vocab_size=512, hidden_size=128, hybrid_override_pattern="M*M*", num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2,
             chunk_size=32, eos_token_id=2, max_position_embeddings=4096, compute_dtype="float32",
             param_dtype="float32")
ANSWER = 10  # answer tokens trained: " VALUE." then end-of-sequence ids
TRAIN_SEED_BASE = 1_000_000  # training haystacks use seeds >= this; the evaluation uses --seed 0


def training_batch(encode, rng: np.random.Generator, batch: int, length: int) -> dict:
    """Needle prompts of `length` tokens followed by the answer " VALUE."; loss on the answer only."""
    rows, masks = [], []
    for _ in range(batch):
        seed = TRAIN_SEED_BASE + int(rng.integers(1 << 30))
        depth = float(rng.uniform())
        case = make_cases(encode, (), [length], [depth], 1, seed)[0]
        key, value = key_and_value(seed, length, 0, 0)
        assert (key, value) == (case.key, case.value)
        answer = encode(" " + value + ".")[:ANSWER]
        answer += [2] * (ANSWER - len(answer))
        ids = list(case.prompt_ids) + answer
        mask = [False] * (len(case.prompt_ids) - 1) + [True] * ANSWER
        rows.append(ids)
        masks.append(mask)
    ids = np.asarray(rows, np.int32)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.asarray(masks, bool)}



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--train-length", type=int, default=160)
    parser.add_argument("--lengths", default="160,320,640")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--minutes", type=float, default=20.0, help="stop training after this long")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()

    documents = load_documents("stdlib", [], "auto", 1 << 20)
    tokenizer = train_tokenizer((d.text for d in documents[:200]), SHAPE["vocab_size"])
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids
    config = from_hf_config(SHAPE)
    model = NemotronH(config)
    variables = jax.jit(init_variables, static_argnums=0)(config, jax.random.key(0))
    settings = ml_collections.ConfigDict(dict(grad_accum_steps=1, mtp_loss_weight=0.0, aux_loss_weight=0.0,
                                              bias_update_rate=0.0))
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, min(100, args.steps // 2), max(args.steps, 2), 3e-4)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    step = jax.jit(make_train_step(model, tx, settings, schedule), donate_argnums=0)
    initial = jax.device_get(variables)  # the train step donates the state, which shares these arrays
    state = init_state(variables, tx, seed=0)
    rng = np.random.default_rng(0)
    begin, losses, done = time.perf_counter(), [], 0
    for i in range(args.steps):
        state, metrics = step(state, training_batch(encode, rng, args.batch, args.train_length))
        done = i + 1
        if i % 50 == 0 or i == args.steps - 1:
            losses.append((i, float(metrics["loss"])))
            print(f"step {i}: answer loss {losses[-1][1]:.3f} ({time.perf_counter() - begin:.0f} s)", flush=True)
        if time.perf_counter() - begin > 60 * args.minutes:
            break
    trained = {**initial, "params": state["params"], "buffers": state["buffers"]}

    results = {"shape": SHAPE, "steps": done, "batch": args.batch, "train_length": args.train_length,
               "train_seconds": time.perf_counter() - begin, "losses": losses, "recall": {}}
    with tempfile.TemporaryDirectory() as directory:
        for name, weights in (("random init", initial), (f"trained {done} steps", trained)):
            path = os.path.join(directory, name.split()[0])
            save_model(path, config, weights)
            save_tokenizer(tokenizer, path)
            out = os.path.join(directory, name.split()[0] + ".json")
            status = eval_main(["needle", "--checkpoint", path, "--lengths", args.lengths, "--samples",
                                str(args.samples), "--batch-size", "8", "--output", out])
            if status:
                sys.exit(status)
            with open(out) as f:
                record = json.load(f)
            results["recall"][name] = {k: record[k] for k in ("recall", "recall_by_depth", "overall_recall")}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "recall_trained.json"), "w") as f:
        json.dump(results, f, indent=2)
    lengths = list(next(iter(results["recall"].values()))["recall"])
    lines = [f"# Needle recall of a tiny hybrid trained on needle prompts ({jax.devices()[0].platform})", "",
             f"Model {SHAPE['hybrid_override_pattern']}, hidden {SHAPE['hidden_size']}, byte-level BPE of "
             f"{SHAPE['vocab_size']}; {done} steps of batch {args.batch} at {args.train_length} tokens "
             f"({results['train_seconds']:.0f} s), loss on the answer only; evaluated with "
             f"`nemojax-eval needle --lengths {args.lengths} --samples {args.samples}` (5 depths, seed 0; "
             "training used other seeds).", "",
             "| model | " + " | ".join(f"recall @ {n}" for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for name, r in results["recall"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r['recall'][n]:.2f}" for n in lengths) + " |")
    lines += ["", "Answer loss during training: " + ", ".join(f"{i}: {v:.2f}" for i, v in losses[::4])]
    with open(os.path.join(args.out, "recall_trained.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
