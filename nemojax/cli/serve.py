"""Serve a checkpoint: an OpenAI-compatible HTTP server, or completions for a file of prompts.

    python serve.py --checkpoint PATH [--host 127.0.0.1] [--port 8000] [--max-model-len N] [--max-waiting N]
        [--served-model-name NAME] [settings below]
    python serve.py --checkpoint PATH --prompts IN.jsonl --output OUT.jsonl [--resume] [--max-new-tokens N]
        [--temperature T] [--top-k K] [--top-p P] [--min-p P] [--seed S] [--stop STR ...] [--ignore-eos]
        [--batch-size B] [--speculative mtp --num-draft-tokens K] [--reasoning on|off|medium|low]
        [--thinking-budget N] [--stats STATS.json] [--mesh data=..,fsdp=..,tensor=..,expert=..] [--cpu-devices N]
        [--prefix-cache-gb GB | --no-prefix-cache] [--prefix-block N]
        [--kv-cache-dtype fp8|bf16|fp32] [--context-parallel]

Without --prompts, the server answers GET /v1/models, POST /v1/completions, POST /v1/chat/completions
(streamed as server-sent events with "stream": true), GET /health and GET /metrics until interrupted;
the command-line settings are the defaults of every request. Both modes run the same continuous-batching
scheduler over --batch-size decode slots, and the same prefix cache (on by default, --prefix-cache-gb
of device memory): a prompt that starts with an earlier prompt's whole --prefix-block blocks restores
their attention KV entries and Mamba states instead of prefilling them (`cached_tokens` in the stats
and in the server's usage).

PATH is a Hugging Face directory (published layout), a nemojax model directory, or a train.py
workdir (latest checkpoint that restores, and its tokenizer). Input lines (split on "\n" only): {"prompt": ...},
{"messages": [...]} or {"input_ids": [...]}, each optionally overriding max_new_tokens, temperature,
top_k, top_p, min_p, seed, stop, ignore_eos, reasoning, thinking_budget (any other field is an error).
Output: exactly one line per input line, in order: {"output_ids", "text", "finish_reason"}, or
{"error": "line N: ..."} for a line that cannot be served (blank lines included).

Records are written in input order as soon as a line and those before it are answered, to
OUT.jsonl.partial, which is moved to OUT.jsonl at the end; after an interruption (Ctrl-C, a kill, a
full disk) rerun the same command with --resume to serve only the lines not yet answered. Bad flags, an
unreadable checkpoint or prompt file, or an output path that cannot be written exit with status 2
before any work.

`--mesh` shards the model and the caches over the devices (sizes multiply to the device count, one
may be -1 for the rest; the default fsdp=-1 uses every device of every process). On a machine without
accelerators, `--cpu-devices N` runs N host devices (threads) and the default mesh becomes data=N: each
device decodes its own --batch-size/N rows on its own core, no communication between them. Several hosts: start
one process per host with the same arguments plus `--coordinator-address/--num-processes/--process-id`
(or let a cluster such as SLURM be detected); process 0 writes the output.

`--kv-cache-dtype` stores the attention layers' keys and values in FP8 (E4M3, with the checkpoint's
per-tensor k_scale / v_scale when it has them, else scale 1), bfloat16 or float32 (default: the compute
dtype); FP8 halves the KV cache of bfloat16 (accuracy cost: docs/long_context.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

from nemojax.cli.common import float_in, int_in, report_errors

MAX_DRAFT_TOKENS = 16
KV_CACHE_CHOICES = ("fp8", "bf16", "fp32")  # the keys of nemojax.config.KV_CACHE_DTYPES (checked by a test)
DEFAULT_PREFIX_CACHE_GB = 2.0
BATCH_SEGMENT_STEPS = 32  # each round costs a dispatch and a read-back: longer rounds when nothing streams
SERVER_SEGMENT_STEPS = 8


def parse_args(argv: list[str]) -> argparse.Namespace:
    from nemojax.chat import REASONING_MODES
    from nemojax.distributed import add_distributed_flags

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompts", default=None, help="JSONL file of prompts (without it: run the HTTP server)")
    p.add_argument("--output", default=None, help="JSONL file of completions (one line per prompt line)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run: keep the records in OUTPUT.partial (or OUTPUT) and serve "
                        "the lines after them")
    p.add_argument("--max-new-tokens", type=int_in(1), default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int_in(0), default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", nargs="+", default=[], metavar="STR", help="stop strings (need a tokenizer)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence ids")
    p.add_argument("--batch-size", type=int_in(1), default=8, help="decode slots (requests generated together)")
    p.add_argument("--segment-steps", type=int_in(1, 1024), default=None,
                   help="decoding steps between scheduling rounds (new requests enter, finished ones leave; a "
                        "round also ends when a row finishes while requests wait). Default: "
                        f"{BATCH_SEGMENT_STEPS} for batch generation, {SERVER_SEGMENT_STEPS} for the server (its "
                        "streams receive tokens per round)")
    p.add_argument("--host", default="127.0.0.1", help="server: address to listen on")
    p.add_argument("--port", type=int_in(0, 65535), default=8000, help="server: port")
    p.add_argument("--max-model-len", type=int_in(2), default=None,
                   help="server: prompt + completion tokens per request (default: the model's context)")
    p.add_argument("--max-waiting", type=int_in(1), default=64,
                   help="server: requests that may wait for a slot; beyond them the server answers 429")
    p.add_argument("--served-model-name", default=None, help="server: the model id (default: the checkpoint's name)")
    p.add_argument("--prefill-chunk", type=int_in(1), default=256, help="prompt tokens per prefill step")
    p.add_argument("--prefix-cache-gb", type=float_in(0, 1e6), default=DEFAULT_PREFIX_CACHE_GB,
                   help="device memory (GB, 1e9 bytes) for the prefix cache: prompts that start with an earlier "
                        "prompt's whole blocks restore them instead of prefilling them (0 = off)")
    p.add_argument("--no-prefix-cache", action="store_true", help="turn the prefix cache off")
    p.add_argument("--prefix-block", type=int_in(1, 1 << 20), default=64, help="tokens per prefix-cache block")
    p.add_argument("--speculative", choices=["mtp"], default=None)
    p.add_argument("--num-draft-tokens", type=int_in(1, MAX_DRAFT_TOKENS), default=3)
    p.add_argument("--reasoning", choices=REASONING_MODES, default="on")
    p.add_argument("--thinking-budget", type=int_in(0), default=None, help="force </think> after N thinking tokens")
    p.add_argument("--dtype", default=None, help="compute dtype (default: the checkpoint's)")
    p.add_argument("--kv-cache-dtype", default=None, choices=KV_CACHE_CHOICES,
                   help="K/V storage of the attention caches (default: the compute dtype)")
    p.add_argument("--context-parallel", action="store_true",
                   help="shard the KV caches along the sequence over the mesh axes the batch leaves unused")
    p.add_argument("--stats", default=None, help="write throughput statistics (JSON) here")
    p.add_argument("--mesh", default=None,
                   help="device mesh, e.g. tensor=4,expert=2; -1 takes the remaining devices (default: fsdp=-1, "
                        "with --cpu-devices N data=N)")
    p.add_argument("--cpu-devices", type=int_in(1, 256), default=1,
                   help="a machine without accelerators as N host devices, one thread each: with the default mesh "
                        "data=N each decodes its own --batch-size/N rows on its own core (N: the cores to use)")
    p.add_argument("--no-progress", action="store_true")
    add_distributed_flags(p)
    args = p.parse_args(argv)
    if args.segment_steps is None:
        args.segment_steps = SERVER_SEGMENT_STEPS if args.prompts is None else BATCH_SEGMENT_STEPS
    if args.mesh is None:
        args.mesh = f"data={args.cpu_devices}" if args.cpu_devices > 1 else "fsdp=-1"
    return args


def use_cpu_devices(args: argparse.Namespace) -> None:
    """Start JAX's CPU backend with --cpu-devices host devices (before anything touches a device). In a process
    whose JAX has already started (a program embedding the CLI), it must have exactly that many."""
    from nemojax.errors import ConfigError

    count = args.cpu_devices
    if args.batch_size % count:
        raise ConfigError(f"--batch-size {args.batch_size} must be a multiple of --cpu-devices {count} "
                          "(each device decodes an equal share of the rows)")
    if count == 1:
        return
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # the backend has started: usable when it has exactly that many
        if len(jax.devices("cpu")) != count:
            raise ConfigError(f"--cpu-devices {count}: JAX has already started in this process with "
                              f"{len(jax.devices('cpu'))} CPU devices") from None


def check_cpu_devices(args: argparse.Namespace) -> None:
    """--cpu-devices is for machines that compute on their CPU (after the backend has started)."""
    import jax

    from nemojax.errors import ConfigError

    if args.cpu_devices > 1 and jax.default_backend() != "cpu":
        raise ConfigError(f"--cpu-devices {args.cpu_devices} is for machines without accelerators; this one "
                          f"computes on {jax.default_backend()} (use --mesh over its devices)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.prompts is None:
        return report_errors(lambda: serve_http(args))
    if args.output is None:
        print("error: --output is required with --prompts", file=sys.stderr)
        return 2
    try:
        return report_errors(lambda: run(args))
    except KeyboardInterrupt:
        partial = args.output + ".partial"
        kept = f": the finished records are kept in {partial}; rerun with --resume" if os.path.exists(partial) else ""
        print(f"interrupted{kept}", file=sys.stderr)
        return 130


def serve_http(args: argparse.Namespace) -> int:
    """The HTTP server (nemojax.server), with the command-line settings as request defaults."""
    from nemojax.config import FLOAT_DTYPES, dtype_name
    from nemojax.errors import CheckpointError, ConfigError
    from nemojax.generate.requests import check_settings
    from nemojax.server.main import run_server

    check_settings(dataclasses.asdict(defaults_of(args)), ConfigError, lambda field: "--" + field.replace("_", "-"))
    if args.dtype is not None and dtype_name(args.dtype) not in FLOAT_DTYPES:
        raise ConfigError(f"--dtype {args.dtype}: expected one of {FLOAT_DTYPES}")
    if not os.path.isdir(args.checkpoint):
        raise CheckpointError(f"--checkpoint {args.checkpoint}: no such checkpoint directory")
    use_cpu_devices(args)
    check_cpu_devices(args)
    return run_server(args, defaults_of(args), engine_options(args))


def check_inputs(args: argparse.Namespace) -> int | None:
    """Everything about the flags and files that can be checked before loading anything; returns the
    number of lines in the prompts file (None for a pipe)."""
    from nemojax.config import FLOAT_DTYPES, dtype_name
    from nemojax.errors import CheckpointError, ConfigError
    from nemojax.generate.jsonl import check_writable, count_lines
    from nemojax.generate.loading import tokenizer_dir
    from nemojax.generate.requests import check_settings

    check_settings(dataclasses.asdict(defaults_of(args)), ConfigError, lambda field: "--" + field.replace("_", "-"))
    if args.dtype is not None and dtype_name(args.dtype) not in FLOAT_DTYPES:
        raise ConfigError(f"--dtype {args.dtype}: expected one of {FLOAT_DTYPES}")
    if not os.path.isdir(args.checkpoint):
        raise CheckpointError(f"--checkpoint {args.checkpoint}: no such checkpoint directory")
    if args.stop and tokenizer_dir(args.checkpoint) is None:
        raise ConfigError(f"--stop needs a tokenizer and {args.checkpoint} has none (no tokenizer.json)")
    lines = count_lines(args.prompts)
    if os.path.realpath(args.output) == os.path.realpath(args.prompts):
        raise ConfigError(f"--output {args.output} is the prompts file; give another path")
    if args.stats is not None:
        check_writable(args.stats, "--stats")
        if os.path.realpath(args.stats) == os.path.realpath(args.output):
            raise ConfigError("--stats and --output name the same file")
    return lines


def defaults_of(args: argparse.Namespace):
    from nemojax.generate import Defaults

    return Defaults(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, min_p=args.min_p, seed=args.seed, stop=tuple(args.stop),
                    ignore_eos=args.ignore_eos, thinking_budget=args.thinking_budget, reasoning=args.reasoning)


def engine_options(args: argparse.Namespace) -> dict:
    """The Engine settings both modes take from the flags (besides the model)."""
    return dict(prefill_chunk=args.prefill_chunk, num_draft_tokens=args.num_draft_tokens if args.speculative else 0,
                prefix_cache_bytes=0 if args.no_prefix_cache else int(args.prefix_cache_gb * 1e9),
                prefix_block_size=args.prefix_block, context_parallel=args.context_parallel)


def run(args: argparse.Namespace) -> int:
    import jax

    from nemojax.distributed import agree, initialize
    from nemojax.errors import ConfigError, NemojaxError, OutputError
    from nemojax.generate.jsonl import JsonlOutput
    from nemojax.generate.loading import load_encoder
    from nemojax.sharding import make_mesh, parse_mesh, resolve_mesh_shape

    total = check_inputs(args)
    encoder, tokenizer = load_encoder(args.checkpoint)  # a bad tokenizer or chat template fails before any work
    mesh_shape = parse_mesh(args.mesh)
    use_cpu_devices(args)
    initialize(args)
    check_cpu_devices(args)
    mesh_shape = resolve_mesh_shape(mesh_shape, jax.device_count())
    single = math.prod(mesh_shape.values()) == 1 and jax.process_count() == 1
    mesh = None if single else make_mesh(**mesh_shape)

    # Process 0 writes; every process learns how many lines are already answered (-1: it could not open).
    writer, failure = None, None
    if jax.process_index() == 0:
        try:
            writer = JsonlOutput(args.output, resume=args.resume)
        except NemojaxError as e:
            failure = e
    answered = agree(-1 if failure is not None else writer.answered if writer is not None else 0)
    if failure is not None:
        raise failure
    if answered < 0:
        raise OutputError("process 0 could not open the output file (see its message)")
    try:
        if total is not None and answered > total:
            raise ConfigError(f"--resume: {args.output} already holds {answered} records but {args.prompts} has "
                              f"only {total} lines; it is the output of another prompt file")

        def flush() -> None:  # after each batch: records to disk, and every process stops if process 0 cannot
            problem = None
            if writer is not None:
                try:
                    writer.flush()
                except OutputError as e:
                    problem = e
            if not agree(int(problem is None)):
                raise problem or OutputError("process 0 could not write the output file (see its message)")

        stats = None
        if total is None or answered < total:
            emit = writer.write if writer is not None else None
            stats = serve_lines(args, mesh, (encoder, tokenizer), total, answered, emit, flush,
                                jax.process_index() == 0)
        if writer is not None:
            writer.commit()
    finally:
        if writer is not None:
            writer.close()
    if args.stats and stats is not None and writer is not None:
        try:
            with open(args.stats, "w") as f:
                json.dump(stats, f, indent=2)
        except OSError as e:
            raise OutputError(f"--stats {args.stats}: cannot write ({e.strerror or e})") from e
    return 0


def serve_lines(args: argparse.Namespace, mesh, encoding: tuple, total: int | None, answered: int, emit, flush,
                main_process: bool) -> dict:
    """Load the checkpoint and serve the lines after the first `answered` with `encoding` (encoder,
    tokenizer): `emit(record)` per line (None: not the writing process), `flush()` after each batch.
    Returns the throughput statistics."""
    from tqdm import tqdm

    from nemojax.generate import Engine
    from nemojax.generate.jsonl import read_lines
    from nemojax.generate.loading import end_of_turn_ids, load_checkpoint
    from nemojax.generate.serving import serve_stream
    from nemojax.generate.stats import stats_record

    encoder, tokenizer = encoding
    model, variables = load_checkpoint(args.checkpoint, args.dtype, mesh, args.kv_cache_dtype)
    engine = Engine(model, variables, eos_ids=model.config.eos_token_id + end_of_turn_ids(tokenizer),
                    think_end_id=encoder.think_end_id, mesh=mesh, **engine_options(args))
    del variables  # the engine holds its own placement (on CPU devices one shared copy): free the loaded one
    with tqdm(total=total, initial=answered, disable=args.no_progress or not main_process, unit="line") as bar:
        serve_stream(read_lines(args.prompts, skip=answered), engine, encoder, tokenizer, defaults_of(args),
                     args.batch_size, emit or (lambda record: None), after_batch=flush, progress=bar,
                     segment_steps=args.segment_steps)
    # row_devices: over how many devices the rows are split, each decoding its own (1: one program for all)
    return dict(stats_record(engine.stats, engine.k), row_devices=engine.programs.row_devices(args.batch_size))


if __name__ == "__main__":
    sys.exit(main())
