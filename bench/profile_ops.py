"""Where a compiled program spends its time, by the model code each operation comes from.

    python bench/profile_ops.py [--quick] [--out bench/results]

Profiles a 4 x 512 prefill (through the decoding cache, as the engine runs it) and decoding steps at
batch 1 and 8 of the serving benchmark's model (bench/serve.py), with the XLA CPU profiler: each
executed HLO operation's time, labelled with the source it was traced from (the `op_name` metadata:
layer, module, jnp call) and summed into a few groups. The prefill's useful FLOP/s is set against a
large float32 matmul measured in the same run. Writes profile_ops.json and profile_ops.md.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import traffic  # noqa: E402

from nemojax.config import from_hf_config  # noqa: E402
from nemojax.generate.sampling import greedy_tokens  # noqa: E402
from nemojax.model import NemotronH, init_cache, init_variables  # noqa: E402
from serve import PATTERN, SHAPE  # noqa: E402

CONTAINERS = ("while", "call", "conditional")  # their time is the time of the operations they run


def op_sources(compiled_text: str) -> dict[str, str]:
    """HLO instruction name -> the source it came from: its op_name; without one (XLA's own matrix-vector
    dots), the variable it reads ("params/.../in_proj/kernel", followed into while-loop bodies through
    their argument tuples); else its opcode."""
    lines = []  # (computation, instruction, opcode, operands, op_name)
    computation = ""
    for line in compiled_text.splitlines():
        header = re.match(r"(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$", line)
        if header:
            computation = header.group(1)
            continue
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*? ([\w\-]+)\(([^)]*)\)(.*)", line)
        if m:
            name = re.search(r'op_name="([^"]*)"', line)
            lines.append((computation, m.group(1), m.group(2), m.group(3), m.group(4), name.group(1) if name else None))
    variables, tuples, bodies = {}, {}, {}
    for _, inst, opcode, operands, rest, name in lines:
        if name and name.startswith("variables"):
            variables[inst] = "/".join(re.findall(r"\\?'([^'\\]+)\\?'", name))
        if opcode == "tuple":
            tuples[inst] = re.findall(r"%([\w.\-]+)", operands)
        if opcode == "while":
            body = re.search(r"body=%([\w.\-]+)", rest)
            if body:
                bodies[body.group(1)] = re.findall(r"%([\w.\-]+)", operands)[0]
    for computation, inst, opcode, _operands, rest, _ in lines:  # loop bodies read variables through their tuple
        index = re.search(r"index=(\d+)", rest)
        if opcode == "get-tuple-element" and computation in bodies and index:
            carried = tuples.get(bodies[computation], [])
            if int(index.group(1)) < len(carried) and carried[int(index.group(1))] in variables:
                variables[inst] = variables[carried[int(index.group(1))]]
    sources = {}
    for _, inst, opcode, operands, _, name in lines:
        read = [variables[o] for o in re.findall(r"%([\w.\-]+)", operands) if o in variables]
        sources[inst] = name or (read[0] if read else opcode)
    return sources


def op_seconds(compiled, calls: list[tuple]) -> dict[str, float]:
    """Seconds per call of each executed HLO operation (containers excluded), from a profiler trace of
    one call per argument tuple in `calls` (fresh ones where the program donates its inputs)."""
    sources = op_sources(compiled.as_text())
    repeats = len(calls)
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            for args in calls:
                jax.block_until_ready(compiled(*args))
        trace = glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)[0]
        with gzip.open(trace) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    total: collections.Counter = collections.Counter()
    for e in events:
        name = e.get("name")
        if e.get("ph") == "X" and name in sources and not name.startswith(CONTAINERS):
            total[sources[name]] += e.get("dur", 0) * 1e-6 / repeats
    return dict(total)


GROUPS = [  # (group, pattern on the op source), first match wins
    ("attention", r"layers_3/"),
    ("routed experts", r"/experts/"),
    ("MoE router, latent, shared expert", r"layers_[146]/mixer/"),
    ("Mamba in/out projections", r"layers_[0257]/mixer/(in_proj|out_proj)/"),
    ("Mamba conv, SSD scan, gated norm", r"layers_[0257]/mixer/"),
    ("lm_head", r"lm_head"),
    ("greedy token", r"greedy_tokens|argmax|/reduce"),
]


def grouped(seconds: dict[str, float]) -> dict[str, float]:
    out: collections.Counter = collections.Counter()
    for source, s in seconds.items():
        out[next((g for g, pattern in GROUPS if re.search(pattern, source)), "norms, residuals, other")] += s
    return dict(out.most_common())


def model_and_variables():
    config = from_hf_config(dict(SHAPE, hybrid_override_pattern=PATTERN), compute_dtype="float32")
    model = NemotronH(config)
    return model, jax.jit(init_variables, static_argnums=0)(config, jax.random.key(0))


def prefill_program(model, variables, batch: int, prompt: int):
    cache = init_cache(model.config, batch, 2 * prompt)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, SHAPE["vocab_size"], (batch, prompt)), jnp.int32)

    def prefill(variables, cache, ids):
        hidden, layers = model.apply(variables, ids, jnp.ones(ids.shape, bool), cache["layers"], cache["index"],
                                     method=lambda m, *a: m.backbone(*a))
        return model.apply(variables, hidden[:, -1], method="logits"), layers

    args = (variables, cache, ids)
    return jax.jit(prefill).lower(*args).compile(), args


def decode_program(model, variables, batch: int, context: int, steps: int):
    """`steps` decoding steps in one loop with the caches carried (updated in place, as in the engine)."""
    cache = dict(init_cache(model.config, batch, 2 * context), index=jnp.int32(context))

    def decode(variables, cache, token):
        def step(_, carry):
            cache, token = carry
            logits, _, cache = model.apply(variables, token[:, None], cache=cache, method="forward")
            return cache, greedy_tokens(logits[:, 0])
        return jax.lax.fori_loop(0, steps, step, (cache, token))

    args = (variables, cache, jnp.arange(batch, dtype=jnp.int32) + 3)
    compiled = jax.jit(decode).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    return compiled, args


def median_seconds(compiled, args, repeats: int) -> float:
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - begin)
    return float(np.median(times))


def markdown(results: dict) -> str:
    p = results["prefill"]
    lines = [f"# Where the time goes ({results['device']})", "", f"Conditions: {results['conditions']}", "",
             f"Model: bench/serve.py's (pattern {PATTERN}, hidden 256, 32 experts top-4), float32. Times per call "
             "from the XLA CPU profiler, summed by the model code each operation comes from (profiling adds a "
             "little time per operation).", "",
             f"Prefill {p['batch']} x {p['prompt']} through the cache: {1e3 * p['seconds']:.1f} ms (median), "
             f"{p['useful_gflop']:.2f} useful GFLOP, {p['gflop_per_s']:.1f} GFLOP/s = "
             f"{p['fraction_of_peak']:.2f} of the float32 matmul peak measured in this run "
             f"({results['matmul_peak_gflop_per_s']:.1f} GFLOP/s, 2048^3).", ""]
    for name, part in (("Prefill", p), *((f"Decoding step, batch {d['batch']}", d) for d in results["decode"])):
        total = sum(part["groups"].values())
        lines += [f"## {name} (profiled total {1e3 * total:.2f} ms)", "", "| part | ms | share |", "|---|---|---|"]
        lines += [f"| {g} | {1e3 * s:.3f} | {s / total:.0%} |" for g, s in part["groups"].items()]
        lines += [""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    batch, prompt, context, steps, repeats = (2, 64, 64, 4, 2) if args.quick else (4, 512, 128, 32, 5)
    began, load = time.strftime("%Y-%m-%d %H:%M:%S"), os.getloadavg()
    peak = traffic.measured_matmul_peak()
    model, variables = model_and_variables()
    compiled, inputs = prefill_program(model, variables, batch, prompt)
    seconds = median_seconds(compiled, inputs, repeats)
    flops = traffic.prefill_flops(model.config, batch, prompt)
    results = {"device": f"{jax.devices()[0].platform}, {os.cpu_count()} CPU cores",
               "matmul_peak_gflop_per_s": peak / 1e9,
               "prefill": {"batch": batch, "prompt": prompt, "seconds": seconds, "useful_gflop": flops / 1e9,
                           "gflop_per_s": flops / seconds / 1e9, "fraction_of_peak": flops / seconds / peak,
                           "groups": grouped(op_seconds(compiled, [inputs] * repeats))},
               "decode": []}
    for rows in (1, 8):
        compiled, inputs = decode_program(model, variables, rows, context, steps)
        per_step = {g: s / steps for g, s in grouped(op_seconds(compiled, [inputs] * repeats)).items()}
        results["decode"].append({"batch": rows, "context": context, "groups": per_step})
    results["conditions"] = (f"run {began} to {time.strftime('%H:%M:%S')}, load average (1/5/15 min) "
                             f"{'/'.join(f'{x:.1f}' for x in load)} at the start (a shared machine)")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "profile_ops.json"), "w") as f:
        json.dump(results, f, indent=2)
    table = markdown(results)
    with open(os.path.join(args.out, "profile_ops.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
