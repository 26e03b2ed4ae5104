"""The OpenAI-compatible server under concurrent clients: continuous vs static batching, in one run.

    python bench/server.py [--clients 16] [--requests 64] [--slots 8] [--max-seconds 600] [--out bench/results]

The tiny model (nemojax/configs/tiny.py, random weights) is served in this process on a loopback port;
`--clients` asyncio clients (the official `openai` client) each send requests one after another until
`--requests` have been sent in all (or `--max-seconds` have passed). Outputs are mixed: most requests
ask for a short completion, every fourth for a long one (`ignore_eos`, so the lengths are exact).
Compared: the continuous-batching scheduler, and a static-batching policy on the same engine and slots
(a batch is admitted only when every slot is free, so it runs until its longest request ends). Reports
throughput (generated tokens/s, requests/s) and request latency p50/p99 (short and long requests apart).
A warm-up pass of the same workload for each policy compiles the programs before the timed passes (the
compilation that still happened while timing is reported). Writes server.json and server.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import threading
import time

import jax
import numpy as np
import openai
import uvicorn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nemojax.config.files import resolve_model_config  # noqa: E402
from nemojax.generate import Defaults, Engine  # noqa: E402
from nemojax.generate.requests import Encoder  # noqa: E402
from nemojax.generate.scheduler import Scheduler  # noqa: E402
from nemojax.model import NemotronH, init_variables  # noqa: E402
from nemojax.server.app import create_app  # noqa: E402
from nemojax.server.service import GenerationService  # noqa: E402

SHORT, LONG, PROMPT = 16, 192, 32


class StaticScheduler(Scheduler):
    """Static batching: waiting requests are admitted only when no slot is busy."""

    def _admit(self) -> None:
        if self.running == 0:
            super()._admit()


def serve(engine: Engine, slots: int, static: bool) -> tuple[str, GenerationService, uvicorn.Server]:
    # A cache that never grows: the warm-up compiles every program the timed run needs.
    scheduler = (StaticScheduler if static else Scheduler)(engine, slots, max_len=PROMPT + LONG, segment_steps=8,
                                                          min_length=PROMPT + LONG + 1)
    service = GenerationService(engine, slots, PROMPT + LONG, max_waiting=1024, scheduler=scheduler)
    app = create_app(service, Encoder(None, None), None, Defaults(), "tiny")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    service.start()
    while not server.started:
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}/v1", service, server


async def clients(base: str, count: int, total: int, max_seconds: float, vocab: int) -> list[dict]:
    """`count` clients sending `total` requests between them; one record per finished request."""
    client = openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0, timeout=max_seconds)
    rng = np.random.default_rng(0)
    plan = [(rng.integers(3, vocab, PROMPT).tolist(), LONG if i % 4 == 0 else SHORT) for i in range(total)]
    records: list[dict] = []
    deadline = time.perf_counter() + max_seconds

    async def one_client() -> None:
        while plan and time.perf_counter() < deadline:
            prompt, max_tokens = plan.pop(0)
            begin = time.perf_counter()
            out = await client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens,
                                                  temperature=0.0, extra_body={"ignore_eos": True})
            records.append({"max_tokens": max_tokens, "tokens": out.usage.completion_tokens,
                            "seconds": time.perf_counter() - begin})

    await asyncio.gather(*(one_client() for _ in range(count)))
    await client.close()
    return records


def summarize(records: list[dict], seconds: float) -> dict:
    def percentiles(values: list[float]) -> dict:
        return {"p50_s": float(np.percentile(values, 50)), "p99_s": float(np.percentile(values, 99))} if values \
            else {}

    return {
        "requests": len(records), "seconds": seconds, "generated_tokens": sum(r["tokens"] for r in records),
        "tokens_per_second": sum(r["tokens"] for r in records) / seconds, "requests_per_second": len(records) / seconds,
        "latency": percentiles([r["seconds"] for r in records]),
        "latency_short": percentiles([r["seconds"] for r in records if r["max_tokens"] == SHORT]),
        "latency_long": percentiles([r["seconds"] for r in records if r["max_tokens"] == LONG]),
    }


def timed(engine: Engine, base: str, args: argparse.Namespace) -> dict:
    """One timed pass; `compile_seconds` is compilation that happened during it (0 after a good warm-up)."""
    compiled = engine.stats.compile_seconds
    begin = time.perf_counter()
    records = asyncio.run(clients(base, args.clients, args.requests, args.max_seconds, engine.config.vocab_size))
    result = summarize(records, time.perf_counter() - begin)
    result["compile_seconds"] = engine.stats.compile_seconds - compiled
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=600)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    config = resolve_model_config("tiny")
    engine = Engine(NemotronH(config), init_variables(config, jax.random.key(0)), eos_ids=(2,), prefill_chunk=64)
    servers = {policy: serve(engine, args.slots, static=policy == "static") for policy in ("continuous", "static")}
    for base, _, _ in servers.values():  # warm-up: the timed workload once, so that its programs are compiled
        timed(engine, base, args)
    results = {policy: timed(engine, base, args) for policy, (base, _, _) in servers.items()}
    for _, service, server in servers.values():
        server.should_exit = True
        service.stop()
    report = {"model": "tiny (nemojax/configs/tiny.py, random weights)", "clients": args.clients,
              "requests": args.requests, "slots": args.slots, "prompt_tokens": PROMPT,
              "outputs": f"{SHORT} tokens, every fourth request {LONG}", "device": jax.devices()[0].device_kind,
              "results": results,
              "speedup_tokens_per_second": results["continuous"]["tokens_per_second"]
              / results["static"]["tokens_per_second"]}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "server.json"), "w") as f:
        json.dump(report, f, indent=2)
    rows = ["| batching | requests | tokens/s | requests/s | p50 / p99 latency (s) | short p50 / p99 | "
            "long p50 / p99 | compiling while timed (s) |", "|---|---|---|---|---|---|---|---|"]
    for policy, r in results.items():
        def pair(d: dict) -> str:
            return f"{d['p50_s']:.2f} / {d['p99_s']:.2f}" if d else "-"
        rows.append(f"| {policy} | {r['requests']} | {r['tokens_per_second']:.0f} | {r['requests_per_second']:.2f} | "
                    f"{pair(r['latency'])} | {pair(r['latency_short'])} | {pair(r['latency_long'])} | "
                    f"{r['compile_seconds']:.1f} |")
    text = (f"# Server: continuous vs static batching\n\n`python bench/server.py --clients {args.clients} "
            f"--requests {args.requests} --slots {args.slots}` on {report['device']}: {report['model']}, "
            f"{PROMPT}-token prompts, outputs of {report['outputs']}, {args.clients} concurrent clients "
            f"(official openai client, loopback), {args.slots} decode slots.\n\n" + "\n".join(rows)
            + f"\n\nContinuous / static throughput: {report['speedup_tokens_per_second']:.2f}x.\n")
    with open(os.path.join(args.out, "server.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
