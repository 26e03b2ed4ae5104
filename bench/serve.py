"""Serving speed on this machine, each comparison measured in one run (ratios, not absolute claims).

    python bench/serve.py [--quick] [--versus-only] [--out bench/results]

1. The machine, in the same run: float32 matmul peak (a large matmul) and read bandwidth (a large
   reduction), see bench/traffic.py.
2. nemojax vs the transformers reference on the same random checkpoint: a prefill of 4 x 512 tokens
   (time, useful FLOP/s and its fraction of the matmul peak; nemojax on one device and with the rows
   split over two devices; transformers with logits at the last position only, as its `generate` runs
   a prefill; a floor: the prefill's plain matrix products alone, in XLA and in torch), and greedy
   decoding of 128 new tokens after 64-token prompts at batch 1, 8 and 32 (tokens/s, and each decoding
   step against its bandwidth bound: the bytes it must move over the measured bandwidth). Medians of interleaved
   repeats; the greedy tokens of both are compared. A batch-scaling table with all batches' runs
   alternating, batches above 1 also with their rows split over two CPU devices (mesh data=2: each
   device decodes its own rows on its own thread; the process is started with two host devices).
3. Decode time per token against context length: the hybrid model vs an attention-only model of
   the same shape (every Mamba layer replaced by attention).
4. MTP speculative decoding: the hybrid model with an MTP block, briefly trained on counting
   sequences so that its drafts are often right; speed-up over plain decoding at the measured
   acceptance rate, for several draft lengths.
Writes serve.json and serve.md (with --versus-only: parts 1-2 only, to serve_versus.json / .md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

# Two host devices: the batch-scaling table also decodes with the rows split over both cores (mesh data=2);
# everything else runs on the first device, as in a one-device process.
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"),
                                                 "--xla_force_host_platform_device_count=2"]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import traffic  # noqa: E402

import nemojax  # noqa: E402
from nemojax.config import from_hf_config  # noqa: E402
from nemojax.generate import Engine, Request  # noqa: E402
from nemojax.generate.stats import stats_record  # noqa: E402
from nemojax.model import NemotronH, init_variables  # noqa: E402
from nemojax.sharding import make_mesh  # noqa: E402
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


def engine_run(engine: Engine, reqs: list[Request]) -> tuple[dict, list]:
    """One timed generate (the engine compiled its programs before): throughput and the completions."""
    engine.stats = type(engine.stats)()
    completions = engine.generate(reqs)
    s = engine.stats
    steps = s.generated_tokens - len(reqs)  # the first token of each row comes from prefill
    run = {"prefill_s": s.prefill_seconds, "decode_s": s.decode_seconds,
           "decode_tokens_per_s": steps / max(s.decode_seconds, 1e-9),
           "prefill_tokens_per_s": s.prefill_tokens / s.prefill_seconds,
           **({k: v for k, v in stats_record(s, engine.k).items() if k in ("acceptance_rate",
                                                                           "mean_accepted_length")})}
    return run, completions


def timed_engine_run(engine: Engine, reqs: list[Request], repeats: int = 3) -> dict:
    """Warm up (compile) once, then the median of `repeats` runs' prefill and decode throughput."""
    engine.generate(reqs)
    return _median_runs([engine_run(engine, reqs)[0] for _ in range(repeats)])


def _median_runs(runs: list[dict]) -> dict:
    return {k: float(np.median([r[k] for r in runs])) for k in runs[0]}


def _hf_seconds(fn, *args) -> float:
    import torch

    begin = time.perf_counter()
    with torch.no_grad():
        fn(*args)
    return time.perf_counter() - begin


class Reference:
    """The transformers model: prefill (one forward with a cache) and greedy generation, timed."""

    def __init__(self, model) -> None:
        self.model = model

    def prefill_s(self, ids: np.ndarray) -> float:
        """One forward with a cache and logits at the last position only, as `generate` runs its prefill."""
        import torch

        return _hf_seconds(lambda: self.model(input_ids=torch.as_tensor(ids), use_cache=True, logits_to_keep=1))

    def generate(self, ids: np.ndarray, new: int) -> tuple[float, np.ndarray]:
        import torch

        begin = time.perf_counter()
        with torch.no_grad():
            # No end-of-sequence id: every row runs `new` tokens, as the engine's ignore_eos rows do (min_new_tokens
            # would instead forbid the id, and the runs differ from the first step where it is the argmax).
            out = self.model.generate(torch.as_tensor(ids), max_new_tokens=new, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)
        return time.perf_counter() - begin, out[:, ids.shape[1]:].numpy()

    def decode_tokens_per_s(self, ids: np.ndarray, new: int) -> tuple[float, np.ndarray]:
        """Decoding throughput: generate(new) - generate(1) removes the prefill and the first token."""
        seconds, out = self.generate(ids, new)
        first, _ = self.generate(ids, 1)
        return ids.shape[0] * (new - 1) / (seconds - first), out


def versus_transformers(sizes: dict, machine: dict) -> dict:
    import torch
    from hf_reference import make_checkpoint

    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as directory:
        reference = make_checkpoint(directory, PATTERN, seed=0, time_step_min=1e-6,
                                    **{k: v for k, v in SHAPE.items() if k != "max_position_embeddings"})
        model, variables = nemojax.load_pretrained(directory, dtype="float32", param_dtype="float32")
    hf = Reference(reference)
    decoders = {(batch, 1): decoding_engine(model, variables, batch, sizes) for batch in sizes["decode_batches"]}
    decode = [decode_versus(model, variables, hf, *decoders[batch, 1], sizes, machine)
              for batch in sizes["decode_batches"]]
    split = make_mesh(data=2, devices=jax.devices()[:2])
    decoders |= {(batch, 2): decoding_engine(model, variables, batch, sizes, split)
                 for batch in sizes["decode_batches"] if batch > 1}
    bounds = {row["batch"]: row["bandwidth_bound_step_s"] for row in decode}
    return {"prefill": prefill_versus(model, variables, hf, sizes, machine, split), "decode": decode,
            "batch_scaling": batch_scaling(decoders, bounds, sizes["repeats"])}


def decoding_engine(model, variables, batch: int, sizes: dict, mesh=None) -> tuple[np.ndarray, Engine, list[Request]]:
    """(prompt ids, an engine with its programs compiled, the requests) for the decoding comparisons; with
    `mesh` (data=2) the rows decode split over two devices (each device loops over its own rows)."""
    ids = np.random.default_rng(batch).integers(3, SHAPE["vocab_size"], (batch, sizes["decode_prompt"]))
    engine = Engine(model, variables, eos_ids=(2,), prefill_chunk=256, mesh=mesh)
    reqs = requests(ids, sizes["decode_new"])
    engine.generate(reqs)
    return ids, engine, reqs


def batch_scaling(decoders: dict, bounds: dict, repeats: int) -> list[dict]:
    """Decode tokens/s per (batch, devices) with all runs alternating (1, 8, 32, 8 on 2 devices, 32 on 2, 1, ...)
    and nothing else in between, so that every row sees the same machine: the batch-scaling measurement (the
    decode table's rows are measured one batch after another, each alternating with transformers). Also each
    row's step against the batch's bandwidth-bound step (`bounds`, from the decode table)."""
    rates = {key: [] for key in decoders}
    for _ in range(repeats):
        for key, (_, engine, reqs) in decoders.items():
            rates[key].append(engine_run(engine, reqs)[0]["decode_tokens_per_s"])
    first = float(np.median(next(iter(rates.values()))))
    rows = []
    for (batch, devices), runs in rates.items():
        rate = float(np.median(runs))
        rows.append({"batch": batch, "devices": devices, "tokens_per_s": rate, "runs": runs,
                     "relative_to_first": rate / first, "bandwidth_bound_fraction": bounds[batch] * rate / batch})
    return rows


def prefill_versus(model, variables, hf: Reference, sizes: dict, machine: dict, split) -> dict:
    """One engine on one device, one with the rows over two devices (`split`, data=2: each prefills its own
    rows), and transformers, their runs interleaved so that all see the same load."""
    batch, prompt, repeats = sizes["prefill_batch"], sizes["prefill_prompt"], sizes["repeats"]
    ids = np.random.default_rng(0).integers(3, SHAPE["vocab_size"], (batch, prompt))
    engines = {"nemojax": Engine(model, variables, eos_ids=(2,), prefill_chunk=prompt),
               "nemojax, 2 devices": Engine(model, variables, eos_ids=(2,), prefill_chunk=prompt, mesh=split)}
    reqs = requests(ids, 1)
    for engine in engines.values():
        engine.generate(reqs)
    hf.prefill_s(ids)
    times = {name: [] for name in (*engines, "transformers")}
    shapes = traffic.prefill_matmul_shapes(model.config, batch, prompt)
    xla_matmuls, xla_operands, matmul_flops = traffic.matmuls_alone(shapes)
    torch_matmuls = torch_matmuls_alone(shapes)
    floors = {"matmuls alone, XLA": lambda: _seconds(xla_matmuls, *xla_operands), "matmuls alone, torch": torch_matmuls}
    for floor in floors.values():
        floor()
    floor_times = {name: [] for name in floors}
    for _ in range(repeats):
        for name, engine in engines.items():
            times[name].append(engine_run(engine, reqs)[0]["prefill_s"])
        times["transformers"].append(hf.prefill_s(ids))
        for name, floor in floors.items():
            floor_times[name].append(floor())
    flops = traffic.prefill_flops(model.config, batch, prompt)
    hf_s = float(np.median(times["transformers"]))
    row = {"batch": batch, "prompt": prompt, "useful_gflop": flops / 1e9, "matmul_gflop": matmul_flops / 1e9,
           "floors": {name: {"seconds": float(np.median(runs)), "of_transformers": float(np.median(runs)) / hf_s}
                      for name, runs in floor_times.items()}}
    for name, runs in times.items():
        seconds = float(np.median(runs))
        row[name] = {"seconds": seconds, "tokens_per_s": batch * prompt / seconds, "gflop_per_s": flops / seconds / 1e9,
                     "fraction_of_peak": flops / seconds / machine["matmul_peak_flop_per_s"],
                     "speedup": hf_s / seconds}
    return row


def _seconds(program, *args) -> float:
    begin = time.perf_counter()
    jax.block_until_ready(program(*args))
    return time.perf_counter() - begin


def torch_matmuls_alone(shapes: list[tuple[int, int, int]]):
    """A timer of the products `shapes` on random float32 operands, as torch runs them (what transformers' matmuls
    cost on this machine)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    operands = [(torch.randn(m, k, generator=generator), torch.randn(k, n, generator=generator)) for m, k, n in shapes]
    return lambda: _hf_seconds(lambda: [torch.sum(a @ w) for a, w in operands])


def decode_versus(model, variables, hf: Reference, ids: np.ndarray, engine: Engine, reqs: list[Request],
                  sizes: dict, machine: dict) -> dict:
    batch = ids.shape[0]
    prompt, new, repeats = sizes["decode_prompt"], sizes["decode_new"], sizes["repeats"]
    hf.generate(ids, new), hf.generate(ids, 1)  # warm-up: the first calls of each length are much slower
    ours, theirs = [], []
    for _ in range(repeats):
        run, completions = engine_run(engine, reqs)
        ours.append(run["decode_tokens_per_s"])
        tokens_per_s, hf_out = hf.decode_tokens_per_s(ids, new)
        theirs.append(tokens_per_s)
    out = np.asarray([c.output_ids for c in completions])
    sequences = np.concatenate([ids, out], axis=1)
    distinct = traffic.distinct_experts(model, variables, sequences, range(prompt, prompt + new - 1))
    distinct_mean = [float(np.mean(layer)) for layer in distinct]
    context = prompt + (new - 1) / 2  # mean cached tokens over the decoding steps
    moved = traffic.decode_step_bytes(model.config, batch, context, distinct_mean)
    bound_s = moved["total"] / machine["bandwidth_bytes_per_s"]
    compute_s = traffic.decode_step_flops(model.config, batch, context) / machine["matmul_peak_flop_per_s"]
    row = {"batch": batch, "prompt": prompt, "new_tokens": new, "distinct_experts_per_moe_layer": distinct_mean,
           "step_bytes": moved, "bandwidth_bound_step_s": bound_s, "compute_bound_step_s": compute_s,
           "greedy_tokens_equal": bool(np.array_equal(out, hf_out))}
    for name, rates in (("nemojax", ours), ("transformers", theirs)):
        rate = float(np.median(rates))
        step_s = batch / rate
        row[name] = {"tokens_per_s": rate, "step_s": step_s, "bandwidth_bound_fraction": bound_s / step_s}
    row["speedup"] = row["nemojax"]["tokens_per_s"] / row["transformers"]["tokens_per_s"]
    return row


def measure_machine() -> dict:
    return {"matmul_peak_flop_per_s": traffic.measured_matmul_peak(),
            "bandwidth_bytes_per_s": traffic.measured_bandwidth(), "load_average": os.getloadavg()}


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
    m, v = results["machine"], results["versus_transformers"]
    p = v["prefill"]
    lines = [f"# Serving benchmark ({results['device']})", "",
             f"Conditions: {results['conditions']}", "",
             f"Machine, measured in this run: float32 matmul peak {m['matmul_peak_flop_per_s'] / 1e9:.1f} GFLOP/s "
             f"(2048^3, best of 5), read bandwidth {m['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s "
             "(512 MB sum, best of 5).", "",
             f"## nemojax vs transformers (pattern {PATTERN}, hidden 256, 32 experts top-4, float32, same checkpoint)",
             "", f"Prefill {p['batch']} x {p['prompt']} tokens ({p['useful_gflop']:.2f} useful GFLOP), median of "
             f"{results['sizes']['repeats']} interleaved runs:", "",
             "| | seconds | tokens/s | GFLOP/s | fraction of matmul peak | speed-up over transformers |",
             "|---|---|---|---|---|---|"]
    for name in ("nemojax", "nemojax, 2 devices", "transformers"):
        r = p[name]
        lines.append(f"| {name} | {r['seconds']:.3f} | {r['tokens_per_s']:.0f} | {r['gflop_per_s']:.1f} | "
                     f"{r['fraction_of_peak']:.2f} | {r['speedup']:.2f}x |")
    xla, torch_floor = p["floors"]["matmuls alone, XLA"], p["floors"]["matmuls alone, torch"]
    lines += ["", f"Floor, same runs: the prefill's plain matrix products alone ({p['matmul_gflop']:.2f} GFLOP: every "
              "Linear over all tokens, each routed-expert projection as one product over the top-k copies, no "
              f"conv, scan, attention or anything else; bench/traffic.py) take {1e3 * xla['seconds']:.1f} ms in one "
              f"XLA program ({xla['of_transformers']:.2f} of transformers' prefill time) and "
              f"{1e3 * torch_floor['seconds']:.1f} ms in torch ({torch_floor['of_transformers']:.2f}).", "",
              f"Greedy decoding, {v['decode'][0]['prompt']}-token prompts, {v['decode'][0]['new_tokens']} new tokens "
              f"(bound: the bytes a step must move over the read bandwidth; bench/traffic.py):", "",
              "| batch | nemojax tokens/s | transformers tokens/s | speed-up | nemojax ms/step "
              "| bandwidth-bound ms/step | fraction of bound | step MB | distinct experts/layer | tokens equal |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in v["decode"]:
        lines.append(f"| {r['batch']} | {r['nemojax']['tokens_per_s']:.0f} | {r['transformers']['tokens_per_s']:.0f} | "
                     f"{r['speedup']:.1f}x | {1e3 * r['nemojax']['step_s']:.3f} | "
                     f"{1e3 * r['bandwidth_bound_step_s']:.3f} | "
                     f"{r['nemojax']['bandwidth_bound_fraction']:.2f} | {r['step_bytes']['total'] / 1e6:.1f} | "
                     f"{np.mean(r['distinct_experts_per_moe_layer']):.1f} | {r['greedy_tokens_equal']} |")
    scaling = v["batch_scaling"]
    lines += ["", f"Batch scaling (nemojax alone, all rows' runs alternating, median of {len(scaling[0]['runs'])}; "
              "2 devices: the rows split over two CPU devices, mesh data=2, each decoding its own rows on its own "
              "thread):", "", f"| batch | devices | decode tokens/s | relative to batch {scaling[0]['batch']} | "
              "fraction of bandwidth bound | runs (tokens/s) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['devices']} | {r['tokens_per_s']:.0f} | {r['relative_to_first']:.2f}x | "
              f"{r['bandwidth_bound_fraction']:.2f} | {', '.join(f'{x:.0f}' for x in r['runs'])} |" for r in scaling]
    if "context_scaling" not in results:
        return "\n".join(lines) + "\n"
    lines += ["", "## Decode time per token vs context (batch 1)", "",
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
    parser.add_argument("--versus-only", action="store_true", help="only the machine and the transformers comparison")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats per comparison")
    parser.add_argument("--decode-new", type=int, default=None, help="new tokens per decoding comparison")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    sizes = dict(prefill_batch=4, prefill_prompt=512, decode_batches=[1, 8, 32], decode_prompt=64, decode_new=128,
                 repeats=5, contexts=[512, 2048, 8192], train_steps=150, spec_batches=[1, 4], drafts=[1, 2, 3])
    if args.quick:
        sizes = dict(prefill_batch=2, prefill_prompt=64, decode_batches=[1, 8], decode_prompt=16, decode_new=8,
                     repeats=2, contexts=[128, 512], train_steps=20, spec_batches=[1], drafts=[2])
    if args.repeats:
        sizes["repeats"] = args.repeats
    if args.decode_new:
        sizes["decode_new"] = args.decode_new
    began = time.strftime("%Y-%m-%d %H:%M:%S")
    machine = measure_machine()
    results = {"device": f"{jax.devices()[0].platform} x{jax.device_count()}, {os.cpu_count()} CPU cores, "
                         f"jax {jax.__version__}",
               "sizes": sizes, "machine": machine,
               "versus_transformers": versus_transformers(sizes, machine)}
    if not args.versus_only:
        results["context_scaling"] = context_scaling(sizes["contexts"], 32)
        results["speculation"] = speculation(sizes["train_steps"], sizes["spec_batches"], sizes["drafts"], 64)
    results["conditions"] = (f"run {began} to {time.strftime('%H:%M:%S')}, load average (1/5/15 min) "
                             f"{'/'.join(f'{x:.1f}' for x in machine['load_average'])} at the start and "
                             f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())} at the end (a shared machine)")
    os.makedirs(args.out, exist_ok=True)
    name = "serve_versus" if args.versus_only else "serve"
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=2, default=lambda o: dataclasses.asdict(o))
    table = markdown(results)
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
