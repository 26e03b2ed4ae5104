"""The release's throughput workloads through the serving engine, hybrid vs attention-only.

    python bench/workloads.py [--config bench] [--decode 1024:4096] [--prefill 32x512:32] \
        [--contexts 1k,8k,32k] [--out bench/results]

On a GPU, the full-size recipe is one flag: `--config nano --decode 8192:65536 --contexts 8k,32k,128k`.

Every workload runs through `nemojax.generate.scheduler` (continuous batching, chunked prefill, decode
segments), once to compile and once measured:
1. decode-heavy: a few long prompts with long outputs (`--decode PROMPT:OUTPUT`, `--decode-rows` at once);
2. prefill-heavy: many short prompts with short outputs (`--prefill NxPROMPT:OUTPUT`);
3. decode time per token at several context lengths (one request: a prompt of that length, then
   `--context-new` tokens).
Reported: output tokens/s, prefill tokens/s, time to first token, per-step latency (p50/p90 of the
time per decode step a streaming client sees: a scheduler round's time over the tokens a row got in
it), cache bytes (the slot state's caches at the end) and memory per token of context (from the cache
shapes), peak RSS (this process, so cumulative) or device peak bytes where the backend reports them.

Both models: the hybrid pattern of `--config`, and an attention-only model of about the same
parameter count: every Mamba layer `M` becomes attention `*`, and the number of query heads is
chosen to match the hybrid's parameter count (KV heads, hence the KV bytes per attention layer, kept).
Writes workloads.json and workloads.md (with the machine's load average).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import subprocess
import sys
import time

import jax
import numpy as np

from nemojax.config import ModelConfig, from_hf_config, resolve_model_config
from nemojax.generate import Engine, Request
from nemojax.generate.scheduler import Ticket
from nemojax.model import NemotronH, abstract_variables, init_cache, init_variables

# A small hybrid (the nano pattern's proportions, shrunk) that runs the long contexts on a few CPU cores.
BENCH_SHAPE = dict(vocab_size=4096, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                   mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=32, n_groups=2, chunk_size=64,
                   intermediate_size=256, n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=64,
                   moe_shared_expert_intermediate_size=128, moe_latent_size=64, n_group=1, topk_group=1,
                   routed_scaling_factor=2.5, eos_token_id=2, max_position_embeddings=1 << 20,
                   hybrid_override_pattern="MEM*EMEM")


def parse_length(text: str) -> int:
    """'4k' -> 4096, '1m' -> 1048576, '300' -> 300."""
    text = text.strip().lower()
    scale = {"k": 1 << 10, "m": 1 << 20}.get(text[-1:], 1)
    return int(text[:-1] if scale > 1 else text) * scale


def hybrid_config(spec: str, dtype: str) -> ModelConfig:
    if spec == "bench":
        return from_hf_config(BENCH_SHAPE, compute_dtype=dtype, param_dtype=dtype)
    return resolve_model_config(spec, compute_dtype=dtype, param_dtype=dtype).replace(
        max_position_embeddings=1 << 20, num_nextn_predict_layers=0, mtp_layer_types=())


def parameter_count(config: ModelConfig) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_variables(config)["params"]))


def attention_only(hybrid: ModelConfig) -> ModelConfig:
    """Mamba layers become attention layers; query heads chosen (a multiple of the KV heads) so the
    parameter count is closest to the hybrid's."""
    kinds = tuple("attention" if k == "mamba" else k for k in hybrid.layer_types)
    target = parameter_count(hybrid)
    kv = hybrid.num_key_value_heads
    candidates = [hybrid.replace(layer_types=kinds, num_attention_heads=kv * g) for g in range(1, 17)]
    return min(candidates, key=lambda c: abs(parameter_count(c) - target))


def cache_bytes_per_token(config: ModelConfig) -> tuple[float, int]:
    """(bytes per token of context, fixed bytes) of one sequence's decoding cache, from the cache shapes."""
    def size(length: int) -> int:
        shapes = jax.eval_shape(lambda: init_cache(config, 1, length))
        return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(shapes))

    small, large = size(1024), size(2048)
    per_token = (large - small) / 1024
    return per_token, int(small - 1024 * per_token)


def requests(n: int, prompt: int, new: int, vocab: int, seed: int) -> list[Request]:
    ids = np.random.default_rng(seed).integers(3, vocab, (n, prompt))
    return [Request(index=i, prompt_ids=tuple(int(t) for t in row), max_new_tokens=new, temperature=0.0, top_k=0,
                    top_p=1.0, min_p=0.0, seed=0, stop=(), ignore_eos=True, thinking_budget=None)
            for i, row in enumerate(ids)]


def serve(engine: Engine, reqs: list[Request], slots: int) -> dict:
    """Serve `reqs` through one scheduler, timing each round; returns the workload's measurements."""
    engine.stats = type(engine.stats)()
    scheduler = engine.scheduler(slots, max(len(r.prompt_ids) + r.max_new_tokens for r in reqs))
    begin = time.perf_counter()
    tickets = [scheduler.submit(Ticket(r)) for r in reqs]
    step_seconds: list[float] = []
    while scheduler.busy:
        before = {id(t): len(t.output_ids) for t in tickets}
        prefilling = any(t is not None and not t.decoding for t in scheduler.rows) or bool(scheduler.waiting)
        start = time.perf_counter()
        scheduler.step()
        elapsed = time.perf_counter() - start
        gained = max(len(t.output_ids) - before[id(t)] for t in tickets)
        if gained and not prefilling:  # pure decode rounds: the per-step latency a streaming client sees
            step_seconds.append(elapsed / gained)
    wall = time.perf_counter() - begin
    stats = engine.stats
    ttft = [t.first_token_at - t.submitted_at for t in tickets]
    cache = sum(x.nbytes for x in jax.tree.leaves(scheduler.state["cache"]))
    return {"requests": len(reqs), "prompt_tokens": len(reqs[0].prompt_ids), "output_tokens": reqs[0].max_new_tokens,
            "wall_s": wall, "prefill_s": stats.prefill_seconds, "output_tokens_per_s": stats.generated_tokens / wall,
            "prefill_tokens_per_s": stats.prefill_tokens / max(stats.prefill_seconds, 1e-9),
            "decode_tokens_per_s": (stats.generated_tokens - len(reqs)) / max(stats.decode_seconds, 1e-9),
            "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_max_s": float(max(ttft)),
            "step_ms_p50": 1000 * float(np.percentile(step_seconds, 50)) if step_seconds else None,
            "step_ms_p90": 1000 * float(np.percentile(step_seconds, 90)) if step_seconds else None,
            "decode_ms_per_step": 1000 * stats.decode_seconds / max(stats.generated_tokens - len(reqs), 1)
            * min(len(reqs), slots),
            "cache_bytes": cache, "compile_s": stats.compile_seconds, **memory()}


def memory() -> dict:
    """Device peak bytes where the backend reports them, else this process's peak RSS."""
    device_stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in device_stats:
        return {"device_peak_bytes": int(device_stats["peak_bytes_in_use"])}
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def measured(engine: Engine, reqs: list[Request], slots: int, warm_up: bool = True) -> dict:
    """The workload's measurements; with `warm_up`, from a second run (the first compiles), else from the
    only run (throughputs and decode times exclude compilation; TTFT and step latencies do not)."""
    if warm_up:
        serve(engine, reqs, slots)
    return serve(engine, reqs, slots)


def model_entry(name: str, config: ModelConfig, prefill_chunk: int) -> dict:
    variables = jax.jit(init_variables, static_argnums=0)(config, jax.random.key(0))
    per_token, fixed = cache_bytes_per_token(config)
    return {"model": name, "pattern": config.pattern, "parameters": parameter_count(config),
            "num_attention_heads": config.num_attention_heads, "cache_bytes_per_token": per_token,
            "cache_fixed_bytes": fixed,
            "engine": Engine(NemotronH(config), variables, eos_ids=(2,), prefill_chunk=prefill_chunk)}


def run_workloads(models: list[dict], args: argparse.Namespace) -> None:
    """Each workload on each model in turn (interleaved, so both see about the same machine load)."""
    vocab = models[0]["engine"].config.vocab_size
    d_prompt, d_new = args.decode
    n, p_prompt, p_new = args.prefill
    for m in models:
        print(f"[{m['model']}] decode-heavy", flush=True)
        m["decode_heavy"] = measured(m["engine"], requests(args.decode_rows, d_prompt, d_new, vocab, 0),
                                     args.decode_rows)
    for m in models:
        print(f"[{m['model']}] prefill-heavy", flush=True)
        m["prefill_heavy"] = measured(m["engine"], requests(n, p_prompt, p_new, vocab, 1), args.prefill_slots)
    for m in models:
        m["contexts"] = []
    for context in args.contexts:
        for m in models:
            print(f"[{m['model']}] context {context}", flush=True)
            run = measured(m["engine"], requests(1, context, args.context_new, vocab, 2), 1, warm_up=False)
            m["contexts"].append({"context": context, **run})
    for m in models:
        del m["engine"]


def markdown(results: dict) -> str:
    h, a = results["models"]
    lines = [f"# Workloads ({results['device']})", "",
             f"Load average before / after: {results['load_before']} / {results['load_after']} "
             "(a shared machine: compare the two models, not absolute numbers).", "",
             f"Command: `{results['command']}`", "",
             "| model | pattern | parameters | KV/state cache bytes per token of context | fixed cache bytes |",
             "|---|---|---|---|---|"]
    for m in (h, a):
        lines.append(f"| {m['model']} | {m['pattern']} | {m['parameters']:,} ({m['num_attention_heads']} q heads) | "
                     f"{m['cache_bytes_per_token']:.0f} | {m['cache_fixed_bytes']:,} |")
    for workload, title in (("decode_heavy", "Decode-heavy"), ("prefill_heavy", "Prefill-heavy")):
        w = h[workload]
        lines += ["", f"## {title}: {w['requests']} requests, {w['prompt_tokens']} prompt -> "
                      f"{w['output_tokens']} output tokens", "",
                  "| model | output tok/s | prefill tok/s | decode tok/s | TTFT p50 s | TTFT max s | step ms p50 | "
                  "step ms p90 | cache MB | peak MB |", "|---|---|---|---|---|---|---|---|---|---|"]
        for m in (h, a):
            r = m[workload]
            peak = r.get("device_peak_bytes", r.get("peak_rss_bytes"))
            lines.append(f"| {m['model']} | {r['output_tokens_per_s']:.1f} | {r['prefill_tokens_per_s']:.0f} | "
                         f"{r['decode_tokens_per_s']:.1f} | {r['ttft_p50_s']:.3f} | {r['ttft_max_s']:.3f} | "
                         f"{_ms(r['step_ms_p50'])} | {_ms(r['step_ms_p90'])} | {r['cache_bytes'] / 2**20:.1f} | "
                         f"{peak / 2**20:.0f} |")
    lines += ["", f"## Decode time per token vs context (1 request, {results['context_new']} new tokens)", "",
              "| context | hybrid ms/token | attention-only ms/token | ratio | hybrid cache MB | attention cache MB | "
              "hybrid prefill s | attention prefill s |", "|---|---|---|---|---|---|---|---|"]
    for rh, ra in zip(h["contexts"], a["contexts"], strict=True):
        lines.append(f"| {rh['context']} | {rh['step_ms_p50']:.2f} | {ra['step_ms_p50']:.2f} | "
                     f"{ra['step_ms_p50'] / rh['step_ms_p50']:.2f}x | "
                     f"{rh['cache_bytes'] / 2**20:.1f} | {ra['cache_bytes'] / 2**20:.1f} | {rh['prefill_s']:.2f} | "
                     f"{ra['prefill_s']:.2f} |")
    if max(r["context"] for r in h["contexts"]) < 131072:
        lines += ["", "128K and longer contexts were not run here: prefill through the attention layers grows with "
                  "the square of the context (the attention-only model's 32K prefill above times 16), beyond this "
                  "shared machine's time; on a GPU pass `--contexts 8k,32k,128k`."]
    lines += ["", "Context rows: one run each (no warm-up run); ms/token is the median over the decode rounds (a "
              "round that compiled is an outlier the median drops), prefill seconds exclude compilation. "
              "Peak MB is this process's peak RSS so far (cumulative over the run) on CPU, the device's peak "
              "bytes in use on an accelerator."]
    return "\n".join(lines) + "\n"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bench", help="'bench' (a small hybrid), or a packaged config / file")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--decode", default="1024:4096", help="PROMPT:OUTPUT tokens of the decode-heavy requests")
    parser.add_argument("--decode-rows", type=int, default=4, help="decode-heavy requests (served together)")
    parser.add_argument("--prefill", default="32x512:32", help="NxPROMPT:OUTPUT of the prefill-heavy workload")
    parser.add_argument("--prefill-slots", type=int, default=8)
    parser.add_argument("--contexts", default="1k,8k,32k")
    parser.add_argument("--context-new", type=int, default=128)
    parser.add_argument("--prefill-chunk", type=int, default=512)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--render", default=None, help="only rewrite workloads.md from this workloads.json")
    args = parser.parse_args()
    if args.render:
        with open(args.render) as f:
            table = markdown(json.load(f))
        with open(os.path.join(args.out, "workloads.md"), "w") as f:
            f.write(table)
        print(table)
        return
    prompt, new = args.decode.split(":")
    args.decode = (parse_length(prompt), parse_length(new))
    count, rest = args.prefill.split("x")
    prompt, new = rest.split(":")
    args.prefill = (int(count), parse_length(prompt), parse_length(new))
    args.contexts = [parse_length(c) for c in args.contexts.split(",")]

    hybrid = hybrid_config(args.config, args.dtype)
    attention = attention_only(hybrid)
    print(f"hybrid {hybrid.pattern}: {parameter_count(hybrid):,} parameters; attention-only {attention.pattern} "
          f"({attention.num_attention_heads} q heads): {parameter_count(attention):,} parameters", flush=True)
    load_before = load_average()
    models = [model_entry("hybrid", hybrid, args.prefill_chunk),
              model_entry("attention-only", attention, args.prefill_chunk)]
    run_workloads(models, args)
    results = {"device": f"{jax.devices()[0].platform} x{jax.device_count()}, {os.cpu_count()} CPU cores",
               "command": "python bench/workloads.py " + " ".join(sys.argv[1:]),
               "load_before": load_before, "load_after": load_average(),
               "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
               "context_new": args.context_new, "models": models,
               "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "workloads.json"), "w") as f:
        json.dump(results, f, indent=2, default=lambda o: dataclasses.asdict(o))
    table = markdown(results)
    with open(os.path.join(args.out, "workloads.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
