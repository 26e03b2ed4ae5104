"""Decode cost against the current length in a long cache, and FP8 vs BF16 KV accuracy (CPU, tiny models).

    python bench/long_context.py [--quick] [--out bench/results]

1. Decode ms/token (batch 1, float32, greedy forward of one token) at current lengths 1K/8K/32K/128K in
   a cache of 128K positions: attention over the key blocks up to the current length (the default),
   the same with every key of the cache visited (the old dense path: FEW_QUERY_KEY_BLOCK past the
   capacity), and an attention-only model of the same shape. The cache is filled synthetically (its
   index and validity set, entries random): a decoding step's cost depends on shapes and the current
   length only, not on how the entries came to be. Times are the fastest step of one run (the machine
   is shared: compare the ratios).
2. FP8 (E4M3, scale 1) vs BF16 KV cache on a random model (bfloat16 compute): logits of a greedy
   generation teacher-forced on the BF16 run's tokens (max / mean absolute difference, relative to the
   logits' spread), and greedy token agreement of free-running generations.
Writes long_context.json and long_context.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from nemojax.config import from_hf_config
from nemojax.model import NemotronH, init_cache, init_variables
from nemojax.ops import attention as attention_ops

SHAPE = dict(vocab_size=512, hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
             mamba_num_heads=8, mamba_head_dim=32, ssm_state_size=32, n_groups=2, chunk_size=64,
             intermediate_size=512, eos_token_id=2, max_position_embeddings=2**20, compute_dtype="float32",
             param_dtype="float32")
HYBRID, ATTENTION_ONLY = "M-M*M-M*", "*-*-*-*-"


def filled_cache(config, capacity: int, length: int, seed: int = 0):
    """A cache of `capacity` positions holding `length` valid random entries (index = length)."""
    cache = init_cache(config, 1, capacity)
    key = jax.random.key(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "index":
            return jnp.full_like(leaf, length)
        if name == "valid":
            return leaf.at[:, :length].set(True)
        if name in ("k", "v"):
            return (jax.random.normal(jax.random.fold_in(key, hash(str(path)) % 1000), leaf.shape) * 0.5
                    ).astype(leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(fill, cache)


def decode_ms(pattern: str, capacity: int, lengths: list[int], steps: int, dense: bool) -> dict[int, float]:
    config = from_hf_config(dict(SHAPE, hybrid_override_pattern=pattern))
    model = NemotronH(config)
    variables = jax.jit(init_variables, static_argnums=0)(config, jax.random.key(0))
    saved = attention_ops.FEW_QUERY_KEY_BLOCK
    attention_ops.FEW_QUERY_KEY_BLOCK = 2 * capacity if dense else saved
    try:
        step = jax.jit(lambda v, ids, c: model.apply(v, ids, None, c, method="forward")[::2], donate_argnums=2)
        token = jnp.asarray([[5]])
        out = {}
        for length in lengths:
            cache = filled_cache(config, capacity, length)
            for _ in range(2):  # compile, warm
                logits, cache = step(variables, token, cache)
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                logits, cache = step(variables, token, cache)
                logits.block_until_ready()
                times.append(time.perf_counter() - start)
            out[length] = 1000 * float(np.min(times))
            del cache
    finally:
        attention_ops.FEW_QUERY_KEY_BLOCK = saved
    return out


def fp8_accuracy(prompt: int, new: int) -> dict:
    config = from_hf_config(dict(SHAPE, hybrid_override_pattern=HYBRID, compute_dtype="bfloat16"))
    variables = jax.jit(init_variables, static_argnums=0)(config, jax.random.key(1))
    ids = np.random.default_rng(0).integers(3, SHAPE["vocab_size"], prompt)

    def run(kv_dtype: str, forced: list[int] | None):
        cfg = config.replace(kv_cache_dtype=kv_dtype)
        model = NemotronH(cfg)
        forward = jax.jit(lambda v, i, c: model.apply(v, i, None, c, method="forward"))
        logits, _, cache = forward(variables, jnp.asarray(ids)[None], init_cache(cfg, 1, prompt + new))
        steps, tokens = [], []
        for j in range(new):
            last = np.asarray(logits[0, -1], np.float32)
            steps.append(last)
            tokens.append(int(np.argmax(last)) if forced is None else forced[j])
            logits, _, cache = forward(variables, jnp.asarray([[tokens[-1]]]), cache)
        return np.stack(steps), tokens

    ref_logits, ref_tokens = run("bfloat16", None)
    forced_logits, _ = run("float8_e4m3fn", ref_tokens)
    _, free_tokens = run("float8_e4m3fn", None)
    diff = np.abs(forced_logits - ref_logits)
    agree = next((j for j, (a, b) in enumerate(zip(free_tokens, ref_tokens, strict=True)) if a != b), new)
    return {"prompt": prompt, "new": new, "logit_spread": float(np.ptp(ref_logits)),
            "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "teacher_forced_argmax_agreement": float(np.mean(forced_logits.argmax(-1) == ref_logits.argmax(-1))),
            "free_run_tokens_equal_before_first_difference": agree,
            "free_run_token_agreement": float(np.mean(np.asarray(free_tokens) == np.asarray(ref_tokens)))}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args()
    capacity, lengths, steps = (8192, [1024, 8192], 5) if args.quick else (131072, [1024, 8192, 32768, 131072], 10)
    results = {"capacity": capacity, "device": jax.devices()[0].device_kind,
               "hybrid_bounded": decode_ms(HYBRID, capacity, lengths, steps, dense=False),
               "hybrid_dense": decode_ms(HYBRID, capacity, lengths, steps, dense=True),
               "attention_only_bounded": decode_ms(ATTENTION_ONLY, capacity, lengths, steps, dense=False),
               "fp8_vs_bf16": fp8_accuracy(*((32, 16) if args.quick else (256, 64)))}
    name = "long_context_quick" if args.quick else "long_context"
    with open(os.path.join(args.out, name + ".json"), "w") as f:
        json.dump(results, f, indent=2)
    lines = [f"# Long context on CPU ({results['device']}), `python bench/long_context.py"
             f"{' --quick' if args.quick else ''}`", "",
             f"## Decode ms/token vs current length (batch 1, float32, cache of {capacity} positions)", "",
             f"Models: hybrid `{HYBRID}` and attention-only `{ATTENTION_ONLY}` (hidden 256, 8 heads, 2 KV heads "
             "of 64). Bounded: attention visits key blocks up to the current length (default). Dense: every "
             "key of the cache (the previous decoding path).", "",
             "| current length | hybrid, bounded | hybrid, dense over capacity | attention-only, bounded |",
             "|---|---|---|---|"]
    for length in lengths:
        lines.append(f"| {length} | {results['hybrid_bounded'][length]:.2f} | {results['hybrid_dense'][length]:.2f} "
                     f"| {results['attention_only_bounded'][length]:.2f} |")
    acc = results["fp8_vs_bf16"]
    lines += ["", "## FP8 (E4M3, scale 1) vs BF16 KV cache (random hybrid model, bfloat16 compute)", "",
              f"Prompt {acc['prompt']} tokens, {acc['new']} generated.", "",
              "| measure | value |", "|---|---|",
              f"| logit spread (max - min, BF16 run) | {acc['logit_spread']:.3f} |",
              f"| max abs logit diff (teacher-forced) | {acc['max_abs_diff']:.4f} |",
              f"| mean abs logit diff (teacher-forced) | {acc['mean_abs_diff']:.4f} |",
              f"| argmax agreement (teacher-forced) | {acc['teacher_forced_argmax_agreement']:.3f} |",
              f"| free-running greedy tokens equal before the first difference | "
              f"{acc['free_run_tokens_equal_before_first_difference']} of {acc['new']} |",
              f"| free-running greedy token agreement | {acc['free_run_token_agreement']:.3f} |"]
    with open(os.path.join(args.out, name + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
