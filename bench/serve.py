"""Serving speed on this machine, each comparison measured in one run (ratios, not absolute claims).

    python bench/serve.py [--quick] [--out bench/results]

1. nemojax vs the transformers reference on the same random checkpoint: prefill (batch x prompt)
   and batch decoding (greedy, tokens/s).
2. Decode time per token against context length: the hybrid model vs an attention-only model of
   the same shape (every Mamba layer replaced by attention).
3. MTP speculative decoding: the hybrid model with an MTP block, briefly trained on counting
   sequences so that its drafts are often right; speed-up over plain decoding at the measured
   acceptance rate, for several draft lengths.
Writes serve.json and serve.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import nemojax  # noqa: E402
from nemojax.config import from_hf_config  # noqa: E402
from nemojax.generate import Engine, Request  # noqa: E402
from nemojax.generate.stats import stats_record  # noqa: E402
from nemojax.model import NemotronH, init_variables  # noqa: E402
from nemojax.train.quick import fit_token_batches  # noqa: E402

PATTERN = "MEM*EMEM"
SHAPE = dict(vocab_size=4096, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             mamba_num_heads=8, mamba_head_dim=32, ssm_state_size=32, n_groups=2, chunk_size=64,
             intermediate_size=512, n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=128,
             moe_shared_expert_intermediate_size=256, moe_latent_size=128, n_group=1, topk_group=1,
             routed_scaling_factor=2.5, eos_token_id=2, max_position_embeddings=65536)


def requests(ids: np.ndarray, max_new: int) -> list[Request]:
    return [Request(index=i, prompt_ids=tuple(int(t) for t in row), max_new_tokens=max_new, temperature=0.0,
                    top_k=0, top_p=1.0, min_p=0.0, seed=0, stop=(), ignore_eos=True, thinking_budget=None)
            for i, row in enumerate(ids)]


def timed_engine_run(engine: Engine, reqs: list[Request], repeats: int = 3) -> dict:
    """Warm up (compile) once, then the best of `repeats` runs' prefill and decode throughput."""
    engine.generate(reqs)
    best: dict = {}
    for _ in range(repeats):
        engine.stats = type(engine.stats)()
        engine.generate(reqs)
        s = engine.stats
        steps = s.generated_tokens - len(reqs)  # the first token of each row comes from prefill
        run = {"prefill_s": s.prefill_seconds, "decode_s": s.decode_seconds,
               "decode_tokens_per_s": steps / s.decode_seconds,
               "prefill_tokens_per_s": s.prefill_tokens / s.prefill_seconds,
               **({k: v for k, v in stats_record(s, engine.k).items() if k in ("acceptance_rate",
                                                                               "mean_accepted_length")})}
        if not best or run["decode_s"] < best["decode_s"]:
            best = run
    return best


def versus_transformers(batch: int, prompt: int, new: int) -> dict:
    import torch
    from hf_reference import make_checkpoint

    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as directory:
        reference = make_checkpoint(directory, PATTERN, seed=0, time_step_min=1e-6,
                                    **{k: v for k, v in SHAPE.items() if k != "max_position_embeddings"})
        model, variables = nemojax.load_pretrained(directory, dtype="float32", param_dtype="float32")
    ids = np.random.default_rng(0).integers(3, SHAPE["vocab_size"], (batch, prompt))
    ours = timed_engine_run(Engine(model, variables, eos_ids=(2,), prefill_chunk=prompt), requests(ids, new))

    x = torch.as_tensor(ids)

    def hf_generate(n: int) -> float:
        begin = time.perf_counter()
        with torch.no_grad():
            reference.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - begin

    hf_generate(new), hf_generate(1)  # warm-up: the first calls of each length are much slower
    hf_prefill = min(_timed_forward(reference, x) for _ in range(3))
    hf_decode = min(hf_generate(new) - hf_generate(1) for _ in range(3))
    hf = {"prefill_s": hf_prefill, "decode_s": hf_decode, "prefill_tokens_per_s": batch * prompt / hf_prefill,
          "decode_tokens_per_s": batch * (new - 1) / hf_decode}
    return {"batch": batch, "prompt": prompt, "new_tokens": new, "nemojax": ours, "transformers": hf,
            "prefill_speedup": hf["prefill_s"] / ours["prefill_s"],
            "decode_speedup": ours["decode_tokens_per_s"] / hf["decode_tokens_per_s"]}


def _timed_forward(reference, x) -> float:
    import torch

    begin = time.perf_counter()
    with torch.no_grad():
        reference(input_ids=x, use_cache=True)
    return time.perf_counter() - begin


def context_scaling(contexts: list[int], new: int) -> list[dict]:
    rows = []
    for name, pattern in (("hybrid", PATTERN), ("attention-only", PATTERN.replace("M", "*"))):
        config = from_hf_config(dict(SHAPE, hybrid_override_pattern=pattern), compute_dtype="float32")
        model = NemotronH(config)
        variables = jax.jit(init_variables, static_argnums=0)(config, jax.random.key(0))
        engine = Engine(model, variables, eos_ids=(2,), prefill_chunk=512)
        for context in contexts:
            ids = np.random.default_rng(0).integers(3, SHAPE["vocab_size"], (1, context))
            run = timed_engine_run(engine, requests(ids, new), repeats=2)
            rows.append({"model": name, "context": context,
                         "ms_per_token": 1000 * run["decode_s"] / (new - 1)})
    return rows


def trained_mtp_model(steps: int) -> tuple[NemotronH, dict]:
    """The hybrid model with an MTP block trained (LM + MTP loss) on sequences counting up by 1 or 2."""
    config = from_hf_config(dict(SHAPE, hybrid_override_pattern=PATTERN, mtp_hybrid_override_pattern="*E",
                                 num_nextn_predict_layers=1), compute_dtype="float32")
    model = NemotronH(config)
    variables = jax.jit(init_variables, static_argnums=0)(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    batches = (counting_batch(rng, 16, 65) for _ in range(steps))
    return model, fit_token_batches(model, variables, batches, learning_rate=3e-3, mtp_loss_weight=1.0)


def counting_batch(rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
    start, stride = rng.integers(0, 1000, (batch, 1)), rng.integers(1, 3, (batch, 1))
    return (start + stride * np.arange(length)[None]) % 1000 + 3


def speculation(train_steps: int, batches: list[int], drafts: list[int], new: int) -> list[dict]:
    model, variables = trained_mtp_model(train_steps)
    rows = []
    for batch in batches:
        reqs = requests(counting_batch(np.random.default_rng(1), batch, 32), new)
        plain = timed_engine_run(Engine(model, variables, eos_ids=(2,)), reqs)
        for k in drafts:
            spec = timed_engine_run(Engine(model, variables, eos_ids=(2,), num_draft_tokens=k), reqs)
            rows.append({"batch": batch, "draft_tokens": k, "plain_tokens_per_s": plain["decode_tokens_per_s"],
                         "speculative_tokens_per_s": spec["decode_tokens_per_s"],
                         "speedup": spec["decode_tokens_per_s"] / plain["decode_tokens_per_s"],
                         "acceptance_rate": spec["acceptance_rate"],
                         "mean_accepted_length": spec["mean_accepted_length"]})
    return rows


def markdown(results: dict) -> str:
    v = results["versus_transformers"]
    lines = [f"# Serving benchmark ({results['device']})", "",
             f"## nemojax vs transformers (pattern {PATTERN}, hidden 256, 32 experts; batch {v['batch']}, "
             f"prompt {v['prompt']}, {v['new_tokens']} new tokens, greedy, float32)", "",
             "| | prefill tokens/s | decode tokens/s |", "|---|---|---|"]
    for name in ("nemojax", "transformers"):
        lines.append(f"| {name} | {v[name]['prefill_tokens_per_s']:.0f} | {v[name]['decode_tokens_per_s']:.1f} |")
    lines += [f"| speed-up | {v['prefill_speedup']:.1f}x | {v['decode_speedup']:.1f}x |", "",
              "## Decode time per token vs context (batch 1)", "",
              "| context | hybrid ms/token | attention-only ms/token |", "|---|---|---|"]
    by = {(r["model"], r["context"]): r["ms_per_token"] for r in results["context_scaling"]}
    for context in sorted({r["context"] for r in results["context_scaling"]}):
        lines.append(f"| {context} | {by[('hybrid', context)]:.2f} | {by[('attention-only', context)]:.2f} |")
    lines += ["", "## MTP speculative decoding (model trained briefly on counting sequences)", "",
              "| batch | draft tokens | acceptance | tokens/verify | plain tok/s | speculative tok/s | speed-up |",
              "|---|---|---|---|---|---|---|"]
    for r in results["speculation"]:
        lines.append(f"| {r['batch']} | {r['draft_tokens']} | {r['acceptance_rate']:.2f} | "
                     f"{r['mean_accepted_length']:.2f} | {r['plain_tokens_per_s']:.1f} | "
                     f"{r['speculative_tokens_per_s']:.1f} | {r['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    sizes = dict(batch=4, prompt=512, new=64, contexts=[512, 2048, 8192], train_steps=150, spec_batches=[1, 4],
                 drafts=[1, 2, 3])
    if args.quick:
        sizes = dict(batch=2, prompt=64, new=16, contexts=[128, 512], train_steps=20, spec_batches=[1], drafts=[2])
    results = {
        "device": f"{jax.devices()[0].platform} x{jax.device_count()}, {os.cpu_count()} CPU cores",
        "sizes": sizes,
        "versus_transformers": versus_transformers(sizes["batch"], sizes["prompt"], sizes["new"]),
        "context_scaling": context_scaling(sizes["contexts"], 32),
        "speculation": speculation(sizes["train_steps"], sizes["spec_batches"], sizes["drafts"], 64),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "serve.json"), "w") as f:
        json.dump(results, f, indent=2, default=lambda o: dataclasses.asdict(o))
    table = markdown(results)
    with open(os.path.join(args.out, "serve.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
