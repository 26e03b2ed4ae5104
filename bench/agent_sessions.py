"""Multi-turn agent sessions with and without the prefix cache, measured in one run (ratios, not
absolute claims: the machine is shared, its load is recorded with the numbers).

    python bench/agent_sessions.py [--quick] [--out bench/results]

Several sessions share a system prompt; each turn's prompt is the previous turn's prompt, the reply
generated to it and a new user message (the way an agent's history grows). Every turn of every
session is served by one continuous-batching scheduler (one slot per session), once with a prefix cache
and once without, on the same random hybrid model (greedy: the replies must be identical). Per turn:
prompt tokens, tokens prefilled, tokens restored from the cache, and the engine's prefill / decode time
(compilation excluded: a warm-up pass compiles every shape first; each turn's fastest of --repeats
interleaved repetitions). Writes agent_sessions.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess

import jax
import numpy as np

from nemojax.config import from_hf_config
from nemojax.generate import Engine, Request
from nemojax.generate.prefix_cache import PrefixCache
from nemojax.generate.scheduler import Scheduler, Ticket
from nemojax.model import NemotronH, init_variables

SHAPE = dict(vocab_size=4096, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             mamba_num_heads=8, mamba_head_dim=32, ssm_state_size=32, n_groups=2, chunk_size=64,
             intermediate_size=512, n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=128,
             moe_shared_expert_intermediate_size=256, moe_latent_size=128, n_group=1, topk_group=1,
             routed_scaling_factor=2.5, eos_token_id=2, max_position_embeddings=65536,
             hybrid_override_pattern="MEM*EMEM", compute_dtype="float32", param_dtype="float32")
BLOCK = 64
CACHE_BYTES = 2 * 10**9


def run_sessions(engine: Engine, sessions: int, turns: int, system: int, user: int, reply: int,
                 prefix: PrefixCache | None, seed: int = 0) -> list[dict]:
    """Serve the sessions turn by turn; per turn the summed counts and engine seconds of all sessions."""
    rng = np.random.default_rng(seed)
    vocab = engine.config.vocab_size
    shared = list(rng.integers(3, vocab, system))
    histories = [shared + list(rng.integers(3, vocab, user)) for _ in range(sessions)]
    max_len = system + turns * (user + reply) + reply
    scheduler = Scheduler(engine, sessions, max_len, segment_steps=16)
    scheduler.prefix = prefix
    rows = []
    for turn in range(turns):
        stats = engine.stats
        before = (stats.prefill_tokens, stats.cached_tokens, stats.prefill_seconds, stats.decode_seconds)
        tickets = [scheduler.submit(Ticket(Request(
            index=s, prompt_ids=tuple(int(t) for t in history), max_new_tokens=reply, temperature=0.0, top_k=0,
            top_p=1.0, min_p=0.0, seed=0, stop=(), ignore_eos=True, thinking_budget=None)))
            for s, history in enumerate(histories)]
        scheduler.run_until_idle()
        rows.append({"turn": turn + 1, "prompt_tokens": sum(len(h) for h in histories),
                     "prefilled": stats.prefill_tokens - before[0], "cached": stats.cached_tokens - before[1],
                     "prefill_s": stats.prefill_seconds - before[2], "decode_s": stats.decode_seconds - before[3],
                     "outputs": [t.output_ids for t in tickets]})
        histories = [h + t.output_ids + list(rng.integers(3, vocab, user)) for h, t in zip(histories, tickets,
                                                                                            strict=True)]
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per mode (each turn's fastest is kept)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args()
    sizes = dict(sessions=2, turns=4, system=256, user=64, reply=16) if args.quick else dict(
        sessions=2, turns=6, system=1024, user=128, reply=32)
    config = from_hf_config(SHAPE)
    variables = jax.jit(init_variables, static_argnums=0)(config, jax.random.key(0))
    engine = Engine(NemotronH(config), variables, eos_ids=(2,), prefill_chunk=256)
    load_before = _load()
    for prefix in (PrefixCache(CACHE_BYTES, BLOCK), None):  # warm-up: compile every shape both modes use
        run_sessions(engine, **sizes, prefix=prefix)
    runs: dict[str, list[list[dict]]] = {"cached": [], "fresh": []}
    for _ in range(args.repeats):  # interleaved, so that a burst of load hits both modes alike
        runs["cached"].append(run_sessions(engine, **sizes, prefix=PrefixCache(CACHE_BYTES, BLOCK)))
        runs["fresh"].append(run_sessions(engine, **sizes, prefix=None))
    cached, fresh = (best_per_turn(runs[mode]) for mode in ("cached", "fresh"))
    assert all([r["outputs"] for r in run] == [r["outputs"] for r in fresh] for run in runs["cached"]), \
        "the prefix cache changed a reply"
    table = []
    for c, f in zip(cached, fresh, strict=True):
        with_cache, without = c["prefill_s"] + c["decode_s"], f["prefill_s"] + f["decode_s"]
        table.append({"turn": c["turn"], "prompt_tokens": c["prompt_tokens"], "prefilled_with_cache": c["prefilled"],
                      "cached": c["cached"], "prefilled_without": f["prefilled"],
                      "prefill_seconds_with_cache": c["prefill_s"], "prefill_seconds_without": f["prefill_s"],
                      "seconds_with_cache": with_cache,
                      "seconds_without": without, "speed_up": without / with_cache})
    total_with = sum(r["seconds_with_cache"] for r in table)
    total_without = sum(r["seconds_without"] for r in table)
    result = {"device": f"{jax.devices()[0].platform} x{jax.device_count()}", "sizes": sizes, "block": BLOCK,
              "repeats": args.repeats,
              "load_before": load_before, "load_after": _load(), "turns": table,
              "total_seconds_with_cache": total_with, "total_seconds_without": total_without,
              "speed_up": total_without / total_with}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "agent_sessions.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(args.out, "agent_sessions.md"), "w") as f:
        f.write(markdown(result))
    print(markdown(result))


def best_per_turn(runs: list[list[dict]]) -> list[dict]:
    """Each turn's fastest repetition (the counts are the same in every one)."""
    return [min(turns, key=lambda r: r["prefill_s"] + r["decode_s"]) for turns in zip(*runs, strict=True)]


def markdown(result: dict) -> str:
    s = result["sizes"]
    lines = [f"# Agent sessions with and without the prefix cache ({result['device']})", "",
             f"{s['sessions']} sessions x {s['turns']} turns; shared system prompt {s['system']} tokens, each turn "
             f"adds the reply ({s['reply']} tokens, greedy) and a user message ({s['user']} tokens); pattern "
             f"{SHAPE['hybrid_override_pattern']}, hidden {SHAPE['hidden_size']}, float32, prefill chunk 256, "
             f"prefix blocks of {result['block']}. Engine seconds (prefill incl. cache copies + decode), compile "
             f"excluded, both modes in one run, each turn's fastest of {result['repeats']} interleaved repetitions; "
             "replies identical in both modes.", "",
             f"Machine load (`uptime`, shared by several jobs): before `{result['load_before']}`, after "
             f"`{result['load_after']}`.", "",
             "| turn | prompt tokens (all sessions) | prefilled with cache | restored | prefilled without | "
             "prefill s with cache | prefill s without | turn s with cache | turn s without | speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["turns"]:
        lines.append(f"| {r['turn']} | {r['prompt_tokens']} | {r['prefilled_with_cache']} | {r['cached']} | "
                     f"{r['prefilled_without']} | {r['prefill_seconds_with_cache']:.3f} | "
                     f"{r['prefill_seconds_without']:.3f} | {r['seconds_with_cache']:.3f} | "
                     f"{r['seconds_without']:.3f} | {r['speed_up']:.2f}x |")
    lines += ["", f"All turns: {result['total_seconds_with_cache']:.3f} s with the cache, "
              f"{result['total_seconds_without']:.3f} s without ({result['speed_up']:.2f}x). Turn 1 does the same "
              "work in both modes (no hit yet, plus the snapshot copies with the cache): its ratio shows the "
              "noise of the loaded machine.", ""]
    return "\n".join(lines)


def _load() -> str:
    out = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    return out.split("load average:")[-1].strip() if "load average:" in out else out


if __name__ == "__main__":
    main()
